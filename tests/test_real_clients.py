"""What the real trainers send, built as their code builds it, against the real server (issue #19).
Each must get the reward ``/v1/score`` gives the same conversation.

- OpenRLHF (3c3be623, ``SingleTurnAgentExecutor``): the query is ``decode(prompt_ids +
  generated_ids)``, the prompt rendered with the policy's template and the generation ending at
  its stop token, the end-of-turn token (``<|im_end|>``), not at what the template writes after it.
- verl (b178a3cd, ``RewardLoopWorker._preprocess_reward_inputs``): the RM tokenizer's template
  on the whole chat, its BOS stripped, posted to ``/classify`` with ``"activation": false``;
  and custom reward functions, loaded by file path and called with verl's keywords.
- vLLM's chat form of ``/classify`` and ``/pooling``.

The decoders are tiny random Llamas with the templates of ChatML (Qwen), Llama 3 and Gemma; the
encoder is the shipped default model.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import inspect
import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import tiny_models
from client import RewardClient
from server import REPO_ROOT, running_server

DEFAULT_RM = (REPO_ROOT / "models" / "default-rm").resolve()

CONVERSATIONS = [
    ([{"role": "user", "content": "What is the capital of France?"}], "Paris is the capital of France."),
    ([{"role": "user", "content": "What is the capital of France?"}], "I think it is Lyon, but I am not sure."),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}], "Hi!"),
    ([{"role": "user", "content": "Write a poem about the sea"}, {"role": "assistant", "content": "The sea is wide."},
      {"role": "user", "content": "Longer please"}], "The sea is wide and deep and blue."),
]
FAMILIES = list(tiny_models.REAL_TEMPLATES)  # chatml, llama3, gemma


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("real-templates")
    paths = {f: tiny_models.build_templated_decoder(root / f, f) for f in FAMILIES}
    # The same weights as "chatml", trained the OpenRLHF way: read at the EOS.
    paths["chatml-eos"] = tiny_models.build_templated_decoder(root / "chatml-eos", "chatml", read_reward_at="eos")
    paths["default"] = DEFAULT_RM
    return paths


@pytest.fixture(scope="module")
def server(model_paths, tmp_path_factory):
    args = [f"--model={name}={path}" for name, path in model_paths.items()] + ["--max-wait-ms", "5"]
    with running_server(args, tmp_path_factory.mktemp("logs") / "server.log") as s:
        yield s


def v1_scores(server, model: str, conversations=CONVERSATIONS) -> list[float]:
    items = [{"messages": m + [{"role": "assistant", "content": r}]} for m, r in conversations]
    with RewardClient(server.url) as client:
        return client.score(items, model=model).scores


def openrlhf_sample(tokenizer, messages, response, end_of_turn) -> tuple[str, str]:
    """(query, prompt) as OpenRLHF's SingleTurnAgentExecutor builds them: the prompt rendered with
    the generation prompt and tokenised without special tokens; vLLM's output ids end with the
    stop token; the query is the decode of both, special tokens kept."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    action_ids = tokenizer(response + end_of_turn, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(prompt_ids + action_ids, skip_special_tokens=False), prompt


def verl_rm_input(tokenizer, messages, response) -> str:
    """verl's RewardLoopWorker._preprocess_reward_inputs: the RM tokenizer's template on the chat
    (no generation prompt), the template's BOS stripped."""
    text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], add_generation_prompt=False, tokenize=False)
    if tokenizer.bos_token is not None and text.startswith(tokenizer.bos_token):
        text = text[len(tokenizer.bos_token):]
    return text


def get_rewards(server, queries, prompts, model) -> list[float]:
    rewards = []
    for query, prompt in zip(queries, prompts):  # one sample per request, as OpenRLHF sends them
        answer = httpx.post(f"{server.url}/get_reward", json={"query": [query], "prompts": [prompt], "labels": [""], "model": model})
        assert answer.status_code == 200, answer.text
        rewards.append(answer.json()["rewards"][0])
    return rewards


# --------------------------------------------------------------------------- 1. the reward's token


