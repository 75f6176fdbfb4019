"""Serving throughput against the in-process limit of the same backend, and against a naive peer.

1. The limit: the model in this process on the chosen backend, the same items tokenised with
   the service's own formatting, sorted into the same token-budget batches, no HTTP.
2. The service: `reward serve` in a subprocess on loopback; C concurrent clients (our async
   client) each sending R items per request until N items are scored. R=1 is how OpenRLHF's
   trainer calls a remote RM (each sample as soon as it is generated).
3. With ``--naive-peer``: bench/naive_peer.py (one forward per request, no cross-request
   batching, torch) under the same load.

``--backend``: torch (fp32), onnx (fp32 export) or onnx-int8 (dynamic int8 export); the ONNX
exports are made on the spot with `reward export-onnx`'s code unless ``--onnx-dir`` names one.

Prints one JSON object and a one-line summary; `--out` also writes the JSON (commit it under
bench/results/ with the machine described, which the JSON carries).

    python bench/bench_serving.py --backend onnx-int8 --items 1024 --concurrency 1 8 32 128 --per-request 8 1 --naive-peer
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
from service.settings import CPU_BATCH_TOKENS, CPU_MAX_PADDING  # noqa: E402
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


def emit(report: dict, out: Path | None) -> None:
    """Print the report as JSON and, with --out, write it there too."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def machine() -> dict:
    import onnxruntime
    import torch

    cpu, simd = platform.processor(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                # What int8 and fp32 kernels can use: AVX2 only, or AVX-512 / VNNI / AMX.
                simd = sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma")))
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "cpu_simd": simd, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "onnxruntime": onnxruntime.__version__,
        "platform": platform.platform(),
    }


def in_process_limit(
    model_dir: Path, backend: str, items: list[dict], max_batch_tokens: int, max_padding: float, repeats: int,
    score_rows_alone: bool | None = None,
) -> dict:
    """Tokenise with the service's formatting and run the same length-sorted token-budget batches
    on the same backend (``score_rows_alone``: override the ONNX backend's choice, to compare)."""
    model = load_bench_model(model_dir, backend, score_rows_alone)
    best = None
    for _ in range(repeats):
        elapsed, stats = limit_pass(model, items, max_batch_tokens, max_padding)
        best = elapsed if best is None else min(best, elapsed)
    return limit_result(items, best, stats)


def load_bench_model(model_dir: Path, backend: str, score_rows_alone: bool | None = None):
    """The model as the service loads it, warmed up, on every core."""
    import torch

    from service.registry import load_model
    from service.settings import ServiceSettings

    torch.set_num_threads(os.cpu_count() or 1)
    model = load_model("bench", model_dir, ServiceSettings(models=[str(model_dir)], backend=backend))
    if score_rows_alone is not None:
        model.backend.score_rows_alone = score_rows_alone
    model.warm_up()
    return model


def limit_pass(model, items: list[dict], max_batch_tokens: int, max_padding: float) -> tuple[float, dict]:
    """One timed pass of the in-process limit: tokenise, plan, pad, score. (seconds, batch stats)"""
    from reward_core.forward import pad_batch, plan_batches
    from reward_core.formatting import encode_items

    started = time.perf_counter()
    encoded = encode_items(items, model.tokenizer, model.spec)
    batches = plan_batches([len(e) for e in encoded], max_batch_tokens, max_padding=max_padding)
    padded = 0
    for indices in batches:
        batch = pad_batch([encoded[i] for i in indices], model.pad_token_id)
        model.backend.score_batch(batch)
        padded += batch.input_ids.size
    elapsed = time.perf_counter() - started
    return elapsed, {"tokens": sum(len(e) for e in encoded), "padded": padded, "batches": len(batches)}


