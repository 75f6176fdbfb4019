"""GPU throughput of the reward forward: Llama-3-8B- and Llama-3.2-1B-shaped reward models
with random weights (built from a config: nothing is downloaded), on a realistic mix of
sequence lengths, in bfloat16 with SDPA attention.

Three ways of running the same items:

* ``padded``: Hugging Face style, uniform batches of ``--padded-batch-size`` items in arrival
  order, each padded to its longest row;
* ``ours``: the service's path: the batcher's length-sorted token-budget plan
  (``service.batcher.plan_batches``) through ``TorchBackend.score_batch`` (pinned, non-blocking
  copies; columns rounded to a multiple of 8; ``--compile`` for torch.compile);
* ``naive``: the naive peer: one forward per request of ``--per-request`` items in arrival
  order (OpenRLHF's serve_rm.py without cross-request batching).

Reported per way: items/s, real tokens/s, padding efficiency and model-FLOPs utilisation
MFU = 2 x non-embedding parameters x real tokens / seconds / peak (attention's own FLOPs are not
counted, as is usual for this measure). Peak bf16 dense: H100 SXM and H200 989 TFLOP/s, H100
PCIe 756, A100 312; ``--peak-tflops`` for other devices.

Prints one JSON object and a one-line summary; ``--out`` also writes the JSON. Refuses to run
without CUDA.

    python bench/bench_gpu.py --shape 1b 8b --items 2048 --out bench/results/gpu-h100.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

# Llama-3.1-8B and Llama-3.2-1B shapes (their published configs), with a one-output head.
SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True),
}
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0)]


def peak_tflops(device_name: str, given: float | None) -> float | None:
    if given:
        return given
    return next((peak for name, peak in PEAK_BF16_TFLOPS if name in device_name), None)


def length_mix(n: int, median: int, sigma: float, longest: int, seed: int) -> np.ndarray:
    """Prompt + response lengths of chat RLHF rollouts: log-normal (most a few hundred tokens,
    a long tail of multi-paragraph answers), clipped to [16, longest]."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(median), sigma, n).astype(int), 16, longest)


def build_model(shape: str, dtype, compile: bool):
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from reward_core.backends import TorchBackend
    from reward_core.model_dir import RewardModelSpec

    config = LlamaConfig(**SHAPES[shape], num_labels=1, pad_token_id=0, max_position_embeddings=8192)
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        torch.manual_seed(0)
        model = LlamaForSequenceClassification(config).to(dtype)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.model.embed_tokens.weight.numel()
    spec = RewardModelSpec(architecture="decoder", max_length=8192)
    return TorchBackend.from_module(model, spec, device="cuda", compile=compile), total, total - embedding


def batches_padded(lengths: np.ndarray, rows: int) -> list[list[int]]:
    return [list(range(i, min(i + rows, len(lengths)))) for i in range(0, len(lengths), rows)]