@pytest.mark.parametrize("name", FAMILIES + ["chatml-eos"])
def test_openrlhf_rollout_cut_at_the_end_of_turn_gets_the_v1_score(server, model_paths, name):
    family = name.split("-")[0]
    tokenizer = AutoTokenizer.from_pretrained(model_paths[name])
    end_of_turn = tiny_models.REAL_TEMPLATES[family]["end_of_turn"]
    samples = [openrlhf_sample(tokenizer, m, r, end_of_turn) for m, r in CONVERSATIONS]
    assert all(q.endswith(end_of_turn) for q, _ in samples)

    rewards = get_rewards(server, [q for q, _ in samples], [p for _, p in samples], name)

    assert rewards == pytest.approx(v1_scores(server, name), abs=1e-4)


@pytest.mark.parametrize("name", FAMILIES + ["chatml-eos"])
def test_verl_reward_loop_input_gets_the_v1_score(server, model_paths, name):
    tokenizer = AutoTokenizer.from_pretrained(model_paths[name])
    rewards = []
    for messages, response in CONVERSATIONS:
        payload = {"model": str(model_paths[name]), "input": verl_rm_input(tokenizer, messages, response), "activation": False}
        answer = httpx.post(f"{server.url}/classify", json=payload)
        assert answer.status_code == 200, answer.text
        rewards.append(answer.json()["data"][-1]["probs"][-1])

    assert rewards == pytest.approx(v1_scores(server, name), abs=1e-4)


def test_an_eos_model_reads_its_reward_where_openrlhf_trained_it(server, model_paths):
    # OpenRLHF's RewardDataset: (prompt + response).rstrip("\n"), then " " + eos unless it ends
    # with it; the reward is the value at that last token.
    path = model_paths["chatml-eos"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    expected = []
    for messages, response in CONVERSATIONS:
        text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False).rstrip("\n")
        if not text.endswith(tokenizer.eos_token):
            text += " " + tokenizer.eos_token
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.inference_mode():
            expected.append(model(input_ids=ids).logits[0, 0].item())

    served = v1_scores(server, "chatml-eos")

    assert served == pytest.approx(expected, abs=1e-4)
    # the same weights read after the template's "\n" give other rewards
    assert all(abs(a - b) > 1e-3 for a, b in zip(served, v1_scores(server, "chatml")))


# --------------------------------------------------------------------------- 2. encoders get their pair


def test_the_default_model_ships_a_chat_template_and_verl_text_gets_the_v1_score(server):
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_RM)
    assert tokenizer.chat_template, "verl formats with the RM tokenizer's template: without one every sample fails"
    rewards = []
    for messages, response in CONVERSATIONS:
        payload = {"model": str(DEFAULT_RM), "input": verl_rm_input(tokenizer, messages, response), "activation": False}
        answer = httpx.post(f"{server.url}/classify", json=payload)
        assert answer.status_code == 200, answer.text
        rewards.append(answer.json()["data"][-1]["probs"][-1])

    assert rewards == pytest.approx(v1_scores(server, "default"), abs=1e-4)


def test_an_openrlhf_chatml_query_loses_its_markup_before_an_encoder_reads_it(server, model_paths):
    policy = AutoTokenizer.from_pretrained(model_paths["chatml"])  # a Qwen-style policy's template
    samples = [openrlhf_sample(policy, m, r, "<|im_end|>") for m, r in CONVERSATIONS]

    rewards = get_rewards(server, [q for q, _ in samples], [p for _, p in samples], "default")

    assert rewards == pytest.approx(v1_scores(server, "default"), abs=1e-4)


def test_text_in_no_known_chat_format_is_still_one_segment(server):
    text = "What is the capital of France? Paris."
    answer = httpx.post(f"{server.url}/get_reward", json={"query": [text], "model": "default"})
    with RewardClient(server.url) as client:
        as_pair = client.score([{"prompt": "What is the capital of France?", "response": "Paris."}], model="default").scores

    assert answer.status_code == 200, answer.text
    assert answer.json()["rewards"][0] != pytest.approx(as_pair[0], abs=1e-4)


# --------------------------------------------------------------------------- 3. verl, for real


