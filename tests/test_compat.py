"""Other frameworks call the service in their own shapes, against the real server: OpenRLHF's
remote RM (``/get_reward``), vLLM's ``/classify`` and ``/pooling`` as verl's reward loop calls
them, text-embeddings-inference's ``/predict`` and ``/rerank``. Each reward must equal what
``/v1/score`` gives for the same input."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from transformers import AutoTokenizer

from client import RewardClient
from server import running_server

CONVERSATIONS = [
    ([{"role": "user", "content": "What is the capital of France?"}], "Paris."),
    ([{"role": "user", "content": "What is the capital of France?"}], "I think it is Lyon, but I am not sure at all."),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}], "Hi!"),
    ([{"role": "user", "content": "Write a poem about the sea"}, {"role": "assistant", "content": "The sea is wide."},
      {"role": "user", "content": "Longer please"}], "The sea is wide and deep and blue, and it is calling me and you."),
]


@pytest.fixture(scope="module")
def server(model_dirs, tmp_path_factory):
    args = [f"--model={name}={model_dirs[name]}" for name in ("llama", "gpt2", "bert")]
    args += ["--max-items", "64", "--max-wait-ms", "10"]
    with running_server(args, tmp_path_factory.mktemp("logs") / "server.log") as s:
        yield s


def v1_scores(server, model: str) -> list[float]:
    items = [{"messages": messages + [{"role": "assistant", "content": response}]} for messages, response in CONVERSATIONS]
    with RewardClient(server.url) as client:
        return client.score(items, model=model).scores


def formatted(model_dir, name: str) -> tuple[list[str], list[str]]:
    """(queries, prompts) as a trainer builds them: the chat template applied by the trainer
    (Llama), the HH transcript for a model without a template (GPT-2)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    queries, prompts = [], []
    for messages, response in CONVERSATIONS:
        if name == "llama":
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            query = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
        else:
            roles = {"user": "Human", "assistant": "Assistant", "system": "System"}
            prompt = "".join(f"\n\n{roles[m['role']]}: {m['content']}" for m in messages) + "\n\nAssistant:"
            query = prompt + " " + response + tokenizer.eos_token
        queries.append(query)
        prompts.append(prompt)
    return queries, prompts


def openrlhf_post(url: str, queries: list[str], prompts: list[str], **extra) -> list[httpx.Response]:
    """What OpenRLHF's agent does: one sample per request, many requests at once."""

    async def fire():
        async with httpx.AsyncClient(timeout=180) as http:
            return await asyncio.gather(*(
                http.post(f"{url}/get_reward", json={"query": [q], "prompts": [p], "labels": [""], **extra})
                for q, p in zip(queries, prompts)
            ))

    return asyncio.run(fire())


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_openrlhf_one_sample_per_request_gets_the_v1_score(server, model_dirs, name):
    queries, prompts = formatted(model_dirs[name], name)
    # OpenRLHF's body names no model: the default (llama, served first) scores it. Our optional
    # "model" field picks another.
    answers = openrlhf_post(server.url, queries, prompts, **({} if name == "llama" else {"model": name}))

    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    bodies = [a.json() for a in answers]
    assert all(set(b) == {"rewards", "scores", "extra_logs"} and len(b["rewards"]) == 1 for b in bodies)
    rewards = [b["rewards"][0] for b in bodies]
    assert rewards == pytest.approx(v1_scores(server, name), abs=1e-4)
    assert [b["scores"][0] for b in bodies] == rewards
    assert all(b["extra_logs"]["reward_model_tokens"][0] > 0 for b in bodies)


def test_openrlhf_several_samples_in_one_request_keep_their_order(server, model_dirs):
    queries, prompts = formatted(model_dirs["llama"], "llama")
    body = {"query": queries[::-1], "prompts": prompts[::-1], "labels": ["a", "b", "c", "d"]}

    answer = httpx.post(f"{server.url}/get_reward", json=body)

    assert answer.status_code == 200, answer.text
    assert answer.json()["rewards"] == pytest.approx(v1_scores(server, "llama")[::-1], abs=1e-4)


def test_openrlhf_empty_slice_gets_empty_lists(server):
    # With several reward URLs, OpenRLHF sends the leftover URLs empty slices.
    answer = httpx.post(f"{server.url}/get_reward", json={"query": [], "prompts": [], "labels": []})

    assert answer.status_code == 200, answer.text
    assert answer.json() == {"rewards": [], "scores": [], "extra_logs": {}}


def test_an_encoder_reads_the_query_split_at_its_prompt(server):
    # A cross-encoder reads (prompt, response): the query is split where prompts[i] ends.
    prompt, response = "What is the capital of France?", "Paris."
    answer = httpx.post(f"{server.url}/get_reward", json={"query": [prompt + " " + response], "prompts": [prompt], "model": "bert"})
    with RewardClient(server.url) as client:
        expected = client.score([{"prompt": prompt, "response": response}], model="bert").scores

    assert answer.json()["rewards"] == pytest.approx(expected, abs=1e-4)


