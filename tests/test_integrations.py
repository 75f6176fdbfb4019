"""Reward functions for TRL and other trainers, called the way those trainers call them
(keyword arguments, extra dataset columns, async on another event loop), against the real
server. Their rewards must equal /v1/score's for the same conversations."""

from __future__ import annotations

import asyncio
import inspect
import json
import pickle
import subprocess
import sys
import threading

import pytest
from transformers import AutoTokenizer

from client import RewardClient, RewardServiceError
from client.integrations import text_reward_fn, trl_async_reward_func, trl_reward_func
from server import REPO_ROOT, free_port, running_server

PROMPTS = ["What is the capital of France?", "Say hi"]
COMPLETIONS = ["Paris.", "Go away."]
CONVERSATIONAL_PROMPTS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Say hi"}],
]
CONVERSATIONAL_COMPLETIONS = [[{"role": "assistant", "content": "Paris."}], [{"role": "assistant", "content": "Go away."}]]


@pytest.fixture(scope="module")
def server(model_dirs, tmp_path_factory):
    args = [f"--model=llama={model_dirs['llama']}", f"--model=bert={model_dirs['bert']}", "--max-wait-ms", "5"]
    with running_server(args, tmp_path_factory.mktemp("logs") / "server.log") as s:
        yield s


def trl_kwargs(prompts, completions) -> dict:
    """Everything GRPOTrainer passes: completion token ids, dataset columns, its state and loggers."""
    return dict(
        prompts=prompts, completions=completions, completion_ids=[[1, 2, 3]] * len(completions),
        ground_truth=["Paris", "Hello"], trainer_state=object(), log_extra=lambda *a: None, log_metric=lambda *a: None,
    )


def v1(server, items, model="llama") -> list[float]:
    with RewardClient(server.url) as client:
        return client.score(items, model=model).scores


@pytest.mark.parametrize("model", ["llama", "bert"])
def test_trl_standard_format(server, model):
    reward_func = trl_reward_func(server.url, model=model)

    rewards = reward_func(**trl_kwargs(PROMPTS, COMPLETIONS))

    expected = v1(server, [{"prompt": p, "response": c} for p, c in zip(PROMPTS, COMPLETIONS)], model)
    assert rewards == pytest.approx(expected, abs=1e-4)
    assert reward_func.__name__ == "reward_model"


def test_trl_conversational_format(server):
    reward_func = trl_reward_func(server.url, model="llama", name="rm_llama")

    rewards = reward_func(**trl_kwargs(CONVERSATIONAL_PROMPTS, CONVERSATIONAL_COMPLETIONS))

    expected = v1(server, [{"messages": p + c} for p, c in zip(CONVERSATIONAL_PROMPTS, CONVERSATIONAL_COMPLETIONS)])
    assert rewards == pytest.approx(expected, abs=1e-4)
    assert reward_func.__name__ == "rm_llama"


def test_trl_async_flavour_runs_concurrently_on_a_loop_of_its_own(server):
    reward_func = trl_async_reward_func(server.url, model="llama")
    assert inspect.iscoroutinefunction(reward_func), "TRL picks the async path with inspect.iscoroutinefunction"

    # TRL runs async reward functions on an event loop in a separate thread and gathers them.
    results = {}

    def trl_loop_thread():
        async def gather():
            return await asyncio.gather(
                reward_func(**trl_kwargs(PROMPTS, COMPLETIONS)),
                reward_func(**trl_kwargs(CONVERSATIONAL_PROMPTS, CONVERSATIONAL_COMPLETIONS)),
            )
        results["rewards"] = asyncio.run(gather())

    thread = threading.Thread(target=trl_loop_thread)
    thread.start()
    thread.join(timeout=120)

    standard, conversational = results["rewards"]
    assert standard == pytest.approx(v1(server, [{"prompt": p, "response": c} for p, c in zip(PROMPTS, COMPLETIONS)]), abs=1e-4)
    assert conversational == pytest.approx(
        v1(server, [{"messages": p + c} for p, c in zip(CONVERSATIONAL_PROMPTS, CONVERSATIONAL_COMPLETIONS)]), abs=1e-4
    )


