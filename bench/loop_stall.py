"""How long one large request body holds the service's event loop: the slowest `/healthz` answer
while the body is parsed and validated (and, if valid, scored).

Serves the default RM with `reward serve` from each ``--repo`` in turn (so one run measures the
code before and after a change), posts each body kind once, and meanwhile asks `/healthz` every
``--interval`` seconds from another thread. Bodies (all within the default limits of body size,
items and messages):

- ``tiny_messages``: 50 conversations of 4,096 one-character messages (7.5 MB), valid: scored;
- ``too_many_items``: 200,000 one-character items, over ``--max-items``: refused with 413;
- ``long_texts``: 39 items of 200,000 characters (7.8 MB), valid: scored; the load of
  ``bench/bystander.py``, where parsing is cheap per byte.

    python bench/loop_stall.py --repo before=/tmp/before --repo after=. --out bench/results/loop-stall-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE / "bench"))

from bench_serving import machine  # noqa: E402  (also puts tests/ on the path)
from server import free_port  # noqa: E402
from trainer.loop import wait_until_ready  # noqa: E402


def bodies() -> dict[str, bytes]:
    chat = [{"role": "user" if i % 2 == 0 else "assistant", "content": "x"} for i in range(4096)]
    half = 100_000
    long_items = [{"prompt": f"p{i} " + "word " * (half // 5 - 2), "response": "reply " * (half // 6)} for i in range(39)]
    return {
        "tiny_messages": json.dumps({"items": [{"messages": chat} for _ in range(50)]}).encode(),
        "too_many_items": json.dumps({"items": [{"prompt": "p", "response": "r"}] * 200_000}).encode(),
        "long_texts": json.dumps({"items": long_items}).encode(),
    }


def measure(url: str, body: bytes, interval: float) -> dict:
    latencies: list[float] = []
    done = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            while not done.is_set():
                start = time.perf_counter()
                http.get("/healthz")
                latencies.append(time.perf_counter() - start)
                time.sleep(interval)

    prober = threading.Thread(target=probe)
    prober.start()
    time.sleep(0.2)  # the prober's connection is open and warm
    start = time.perf_counter()
    with httpx.Client(base_url=url, timeout=600) as http:
        answer = http.post("/v1/score", content=body, headers={"content-type": "application/json"})
    took = time.perf_counter() - start
    done.set()
    prober.join()
    return {"status": answer.status_code, "request_s": round(took, 3), "healthz_probes": len(latencies),
            "healthz_max_s": round(max(latencies), 4), "healthz_median_s": round(statistics.median(latencies), 4)}


def serve(repo: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(repo), "REWARD_SHUTDOWN_DRAIN_S": "0"}
    with open(log_path, "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "reward_cli", "serve", "--port", str(port)], cwd=repo, env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_ready(url, server, 180, log_path)
    except RuntimeError:
        server.kill()
        raise
    return server, url


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", action="append", required=True, help="LABEL=PATH of a checkout to serve from (repeatable)")
    parser.add_argument("--interval", type=float, default=0.01)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    kinds = bodies()
    result = {"machine": machine(), "bodies_mb": {k: round(len(b) / 1e6, 2) for k, b in kinds.items()}, "runs": {}}
    for spec in args.repo:
        label, _, path = spec.partition("=")
        server, url = serve(Path(path).resolve(), Path(tempfile.gettempdir()) / f"loop-stall-{label}.log")
        try:
            result["runs"][label] = {kind: measure(url, body, args.interval) for kind, body in kinds.items()}
        finally:
            server.terminate()
            server.wait(30)
    print(json.dumps(result, indent=2))
    summary = "; ".join(f"{label}: " + ", ".join(f"{k} {v['healthz_max_s']:.3f}s" for k, v in runs.items())
                        for label, runs in result["runs"].items())
    print(f"slowest /healthz while the body was handled: {summary}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
