"""Sustained load on loopback (tests/load.py): below capacity nothing fails; above it the only
refusals are 429s; every request gets its own scores; the server's memory stays flat."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from load import closed_loop, item_pool
from server import running_server

POOL = 64
QUEUE = 64  # items per model the server lets wait: 8 requests of 8 items


@pytest.mark.slow
def test_loopback_load_below_and_above_capacity(model_dirs, tmp_path):
    pool = item_pool(POOL)
    args = [f"--model=bert={model_dirs['bert']}", "--max-queue-items", str(QUEUE), "--max-items", "64",
            "--max-wait-ms", "5", "--log-level", "warning"]
    with running_server(args, tmp_path / "server.log") as server:
        reference = httpx.post(f"{server.url}/v1/score", json={"items": pool}, timeout=60).json()["scores"]
        pid = server.process.pid
        # 4 clients x 8 items can never hold more than 32 items in the queue: no refusal allowed.
        below = asyncio.run(closed_loop(server.url, clients=4, duration_s=6, pool=pool, reference=reference,
                                        items_per_request=8, server_pid=pid))
        # 32 clients x 8 items is 4 times what the queue takes: the excess must be 429s, nothing else.
        above = asyncio.run(closed_loop(server.url, clients=32, duration_s=10, pool=pool, reference=reference,
                                        items_per_request=8, server_pid=pid))
        rejections = httpx.get(f"{server.url}/metrics").text

    for run in (below, above):
        assert run.errors == 0, run.error_samples
        assert run.wrong_scores == 0
        assert run.ok > 0
    assert below.rejected_429 == 0
    assert above.rejected_429 > 0, "32 clients never filled a 64-item queue: the test did not reach capacity"
    assert f'reward_rejections_total{{reason="queue_full"}} {float(above.rejected_429)}' in rejections
    # Memory flat under sustained overload: allocator noise, no growth with the request count.
    settled, last = above.rss_mib[2], above.rss_mib[-1]
    assert last - settled < 64, f"RSS grew from {settled} to {last} MiB during the overload"