def run_way(backend, items: list[list[int]], plan: list[list[int]]) -> dict:
    import torch

    from reward_core.forward import pad_batch
    from reward_core.formatting import EncodedInput

    encoded = [EncodedInput(ids, None, False) for ids in items]
    padded = real = 0
    batches = [pad_batch([encoded[i] for i in indices], 0) for indices in plan]
    torch.cuda.synchronize()
    started = time.perf_counter()
    for batch in batches:
        backend.score_batch(batch)  # returns host numpy: each batch is synchronised, as when serving
        padded += batch.input_ids.size
        real += int(batch.attention_mask.sum())
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "items_per_s": len(items) / seconds, "tokens_per_s": real / seconds,
            "batches": len(plan), "mean_batch_size": len(items) / len(plan), "padding_efficiency": real / padded,
            "real_tokens": real, "padded_tokens": padded}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", nargs="+", choices=sorted(SHAPES), default=["1b", "8b"])
    parser.add_argument("--items", type=int, default=2048)
    parser.add_argument("--median-tokens", type=int, default=320)
    parser.add_argument("--sigma", type=float, default=0.8, help="log-normal spread of the lengths")
    parser.add_argument("--longest", type=int, default=4096)
    parser.add_argument("--max-batch-tokens", type=int, default=65536, help="ours: padded tokens per forward")
    parser.add_argument("--padded-batch-size", type=int, default=32, help="padded: items per uniform batch")
    parser.add_argument("--per-request", type=int, default=8, help="naive: items per request (one forward each)")
    parser.add_argument("--ways", nargs="+", choices=["padded", "ours", "naive"], default=["padded", "ours", "naive"])
    parser.add_argument("--compile", action="store_true", help="ours: torch.compile the forward")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak of the device")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU and torch sees none (torch "
              f"{torch.__version__}); run it on a GPU machine", file=sys.stderr)
        return 2
    from reward_core.backends import TorchBackend  # noqa: F401  (fail here, not mid-run, if the core is broken)
    from reward_core.forward import plan_batches

    device_name = torch.cuda.get_device_name()
    peak = peak_tflops(device_name, args.peak_tflops)
    lengths = length_mix(args.items, args.median_tokens, args.sigma, args.longest, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    report = {
        "benchmark": "gpu", "device": device_name, "peak_bf16_tflops": peak, "torch": torch.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(), "items": args.items,
        "length_mix": {"distribution": "lognormal", "median": args.median_tokens, "sigma": args.sigma,
                       "longest": args.longest, "mean": float(lengths.mean()), "p50": float(np.percentile(lengths, 50)),
                       "p90": float(np.percentile(lengths, 90)), "max": int(lengths.max())},
        "max_batch_tokens": args.max_batch_tokens, "padded_batch_size": args.padded_batch_size,
        "per_request": args.per_request, "compile": args.compile, "shapes": {},
    }
    for shape in args.shape:
        backend, total, non_embedding = build_model(shape, torch.bfloat16, args.compile)
        vocab = SHAPES[shape]["vocab_size"]
        items = [rng.integers(1, vocab, n).tolist() for n in lengths]
        plans = {
            "padded": batches_padded(lengths, args.padded_batch_size),
            "ours": plan_batches(lengths.tolist(), args.max_batch_tokens),
            "naive": batches_padded(lengths, args.per_request),
        }
        results = {"parameters": total, "non_embedding_parameters": non_embedding}
        for way in args.ways:
            # Warm-up on the first batches of the plan (kernel selection; compilation with --compile).
            run_way(backend, items, plans[way][:3])
            result = run_way(backend, items, plans[way])
            flops = 2 * non_embedding * result["real_tokens"]
            result["mfu"] = flops / result["seconds"] / (peak * 1e12) if peak else None
            result["hardware_flops_utilisation"] = (
                2 * non_embedding * result["padded_tokens"] / result["seconds"] / (peak * 1e12) if peak else None
            )
            results[way] = result
            print(json.dumps({"shape": shape, "way": way, **result}), file=sys.stderr)
        if "ours" in results and "naive" in results:
            results["ours_vs_naive"] = results["ours"]["items_per_s"] / results["naive"]["items_per_s"]
        if "ours" in results and "padded" in results:
            results["ours_vs_padded"] = results["ours"]["items_per_s"] / results["padded"]["items_per_s"]
        report["shapes"][shape] = results
        del backend
        torch.cuda.empty_cache()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    parts = []
    for shape, r in report["shapes"].items():
        mfu = {w: r[w]["mfu"] for w in ("padded", "ours", "naive") if w in r and r[w]["mfu"] is not None}
        parts.append(f"{shape}: " + ", ".join(f"{w} {r[w]['tokens_per_s']:.0f} tok/s" + (f" MFU {mfu[w]:.0%}" if w in mfu else "")
                                              for w in ("padded", "ours", "naive") if w in r)
                     + (f", ours/naive {r['ours_vs_naive']:.1f}x" if "ours_vs_naive" in r else ""))
    print(f"gpu ({device_name}): " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
