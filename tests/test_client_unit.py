"""Unit tests for the client package against httpx.MockTransport (no server, no torch)."""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import client.client as client_module
from client import (
    AsyncRewardClient,
    ModelList,
    RewardClient,
    RewardServiceError,
    ScoreResponse,
    ServiceUnavailable,
)
from client.cli import add_score_parser, run_score

BASE_URL = "http://reward.test"
REPO_ROOT = Path(__file__).resolve().parents[1]
FAST = dict(backoff=0.001, backoff_max=0.01)


def item(i: int) -> dict:
    return {"prompt": f"question {i}", "response": f"answer {i}"}


def item_index(body_item: dict) -> int:
    text = body_item["messages"][-1]["content"] if "messages" in body_item else body_item["response"]
    return int(text.split()[-1])


def score_body(request: httpx.Request) -> dict:
    """What the service would answer: item i scores float(i)."""
    items = json.loads(request.content)["items"]
    scores = [float(item_index(x)) for x in items]
    return {"model": "tiny@1", "scores": scores, "usage": {"items": len(items), "tokens": 10 * len(items), "truncated": 1}}


def error_body(status: int, type_: str, message: str) -> dict:
    return {"error": {"code": status, "type": type_, "message": message, "request_id": "req-1"}}


class Recorder:
    """Collects what a fake sleep was asked to wait."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


@pytest.fixture
def recorded_sleeps(monkeypatch) -> Recorder:
    recorder = Recorder()
    monkeypatch.setattr(client_module, "_sleep", recorder)
    return recorder


# -- chunking ----------------------------------------------------------------------------------


def test_sync_chunks_are_sent_concurrently_and_merged_in_item_order():
    chunk_sizes, progress_calls = [], []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        chunk_sizes.append(len(body["items"]))
        # Earlier chunks answer later, so completion order is the reverse of item order.
        time.sleep(0.05 * (1 - item_index(body["items"][0]) / 150))
        return httpx.Response(200, json=score_body(request))

    with RewardClient(BASE_URL, chunk_size=64, max_concurrency=3, transport=httpx.MockTransport(handler)) as rm:
        result = rm.score([item(i) for i in range(150)], progress=lambda done, total: progress_calls.append((done, total)))

    assert sorted(chunk_sizes) == [22, 64, 64]
    assert result.scores == [float(i) for i in range(150)]
    assert result.usage.items == 150 and result.usage.tokens == 1500 and result.usage.truncated == 3
    assert isinstance(result, ScoreResponse) and result.model == "tiny@1"
    assert progress_calls[0] == (22, 150)  # the last chunk finished first
    assert progress_calls[-1] == (150, 150)


async def test_async_chunks_finish_out_of_order_and_are_merged_in_item_order():
    chunk_sizes, finished_first_index, progress_calls = [], [], []

    async def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        chunk_sizes.append(len(body["items"]))
        first = item_index(body["items"][0])
        await asyncio.sleep(0.05 * (1 - first / 150))
        finished_first_index.append(first)
        return httpx.Response(200, json=score_body(request))

    async with AsyncRewardClient(BASE_URL, chunk_size=64, transport=httpx.MockTransport(handler)) as rm:
        result = await rm.score([item(i) for i in range(150)], progress=lambda d, t: progress_calls.append((d, t)))

    assert chunk_sizes == [64, 64, 22]
    assert finished_first_index == [128, 64, 0]  # really out of order
    assert result.scores == [float(i) for i in range(150)]
    assert result.usage.items == 150
    assert progress_calls == [(22, 150), (86, 150), (150, 150)]


async def test_async_concurrency_is_bounded_by_max_concurrency():
    in_flight, peak = 0, 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return httpx.Response(200, json=score_body(request))

    async with AsyncRewardClient(BASE_URL, chunk_size=5, max_concurrency=3, transport=httpx.MockTransport(handler)) as rm:
        result = await rm.score([item(i) for i in range(50)])
    assert result.scores == [float(i) for i in range(50)]
    assert peak == 3


def test_items_may_be_messages_or_protocol_models_and_unset_fields_are_not_sent():
    sent = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return httpx.Response(200, json=score_body(request))

    conversation = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "answer 7"}]}
    with RewardClient(BASE_URL, transport=httpx.MockTransport(handler)) as rm:
        from client import PromptResponseItem

        result = rm.score([conversation, PromptResponseItem(prompt="q", response="answer 3")])
    assert result.scores == [7.0, 3.0]
    assert sent == [{"items": [conversation, {"prompt": "q", "response": "answer 3"}], "normalize": False}]


def test_objective_fields_are_sent_only_when_used_and_heads_merge_across_chunks():
    # A 1.0 service refuses fields it does not know: a call that does not use them must not send them.
    sent = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        sent.append({k: v for k, v in body.items() if k != "items"})
        answer = score_body(request)
        if body.get("return_objectives"):
            answer["objectives"] = {"truthfulness": [-s for s in answer["scores"]]}
        return httpx.Response(200, json=answer)

    with RewardClient(BASE_URL, chunk_size=2, transport=httpx.MockTransport(handler)) as rm:
        rm.score([item(1)])
        result = rm.score([item(i) for i in range(5)], objective="truthfulness", return_objectives=True)
    assert sent[0] == {"normalize": False}
    assert sent[1:] == [{"normalize": False, "objective": "truthfulness", "return_objectives": True}] * 3
    assert result.objectives == {"truthfulness": [-float(i) for i in range(5)]}


def test_ensemble_fields_are_sent_only_when_used_and_merge_across_chunks():
    # A service older than 1.2 refuses fields it does not know: a call that does not use them must not send them.
    sent = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        sent.append({k: v for k, v in body.items() if k not in ("items", "pairs", "query")})
        if request.url.path == "/get_reward":
            return httpx.Response(200, json={"rewards": [1.0] * len(body["query"]), "scores": [1.0] * len(body["query"])})
        answer = score_body(request)
        if body.get("return_uncertainty"):
            answer["ensemble_mean"] = [s + 1 for s in answer["scores"]]
            answer["ensemble_std"] = [0.5 for _ in answer["scores"]]
        if body.get("return_members"):
            answer["members"] = [[s, -s] for s in answer["scores"]]
        return httpx.Response(200, json=answer)

    with RewardClient(BASE_URL, chunk_size=2, transport=httpx.MockTransport(handler)) as rm:
        rm.score([item(1)])
        result = rm.score([item(i) for i in range(5)], aggregate="mean_minus_var", uncertainty_penalty=0.5,
                          return_uncertainty=True, return_members=True)
        rm.score_texts(["text"], aggregate="min")
        with pytest.raises(ValueError, match="mean_minus_var"):  # refused before sending
            rm.score([item(1)], aggregate="max")
    assert sent[0] == {"normalize": False}
    assert sent[1:4] == [{"normalize": False, "aggregate": "mean_minus_var", "uncertainty_penalty": 0.5,
                          "return_uncertainty": True, "return_members": True}] * 3
    assert sent[4] == {"aggregate": "min"} and len(sent) == 5
    assert result.ensemble_mean == [float(i) + 1 for i in range(5)] and result.ensemble_std == [0.5] * 5
    assert result.members == [[float(i), -float(i)] for i in range(5)]


def test_invalid_item_is_reported_by_index_before_sending():
    def handler(request: httpx.Request) -> httpx.Response:  # pragma: no cover - must not be called
        raise AssertionError("nothing should be sent")

    with RewardClient(BASE_URL, transport=httpx.MockTransport(handler)) as rm:
        with pytest.raises(ValueError, match="item 1"):
            rm.score([item(0), {"prompt": "q"}])


def test_compare_chunks_pairs_and_keeps_pair_order():
    pair_counts = []

    def handler(request: httpx.Request) -> httpx.Response:
        pairs = json.loads(request.content)["pairs"]
        pair_counts.append(len(pairs))
        results = [{"reward_a": float(p["a"]), "reward_b": float(p["b"]), "p_a_better": 0.5} for p in pairs]
        usage = {"items": 2 * len(pairs), "tokens": 0, "truncated": 0}
        return httpx.Response(200, json={"model": "tiny@1", "results": results, "usage": usage})

    with RewardClient(BASE_URL, chunk_size=8, transport=httpx.MockTransport(handler)) as rm:
        result = rm.compare([{"prompt": "q", "a": str(i), "b": str(-i)} for i in range(10)])
    assert sorted(pair_counts) == [2, 4, 4]  # 4 pairs = 8 scored responses per request
    assert [r.reward_a for r in result.results] == [float(i) for i in range(10)]
    assert result.usage.items == 20


# -- retries and errors ------------------------------------------------------------------------


def test_503_with_retry_after_is_retried_honouring_the_header(recorded_sleeps):
    answers = iter([
        httpx.Response(503, headers={"Retry-After": "2"}, json=error_body(503, "not_ready", "loading")),
        httpx.Response(503, headers={"Retry-After": "100"}, json=error_body(503, "not_ready", "loading")),
    ])

    def handler(request: httpx.Request) -> httpx.Response:
        return next(answers, None) or httpx.Response(200, json=score_body(request))

    with RewardClient(BASE_URL, backoff=0.001, backoff_max=5.0, transport=httpx.MockTransport(handler)) as rm:
        result = rm.score([item(4)])
    assert result.scores == [4.0]
    # max(backoff, Retry-After), capped at backoff_max.
    assert recorded_sleeps.waits == [2.0, 5.0]


def test_429_is_retried(recorded_sleeps):
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls <= 2:
            return httpx.Response(429, json=error_body(429, "overloaded", "queue full"))
        return httpx.Response(200, json=score_body(request))

    with RewardClient(BASE_URL, **FAST, transport=httpx.MockTransport(handler)) as rm:
        assert rm.score([item(1)]).scores == [1.0]
    assert calls == 3
    assert len(recorded_sleeps.waits) == 2 and all(0 <= w <= 0.01 for w in recorded_sleeps.waits)


def test_422_is_not_retried_and_raises_the_servers_error(recorded_sleeps):
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(422, json=error_body(422, "validation_error", "items.0.response: required field is missing"))

    with RewardClient(BASE_URL, **FAST, transport=httpx.MockTransport(handler)) as rm:
        with pytest.raises(RewardServiceError) as raised:
            rm.score([item(1)])
    error = raised.value
    assert calls == 1 and recorded_sleeps.waits == []
    assert not isinstance(error, ServiceUnavailable)
    assert (error.status, error.type, error.request_id) == (422, "validation_error", "req-1")
    assert error.message == "items.0.response: required field is missing"
    assert "validation_error" in str(error) and "422" in str(error)


def test_error_without_the_services_body_falls_back_to_the_text():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="<html>bad gateway</html>")

    with RewardClient(BASE_URL, **FAST, transport=httpx.MockTransport(handler)) as rm:
        with pytest.raises(RewardServiceError) as raised:
            rm.models()
    assert (raised.value.status, raised.value.type, raised.value.message) == (502, "http_502", "<html>bad gateway</html>")


def test_connection_errors_exhaust_retries_and_raise_service_unavailable(recorded_sleeps):
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        raise httpx.ConnectError("connection refused", request=request)

    with RewardClient(BASE_URL, max_retries=3, **FAST, transport=httpx.MockTransport(handler)) as rm:
        with pytest.raises(ServiceUnavailable) as raised:
            rm.score([item(1)])
    assert calls == 4 and len(recorded_sleeps.waits) == 3
    message = str(raised.value)
    assert f"cannot reach the reward service at {BASE_URL}/v1/score after 4 tries" in message
    assert "connection refused" in message


@pytest.mark.parametrize("reset", [httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError])
def test_a_pooled_connection_closed_under_the_request_is_retried(recorded_sleeps, reset):
    # What a keep-alive connection the server closes as the next request goes out looks like.
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise reset("", request=request)
        return httpx.Response(200, json=score_body(request))

    with RewardClient(BASE_URL, max_retries=2, **FAST, transport=httpx.MockTransport(handler)) as rm:
        assert rm.score([item(4)]).scores == [4.0]
    assert calls == 2


def test_503_that_never_clears_raises_service_unavailable_with_the_servers_message(recorded_sleeps):
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json=error_body(503, "not_ready", "models are loading"))

    with RewardClient(BASE_URL, max_retries=2, **FAST, transport=httpx.MockTransport(handler)) as rm:
        with pytest.raises(ServiceUnavailable) as raised:
            rm.score([item(1)])
    assert (raised.value.status, raised.value.type, raised.value.message) == (503, "not_ready", "models are loading")
    assert len(recorded_sleeps.waits) == 2


async def test_async_retries_then_raises_typed_errors(monkeypatch):
    waits = []

    async def fake_sleep(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(client_module, "_async_sleep", fake_sleep)
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            return httpx.Response(503, headers={"Retry-After": "1"}, json=error_body(503, "not_ready", "loading"))
        if calls == 2:
            raise httpx.ConnectError("refused", request=request)
        if calls == 3:
            return httpx.Response(200, json=score_body(request))
        return httpx.Response(404, json=error_body(404, "model_not_found", "model 'nope' is not served here"))

    async with AsyncRewardClient(BASE_URL, backoff=0.001, backoff_max=3.0, transport=httpx.MockTransport(handler)) as rm:
        assert (await rm.score([item(9)])).scores == [9.0]
        with pytest.raises(RewardServiceError, match="model_not_found"):
            await rm.score([item(9)], model="nope")
    assert calls == 4 and waits[0] == 1.0 and len(waits) == 2


def test_failed_chunk_fails_the_whole_call():
    def handler(request: httpx.Request) -> httpx.Response:
        if item_index(json.loads(request.content)["items"][0]) == 10:
            return httpx.Response(413, json=error_body(413, "too_many_items", "too many"))
        return httpx.Response(200, json=score_body(request))

    with RewardClient(BASE_URL, chunk_size=10, transport=httpx.MockTransport(handler)) as rm:
        with pytest.raises(RewardServiceError, match="too_many_items"):
            rm.score([item(i) for i in range(40)])


# -- headers, models, health -------------------------------------------------------------------


def test_api_key_models_health_and_ready():
    seen_auth = []
    ready = {"value": False}
    card = {
        "name": "tiny", "version": "1", "path": "/m", "backend": "torch", "max_length": 512, "dtype": "float32",
        "device": "cpu", "architecture": "encoder", "normalize_available": False, "default": True,
    }

    def handler(request: httpx.Request) -> httpx.Response:
        seen_auth.append(request.headers.get("authorization"))
        if request.url.path == "/healthz":
            return httpx.Response(200, json={"status": "ok"})
        if request.url.path == "/readyz":
            if ready["value"]:
                return httpx.Response(200, json={"status": "ready"})
            ready["value"] = True  # ready from the second poll on
            return httpx.Response(503, json=error_body(503, "not_ready", "loading"))
        assert request.url.path == "/v1/models"
        return httpx.Response(200, json={"object": "list", "data": [card]})

    with RewardClient(BASE_URL + "/", api_key="sekret", transport=httpx.MockTransport(handler)) as rm:
        assert rm.health() is True
        assert rm.ready() is False
        rm.wait_ready(timeout=5, interval=0.001)
        models = rm.models()
    assert isinstance(models, ModelList) and models.data[0].name == "tiny"
    assert set(seen_auth) == {"Bearer sekret"}


def test_health_is_false_when_unreachable_and_wait_ready_times_out():
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with RewardClient(BASE_URL, transport=httpx.MockTransport(handler)) as rm:
        assert rm.health() is False
        with pytest.raises(ServiceUnavailable, match="not ready"):
            rm.wait_ready(timeout=0.05, interval=0.01)


# -- CLI ---------------------------------------------------------------------------------------


def score_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="reward")
    add_score_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["score", *argv])


def scoring_transport(sent_bodies: list) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        sent_bodies.append(json.loads(request.content))
        return httpx.Response(200, json=score_body(request))

    return httpx.MockTransport(handler)


def test_cli_scores_a_jsonl_file_in_order_keeping_extra_keys(tmp_path, capsys):
    rows = [{"id": f"row-{i}", **item(i)} for i in range(5)]
    rows.append({"id": "chat", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a 42"}]})
    source = tmp_path / "items.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    output = tmp_path / "scored.jsonl"
    sent = []

    args = score_args(str(source), "-o", str(output), "--chunk-size", "2", "--concurrency", "2", "--url", BASE_URL)
    assert args.func is run_score
    assert run_score(args, transport=scoring_transport(sent)) == 0

    scored = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["id"] for r in scored] == [r["id"] for r in rows]
    assert [r["score"] for r in scored] == [0.0, 1.0, 2.0, 3.0, 4.0, 42.0]
    assert scored[0] == {**rows[0], "score": 0.0}
    sent_items = [x for body in sent for x in body["items"]]
    assert len(sent) == 3 and all("id" not in x for x in sent_items)
    assert capsys.readouterr().out == ""  # the progress bar and summary go to stderr


def test_cli_reads_gzip_and_writes_stdout(tmp_path, capsys):
    source = tmp_path / "items.jsonl.gz"
    source.write_bytes(gzip.compress("".join(json.dumps(item(i)) + "\n" for i in range(3)).encode()))
    assert run_score(score_args(str(source), "--url", BASE_URL), transport=scoring_transport([])) == 0
    out = capsys.readouterr().out
    assert [json.loads(line)["score"] for line in out.splitlines()] == [0.0, 1.0, 2.0]


def test_cli_bad_lines_exit_2_naming_file_and_line_before_sending(tmp_path, capsys):
    source = tmp_path / "bad.jsonl"
    source.write_text(
        json.dumps(item(0)) + "\n"
        + "{not json\n"
        + json.dumps({"id": 3, "prompt": "q"}) + "\n"
        + json.dumps(["a", "list"]) + "\n"
        + json.dumps({"id": 5, "text": "no shape"}) + "\n"
    )
    sent = []
    assert run_score(score_args(str(source), "--url", BASE_URL), transport=scoring_transport(sent)) == 2
    err = capsys.readouterr().err
    assert sent == []
    assert f"{source}:2: invalid JSON" in err
    assert f"{source}:3: response" in err
    assert f"{source}:4: expected a JSON object" in err
    assert f"{source}:5: is not an item" in err
    assert f"{source}:1:" not in err


def test_cli_service_error_exits_1_with_the_message(tmp_path, capsys):
    source = tmp_path / "items.jsonl"
    source.write_text(json.dumps(item(0)) + "\n")
    output = tmp_path / "out.jsonl"

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json=error_body(404, "model_not_found", "model 'x' is not served here"))

    args = score_args(str(source), "-o", str(output), "--model", "x", "--url", BASE_URL)
    assert run_score(args, transport=httpx.MockTransport(handler)) == 1
    assert "model 'x' is not served here" in capsys.readouterr().err
    assert not output.exists()


def test_cli_standalone_main_runs_score(monkeypatch):
    from client import cli

    seen = []
    monkeypatch.setattr(cli, "run_score", lambda args: seen.append(args) or 0)
    monkeypatch.setenv("REWARD_URL", "http://from-env:9")  # read when the parser is built
    assert cli.main(["score", "in.jsonl", "--normalize"]) == 0
    assert seen[0].url == "http://from-env:9" and seen[0].normalize and seen[0].input == "in.jsonl"


# -- import hygiene ----------------------------------------------------------------------------


def test_client_imports_neither_torch_nor_service():
    code = (
        "import client, client.cli, client.integrations, sys; "
        "heavy = [m for m in ('torch', 'service', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=60)