def load_like_verl(path: Path | str, name: str, reward_kwargs: dict):
    """verl.utils.import_utils.load_module (``pkg://`` a module, else a file path loaded under a
    module name of its own) and verl.trainer.ppo.reward.get_custom_reward_fn (reward_kwargs merged
    over the call's keywords)."""
    if isinstance(path, str) and path.startswith("pkg://"):
        module = importlib.import_module(path[len("pkg://"):].replace("/", "."))
    else:
        spec = importlib.util.spec_from_file_location(f"custom_module_{hash(str(Path(path).resolve()))}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    raw_fn = getattr(module, name)

    if inspect.iscoroutinefunction(raw_fn):
        async def call(*args, **kwargs):
            return await raw_fn(*args, **{**kwargs, **reward_kwargs})
        return call
    return functools.partial(lambda fn, *args, **kwargs: fn(*args, **{**kwargs, **reward_kwargs}), raw_fn)


VERL_SAMPLES = [  # extra_info as verl's data preparation leaves it: the prompt under "prompt" or "question"
    ({"split": "train", "index": 0, "question": "What is the capital of France?"}, "Paris is the capital of France."),
    ({"split": "train", "index": 1, "prompt": np.array([{"role": "system", "content": "Be brief."},
                                                        {"role": "user", "content": "Say hi"}], dtype=object)}, "Hi!"),
]


def expected_for_verl(server, model):
    items = [{"prompt": "What is the capital of France?", "response": "Paris is the capital of France."},
             {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}], "response": "Hi!"}]
    with RewardClient(server.url) as client:
        return client.score(items, model=model).scores


@pytest.mark.parametrize("model,where", [("default", "file"), ("chatml", "file"), ("default", "pkg://client.verl")])
def test_verl_custom_reward_function_called_as_the_naive_manager_calls_it(server, model, where):
    path = REPO_ROOT / "client" / "verl.py" if where == "file" else where
    compute_score = load_like_verl(path, "compute_score", {"reward_url": server.url, "reward_model": model})

    scores = [
        compute_score(data_source="openai/gsm8k", solution_str=response, ground_truth="42", extra_info=dict(info))
        for info, response in VERL_SAMPLES
    ]

    assert scores == pytest.approx(expected_for_verl(server, model), abs=1e-4)
    assert all(isinstance(s, float) for s in scores)

    async def reward_loop():  # the reward loop runs a plain function in its thread pool, many at once
        loop = asyncio.get_running_loop()
        return await asyncio.gather(*(
            loop.run_in_executor(None, lambda i=i, r=r: compute_score(data_source="x", solution_str=r, ground_truth="", extra_info=dict(i)))
            for i, r in VERL_SAMPLES * 4
        ))

    assert asyncio.run(reward_loop()) == pytest.approx(expected_for_verl(server, model) * 4, abs=1e-4)


def test_verl_async_reward_function_awaited_concurrently_by_the_reward_loop(server):
    compute_score = load_like_verl(REPO_ROOT / "client" / "verl.py", "compute_score_async", {"reward_url": server.url, "reward_model": "default"})
    assert inspect.iscoroutinefunction(compute_score)

    async def reward_loop():  # RewardLoopWorker: one task per sample, gathered; its own keywords added
        extra = {"reward_router_address": None, "reward_model_tokenizer": None}
        return await asyncio.gather(*(
            compute_score(data_source="gsm8k", solution_str=r, ground_truth="x", extra_info=dict(i), **extra)
            for i, r in VERL_SAMPLES * 3
        ))

    scores = asyncio.run(reward_loop())

    assert scores == pytest.approx(expected_for_verl(server, "default") * 3, abs=1e-4)


def test_verl_batch_reward_function_and_a_missing_prompt(server):
    compute_score = load_like_verl(REPO_ROOT / "client" / "verl.py", "compute_score_batch", {"reward_url": server.url, "reward_model": "default"})

    scores = compute_score(
        data_sources=np.array(["gsm8k", "gsm8k"], dtype=object), solution_strs=[r for _, r in VERL_SAMPLES],
        ground_truths=["42", "hi"], extra_infos=np.array([dict(i) for i, _ in VERL_SAMPLES], dtype=object),
    )
    assert scores == pytest.approx(expected_for_verl(server, "default"), abs=1e-4)

    single = load_like_verl(REPO_ROOT / "client" / "verl.py", "compute_score", {"reward_url": server.url})
    with pytest.raises(ValueError, match="extra_info"):
        single(data_source="gsm8k", solution_str="4", ground_truth="4", extra_info={"split": "train"})