def test_trailing_pad_tokens_of_a_decoded_rollout_are_not_scored(server, model_dirs):
    queries, prompts = formatted(model_dirs["llama"], "llama")
    clean = httpx.post(f"{server.url}/get_reward", json={"query": queries[:1]}).json()["rewards"]
    padded = httpx.post(f"{server.url}/get_reward", json={"query": [queries[0] + "<pad><pad>"]}).json()["rewards"]

    assert padded == pytest.approx(clean, abs=1e-5)


@pytest.mark.parametrize("body,mentions", [
    ({"prompts": ["p"]}, "query"),
    ({"query": "a single string"}, "query"),
    ({"query": ["a", "b"], "prompts": ["p"]}, "prompts"),
    ({"query": ["a"], "model": "no-such-model"}, "no-such-model"),
])
def test_bad_openrlhf_bodies_get_a_4xx_naming_the_field(server, body, mentions):
    answer = httpx.post(f"{server.url}/get_reward", json=body)

    assert 400 <= answer.status_code < 500, answer.text
    assert mentions in answer.json()["error"]["message"]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_verl_classify_reads_the_reward_at_data_last_probs_last(server, model_dirs, name):
    queries, _ = formatted(model_dirs[name], name)
    expected = v1_scores(server, name)
    for query, want in zip(queries, expected):
        # verl's RewardLoopWorker: the model named by its path, raw logits requested.
        payload = {"model": str(model_dirs[name]), "input": query, "use_activation": False}
        answer = httpx.post(f"{server.url}/classify", json=payload)

        assert answer.status_code == 200, answer.text
        output = answer.json()
        assert set(output) == {"id", "object", "created", "model", "data", "usage"}
        assert output["object"] == "list" and output["id"].startswith("classify-") and output["model"] == str(model_dirs[name])
        assert set(output["data"][-1]) == {"index", "label", "probs", "num_classes"} and output["data"][-1]["num_classes"] == 1
        assert output["usage"]["prompt_tokens"] == output["usage"]["total_tokens"] > 0
        assert output["data"][-1]["probs"][-1] == pytest.approx(want, abs=1e-4)


def test_classify_applies_the_sigmoid_unless_told_not_to(server, model_dirs):
    import math

    queries, _ = formatted(model_dirs["llama"], "llama")
    raw = httpx.post(f"{server.url}/classify", json={"model": "llama", "input": queries, "use_activation": False}).json()
    activated = httpx.post(f"{server.url}/classify", json={"model": "llama", "input": queries, "use_activation": True}).json()
    default = httpx.post(f"{server.url}/classify", json={"model": "llama", "input": queries}).json()
    legacy = httpx.post(f"{server.url}/classify", json={"model": "llama", "input": queries, "activation": False}).json()

    logits = [d["probs"][0] for d in raw["data"]]
    assert [d["index"] for d in raw["data"]] == list(range(len(queries)))
    assert logits == pytest.approx(v1_scores(server, "llama"), abs=1e-4)
    assert [d["probs"][0] for d in activated["data"]] == pytest.approx([1 / (1 + math.exp(-x)) for x in logits], abs=1e-6)
    assert [d["probs"][0] for d in default["data"]] == [d["probs"][0] for d in activated["data"]]
    assert [d["probs"][0] for d in legacy["data"]] == logits


def test_vllm_pooling_returns_the_reward(server, model_dirs):
    queries, _ = formatted(model_dirs["gpt2"], "gpt2")
    answer = httpx.post(f"{server.url}/pooling", json={"model": "gpt2", "input": queries})

    assert answer.status_code == 200, answer.text
    output = answer.json()
    assert output["object"] == "list" and output["id"].startswith("pool-")
    assert [d["object"] for d in output["data"]] == ["pooling"] * len(queries)
    assert [d["data"][0] for d in output["data"]] == pytest.approx(v1_scores(server, "gpt2"), abs=1e-4)


