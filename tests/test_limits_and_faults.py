"""The service under pressure: a full queue, a passed deadline, a failing backend, a flood from
one caller, oversized fields, and SIGTERM with requests in flight. Each test serves the tiny
BERT on loopback; the in-process server lets a test hold or break forward passes
(tests/faults.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import time
from dataclasses import replace

import httpx
import pytest

from faults import ControlledBackend
from server import in_process_server, running_server
from service.app import create_app
from service.auth import KeyRing
from reward_core.forward import pad_batch
from reward_core.formatting import encode_items
from service.registry import load_model
from service.settings import ServiceSettings

ITEM = {"prompt": "What is the capital of France?", "response": "Paris."}


def items(n: int, tag: str = "") -> list[dict]:
    return [{"prompt": f"{tag} question {i}: what is {i} + {i}?", "response": f"It is {2 * i}."} for i in range(n)]


def metric(text: str, name: str, **labels: str) -> float:
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{name}{{{re.escape(label_text)}}} ([0-9.e+-]+)$" if labels else rf"^{name} ([0-9.e+-]+)$"
    match = re.search(pattern, text, re.M)
    return float(match.group(1)) if match else 0.0


@pytest.fixture(scope="module")
def bert(model_dirs):
    """The tiny BERT, loaded once; each test serves it behind its own ControlledBackend."""
    return load_model("bert", model_dirs["bert"], ServiceSettings(models=[f"bert={model_dirs['bert']}"]))


@contextlib.contextmanager
def serving(bert, keys: KeyRing | None = None, tokenizer=None, **overrides):
    settings = ServiceSettings(models=[f"bert={bert.path}"], max_wait_ms=0, shutdown_drain_s=0, **overrides)
    backend = ControlledBackend(bert.backend)
    served = replace(bert, backend=backend, batcher=None, tokenizer=tokenizer or bert.tokenizer)
    app = create_app(settings, [served], keys)
    with in_process_server(app, settings) as url:
        backend.reset()
        yield url, backend


def reference_scores(bert, batch_items: list[dict]) -> list[float]:
    """The model's scores for these items, one unbatched forward each, without the service."""
    encoded = encode_items(batch_items, bert.tokenizer, bert.spec)
    return [float(bert.backend.score_batch(pad_batch([e], bert.pad_token_id))[0]) for e in encoded]


async def test_a_full_queue_is_answered_429_with_retry_after(bert):
    with serving(bert, max_items=8, max_queue_items=8) as (url, backend):
        backend.gate.clear()  # hold the first forward: its 8 items fill the queue
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            first = asyncio.create_task(http.post("/v1/score", json={"items": items(8)}))
            assert await asyncio.to_thread(backend.started.wait, 10)
            refused = await http.post("/v1/score", json={"items": [ITEM]})
            backend.gate.set()
            accepted = await first
            after = await http.post("/v1/score", json={"items": [ITEM]})
            metrics = (await http.get("/metrics")).text

    assert refused.status_code == 429, refused.text
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["type"] == "queue_full" and "Retry-After" in refused.json()["error"]["message"]
    assert accepted.status_code == 200 and len(accepted.json()["scores"]) == 8
    assert after.status_code == 200, "room again once the queue drained"
    assert metric(metrics, "reward_rejections_total", reason="queue_full") == 1


async def test_a_request_past_its_deadline_gets_504_and_its_queued_items_are_dropped(bert):
    with serving(bert, request_timeout_s=1.0) as (url, backend):
        backend.gate.clear()
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            running = asyncio.create_task(http.post("/v1/score", json={"items": items(2, "running")}))
            assert await asyncio.to_thread(backend.started.wait, 10)
            waiting = await http.post("/v1/score", json={"items": items(3, "waiting")})  # queued behind the held forward
            depth_after_504 = metric((await http.get("/metrics")).text, "reward_queue_depth", model="bert")
            backend.gate.set()
            running_answer = await running
            await asyncio.sleep(0.3)  # the worker would run anything left in the queue now
            metrics = (await http.get("/metrics")).text
            forwards, rows = backend.forwards, backend.rows
            fresh = await http.post("/v1/score", json={"items": [ITEM]})

    assert waiting.status_code == 504, waiting.text
    error = waiting.json()["error"]
    assert error["type"] == "deadline_exceeded" and "--request-timeout-s" in error["message"] and error["request_id"]
    assert running_answer.status_code == 504, "the held forward outlived its request's deadline too"
    assert depth_after_504 == 0, "the timed-out requests' items left the queue"
    assert forwards == 1 and rows == 2, "the 3 waiting items never reached the model"
    assert metric(metrics, "reward_rejections_total", reason="deadline_exceeded") == 2
    assert fresh.status_code == 200


