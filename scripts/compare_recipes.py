"""Two training recipes, each trained with more than one seed, compared on the dev sets through a
running service: what decides whether a change to a recipe (such as the default's) is adopted.

    python scripts/compare_recipes.py --url URL --recipe shipped=default,base-s43 \
        --recipe augmented=dv7,aug-s43 [--data NAME=PATH ...] [--bootstrap 2000] [--out FILE]

Each ``--recipe NAME=MODEL,MODEL`` names the served models (one per seed) of one recipe; all are
served by the one service at ``--url`` (``reward serve --model NAME=DIR`` repeated). With one
seed per recipe, a difference between recipes cannot be told from a difference between seeds;
with several, this prints per dev set (and per category of a set that has them, e.g. sanity/dev):

- each model's accuracy, and each recipe's mean over its seeds;
- the second recipe minus the first, averaged over seeds, with a 95% interval from a paired
  bootstrap over the set's pairs (each pair's outcome averaged over a recipe's seeds first), so
  the interval holds the dev set's size; the seeds are the ones given, not a sample of them;
- the seed-to-seed difference within each recipe (its last seed minus its first, paired), the
  scale a one-seed comparison is blind to;
- per set, a recipe's seeds read as an ensemble of separate runs (``seeds_as_ensemble``): each
  model's rewards standardised over the pool, their mean as the reward, and how well the seeds'
  disagreement picks out the pairs that mean gets wrong (the AUROC of each of ``reward eval``'s
  pair uncertainty scores, ``small_margin`` the baseline that needs no second run).

One JSON object goes to stdout (and ``--out``), a summary line per set to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client import RewardClient  # noqa: E402
from trainer.evaluate.datasets import NO_CATEGORY, ItemPool, load_datasets  # noqa: E402
from trainer.evaluate.metrics import pair_outcomes, paired_bootstrap_diff  # noqa: E402
from trainer.evaluate.uncertainty import EnsembleScores, uncertainty_section  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_SETS = ["alpacaeval/dev", "alpacaeval/dev-balanced", "hh-harmless/dev", "truthfulqa/dev", "sanity/dev"]


def parse_recipe(text: str) -> tuple[str, list[str]]:
    name, sep, models = text.partition("=")
    seeds = [m for m in models.split(",") if m]
    if not sep or not name or len(seeds) < 1:
        raise argparse.ArgumentTypeError(f"--recipe {text!r}: give NAME=MODEL[,MODEL...] (the served models, one per seed)")
    return name, seeds


def compare_outcomes(outcomes: dict[str, np.ndarray], recipes: list[tuple[str, list[str]]], n_boot: int, seed: int) -> dict[str, Any]:
    """Per-pair outcomes (1 right, 0.5 tie, 0 wrong) per model -> the comparison described above."""
    (name_a, seeds_a), (name_b, seeds_b) = recipes
    mean_a = np.mean([outcomes[m] for m in seeds_a], axis=0)
    mean_b = np.mean([outcomes[m] for m in seeds_b], axis=0)
    effect = paired_bootstrap_diff(mean_a, mean_b, n_boot=n_boot, seed=seed)
    out: dict[str, Any] = {
        "n_pairs": int(mean_a.size),
        "accuracy": {m: float(outcomes[m].mean()) for _, seeds in recipes for m in seeds},
        "recipe_mean": {name_a: float(mean_a.mean()), name_b: float(mean_b.mean())},
        "difference": {"of": f"{name_b} - {name_a}", "diff": effect["diff"], "low": effect["low"], "high": effect["high"]},
        "seed_to_seed": {},
    }
    for name, seeds in recipes:
        if len(seeds) > 1:
            spread = paired_bootstrap_diff(outcomes[seeds[0]], outcomes[seeds[-1]], n_boot=n_boot, seed=seed)
            out["seed_to_seed"][name] = {"of": f"{seeds[-1]} - {seeds[0]}", "diff": spread["diff"],
                                         "low": spread["low"], "high": spread["high"]}
    return out


def seeds_as_ensemble(rewards: dict[str, np.ndarray], seeds: list[str], chosen: np.ndarray, rejected: np.ndarray,
                      n_boot: int, seed: int) -> dict[str, Any]:
    """A recipe's seeds as the members of an ensemble of separate runs, on one set's pairs. Each
    run's rewards are standardised over the whole pool first: runs differ in scale and offset."""
    members = np.stack([(rewards[m] - rewards[m].mean()) / (rewards[m].std() or 1.0) for m in seeds], axis=1)
    runs = EnsembleScores(members=members, item_std=members.std(axis=1), aggregate="mean", uncertainty_penalty=None)
    answers = np.unique(np.r_[chosen, rejected])
    section = uncertainty_section(chosen, rejected, answers, members.mean(axis=1), runs, 4, n_boot, seed)
    return {"members": seeds, "n_wrong": section["n_wrong"], "accuracy": section["accuracy"]["accuracy"],
            "pair_error_auroc": section["pair_error_auroc"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the service serving every model named in --recipe")
    parser.add_argument("--recipe", type=parse_recipe, action="append", required=True,
                        help="NAME=MODEL[,MODEL...]: a recipe and its served models, one per seed (give two)")
    parser.add_argument("--data", action="append", help="[NAME=]PATH of a dev set (repeatable; default: our five)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="paired bootstrap resamples (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="the bootstrap's seed")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if len(args.recipe) != 2:
        parser.error("give exactly two --recipe")
    specs = args.data or [f"{name}={DATA / name}.jsonl.gz" for name in DEFAULT_SETS]
    pool = ItemPool()
    datasets = load_datasets(specs, pool, max_bad_fraction=0.01)
    models = [m for _, seeds in args.recipe for m in seeds]
    rewards: dict[str, np.ndarray] = {}
    with RewardClient(args.url, timeout=300) as rm:
        for model in models:
            print(f"compare_recipes: scoring {len(pool)} items with {model}", file=sys.stderr)
            rewards[model] = np.asarray(rm.score(pool.items, model=model).scores, np.float64)

    result: dict[str, Any] = {"recipes": dict(args.recipe), "sets": {}}
    for d in datasets:
        outcomes = {m: pair_outcomes(rewards[m][d.chosen] - rewards[m][d.rejected], np.zeros(d.n_pairs)) for m in models}
        entry = compare_outcomes(outcomes, args.recipe, args.bootstrap, args.seed)
        categories = [c for c in d.categories if c != NO_CATEGORY]
        if len(categories) > 1:
            entry["per_category"] = {
                c: compare_outcomes({m: o[d.category == c] for m, o in outcomes.items()}, args.recipe, args.bootstrap, args.seed)
                for c in categories
            }
        entry["seeds_as_ensemble"] = {
            name: seeds_as_ensemble(rewards, seeds, d.chosen, d.rejected, args.bootstrap, args.seed)
            for name, seeds in args.recipe if len(seeds) > 1
        }
        result["sets"][d.name] = entry
        diff = entry["difference"]
        print(f"{d.name}: {json.dumps(entry['recipe_mean'])}; {diff['of']} {100 * diff['diff']:+.1f} "
              f"[{100 * diff['low']:+.1f}, {100 * diff['high']:+.1f}] points", file=sys.stderr)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
