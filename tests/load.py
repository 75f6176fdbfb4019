"""A closed-loop load generator over raw HTTP (no client retries, so every 429 is seen), shared
by the load test (tests/test_load.py) and the load benchmark (bench/load_test.py).

Each of C clients sends, back to back for D seconds, a request of R items drawn at random from
a pool of distinct items whose scores are known, and checks that the answer holds exactly those
items' scores in that order: a request given another request's scores is counted as
``wrong_scores``. A 429 is retried after ``backoff_s`` (shorter than Retry-After, to keep the
pressure on). The server's RSS is sampled every half second.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np


def item_pool(n: int) -> list[dict]:
    """``n`` distinct (prompt, response) items of varied lengths."""
    rng = random.Random(0)
    words = "the a river mountain quick answer question model reward score token batch queue".split()
    pool = []
    for i in range(n):
        prompt = f"Question {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 40))) + "?"
        response = f"Answer {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 60))) + "."
        pool.append({"prompt": prompt, "response": response})
    return pool


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@dataclass
class LoadResult:
    clients: int
    items_per_request: int
    seconds: float
    requests: int = 0
    ok: int = 0
    rejected_429: int = 0
    errors: int = 0  # any other status, or a transport error
    wrong_scores: int = 0
    error_samples: list[str] = field(default_factory=list)
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    items_per_s: float = 0.0
    rss_mib: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        data = asdict(self)
        samples = data.pop("rss_mib")
        data["rss_mib_first"], data["rss_mib_last"] = (samples[0], samples[-1]) if samples else (None, None)
        data["rss_mib_max"] = max(samples) if samples else None
        return data


async def closed_loop(
    url: str, *, clients: int, duration_s: float, pool: list[dict], reference: list[float],
    items_per_request: int, model: str | None = None, server_pid: int | None = None,
    headers: dict[str, str] | None = None, backoff_s: float = 0.1, tolerance: float = 1e-3,
) -> LoadResult:
    result = LoadResult(clients=clients, items_per_request=items_per_request, seconds=duration_s)
    latencies: list[float] = []
    stop_at = time.monotonic() + duration_s

    async def client(number: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(number)
        while time.monotonic() < stop_at:
            chosen = rng.sample(range(len(pool)), items_per_request)
            body = {"items": [pool[i] for i in chosen], **({"model": model} if model else {})}
            started = time.perf_counter()
            result.requests += 1
            try:
                answer = await http.post("/v1/score", json=body)
            except httpx.HTTPError as exc:
                result.errors += 1
                result.error_samples.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            if answer.status_code == 200:
                result.ok += 1
                latencies.append(time.perf_counter() - started)
                scores = answer.json()["scores"]
                if len(scores) != len(chosen) or any(abs(s - reference[i]) > tolerance for s, i in zip(scores, chosen)):
                    result.wrong_scores += 1
            elif answer.status_code == 429:
                result.rejected_429 += 1
                await asyncio.sleep(backoff_s)
            else:
                result.errors += 1
                result.error_samples.append(f"{answer.status_code}: {answer.text}"[:200])

    async def sample_rss() -> None:
        while time.monotonic() < stop_at and server_pid is not None:
            value = rss_mib(server_pid)
            if value is not None:
                result.rss_mib.append(round(value, 1))
            await asyncio.sleep(0.5)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, headers=headers) as http:
        started = time.monotonic()
        await asyncio.gather(sample_rss(), *(client(n, http) for n in range(clients)))
        result.seconds = round(time.monotonic() - started, 2)
    if latencies:
        result.latency_p50_ms = round(float(np.percentile(latencies, 50)) * 1000, 1)
        result.latency_p99_ms = round(float(np.percentile(latencies, 99)) * 1000, 1)
    result.items_per_s = round(result.ok * items_per_request / result.seconds, 1)
    result.error_samples = result.error_samples[:5]
    return result
