"""Hot reload: a new version of a model's weights goes live without a restart, and requests
that arrive meanwhile all get answers."""

from __future__ import annotations

import asyncio
import shutil

import httpx
import pytest

import tiny_models
from client import AsyncRewardClient, RewardClient
from server import running_server

TOKEN = "s3cret-reload-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ITEMS = [{"prompt": "What is the capital of France?", "response": "Paris."}, {"prompt": "Say hi", "response": "Hi!"}]


@pytest.fixture
def served_dir(model_dirs, tmp_path):
    target = tmp_path / "llama"
    shutil.copytree(model_dirs["llama"], target)
    return target


def reloadable_server(served_dir, model_dirs, log_path):
    args = [f"--model=rm={served_dir}", f"--model=bert={model_dirs['bert']}", "--max-wait-ms", "5"]
    return running_server(args, log_path, env={"REWARD_RELOAD_TOKEN": TOKEN})


@pytest.fixture
def server(served_dir, model_dirs, tmp_path):
    """A server of its own: the test swaps the weights it serves."""
    with reloadable_server(served_dir, model_dirs, tmp_path / "server.log") as s:
        yield s


@pytest.fixture(scope="module")
def unchanged_server(model_dirs, tmp_path_factory):
    """One server for the tests whose reloads are refused, so what it serves never changes."""
    root = tmp_path_factory.mktemp("unchanged")
    served_dir = root / "llama"
    shutil.copytree(model_dirs["llama"], served_dir)
    with reloadable_server(served_dir, model_dirs, root / "server.log") as s:
        yield s


def scores(server, model="rm") -> list[float]:
    with RewardClient(server.url) as client:
        return client.score(ITEMS, model=model).scores


def test_new_weights_go_live_and_requests_during_the_swap_all_succeed(server, served_dir, tmp_path):
    before = scores(server)
    version_before = httpx.get(f"{server.url}/v1/models").json()["data"][0]["version"]
    # A training job writes a new version of the model into the directory being served.
    fresh = tiny_models.build_tiny_llama(tmp_path / "retrained", seed=1)
    shutil.copy(fresh / "model.safetensors", served_dir / "model.safetensors")

    async def reload_under_load():
        async with AsyncRewardClient(server.url, max_concurrency=32) as client, httpx.AsyncClient(timeout=120) as http:
            traffic = [asyncio.ensure_future(client.score(ITEMS, model="rm")) for _ in range(60)]
            reload = await http.post(f"{server.url}/v1/models/rm/reload", headers=AUTH)
            traffic += [asyncio.ensure_future(client.score(ITEMS, model="rm")) for _ in range(20)]
            return reload, await asyncio.gather(*traffic)

    reload, answers = asyncio.run(reload_under_load())

    assert reload.status_code == 200, reload.text
    body = reload.json()
    assert body["previous_version"] == version_before and body["model"]["version"] != version_before
    after = scores(server)
    assert after != pytest.approx(before, abs=1e-3), "the new weights are not being served"
    with RewardClient(server.url) as client:
        assert client.models().data[0].version == body["model"]["version"]
    for answer in answers:  # every request got the old model's scores or the new one's
        assert answer.scores == pytest.approx(before, abs=1e-4) or answer.scores == pytest.approx(after, abs=1e-4)


def test_a_directory_that_cannot_load_leaves_the_old_model_serving(unchanged_server, tmp_path):
    server = unchanged_server
    before = scores(server)

    answer = httpx.post(f"{server.url}/v1/models/rm/reload", json={"path": str(tmp_path / "nowhere")}, headers=AUTH, timeout=60)

    assert answer.status_code == 422 and "nowhere" in answer.json()["error"]["message"]
    assert "keeps serving" in answer.json()["error"]["message"]
    assert scores(server) == pytest.approx(before, abs=1e-6)


def test_reload_needs_the_token(unchanged_server):
    server = unchanged_server
    wrong = httpx.post(f"{server.url}/v1/models/rm/reload", headers={"Authorization": "Bearer guess"})
    missing = httpx.post(f"{server.url}/v1/models/nope/reload", headers=AUTH)

    assert wrong.status_code == 401 and "Authorization: Bearer" in wrong.json()["error"]["message"]
    assert missing.status_code == 404


def test_reload_is_off_without_a_token(model_dirs, tmp_path):
    with running_server([f"--model=bert={model_dirs['bert']}"], tmp_path / "server.log") as s:
        answer = httpx.post(f"{s.url}/v1/models/bert/reload", headers=AUTH)

    assert answer.status_code == 403 and "REWARD_RELOAD_TOKEN" in answer.json()["error"]["message"]
