"""Serving throughput against the in-process limit of the same backend.

1. The limit: the model in this process, the same items tokenised with the service's own
   formatting, sorted into the same token-budget batches, no HTTP.
2. The service: `reward serve` in a subprocess on loopback; C concurrent clients (our async
   client) each sending R items per request until N items are scored.

Prints one JSON object and a one-line summary; `--out` also writes the JSON (commit it under
bench/results/ with the machine described, which the JSON carries).

    python bench/bench_serving.py --model models/default-rm --items 1024 --concurrency 32 --per-request 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))

from client import AsyncRewardClient  # noqa: E402
from server import running_server  # noqa: E402  (tests/server.py: the same launcher the tests use)

DEV = REPO_ROOT.parent / "shared" / "data" / "alpacaeval" / "dev.jsonl.gz"


def load_items(n: int) -> list[dict]:
    from trainer.data import load_file

    records = load_file(DEV).records
    items = []
    for record in records:
        for response in record.responses:
            items.append({"prompt": record.prompt, "response": response})
            if len(items) == n:
                return items
    return items


def machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
    }


def in_process_limit(model_dir: Path, items: list[dict], max_batch_tokens: int, repeats: int) -> dict:
    """Tokenise with the service's formatting and run the same length-sorted token-budget batches."""
    import torch

    from service.batcher import pad_batch, plan_batches
    from service.formatting import encode_items
    from service.registry import load_model
    from service.settings import ServiceSettings

    torch.set_num_threads(os.cpu_count() or 1)
    model = load_model("bench", model_dir, ServiceSettings(models=[str(model_dir)]))
    model.warm_up()
    best = None
    for _ in range(repeats):
        started = time.perf_counter()
        encoded = encode_items(items, model.tokenizer, model.spec)
        batches = plan_batches([len(e) for e in encoded], max_batch_tokens)
        padded = 0
        for indices in batches:
            batch = pad_batch([encoded[i] for i in indices], model.pad_token_id)
            model.backend.score_batch(batch)
            padded += batch.input_ids.size
        elapsed = time.perf_counter() - started
        best = elapsed if best is None else min(best, elapsed)
    tokens = sum(len(e) for e in encoded)
    return {
        "items_per_s": len(items) / best, "tokens_per_s": tokens / best, "seconds": best,
        "batches": len(batches), "mean_batch_size": len(items) / len(batches), "padding_efficiency": tokens / padded,
    }


def _counter(metrics: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", metrics, re.M))


async def drive(url: str, items: list[dict], concurrency: int, per_request: int) -> dict:
    requests = [items[i:i + per_request] for i in range(0, len(items), per_request)]
    latencies: list[float] = []
    next_request = iter(range(len(requests)))

    async with AsyncRewardClient(url, max_concurrency=concurrency, chunk_size=per_request, timeout=600) as client:
        async def worker():
            for index in next_request:
                started = time.perf_counter()
                await client.score(requests[index])
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    lat = np.array(latencies)
    return {
        "seconds": elapsed, "requests": len(requests), "items_per_s": len(items) / elapsed,
        "latency_p50_ms": float(np.percentile(lat, 50) * 1000), "latency_p99_ms": float(np.percentile(lat, 99) * 1000),
    }


def serve_and_measure(model_dir: Path, items: list[dict], args) -> list[dict]:
    import httpx

    results = []
    server_args = [f"--model=bench={model_dir}", "--max-batch-tokens", str(args.max_batch_tokens),
                   "--max-wait-ms", str(args.max_wait_ms), "--log-level", "warning"]
    with tempfile.TemporaryDirectory() as tmp, running_server(server_args, Path(tmp) / "server.log") as server:
        asyncio.run(drive(server.url, items[: min(64, len(items))], 4, args.per_request[0]))  # warm-up
        for concurrency in args.concurrency:
            for per_request in args.per_request:
                before = httpx.get(f"{server.url}/metrics").text
                run = asyncio.run(drive(server.url, items, concurrency, per_request))
                after = httpx.get(f"{server.url}/metrics").text
                delta = {n: _counter(after, n) - _counter(before, n) for n in (
                    "reward_batch_size_sum", "reward_batch_size_count", "reward_tokens_scored_total", "reward_padded_tokens_total")}
                run.update({
                    "concurrency": concurrency, "per_request": per_request,
                    "tokens_per_s": delta["reward_tokens_scored_total"] / run["seconds"],
                    "mean_batch_size": delta["reward_batch_size_sum"] / max(delta["reward_batch_size_count"], 1),
                    "padding_efficiency": delta["reward_tokens_scored_total"] / max(delta["reward_padded_tokens_total"], 1),
                })
                results.append(run)
                print(json.dumps(run), file=sys.stderr)
    return results


def default_model_dir() -> Path:
    shipped = REPO_ROOT / "models" / "default-rm"
    if (shipped / "config.json").exists():
        return shipped
    import tiny_models

    return tiny_models.build_minilm_rm(Path(tempfile.mkdtemp()) / "minilm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: the shipped default RM)")
    parser.add_argument("--items", type=int, default=1024)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[32])
    parser.add_argument("--per-request", type=int, nargs="+", default=[8])
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=2, help="in-process limit: best of this many passes")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    model_dir = args.model or default_model_dir()
    items = load_items(args.items)
    limit = in_process_limit(model_dir, items, args.max_batch_tokens, args.repeats)
    print(json.dumps({"in_process_limit": limit}), file=sys.stderr)
    service = serve_and_measure(model_dir, items, args)
    report = {
        "benchmark": "serving", "model": str(model_dir), "items": len(items), "data": str(DEV.relative_to(REPO_ROOT.parent)),
        "max_batch_tokens": args.max_batch_tokens, "max_wait_ms": args.max_wait_ms, "machine": machine(),
        "in_process_limit": limit, "service": service,
        "ratio_to_limit": {f"c{r['concurrency']}xr{r['per_request']}": r["items_per_s"] / limit["items_per_s"] for r in service},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    best = max(service, key=lambda r: r["items_per_s"])
    print(
        f"serving: limit {limit['items_per_s']:.1f} items/s in-process; service "
        + ", ".join(f"{k} {v:.2f}x" for k, v in report["ratio_to_limit"].items())
        + f" (best {best['items_per_s']:.1f} items/s, p99 {best['latency_p99_ms']:.0f} ms, mean batch {best['mean_batch_size']:.1f})"
    )


if __name__ == "__main__":
    main()