def limit_result(items: list[dict], best: float, stats: dict) -> dict:
    tokens, batches = stats["tokens"], stats["batches"]
    return {
        "items_per_s": len(items) / best, "tokens_per_s": tokens / best, "seconds": best,
        "batches": batches, "mean_batch_size": len(items) / batches, "padding_efficiency": tokens / stats["padded"],
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


def token_lengths(model_dir: Path, backend: str, items: list[dict]) -> list[int]:
    from reward_core.formatting import encode_items
    from reward_core.model_dir import load_spec, load_tokenizer
    from transformers import AutoConfig

    spec_json = model_dir / "reward_model.json"
    base = json.loads(spec_json.read_text()).get("base_model") if spec_json.is_file() else None
    tokenizer = load_tokenizer(model_dir, base_model=base)
    spec = load_spec(model_dir, AutoConfig.from_pretrained(model_dir), tokenizer)
    return [len(e) for e in encode_items(items, tokenizer, spec)]


def naive_peer_measure(model_dir: Path, items: list[dict], lengths: list[int], args) -> list[dict]:
    """The naive peer under the same load; its tokens and padding follow from the request
    composition (each request is one batch padded to its longest item)."""
    results = []
    peer_args = ["--model", str(model_dir), "--backend", "torch"]
    entry = [str(REPO_ROOT / "bench" / "naive_peer.py")]
    with tempfile.TemporaryDirectory() as tmp, running_server(peer_args, Path(tmp) / "peer.log", entry=entry) as peer:
        asyncio.run(drive(peer.url, items[: min(16, len(items))], 2, args.per_request[0]))  # warm-up
        for concurrency in args.concurrency:
            for per_request in args.per_request:
                run = asyncio.run(drive(peer.url, items, concurrency, per_request))
                groups = [lengths[i:i + per_request] for i in range(0, len(lengths), per_request)]
                real, padded = sum(lengths), sum(len(g) * max(g) for g in groups)
                run.update({
                    "concurrency": concurrency, "per_request": per_request, "tokens_per_s": real / run["seconds"],
                    "mean_batch_size": len(items) / len(groups), "padding_efficiency": real / padded,
                })
                results.append(run)
                print(json.dumps({"naive_peer": run}), file=sys.stderr)
    return results


def serve_and_measure(model_dir: Path, backend: str, items: list[dict], args) -> list[dict]:
    import httpx

    results = []
    server_args = [f"--model=bench={model_dir}", "--backend", "onnx" if backend.startswith("onnx") else "torch",
                   "--max-batch-tokens", str(args.max_batch_tokens), "--max-padding", str(args.max_padding),
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


def served_directory(model_dir: Path, backend: str, onnx_dir: Path | None, workdir: Path) -> Path:
    """The directory the chosen backend serves: the model itself, or its ONNX export."""
    if backend == "torch":
        return model_dir
    if onnx_dir is not None:
        return onnx_dir
    from trainer.export import export_onnx

    out = workdir / backend
    summary = export_onnx(model_dir, out, int8=backend == "onnx-int8")
    print(json.dumps({"export": summary}), file=sys.stderr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: the shipped default RM)")
    parser.add_argument("--backend", choices=["torch", "onnx", "onnx-int8"], default="torch")
    parser.add_argument("--onnx-dir", type=Path, default=None, help="an existing export of --model for the onnx backends")
    parser.add_argument("--naive-peer", action="store_true", help="also measure bench/naive_peer.py (torch) under the same load")
    parser.add_argument("--items", type=int, default=1024)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--per-request", type=int, nargs="+", default=[8, 1])
    parser.add_argument("--max-batch-tokens", type=int, default=CPU_BATCH_TOKENS,
                        help="padded tokens per forward, for the service and the in-process limit alike "
                        "(default: the service's CPU default)")
    parser.add_argument("--max-padding", type=float, default=CPU_MAX_PADDING,
                        help="largest padding share of a forward, for both (default: the service's CPU default)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=2, help="in-process limit: best of this many passes")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    model_dir = args.model or default_model_dir()
    items = load_items(args.items)
    with tempfile.TemporaryDirectory() as workdir:
        served = served_directory(model_dir, args.backend, args.onnx_dir, Path(workdir))
        backend = "onnx" if args.backend.startswith("onnx") else "torch"
        limit = in_process_limit(served, backend, items, args.max_batch_tokens, args.max_padding, args.repeats)
        print(json.dumps({"in_process_limit": limit}), file=sys.stderr)
        service = serve_and_measure(served, args.backend, items, args)
    peer = naive_peer_measure(model_dir, items, token_lengths(model_dir, "torch", items), args) if args.naive_peer else None
    report = {
        "benchmark": "serving", "backend": args.backend, "model": str(model_dir), "items": len(items),
        "data": str(DEV.relative_to(REPO_ROOT.parent)),
        "max_batch_tokens": args.max_batch_tokens, "max_padding": args.max_padding, "max_wait_ms": args.max_wait_ms, "machine": machine(),
        "in_process_limit": limit, "service": service,
        "ratio_to_limit": {f"c{r['concurrency']}xr{r['per_request']}": r["items_per_s"] / limit["items_per_s"] for r in service},
    }
    if peer is not None:
        report["naive_peer"] = peer
        by_load = {(r["concurrency"], r["per_request"]): r for r in peer}
        report["vs_naive_peer"] = {
            f"c{r['concurrency']}xr{r['per_request']}": {
                "items_per_s_ratio": r["items_per_s"] / by_load[r["concurrency"], r["per_request"]]["items_per_s"],
                "p99_ratio": r["latency_p99_ms"] / by_load[r["concurrency"], r["per_request"]]["latency_p99_ms"],
            } for r in service
        }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    best = max(service, key=lambda r: r["items_per_s"])
    summary = (
        f"serving ({args.backend}): limit {limit['items_per_s']:.1f} items/s in-process; service "
        + ", ".join(f"{k} {v:.2f}x" for k, v in report["ratio_to_limit"].items())
        + f" (best {best['items_per_s']:.1f} items/s, p99 {best['latency_p99_ms']:.0f} ms, mean batch {best['mean_batch_size']:.1f})"
    )
    if peer is not None:
        summary += "; vs naive torch peer: " + ", ".join(
            f"{k} {v['items_per_s_ratio']:.2f}x items/s, p99 x{v['p99_ratio']:.2f}" for k, v in report["vs_naive_peer"].items()
        )
    print(summary)


if __name__ == "__main__":
    main()
