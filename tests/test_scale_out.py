"""Scale-out from the client side: several replicas of one model behind a list of URLs. The
client spreads requests over the replicas and moves past one that is down, without waiting."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

from client import AsyncRewardClient, RewardClient
from client.integrations import trl_reward_func
from server import free_port, running_servers

ITEMS = [{"prompt": f"Question {i}?", "response": f"Answer {i}."} for i in range(40)]


@pytest.fixture(scope="module")
def replicas(model_dirs, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    args = [f"--model=bert={model_dirs['bert']}", "--max-wait-ms", "2"]
    with running_servers((args, logs / "a.log"), (args, logs / "b.log")) as (a, b):
        yield a, b


def scored_requests(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    match = re.search(r'^reward_requests_total\{route="/v1/score",status="200"\} ([0-9.e+]+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def test_requests_are_spread_over_the_replicas_and_scores_do_not_change(replicas):
    a, b = replicas
    with RewardClient(a.url) as single:
        expected = single.score(ITEMS).scores
    before = [scored_requests(a.url), scored_requests(b.url)]

    with RewardClient([a.url, b.url], chunk_size=4) as client:  # 10 chunks
        scores = client.score(ITEMS).scores

    assert scores == pytest.approx(expected, abs=1e-5)
    served = [scored_requests(a.url) - before[0], scored_requests(b.url) - before[1]]
    assert served == [5, 5], f"requests per replica: {served}"


def test_a_dead_replica_is_skipped_without_backoff(replicas):
    a, b = replicas
    dead = f"http://127.0.0.1:{free_port()}"
    with RewardClient(a.url) as single:
        expected = single.score(ITEMS).scores

    started = time.perf_counter()
    with RewardClient([dead, a.url, b.url], chunk_size=4, max_retries=0, backoff=5.0) as client:
        scores = client.score(ITEMS).scores
    elapsed = time.perf_counter() - started

    assert scores == pytest.approx(expected, abs=1e-5)
    assert elapsed < 5.0, f"{elapsed:.1f} s: the client waited before trying the next replica"


def test_the_async_client_and_the_trl_function_take_replicas_too(replicas):
    a, b = replicas
    dead = f"http://127.0.0.1:{free_port()}"
    with RewardClient(a.url) as single:
        expected = single.score(ITEMS[:8]).scores

    async def fire():
        async with AsyncRewardClient([dead, a.url, b.url], chunk_size=2, max_retries=0) as client:
            return (await client.score(ITEMS[:8])).scores

    assert asyncio.run(fire()) == pytest.approx(expected, abs=1e-5)
    reward_func = trl_reward_func([a.url, dead, b.url], max_retries=0)
    rewards = reward_func(prompts=[i["prompt"] for i in ITEMS[:8]], completions=[i["response"] for i in ITEMS[:8]])
    assert rewards == pytest.approx(expected, abs=1e-5)