def test_an_unreachable_service_raises_or_gives_none_as_asked():
    url = f"http://127.0.0.1:{free_port()}"
    strict = trl_reward_func(url, max_retries=0, timeout=5)
    lenient = trl_reward_func(url, on_error="none", max_retries=0, timeout=5)

    with pytest.raises(RewardServiceError, match="cannot reach"):
        strict(**trl_kwargs(PROMPTS, COMPLETIONS))
    # TRL turns None into NaN and leaves those completions out of the reward.
    assert lenient(**trl_kwargs(PROMPTS, COMPLETIONS)) == [None, None]


def test_text_reward_fn_scores_formatted_texts_like_v1_score(server, model_dirs):
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["llama"])
    conversations = [p + c for p, c in zip(CONVERSATIONAL_PROMPTS, CONVERSATIONAL_COMPLETIONS)]
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    reward_fn = text_reward_fn(server.url, model="llama", chunk_size=1)  # one request per text, merged in order

    assert reward_fn(texts) == pytest.approx(v1(server, [{"messages": c} for c in conversations]), abs=1e-4)
    assert reward_fn([]) == []


# TRL's AsyncGRPOTrainer (trl.experimental.async_grpo, main at f2cd577): AsyncRolloutWorker.start()
# checks pickle.dumps(reward_funcs) and refuses what does not pickle (closures), then a spawned
# process unpickles them; _score_group calls a plain function with asyncio.to_thread and awaits an
# async one (inspect.iscoroutinefunction), all gathered, with keywords only; the function names
# come from get_callable_name (``__name__``). Rebuilt here without TRL.
SPAWNED_ROLLOUT_PROCESS = r"""
import asyncio, inspect, json, pickle, sys
reward_funcs = pickle.loads(sys.stdin.buffer.read())
kwargs = json.loads(sys.argv[1])
async def score_group():
    return await asyncio.gather(*[
        f(**kwargs) if inspect.iscoroutinefunction(f) else asyncio.to_thread(f, **kwargs) for f in reward_funcs
    ])
print(json.dumps({"names": [getattr(f, "__name__", type(f).__name__) for f in reward_funcs],
                  "rewards": asyncio.run(score_group())}))
"""


def test_trl_functions_pickle_into_a_spawned_process_as_async_grpo_sends_them(server):
    funcs = [trl_reward_func(server.url, model="llama"), trl_async_reward_func(server.url, model="bert", name="rm_bert")]
    assert [inspect.iscoroutinefunction(f) for f in funcs] == [False, True]
    payload = pickle.dumps(funcs)  # what AsyncRolloutWorker.start() checks before spawning
    kwargs = {"prompts": CONVERSATIONAL_PROMPTS, "completions": CONVERSATIONAL_COMPLETIONS,
              "completion_ids": [[1, 2, 3]] * 2, "ground_truth": ["Paris", "Hello"]}

    child = subprocess.run([sys.executable, "-c", SPAWNED_ROLLOUT_PROCESS, json.dumps(kwargs)], input=payload,
                           capture_output=True, cwd=REPO_ROOT, timeout=120, check=False)

    assert child.returncode == 0, child.stderr.decode()
    answer = json.loads(child.stdout)
    assert answer["names"] == ["reward_model", "rm_bert"]
    items = [{"messages": p + c} for p, c in zip(CONVERSATIONAL_PROMPTS, CONVERSATIONAL_COMPLETIONS)]
    assert answer["rewards"][0] == pytest.approx(v1(server, items, "llama"), abs=1e-4)
    assert answer["rewards"][1] == pytest.approx(v1(server, items, "bert"), abs=1e-4)
    funcs[0].client.close()


def test_a_trl_function_around_a_caller_s_client_says_why_it_does_not_pickle(server):
    with RewardClient(server.url) as client:
        reward_func = trl_reward_func(client=client)
        with pytest.raises(TypeError, match="client="):
            pickle.dumps(reward_func)
