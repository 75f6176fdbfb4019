"""A sharper gate on the shipped default, offline (QUESTION.txt): each set's pairs scored once
(heads and gate weights), then combined at each temperature with sharper_gate.sharpened; the
differences against T = 1 with paired bootstrap intervals, and the adoption rule applied.

    python reports/default-rm-sharper/sharper_shipped.py models/default-rm --cache runs/sharper/scores.npz \
        > reports/default-rm-sharper/sharper.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "reports" / "default-rm-gate"))

from gate_probe import NON_ANSWER_SETS, NON_ANSWERS, SETS, GatedScorer, non_answer_records  # noqa: E402
from sharper_gate import sharpened  # noqa: E402
from trainer.data import load_file, weight_draw  # noqa: E402
from trainer.evaluate.metrics import paired_bootstrap_diff  # noqa: E402

TEMPERATURES = (1.0, 0.5, 0.25, 0.0)
CANDIDATES = (0.5, 0.25)
SHIPPED_SEEDS = (42, 43)  # the two runs averaged into models/default-rm
ALPACA_TRAIN = "../shared/data/alpacaeval/train.jsonl.gz"  # the path string the runs' draws were seeded with


def unused_alpaca(data_root: Path, n: int, seed: int) -> list:
    """``n`` seeded AlpacaEval training pairs that neither shipped run drew (its 0.6 weight, drawn
    as load_preferences draws it)."""
    records = load_file(data_root / "alpacaeval" / "train.jsonl.gz").records
    drawn = {i for run_seed in SHIPPED_SEEDS for i in weight_draw(len(records), 0.6, run_seed, ALPACA_TRAIN)}
    unused = [i for i in range(len(records)) if i not in drawn]
    return [records[i] for i in sorted(random.Random(seed).sample(unused, n))]


def pair_sets(data_root: Path, n_unused: int, seed: int) -> dict[str, list]:
    sets = {name: load_file(data_root / f"{name}.jsonl.gz").records for name in SETS}
    sets["alpacaeval-unused"] = unused_alpaca(data_root, n_unused, seed)
    sets["sharegpt-en"] = load_file(data_root / "sharegpt" / "dpo_en_demo.json").records
    return sets


def score_all(scorer: GatedScorer, data_root: Path, n_unused: int, seed: int, n_probe: int) -> dict[str, np.ndarray]:
    """Heads [n, k, H] and gate weights [n, k, H] per set (k = 2 for pairs, 1 + non-answers for probes),
    and sanity/dev's categories."""
    out: dict[str, np.ndarray] = {}
    for name, records in pair_sets(data_root, n_unused, seed).items():
        _, heads, weights = scorer.score([(r.prompt, a) for r in records for a in (r.best, r.worst)])
        out[f"pairs/{name}/heads"] = heads.reshape(len(records), 2, -1)
        out[f"pairs/{name}/weights"] = weights.reshape(len(records), 2, -1)
        if name == "sanity/dev":
            out["sanity_categories"] = np.array([r.category for r in records])
        print(f"{name}: {len(records)} pairs scored", file=sys.stderr, flush=True)
    k = 1 + len(NON_ANSWERS)
    for name in NON_ANSWER_SETS:
        records = non_answer_records(data_root, name, n_probe, 0)
        _, heads, weights = scorer.score([(r.prompt, a) for r in records for a in [r.best, *NON_ANSWERS]])
        out[f"probe/{name}/heads"] = heads.reshape(len(records), k, -1)
        out[f"probe/{name}/weights"] = weights.reshape(len(records), k, -1)
        print(f"{name}: non-answer probe scored", file=sys.stderr, flush=True)
    return out


def combined(scores: dict[str, np.ndarray], key: str, temperature: float) -> np.ndarray:
    return (sharpened(scores[f"{key}/weights"], temperature) * scores[f"{key}/heads"]).sum(-1)


