"""API keys and scopes, as docs/security.md describes them: a keys
file (clear keys or their SHA-256), Bearer keys, the score and admin scopes, open probes, and
the refusal to serve a non-loopback address without keys."""

from __future__ import annotations

import hashlib
import io
import logging
import subprocess
import sys
from dataclasses import replace

import httpx
import pytest

from client import RewardClient, RewardServiceError
from server import REPO_ROOT, in_process_server
from service.app import create_app
from service.auth import KeyFileError, KeyRing, RateLimiter, is_loopback, load_keys, parse_key_entry
from service.logs import JsonFormatter
from service.registry import load_model
from service.settings import ServiceSettings

SCORE_KEY = "score-key-0123456789abcdef"
ADMIN_KEY = "admin-key-0123456789abcdef"
BOTH_KEY = "both-key-0123456789abcdef0"
FLOOD_KEY, CALM_KEY = "flood-key-0123456789abcdef", "calm-key-0123456789abcdef0"
BURST = 5
ITEM = {"prompt": "Say hi", "response": "Hi!"}


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    admin_digest = hashlib.sha256(ADMIN_KEY.encode()).hexdigest()
    path.write_text(
        "# one key per line: KEY or sha256=HEX, then :scopes\n"
        f"{SCORE_KEY}\n"
        f"sha256={admin_digest}:admin   # stored hashed: the file need not hold the key\n"
        f"{BOTH_KEY}:score,admin\n"
        f"{FLOOD_KEY}\n{CALM_KEY}\n"
    )
    return path


@pytest.fixture(scope="module")
def server(model_dirs, keys_file):
    """The tiny BERT behind keys, with a per-key rate limit; its log lines are captured."""
    settings = ServiceSettings(
        models=[f"bert={model_dirs['bert']}"], api_keys_file=keys_file, rate_limit_rps=0.2, rate_limit_burst=BURST,
        shutdown_drain_s=0,
    )
    model = load_model("bert", model_dirs["bert"], settings)
    app = create_app(settings, [replace(model, batcher=None)], KeyRing(load_keys(None, keys_file)))
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    previous_level = root.level
    root.setLevel(logging.INFO)
    try:
        with in_process_server(app, settings) as url:
            yield url, captured
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_scoring_request_without_a_key_is_401(server):
    url, _ = server
    answer = httpx.post(f"{url}/v1/score", json={"items": [ITEM]})
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    error = answer.json()["error"]
    assert error["type"] == "unauthenticated" and "Authorization: Bearer" in error["message"] and error["request_id"]


@pytest.mark.parametrize("header", ["Bearer not-a-key-of-this-service", f"Basic {SCORE_KEY}", "Bearer", SCORE_KEY, f"Bearer {SCORE_KEY}x"])
def test_a_wrong_key_or_scheme_is_401(server, header):
    url, _ = server
    assert httpx.post(f"{url}/v1/score", json={"items": [ITEM]}, headers={"Authorization": header}).status_code == 401


def test_a_key_without_the_routes_scope_is_403(server):
    url, _ = server
    metrics_with_score_key = httpx.get(f"{url}/metrics", headers=bearer(SCORE_KEY))
    score_with_admin_key = httpx.post(f"{url}/v1/score", json={"items": [ITEM]}, headers=bearer(ADMIN_KEY))
    assert metrics_with_score_key.status_code == 403 and "'admin' scope" in metrics_with_score_key.json()["error"]["message"]
    assert score_with_admin_key.status_code == 403 and "'score' scope" in score_with_admin_key.json()["error"]["message"]


def test_each_scope_opens_its_routes(server):
    url, _ = server
    with RewardClient(url, api_key=SCORE_KEY) as client:
        assert len(client.score([ITEM]).scores) == 1
        assert len(client.compare([{"prompt": "Say hi", "a": "Hi!", "b": "No."}]).results) == 1
    assert httpx.get(f"{url}/v1/models", headers=bearer(SCORE_KEY)).status_code == 200
    metrics = httpx.get(f"{url}/metrics", headers=bearer(ADMIN_KEY))
    assert metrics.status_code == 200 and 'reward_rejections_total{reason="unauthenticated"}' in metrics.text
    assert httpx.get(f"{url}/metrics", headers=bearer(BOTH_KEY)).status_code == 200


