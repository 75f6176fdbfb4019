"""The path of a score request, end to end: `reward serve` on loopback, our client over HTTP,
real models (tiny random-init BERT, Llama and GPT-2, and the pretrained MiniLM)."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from client import AsyncRewardClient, RewardClient, RewardServiceError
from server import running_server
from reward_core.formatting import encode_items
from reward_core.model_dir import load_spec

MAX_ITEMS = 256
MAX_BODY = 400_000
ITEMS = [
    {"prompt": "What is the capital of France?", "response": "Paris."},
    {"prompt": "What is the capital of France?", "response": "I think it is Lyon, but I am not sure at all."},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}], "response": "Hi!"},
    {"messages": [
        {"role": "user", "content": "Write a poem about the sea"},
        {"role": "assistant", "content": "The sea is wide."},
        {"role": "user", "content": "Longer please"},
        {"role": "assistant", "content": "The sea is wide and deep and blue, and it is calling me and you."},
    ]},
]


@pytest.fixture(scope="module")
def server(model_dirs, tmp_path_factory):
    args = [f"--model={name}={path}" for name, path in model_dirs.items()]
    args += ["--max-items", str(MAX_ITEMS), "--max-body-bytes", str(MAX_BODY), "--max-batch-tokens", "2048", "--max-wait-ms", "10"]
    with running_server(args, tmp_path_factory.mktemp("logs") / "server.log") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with RewardClient(server.url) as c:
        yield c


def in_process_scores(model_dir, items) -> list[float]:
    """The reference: Hugging Face's own forward, one unpadded item at a time."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    spec = load_spec(model_dir, model.config, tokenizer)
    scores = []
    with torch.inference_mode():
        for encoded in encode_items(items, tokenizer, spec):
            inputs = {"input_ids": torch.tensor([encoded.input_ids])}
            if encoded.token_type_ids is not None:
                inputs["token_type_ids"] = torch.tensor([encoded.token_type_ids])
            scores.append(model(**inputs).logits[0, 0].item())
    return scores


@pytest.mark.parametrize("name", ["bert", "llama", "gpt2", "minilm"])
def test_served_scores_match_an_in_process_forward(client, model_dirs, name):
    response = client.score(ITEMS, model=name)

    assert response.model.startswith(f"{name}@")
    assert response.scores == pytest.approx(in_process_scores(model_dirs[name], ITEMS), abs=1e-4)
    assert response.usage.items == len(ITEMS) and response.usage.truncated == 0 and response.usage.tokens > 0


def test_first_model_is_the_default(client):
    assert client.score(ITEMS[:1]).model.startswith("bert@")


def test_order_is_kept_when_a_request_is_split_across_batches(server, model_dirs):
    # 200 items of very different lengths: the batcher sorts them by length and cuts them into
    # several 2048-token batches; the answer must still come back in item order.
    items = [{"prompt": f"question {i} " + "word " * (i % 37), "response": "answer " * (1 + (i * 7) % 50)} for i in range(200)]
    with RewardClient(server.url, chunk_size=MAX_ITEMS) as c:
        together = c.score(items, model="gpt2").scores
    one_by_one = [RewardClient(server.url).score([item], model="gpt2").scores[0] for item in items[:40]]
    assert together[:40] == pytest.approx(one_by_one, abs=1e-4)
    assert together == pytest.approx(in_process_scores(model_dirs["gpt2"], items), abs=1e-4)


def _histogram(metrics_text: str, name: str, model: str) -> tuple[float, float]:
    def value(suffix: str) -> float:
        match = re.search(rf'^{name}_{suffix}{{model="{model}"}} ([0-9.e+]+)$', metrics_text, re.M)
        return float(match.group(1)) if match else 0.0

    return value("sum"), value("count")