VERL_RAY_WORKER = r"""
import json, sys
import cloudpickle
compute_score = cloudpickle.loads(sys.stdin.buffer.read())
samples = json.loads(sys.argv[1])
print(json.dumps([compute_score(data_source="gsm8k", solution_str=r, ground_truth="", extra_info=i) for i, r in samples]))
"""


@pytest.mark.parametrize("where", ["file", "pkg://client.verl"])
def test_verl_custom_reward_function_shipped_to_a_ray_worker(server, where):
    # verl's reward loop with reward_manager=remote hands the loaded function (verl's partial around
    # it) to Ray workers, RewardComputeWorker.remote(self.compute_score), as
    # reward_model.launch_reward_fn_async does with the reward manager: Ray pickles it with
    # cloudpickle, which pickles a function of a file-loaded module (not in sys.modules) by value.
    cloudpickle = pytest.importorskip("cloudpickle")
    path = REPO_ROOT / "client" / "verl.py" if where == "file" else where
    compute_score = load_like_verl(path, "compute_score", {"reward_url": server.url, "reward_model": "default"})
    compute_score(data_source="x", solution_str="Hi!", ground_truth="", extra_info=dict(VERL_SAMPLES[0][0]))  # a client cached
    samples = [({"question": "What is the capital of France?"}, "Paris is the capital of France."),
               ({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]}, "Hi!")]

    worker = subprocess.run([sys.executable, "-c", VERL_RAY_WORKER, json.dumps(samples)], input=cloudpickle.dumps(compute_score),
                            capture_output=True, cwd=REPO_ROOT, timeout=120, check=False)

    assert worker.returncode == 0, worker.stderr.decode()
    assert json.loads(worker.stdout) == pytest.approx(expected_for_verl(server, "default"), abs=1e-4)


# --------------------------------------------------------------------------- 4. vLLM's chat form


@pytest.mark.parametrize("name", ["chatml", "default"])
def test_vllm_chat_bodies_of_classify_and_pooling_are_scored_through_the_template(server, name):
    expected = v1_scores(server, name)
    for (messages, response), want in zip(CONVERSATIONS, expected):
        chat = messages + [{"role": "assistant", "content": [{"type": "text", "text": response}]}]
        classified = httpx.post(f"{server.url}/classify", json={"model": name, "messages": chat, "use_activation": False})
        pooled = httpx.post(f"{server.url}/pooling", json={"model": name, "messages": chat})

        assert classified.status_code == 200, classified.text
        assert pooled.status_code == 200, pooled.text
        assert classified.json()["data"][-1]["probs"][-1] == pytest.approx(want, abs=1e-4)
        assert pooled.json()["data"][0]["data"][0] == pytest.approx(want, abs=1e-4)
        assert classified.json()["usage"]["prompt_tokens"] > 0


@pytest.mark.parametrize("body,mentions", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "assistant"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "input": "x"}, "one of the two"),
])
def test_bad_chat_bodies_get_a_422_naming_the_problem(server, body, mentions):
    answer = httpx.post(f"{server.url}/classify", json={"model": "chatml", **body})

    assert answer.status_code == 422, answer.text
    assert mentions in answer.json()["error"]["message"]


def test_slime_remote_rm_body_gets_the_v1_score(server, model_paths):
    # slime's remote_rm posts {"prompt": sample.prompt, "response": sample.response, "label": ...}
    # and takes the JSON answer as the reward; its prompt is messages or the policy's templated text.
    policy = AutoTokenizer.from_pretrained(model_paths["chatml"])
    for name in ("chatml", "default"):
        for (messages, response), want in zip(CONVERSATIONS, v1_scores(server, name)):
            templated = policy.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            for prompt in (messages, templated):
                answer = httpx.post(f"{server.url}/slime_reward", json={"prompt": prompt, "response": response, "label": "x", "model": name})
                assert answer.status_code == 200, answer.text
                assert answer.json() == pytest.approx(want, abs=1e-4)
