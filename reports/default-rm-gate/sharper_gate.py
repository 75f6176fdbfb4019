"""A sharper gate on a trained model, offline: its gate's weights raised to the power 1/T and
renormalised (the softmax at temperature T; T = 0: all weight on the top objective), applied to
its own heads. Per dev set, and on the non-answer probe's prompts.

    python reports/default-rm-gate/sharper_gate.py runs/gate0-s42 > reports/default-rm-gate/seed42-gate0-sharper.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from gate_probe import NON_ANSWER_SETS, NON_ANSWERS, SETS, GatedScorer, non_answer_records, probe_arguments  # noqa: E402
from trainer.data import load_file  # noqa: E402

TEMPERATURES = (1.0, 0.5, 0.25, 0.0)


def sharpened(weights: np.ndarray, temperature: float) -> np.ndarray:
    if temperature == 0:
        return np.eye(weights.shape[-1])[weights.argmax(axis=-1)]
    logits = np.log(np.clip(weights, 1e-12, None)) / temperature
    logits -= logits.max(axis=-1, keepdims=True)
    out = np.exp(logits)
    return out / out.sum(axis=-1, keepdims=True)


def main() -> None:
    args = probe_arguments(__doc__)
    scorer = GatedScorer(args.model_dir)
    result: dict = {"model": str(args.model_dir), "accuracy": {}, "non_answer_beats_chosen": {}}
    for name in SETS:
        records = load_file(args.data_root / f"{name}.jsonl.gz").records
        _, heads, weights = scorer.score([(r.prompt, a) for r in records for a in (r.best, r.worst)])
        heads, weights = heads.reshape(len(records), 2, -1), weights.reshape(len(records), 2, -1)
        groups = {"all": np.ones(len(records), bool)}
        if name == "sanity/dev":
            groups |= {c: np.array([r.category == c for r in records]) for c in sorted({r.category for r in records})}
        rewards = {f"T={t:g}": (sharpened(weights, t) * heads).sum(-1) for t in TEMPERATURES}
        result["accuracy"][name] = {g: {k: round(float((r[:, 0] > r[:, 1])[m].mean()) * 100, 1) for k, r in rewards.items()}
                                    for g, m in groups.items()}
        print(f"{name}: done", file=sys.stderr, flush=True)
    for name in NON_ANSWER_SETS:
        records = non_answer_records(args.data_root, name, args.n, args.seed)
        k = 1 + len(NON_ANSWERS)
        _, heads, weights = scorer.score([(r.prompt, a) for r in records for a in [r.best, *NON_ANSWERS]])
        heads, weights = heads.reshape(len(records), k, -1), weights.reshape(len(records), k, -1)
        out = {}
        for t in TEMPERATURES:
            r = (sharpened(weights, t) * heads).sum(-1)
            out[f"T={t:g}"] = {a: round(float((r[:, j] > r[:, 0]).mean()) * 100, 1) for j, a in enumerate(NON_ANSWERS, start=1)}
        result["non_answer_beats_chosen"][name] = out
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