def test_concurrent_requests_are_batched_together_and_each_gets_its_own_scores(server):
    before = httpx.get(f"{server.url}/metrics").text
    requests = [[{"prompt": f"Request {i}: what is {i} + {i}?", "response": f"It is {2 * i}."}] * 2 for i in range(64)]

    async def fire():
        async with AsyncRewardClient(server.url, max_concurrency=64) as c:
            return await asyncio.gather(*(c.score(items, model="llama") for items in requests))

    answers = asyncio.run(fire())

    expected = RewardClient(server.url).score([items[0] for items in requests], model="llama").scores
    for answer, want in zip(answers, expected):
        assert answer.scores == pytest.approx([want, want], abs=1e-4)
    after = httpx.get(f"{server.url}/metrics").text
    rows = _histogram(after, "reward_batch_size", "llama")[0] - _histogram(before, "reward_batch_size", "llama")[0]
    batches = _histogram(after, "reward_batch_size", "llama")[1] - _histogram(before, "reward_batch_size", "llama")[1]
    assert rows >= 128 and batches < 64, f"{rows} rows in {batches} forward passes: no cross-request batching"


def test_truncation_keeps_the_response_and_the_end_of_the_prompt(client):
    # tiny BERT reads at most 128 tokens; these prompts are far longer.
    tail = "Finally: which planet is largest?"
    response = "Jupiter is the largest planet."
    filler = "and so on " * 100
    a = {"prompt": "Alpha. " + filler + tail, "response": response}
    b = {"prompt": "Omega. " + filler + tail, "response": response}
    c = {"prompt": "Alpha. " + filler + "Finally: which planet is smallest?", "response": response}
    scored = client.score([a, b, c], model="bert")

    assert scored.usage.truncated == 3 and scored.usage.tokens == 3 * 128
    assert scored.scores[0] == pytest.approx(scored.scores[1], abs=1e-6), "the start of the prompt was kept"
    assert scored.scores[0] != pytest.approx(scored.scores[2], abs=1e-6), "the end of the prompt was dropped"


def test_compare_gives_both_rewards_and_the_bradley_terry_probability(client):
    result = client.compare([{"prompt": "Say hi", "a": "Hi!", "b": "Go away."}], model="minilm")
    scores = client.score([{"prompt": "Say hi", "response": "Hi!"}, {"prompt": "Say hi", "response": "Go away."}], model="minilm").scores

    pair = result.results[0]
    assert [pair.reward_a, pair.reward_b] == pytest.approx(scores, abs=1e-4)
    assert pair.p_a_better == pytest.approx(float(torch.sigmoid(torch.tensor(scores[0] - scores[1]))), abs=1e-5)


def test_models_health_readiness_metrics_and_docs(server, model_dirs):
    models = httpx.get(f"{server.url}/v1/models").json()["data"]
    assert [m["name"] for m in models] == list(model_dirs)
    assert models[0]["default"] and models[0]["architecture"] == "encoder" and models[1]["architecture"] == "decoder"
    assert {"path", "backend", "max_length", "dtype"} <= set(models[0])
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    for probe in ("/healthz", "/readyz"):  # some balancers' health checks send HEAD
        head = httpx.head(f"{server.url}{probe}")
        assert head.status_code == 200 and head.content == b""
    metrics = httpx.get(f"{server.url}/metrics").text
    for family in ("reward_requests_total", "reward_request_latency_seconds_bucket", "reward_batch_size_bucket",
                   "reward_batch_tokens_bucket", "reward_queue_depth", "reward_items_scored_total", "reward_tokens_scored_total"):
        assert family in metrics
    assert httpx.get(f"{server.url}/docs").status_code == 200
    assert "/v1/score" in httpx.get(f"{server.url}/openapi.json").json()["paths"]


def test_normalize_without_statistics_is_refused_with_a_reason(client):
    with pytest.raises(RewardServiceError) as err:
        client.score(ITEMS[:1], normalize=True)
    assert err.value.status == 400 and "reward_mean" in err.value.message