@pytest.mark.parametrize("path,body,status,mentions", [
    ("/classify", {"model": "llama"}, 422, "input"),
    ("/classify", {"model": "llama", "input": []}, 422, "input"),
    ("/classify", {"model": "/no/such/dir", "input": "x"}, 404, "/no/such/dir"),
    ("/pooling", {"model": "llama", "input": "x", "encoding_format": "base64"}, 422, "encoding_format"),
    # Nothing left to read (found by the OpenAPI fuzzer: was a 500 from the model).
    ("/classify", {"model": "bert", "input": "", "add_special_tokens": False}, 422, "empty after tokenisation"),
    # A boolean or a numeric string is not an integer (found by the OpenAPI fuzzer: true was read as 1).
    ("/classify", {"model": "bert", "input": "x", "priority": True}, 422, "priority"),
    ("/pooling", {"model": "bert", "input": "x", "truncate_prompt_tokens": "3"}, 422, "truncate_prompt_tokens"),
    # The chat form has no truncation of its own: it was ignored, and the whole chat scored (adversarial probe).
    ("/classify", {"model": "bert", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                   "truncate_prompt_tokens": 2}, 422, "truncate_prompt_tokens applies to the text form"),
    # An image part was dropped: the answer was the reward of an empty response (adversarial probe).
    ("/classify", {"model": "bert", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/cat.png"}}]}]}, 422, "messages.1.content.0.type"),
])
def test_bad_vllm_bodies_get_a_4xx_naming_the_field(server, path, body, status, mentions):
    answer = httpx.post(f"{server.url}{path}", json=body)

    assert answer.status_code == status, answer.text
    assert mentions in answer.json()["error"]["message"]


# -- text-embeddings-inference: /predict and /rerank ---------------------------------------------


def sigmoid(x: float) -> float:
    import math

    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_tei_predict_scores_a_pair_as_v1_score_and_a_text_as_get_reward(server, model_dirs, name):
    # A TEI user sends [prompt, response] pairs (and perhaps texts already formatted) to /predict.
    pairs = [("What is the capital of France?", "Paris."), ("Say hi", "Hi there, how can I help?")]
    queries, prompts = formatted(model_dirs[name], name) if name == "llama" else (["Hello there"], None)
    with RewardClient(server.url) as client:
        want_pairs = client.score([{"prompt": p, "response": r} for p, r in pairs], model=name).scores
        want_text = client.score_texts(queries[:1], model=name)
    batch = {"model": name, "inputs": [list(pairs[0]), [queries[0]], list(pairs[1])]}
    raw = httpx.post(f"{server.url}/predict", json={**batch, "raw_scores": True})
    default = httpx.post(f"{server.url}/predict", json=batch)
    one = httpx.post(f"{server.url}/predict", json={"model": name, "inputs": list(pairs[0]), "raw_scores": True})

    assert raw.status_code == default.status_code == one.status_code == 200, (raw.text, default.text, one.text)
    assert [len(p) for p in raw.json()] == [1, 1, 1] and {p[0]["label"] for p in raw.json()} == {"LABEL_0"}
    assert [p[0]["score"] for p in raw.json()] == pytest.approx([want_pairs[0], want_text[0], want_pairs[1]], abs=1e-4)
    assert [p[0]["score"] for p in default.json()] == pytest.approx([sigmoid(p[0]["score"]) for p in raw.json()], abs=1e-6)
    # One input (not a batch) is answered with its list of predictions, not a list of lists.
    assert len(one.json()) == 1 and one.json()[0]["score"] == pytest.approx(want_pairs[0], abs=1e-4), one.json()


def test_tei_rerank_puts_the_best_response_first(server):
    query, texts = "What is the capital of France?", ["I do not know.", "Paris.", "Paris is the capital of France."]
    with RewardClient(server.url) as client:
        want = client.score([{"prompt": query, "response": t} for t in texts], model="bert").scores
    answer = httpx.post(f"{server.url}/rerank", json={"model": "bert", "query": query, "texts": texts, "raw_scores": True})
    with_text = httpx.post(f"{server.url}/rerank", json={"model": "bert", "query": query, "texts": texts, "return_text": True})

    assert answer.status_code == with_text.status_code == 200, (answer.text, with_text.text)
    ranks = answer.json()
    assert [r["index"] for r in ranks] == sorted(range(3), key=lambda i: -want[i])
    assert [r["score"] for r in ranks] == pytest.approx(sorted(want, reverse=True), abs=1e-4)
    assert all("text" not in r for r in ranks)
    assert [(r["text"], r["score"]) for r in with_text.json()] == [
        (texts[r["index"]], pytest.approx(sigmoid(r["score"]), abs=1e-6)) for r in ranks
    ]


def test_tei_truncate_false_refuses_an_input_the_model_would_cut(server):
    long = "word " * 5000
    refused = httpx.post(f"{server.url}/predict", json={"model": "bert", "inputs": [["q", "a"], ["q", long]], "truncate": False})
    cut = httpx.post(f"{server.url}/predict", json={"model": "bert", "inputs": [["q", "a"], ["q", long]]})

    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["type"] == "input_too_long" and error["message"].startswith("input 1 is longer than the"), error
    assert "truncate: true" in error["message"]
    assert cut.status_code == 200 and len(cut.json()) == 2, cut.text


@pytest.mark.parametrize("path,body,mentions", [
    ("/predict", {"inputs": []}, "inputs"),
    ("/predict", {"inputs": ["a", "b", "c"]}, "at most 2"),
    ("/predict", {"inputs": [["a"], "b"]}, "inputs.1"),
    ("/predict", {"inputs": 3}, "a text, a pair [text, text], or a batch"),
    ("/predict", {"inputs": "x", "raw_scores": "yes"}, "raw_scores"),
    ("/predict", {"inputs": "x", "truncation_direction": "up"}, "truncation_direction"),
    ("/rerank", {"query": "q", "texts": []}, "texts"),
    ("/rerank", {"texts": ["a"]}, "query"),
])
def test_bad_tei_bodies_get_a_422_naming_the_field(server, path, body, mentions):
    answer = httpx.post(f"{server.url}{path}", json={"model": "bert", **body})

    assert answer.status_code == 422, answer.text
    assert mentions in answer.json()["error"]["message"]