async def test_a_backend_fault_fails_its_batch_with_the_request_id_and_the_next_request_is_fine(bert):
    expected = reference_scores(bert, [ITEM])
    with serving(bert) as (url, backend):
        backend.fail_forwards = {1}
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            failed = await http.post("/v1/score", json={"items": [ITEM]}, headers={"X-Request-ID": "fault-test-1"})
            after = await http.post("/v1/score", json={"items": [ITEM]})
            ready = await http.get("/readyz")
            metrics = (await http.get("/metrics")).text

    assert failed.status_code == 500 and failed.headers["x-request-id"] == "fault-test-1"
    error = failed.json()["error"]
    assert error["type"] == "forward_failed" and error["request_id"] == "fault-test-1"
    assert "injected fault" in error["message"] and "request id" in error["message"]
    assert after.status_code == 200 and after.json()["scores"] == pytest.approx(expected, abs=1e-4)
    assert ready.status_code == 200
    assert metric(metrics, "reward_forward_failures_total", model="bert") == 1


class TokenizerWithABug:
    """The real tokenizer, except that it raises on any text containing 'boom'."""

    def __init__(self, inner) -> None:
        self._inner = inner

    def __call__(self, *args, **kwargs):
        if "boom" in repr(args):
            raise KeyError("a bug in the service")
        return self._inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


async def test_an_unexpected_error_is_a_json_500_with_the_request_id_and_serving_goes_on(bert):
    with serving(bert, tokenizer=TokenizerWithABug(bert.tokenizer)) as (url, _):
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            failed = await http.post("/v1/score", json={"items": [{"prompt": "boom", "response": "r"}]},
                                     headers={"X-Request-ID": "bug-1"})
            after = await http.post("/v1/score", json={"items": [ITEM]})

    assert failed.status_code == 500 and failed.headers["x-request-id"] == "bug-1"
    assert failed.json()["error"] == {
        "code": 500, "type": "internal_error", "request_id": "bug-1",
        "message": "internal error: KeyError; quote the request id when reporting it",
    }
    assert after.status_code == 200


async def test_one_failing_batch_fails_only_the_requests_in_it(bert):
    # A held forward lets four requests pile up; the next forward (all four together) fails,
    # the one after it succeeds: the first request is answered, the four get 500s, later ones 200.
    with serving(bert) as (url, backend):
        backend.gate.clear()
        backend.fail_forwards = {2}
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            first = asyncio.create_task(http.post("/v1/score", json={"items": [ITEM]}))
            assert await asyncio.to_thread(backend.started.wait, 10)
            batch = [asyncio.create_task(http.post("/v1/score", json={"items": items(2, f"r{i}")})) for i in range(4)]
            await asyncio.sleep(0.5)  # let them queue
            backend.gate.set()
            first_answer = await first
            answers = await asyncio.gather(*batch)
            later = await http.post("/v1/score", json={"items": items(2, "later")})

    assert first_answer.status_code == 200
    assert [a.status_code for a in answers] == [500] * 4
    assert len({a.json()["error"]["request_id"] for a in answers}) == 4, "each failure names its own request"
    assert later.status_code == 200


async def test_fields_over_the_character_limit_are_refused_naming_the_field(bert):
    with serving(bert, max_field_chars=1000) as (url, _):
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            long_response = await http.post("/v1/score", json={"items": [ITEM, {"prompt": "p", "response": "x" * 1001}]})
            long_message = await http.post("/v1/compare", json={"pairs": [{"prompt": [{"role": "user", "content": "y" * 5000}], "a": "a", "b": "b"}]})
            at_limit = await http.post("/v1/score", json={"items": [{"prompt": "p", "response": "x" * 1000}]})

    assert long_response.status_code == 413
    assert "items.1.response" in long_response.json()["error"]["message"]
    assert "--max-field-chars" in long_response.json()["error"]["message"]
    assert long_message.status_code == 413 and "pairs.0.prompt.0.content" in long_message.json()["error"]["message"]
    assert at_limit.status_code == 200


async def test_a_caller_over_its_rate_limit_gets_429_with_retry_after(bert):
    with serving(bert, rate_limit_rps=0.5, rate_limit_burst=2) as (url, _):
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            answers = [await http.post("/v1/score", json={"items": [ITEM]}) for _ in range(3)]
            health = await http.get("/healthz")

    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[2].json()["error"]["type"] == "rate_limited"
    assert int(answers[2].headers["Retry-After"]) >= 1
    assert health.status_code == 200, "probes are not rate limited"