GOOD = {"prompt": "p", "response": "r"}
BAD_BODIES = [
    ("empty items", {"items": []}, 422, "items"),
    ("items not a list", {"items": "hello"}, 422, "items"),
    ("item of the wrong type", {"items": [42]}, 422, "items.0"),
    ("missing response", {"items": [{"prompt": "p"}]}, 422, "items.0.response"),
    ("response not a string", {"items": [{"prompt": "p", "response": 5}]}, 422, "items.0.response"),
    ("misspelt field", {"items": [{"prompt": "p", "respone": "r"}]}, 422, "respone"),
    ("messages not ending with the assistant", {"items": [{"messages": [{"role": "user", "content": "x"}]}]}, 422, "assistant"),
    ("unknown role", {"items": [{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}]}, 422, "role"),
    ("unknown model", {"model": "no-such-model", "items": [GOOD]}, 404, "no-such-model"),
    # JSON true/false only, as numbers refuse booleans (lax parsing read "no" as false and 1 as true)
    ("a flag as a string", {"items": [GOOD], "normalize": "no"}, 422, "normalize"),
    ("a flag as a number", {"items": [GOOD], "return_objectives": 1}, 422, "return_objectives"),
    ("too many items", {"items": [GOOD] * (MAX_ITEMS + 1)}, 413, "--max-items"),
    ("body too large", {"items": [{"prompt": "x" * (MAX_BODY + 10), "response": "r"}]}, 413, "--max-body-bytes"),
]


@pytest.mark.parametrize("case,body,status,mentions", BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_bad_input_gets_a_4xx_that_says_what_to_fix(server, case, body, status, mentions):
    answer = httpx.post(f"{server.url}/v1/score", json=body, timeout=30)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["code"] == status and mentions in error["message"] and error["request_id"]


@pytest.mark.parametrize("content", [b"\xff\xfe{not utf-8", b"this is not json", b"", b'{"items": [', b"[1, 2]"])
def test_bodies_that_are_not_json_objects_get_a_4xx(server, content):
    answer = httpx.post(f"{server.url}/v1/score", content=content, headers={"content-type": "application/json"})
    assert 400 <= answer.status_code < 500, answer.text
    assert "JSON" in answer.json()["error"]["message"] or "body" in answer.json()["error"]["message"]


def test_a_streamed_body_over_the_limit_is_refused_without_content_length(server):
    def chunks():
        for _ in range(MAX_BODY // 10_000 + 2):
            yield b" " * 10_000

    answer = httpx.post(f"{server.url}/v1/score", content=chunks(), headers={"content-type": "application/json"})
    assert answer.status_code == 413


def test_bad_requests_do_not_disturb_other_clients(server):
    async def fire():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as h:
            good = [h.post("/v1/score", json={"items": [GOOD], "model": "bert"}) for _ in range(16)]
            bad = [h.post("/v1/score", content=b"\xff garbage") for _ in range(16)]
            return await asyncio.gather(*good, *bad)

    answers = asyncio.run(fire())
    assert [a.status_code for a in answers[:16]] == [200] * 16
    assert all(400 <= a.status_code < 500 for a in answers[16:])
    assert httpx.get(f"{server.url}/readyz").status_code == 200


def test_a_missing_model_directory_stops_serve_with_the_reason(tmp_path):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "reward_cli", "serve", "--model", f"x={tmp_path / 'nowhere'}"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode != 0
    assert "nowhere" in done.stderr and "not a directory" in done.stderr


def test_pickle_weights_are_refused(tmp_path, model_dirs):
    import shutil
    import subprocess
    import sys

    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(model_dirs["bert"], pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    done = subprocess.run(
        [sys.executable, "-m", "reward_cli", "serve", "--model", f"x={pickled}"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode != 0 and "--allow-pickle" in done.stderr


def test_reward_score_scores_a_jsonl_file_through_the_service(server, tmp_path):
    import subprocess
    import sys

    lines = [{"id": i, **item} for i, item in enumerate(ITEMS)]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    done = subprocess.run(
        [sys.executable, "-m", "reward_cli", "score", "--url", server.url, "--model", "minilm", str(source)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    scored = [json.loads(line) for line in done.stdout.splitlines()]
    assert [s["id"] for s in scored] == list(range(len(ITEMS)))
    expected = RewardClient(server.url).score(ITEMS, model="minilm").scores
    assert [s["score"] for s in scored] == pytest.approx(expected, abs=1e-5)
