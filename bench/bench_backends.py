"""The CPU backends side by side, in one process and one run: torch fp32, ONNX fp32 and ONNX int8.

Each backend's in-process limit (bench_serving.py's: the service's formatting, the same
length-sorted token-budget batches, no HTTP) on the same items, one after the other, so the
ratios between them come from one machine at one time. The int8 export is also measured with
whole padded batches (``int8_batched``), to show what scoring each item alone costs or saves;
the service never runs it that way, because an item's int8 reward would then depend on its
batch (docs/serving.md, Performance).

Prints one JSON object and a one-line summary; ``--out`` also writes the JSON (commit it under
bench/results/; it carries the machine, SIMD flags included).

    python bench/bench_backends.py --items 384 --out bench/results/backends-cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serving import DEV, REPO_ROOT, default_model_dir, in_process_limit, load_items, machine, served_directory  # noqa: E402
from service.settings import CPU_BATCH_TOKENS, CPU_MAX_PADDING  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: the shipped default RM)")
    parser.add_argument("--items", type=int, default=384)
    parser.add_argument("--max-batch-tokens", type=int, default=CPU_BATCH_TOKENS)
    parser.add_argument("--max-padding", type=float, default=CPU_MAX_PADDING)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many passes per backend")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    model_dir = args.model or default_model_dir()
    items = load_items(args.items)
    limits = {}
    with tempfile.TemporaryDirectory() as workdir:
        fp32 = served_directory(model_dir, "onnx", None, Path(workdir))
        int8 = served_directory(model_dir, "onnx-int8", None, Path(workdir))
        runs = [("torch_fp32", model_dir, "torch", None), ("onnx_fp32", fp32, "onnx", None),
                ("onnx_int8", int8, "onnx", None), ("onnx_int8_batched", int8, "onnx", False)]
        for name, served, backend, rows_alone in runs:
            limits[name] = in_process_limit(served, backend, items, args.max_batch_tokens, args.max_padding,
                                            args.repeats, score_rows_alone=rows_alone)
            print(json.dumps({name: limits[name]}), file=sys.stderr)
    base = limits["torch_fp32"]["items_per_s"]
    report = {
        "benchmark": "backends", "model": str(model_dir), "items": len(items), "data": str(DEV.relative_to(REPO_ROOT.parent)),
        "max_batch_tokens": args.max_batch_tokens, "max_padding": args.max_padding, "machine": machine(),
        "in_process_limit": limits,
        "ratio_to_torch_fp32": {name: limit["items_per_s"] / base for name, limit in limits.items()},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print("backends (in process, items/s): " + ", ".join(
        f"{name} {limit['items_per_s']:.1f} ({report['ratio_to_torch_fp32'][name]:.2f}x torch)" for name, limit in limits.items()))


if __name__ == "__main__":
    main()
