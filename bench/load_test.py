"""Load test: `reward serve` in a subprocess on loopback under a closed loop of C clients for D
seconds each (tests/load.py), below and above capacity. Reports per phase: requests, 200s,
429s, other errors, requests given wrong scores, p50/p99 latency of the 200s, items/s and the
server's RSS; `--out` writes the JSON, with the machine described, under bench/results/.

    python bench/load_test.py --clients 4 32 --seconds 10 --out bench/results/load-cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))

from bench_serving import default_model_dir, machine  # noqa: E402
from load import closed_loop, item_pool  # noqa: E402
from server import running_server  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: the shipped default RM)")
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 32], help="one phase per value")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    parser.add_argument("--per-request", type=int, default=8)
    parser.add_argument("--pool", type=int, default=256, help="distinct items requests are drawn from")
    parser.add_argument("--max-queue-items", type=int, default=64)
    parser.add_argument("--note", default="", help="what else ran on the machine")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    model_dir = args.model or default_model_dir()
    pool = item_pool(args.pool)
    server_args = [f"--model=bench={model_dir}", "--max-queue-items", str(args.max_queue_items),
                   "--max-items", str(min(args.max_queue_items, 1024)), "--log-level", "warning"]
    phases = []
    with tempfile.TemporaryDirectory() as tmp, running_server(server_args, Path(tmp) / "server.log") as server:
        reference = []
        for start in range(0, len(pool), 32):
            reference += httpx.post(f"{server.url}/v1/score", json={"items": pool[start:start + 32]}, timeout=300).json()["scores"]
        for clients in args.clients:
            run = asyncio.run(closed_loop(
                server.url, clients=clients, duration_s=args.seconds, pool=pool, reference=reference,
                items_per_request=args.per_request, server_pid=server.process.pid,
            ))
            phases.append(run.summary())
            print(json.dumps(phases[-1]), file=sys.stderr)
    report = {
        "benchmark": "load", "model": str(model_dir), "per_request": args.per_request,
        "max_queue_items": args.max_queue_items, "phase_seconds": args.seconds,
        "clients_backoff_on_429_s": 0.1, "machine": {**machine(), "note": args.note}, "phases": phases,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
