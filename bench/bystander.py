"""Bystander latency under issue #21's probe: while two huge valid requests (~7.8 MB each: 39
items of 200,000 characters, the default --max-field-chars) are being scored, how long does a
one-item request wait?

Serves the default RM with `reward serve` from ``--repo`` (so the same script measures another
checkout, e.g. the code before a change), sends the two huge requests at once, then a one-item
/v1/score every ``--interval`` seconds until both huge ones are answered, and writes the
one-item latencies (and the huge requests' own) as JSON.

    python bench/bystander.py --out bench/results/bystander-cpu.json
    python bench/bystander.py --repo /tmp/before --label before --out /tmp/before.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def huge_body(tag: str) -> bytes:
    half = 100_000  # prompt + response: 200,000 characters per item
    items = [{"prompt": f"{tag}{i} " + "word " * (half // 5 - 2), "response": "reply " * (half // 6)} for i in range(39)]
    return json.dumps({"items": items}).encode()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=HERE, help="checkout whose `reward serve` to measure")
    parser.add_argument("--label", default="after")
    parser.add_argument("--interval", type=float, default=0.25)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(args.repo), "REWARD_SHUTDOWN_DRAIN_S": "0"}
    server = subprocess.Popen([sys.executable, "-m", "reward_cli", "serve", "--port", str(port)], cwd=args.repo, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the server did not become ready")
            time.sleep(0.5)

        small = {"items": [{"prompt": "What is the capital of France?", "response": "Paris."}]}
        with httpx.Client(base_url=url, timeout=120) as http:
            baseline = []
            for _ in range(10):
                t = time.perf_counter()
                http.post("/v1/score", json=small).raise_for_status()
                baseline.append(time.perf_counter() - t)

        bodies = [huge_body("a"), huge_body("b")]
        huge_results: list[dict] = []

        def send_huge(body: bytes) -> None:
            t = time.perf_counter()
            answer = httpx.post(f"{url}/v1/score", content=body, headers={"content-type": "application/json"}, timeout=300)
            huge_results.append({"status": answer.status_code, "seconds": round(time.perf_counter() - t, 2)})

        threads = [threading.Thread(target=send_huge, args=(b,)) for b in bodies]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        time.sleep(1.0)  # both huge bodies are in and being tokenised
        latencies = []
        with httpx.Client(base_url=url, timeout=120) as http:
            while any(t.is_alive() for t in threads):
                t = time.perf_counter()
                answer = http.post("/v1/score", json=small)
                latencies.append(round(time.perf_counter() - t, 3))
                assert answer.status_code == 200, answer.text
                time.sleep(args.interval)
        for thread in threads:
            thread.join()
    finally:
        server.terminate()
        server.wait(timeout=30)

    result = {
        "label": args.label,
        "what": "one-item /v1/score latency (s) while two ~7.8 MB requests (39 items x 200,000 chars) are scored",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
        "idle_one_item_median_s": round(statistics.median(baseline), 3),
        "under_load": {
            "requests": len(latencies),
            "median_s": round(statistics.median(latencies), 3) if latencies else None,
            "p90_s": sorted(latencies)[max(0, math.ceil(0.9 * len(latencies)) - 1)] if latencies else None,
            "max_s": max(latencies) if latencies else None,
        },
        "huge_requests": huge_results,
        "load_seconds": round(time.perf_counter() - started, 1),
        "latencies_s": latencies,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
