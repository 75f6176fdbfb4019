"""The response-score cache (`--score-cache-size`): through the real server, repeated items
come back with identical scores and move the hit counter in /metrics; the LRU stays within its
size."""

from __future__ import annotations

import re

import httpx
import pytest

from client import RewardClient
from server import running_servers
from reward_core.formatting import EncodedInput
from service.score_cache import ScoreCache

ITEMS = [
    {"prompt": "What is the capital of France?", "response": "Paris."},
    {"prompt": "What is the capital of France?", "response": "I think it is Lyon."},
    {"prompt": "Say hi", "response": "Hi! How can I help you today?"},
]


def counter(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M))


@pytest.fixture(scope="module")
def servers(model_dirs, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    model = f"--model=bert={model_dirs['bert']}"
    with running_servers(([model, "--score-cache-size", "64"], logs / "cached.log"), ([model], logs / "plain.log")) as (cached, plain):
        yield cached, plain


def test_repeated_items_are_answered_from_the_cache_with_identical_scores(servers):
    cached, plain = servers
    with RewardClient(cached.url) as client, RewardClient(plain.url) as reference:
        hits_before = counter(cached.url, "reward_score_cache_hits_total")
        first = client.score(ITEMS)
        assert counter(cached.url, "reward_score_cache_hits_total") == hits_before
        assert counter(cached.url, "reward_score_cache_misses_total") >= len(ITEMS)
        scored_before = counter(cached.url, "reward_items_scored_total")

        again = client.score(list(reversed(ITEMS)) + ITEMS[:1])

        assert again.scores == list(reversed(first.scores)) + first.scores[:1]
        assert counter(cached.url, "reward_score_cache_hits_total") == hits_before + len(ITEMS) + 1
        assert counter(cached.url, "reward_items_scored_total") == scored_before  # no forward ran
        assert first.scores == pytest.approx(reference.score(ITEMS).scores, abs=1e-5)


def test_the_cache_is_keyed_by_the_encoded_input_across_routes(servers):
    """A compare of two responses already scored reads them from the cache: same tokens, same key."""
    cached, _ = servers
    with RewardClient(cached.url) as client:
        scores = client.score(ITEMS[:2]).scores
        hits = counter(cached.url, "reward_score_cache_hits_total")
        result = client.compare([{"prompt": ITEMS[0]["prompt"], "a": ITEMS[0]["response"], "b": ITEMS[1]["response"]}])
    assert counter(cached.url, "reward_score_cache_hits_total") == hits + 2
    assert (result.results[0].reward_a, result.results[0].reward_b) == (scores[0], scores[1])


def test_the_cache_is_off_by_default(servers):
    _, plain = servers
    with RewardClient(plain.url) as client:
        client.score(ITEMS)
        client.score(ITEMS)
    assert counter(plain.url, "reward_score_cache_hits_total") == 0
    assert counter(plain.url, "reward_score_cache_misses_total") == 0


def test_lru_evicts_the_least_recently_used_and_separates_models():
    cache = ScoreCache(2)
    a, b, c = (EncodedInput([101, i, 102], None, False) for i in (1, 2, 3))
    keys = cache.keys("model@v1", [a, b, c])
    cache.store(keys[:2], [1.0, 2.0])
    assert cache.lookup("m", keys[:1]) == [1.0]  # a is now the most recently used
    cache.store(keys[2:], [3.0])
    assert cache.lookup("m", keys) == [1.0, None, 3.0] and len(cache) == 2
    assert cache.lookup("m", cache.keys("model@v2", [a])) == [None]  # another version, another key
    typed = EncodedInput([101, 1, 102], [0, 1, 1], False)
    assert cache.keys("model@v1", [typed]) != keys[:1]  # segment ids are part of the input