def test_sigterm_under_load_answers_every_accepted_request(model_dirs, bert, tmp_path):
    """Requests in flight when SIGTERM arrives all get their own scores; meanwhile /readyz says
    not ready; then the process exits 0. Every forward sleeps 0.25 s (tests/serve_slow.py),
    4 rows at most, so 24 requests x 2 items need ~3 s of forwards."""
    requests = [items(2, f"request {r}") for r in range(24)]
    args = [f"--model=bert={model_dirs['bert']}", "--max-batch-size", "4", "--max-wait-ms", "20",
            "--shutdown-drain-s", "0.5", "--log-format", "json"]
    env = {"REWARD_TEST_FORWARD_DELAY_S": "0.25", "REWARD_SHUTDOWN_DRAIN_S": "0.5"}
    log_path = tmp_path / "server.log"
    with running_server(args, log_path, env, entry=["tests/serve_slow.py"]) as server:

        async def load_then_sigterm():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
                tasks = [asyncio.create_task(http.post("/v1/score", json={"items": r}, headers={"X-Request-ID": f"load-{i}"}))
                         for i, r in enumerate(requests)]
                await asyncio.sleep(0.8)
                done_at_sigterm = sum(t.done() for t in tasks)
                server.process.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.1)
                async with httpx.AsyncClient(base_url=server.url, timeout=5) as probe:
                    readiness = (await probe.get("/readyz")).status_code
                return done_at_sigterm, readiness, await asyncio.gather(*tasks)

        done_at_sigterm, readiness, answers = asyncio.run(load_then_sigterm())
        exit_code = server.process.wait(timeout=30)

    assert done_at_sigterm < len(requests), "the load had finished before SIGTERM; the test proved nothing"
    assert readiness == 503
    assert [a.status_code for a in answers] == [200] * len(requests)
    for answer, request in zip(answers, requests):
        assert answer.json()["scores"] == pytest.approx(reference_scores(bert, request), abs=1e-4)
    assert exit_code == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/healthz", timeout=2)
    # Structured logs: one JSON object per line; each scoring request logged with its fields.
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    logged = {line["request_id"]: line for line in lines if line.get("msg") == "request"}
    for i in range(len(requests)):
        line = logged[f"load-{i}"]
        assert line["status"] == 200 and line["model"] == "bert" and line["items"] == 2
        assert line["tokens"] > 0 and line["latency_ms"] > 0 and line["route"] == "/v1/score"
    assert any("draining" in line["msg"] for line in lines)


async def test_a_callers_request_id_is_kept_and_one_that_is_not_an_id_is_replaced(bert):
    with serving(bert) as (url, _):
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            kept = await http.post("/v1/score", json={"items": [ITEM]}, headers={"X-Request-ID": "trace-42.a"})
            replaced = await http.post("/v1/score", json={"items": [ITEM]}, headers={"X-Request-ID": "<script> and spaces"})
            refused = await http.post("/v1/score", json={"items": []}, headers={"X-Request-ID": "trace-43"})

    assert kept.headers["x-request-id"] == "trace-42.a"
    assert re.fullmatch(r"[0-9a-f]{32}", replaced.headers["x-request-id"])
    assert refused.status_code == 422 and refused.headers["x-request-id"] == refused.json()["error"]["request_id"] == "trace-43"


async def test_a_body_without_the_json_content_type_is_told_to_send_one(bert):
    with serving(bert) as (url, _):
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            form = await http.post("/v1/score", content=json.dumps({"items": [ITEM]}),
                                   headers={"content-type": "application/x-www-form-urlencoded"})

    assert form.status_code == 422 and "Content-Type: application/json" in form.json()["error"]["message"]


def test_a_body_trickled_in_too_slowly_is_cut_off_with_408(bert):
    # Headers promise 200 bytes; 9 arrive, then nothing: the connection must not be held for ever.
    import socket

    with serving(bert, request_timeout_s=1.0) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 200\r\nX-Request-ID: slow-1\r\n\r\n{\"items\":")
            started = time.monotonic()
            first = conn.recv(65536)  # blocks until the server answers
            waited = time.monotonic() - started
            answer = first
            while b'"request_id"' not in answer:  # headers and body may come in separate reads
                more = conn.recv(65536)
                if not more:
                    break
                answer += more
            head = answer.decode("latin-1")
        health = httpx.get(f"{url}/healthz")

    assert head.startswith("HTTP/1.1 408"), head
    assert '"body_timeout"' in head and '"request_id":"slow-1"' in head and "--request-timeout-s" in head
    assert 1.5 <= waited < 10
    assert health.status_code == 200