def analyse(scores: dict[str, np.ndarray], n_boot: int) -> dict:
    names = sorted({k.split("/", 1)[1].rsplit("/", 1)[0] for k in scores if k.startswith("pairs/")})
    accuracy, diffs = {}, {}
    for name in names:
        groups = {"all": None}
        if name == "sanity/dev":
            cats = scores["sanity_categories"]
            groups |= {str(c): cats == c for c in sorted(set(cats))}
        for group, mask in groups.items():
            label = name if group == "all" else f"{name} · {group}"
            correct = {t: combined(scores, f"pairs/{name}", t) for t in TEMPERATURES}
            correct = {t: (r[:, 0] > r[:, 1]).astype(float) if mask is None else (r[:, 0] > r[:, 1])[mask].astype(float)
                       for t, r in correct.items()}
            accuracy[label] = {f"T={t:g}": round(100 * float(c.mean()), 2) for t, c in correct.items()}
            accuracy[label]["pairs"] = int(correct[1.0].size)
            diffs[label] = {f"T={t:g}": {k: round(100 * v, 2) if k != "n_boot" else v
                                         for k, v in paired_bootstrap_diff(correct[1.0], correct[t], n_boot).items()}
                            for t in TEMPERATURES if t != 1.0}
    probes = {}
    for name in NON_ANSWER_SETS:
        per_t = {}
        for t in TEMPERATURES:
            r = combined(scores, f"probe/{name}", t)
            shares = {a: round(100 * float((r[:, j] > r[:, 0]).mean()), 2) for j, a in enumerate(NON_ANSWERS, start=1)}
            per_t[f"T={t:g}"] = shares | {"mean": round(float(np.mean(list(shares.values()))), 2)}
        probes[name] = per_t
    return {"accuracy": accuracy, "difference_vs_T1": diffs, "non_answer_beats_chosen": probes,
            "mean_weight_on_top_objective": {n: {f"T={t:g}": round(float(sharpened(scores[f"pairs/{n}/weights"], t).max(-1).mean()), 3)
                                                 for t in TEMPERATURES} for n in names}}


def decide(result: dict) -> dict:
    """QUESTION.txt's rule, applied to the point values."""
    acc, probes = result["accuracy"], result["non_answer_beats_chosen"]
    dev = list(SETS)
    verdicts = {}
    for t in CANDIDATES:
        k, base = f"T={t:g}", "T=1"
        checks = {
            "a_dev_sets_within_0.5": all(acc[s][k] >= acc[s][base] - 0.5 for s in dev),
            "a_sanity_no_pair_lost": all(acc[s][k] >= acc[s][base] for s in acc if s.startswith("sanity/dev")),
            "b_held_out_within_1": all(acc[s][k] >= acc[s][base] - 1.0 for s in ("alpacaeval-unused", "sharegpt-en")),
            "c_non_answers_within_1": all(probes[s][k]["mean"] <= probes[s][base]["mean"] + 1.0 for s in NON_ANSWER_SETS),
            "d_five_set_mean_higher": float(np.mean([acc[s][k] for s in dev])) > float(np.mean([acc[s][base] for s in dev])),
        }
        verdicts[k] = checks | {"five_set_mean": round(float(np.mean([acc[s][k] for s in dev])), 2), "passes": all(checks.values())}
    verdicts["T=1 five_set_mean"] = round(float(np.mean([acc[s]["T=1"] for s in dev])), 2)
    passing = [t for t in CANDIDATES if verdicts[f"T={t:g}"]["passes"]]
    adopted = max(passing, key=lambda t: (verdicts[f"T={t:g}"]["five_set_mean"], t)) if passing else None
    verdicts["adopted"] = adopted
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--cache", type=Path, help="npz of the scores: written after scoring, read instead of scoring if present")
    parser.add_argument("--n-unused", type=int, default=1000)
    parser.add_argument("--n-probe", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-boot", type=int, default=2000)
    args = parser.parse_args()
    if args.cache is not None and args.cache.exists():
        scores = dict(np.load(args.cache))
    else:
        scores = score_all(GatedScorer(args.model_dir), args.data_root, args.n_unused, args.seed, args.n_probe)
        if args.cache is not None:
            args.cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(args.cache, **scores)
    result = {"model": str(args.model_dir), "temperatures": list(TEMPERATURES)} | analyse(scores, args.n_boot)
    result["decision"] = decide(result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