def test_the_client_reports_a_missing_key_as_an_error(server):
    url, _ = server
    with RewardClient(url) as client, pytest.raises(RewardServiceError) as err:
        client.score([ITEM])
    assert err.value.status == 401


def test_probes_and_the_api_description_stay_open(server):
    url, _ = server
    for path in ("/healthz", "/readyz", "/openapi.json"):
        assert httpx.get(f"{url}{path}").status_code == 200, path


def test_the_rate_limit_is_per_key(server):
    url, _ = server
    answers = [httpx.post(f"{url}/v1/score", json={"items": [ITEM]}, headers=bearer(FLOOD_KEY)) for _ in range(BURST + 1)]
    other_key = httpx.post(f"{url}/v1/score", json={"items": [ITEM]}, headers=bearer(CALM_KEY))
    assert [a.status_code for a in answers] == [200] * BURST + [429]
    assert answers[-1].json()["error"]["type"] == "rate_limited" and int(answers[-1].headers["Retry-After"]) >= 1
    assert other_key.status_code == 200, "another key has its own bucket"


def test_keys_are_never_logged_but_their_ids_are(server):
    url, captured = server
    httpx.post(f"{url}/v1/score", json={"items": [ITEM]}, headers={**bearer(SCORE_KEY), "X-Request-ID": "auth-log-1"})
    httpx.post(f"{url}/v1/score", json={"items": [ITEM]}, headers=bearer("an-invalid-key-0123456789"))
    logs = captured.getvalue()
    assert '"request_id": "auth-log-1"' in logs
    assert hashlib.sha256(SCORE_KEY.encode()).hexdigest()[:8] in logs
    for secret in (SCORE_KEY, ADMIN_KEY, BOTH_KEY, "an-invalid-key-0123456789"):
        assert secret not in logs


def test_serving_a_non_loopback_address_without_keys_is_refused(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "reward_cli", "serve", "--host", "0.0.0.0", "--model", f"x={tmp_path}"],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
    )
    assert done.returncode == 2
    assert "refusing to bind 0.0.0.0 without API keys" in done.stderr
    assert "--api-key" in done.stderr and "--insecure" in done.stderr


def test_a_bad_keys_file_stops_serve_with_the_line_at_fault(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("a-good-key-0123456789abcdef\nshort\n")
    done = subprocess.run(
        [sys.executable, "-m", "reward_cli", "serve", "--api-keys-file", str(keys), "--model", f"x={tmp_path}"],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
    )
    assert done.returncode == 2 and f"{keys}:2" in done.stderr and "16 characters" in done.stderr


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True),
                                           ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("example.org", False)])
def test_which_addresses_count_as_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_key_entries(tmp_path):
    assert parse_key_entry("k" * 16).scopes == {"score"}
    assert parse_key_entry("k" * 16 + ":admin,score").scopes == {"score", "admin"}
    hashed = parse_key_entry("sha256=" + hashlib.sha256(b"k" * 16).hexdigest())
    assert KeyRing([hashed]).find("k" * 16) == hashed and KeyRing([hashed]).find("k" * 17) is None
    with pytest.raises(KeyFileError, match="scopes"):
        parse_key_entry("k" * 16 + ":root")
    with pytest.raises(KeyFileError, match="64 hex"):
        parse_key_entry("sha256=abc")
    assert load_keys("k" * 16, None)[0].scopes == {"score", "admin"}, "--api-key is the operator's key"
    several = load_keys(None, None, f"{'a' * 16}:score\n sha256={hashlib.sha256(b'b' * 16).hexdigest()}:admin")
    assert [k.scopes for k in several] == [{"score"}, {"admin"}] and KeyRing(several).find("b" * 16) == several[1]
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing yet\n")
    with pytest.raises(KeyFileError, match="no keys"):
        load_keys(None, empty)


def test_the_token_bucket_refills_at_its_rate():
    limiter = RateLimiter(rate=2.0, burst=2)
    assert [limiter.acquire("a", now=0.0) for _ in range(2)] == [0.0, 0.0]
    assert limiter.acquire("a", now=0.0) == pytest.approx(0.5)
    assert limiter.acquire("a", now=0.5) == 0.0
    assert limiter.acquire("b", now=0.5) == 0.0
