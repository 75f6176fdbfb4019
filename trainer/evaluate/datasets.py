"""Preference datasets for ``reward eval``: responses pooled for scoring, pairs over the pool, and
the preference report (every metric of every model on every dataset, side by side)."""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..data import DataError, PreferenceRecord, load_file
from .metrics import (
    accuracy_block,
    agreement_rate,
    brier_score,
    calibration_pairs,
    distribution_summary,
    expected_calibration_error,
    length_controlled_accuracy,
    longer_wins_accuracy,
    pair_outcomes,
    paired_bootstrap_diff,
    pearson,
    reliability_bins,
    spearman,
)
from .report import SCHEMA_VERSION, utc_now

NO_CATEGORY = "(none)"


class ItemPool:
    """Unique (prompt messages, response) items; each is scored once whatever uses it."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self._index: dict[tuple[str, str], int] = {}

    def add(self, prompt: list[dict], response: str) -> int:
        key = (json.dumps(prompt, ensure_ascii=False, sort_keys=True), response)
        index = self._index.get(key)
        if index is None:
            index = self._index[key] = len(self.items)
            self.items.append({"prompt": [{"role": m["role"], "content": m["content"]} for m in prompt], "response": response})
        return index

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class EvalDataset:
    """One preference dataset as pairs of indices into an :class:`ItemPool`."""

    name: str
    path: str
    records: list[PreferenceRecord]
    load: dict[str, int]
    chosen: np.ndarray = field(default=None)  # pool index of the better response, per pair
    rejected: np.ndarray = field(default=None)
    chosen_len: np.ndarray = field(default=None)  # characters
    rejected_len: np.ndarray = field(default=None)
    category: np.ndarray = field(default=None)  # per pair (object array of str)
    responses: np.ndarray = field(default=None)  # unique pool indices of the dataset's responses
    response_len: np.ndarray = field(default=None)
    response_category: np.ndarray = field(default=None)

    @property
    def n_pairs(self) -> int:
        return int(self.chosen.size)

    @property
    def categories(self) -> list[str]:
        return sorted(set(self.category.tolist()))

    def build(self, pool: ItemPool) -> None:
        chosen, rejected, lc, lr, cats = [], [], [], [], []
        seen: dict[int, tuple[int, str]] = {}
        for record in self.records:
            category = record.category if record.category is not None else NO_CATEGORY
            index = [pool.add(record.prompt, r) for r in record.responses]
            for i, r in zip(index, record.responses):
                seen.setdefault(i, (len(r), category))
            for b, w in record.pairs():
                chosen.append(index[b])
                rejected.append(index[w])
                lc.append(len(record.responses[b]))
                lr.append(len(record.responses[w]))
                cats.append(category)
        self.chosen, self.rejected = np.asarray(chosen, np.int64), np.asarray(rejected, np.int64)
        self.chosen_len, self.rejected_len = np.asarray(lc, np.int64), np.asarray(lr, np.int64)
        self.category = np.asarray(cats, dtype=object)
        self.responses = np.asarray(list(seen), np.int64)
        self.response_len = np.asarray([v[0] for v in seen.values()], np.int64)
        self.response_category = np.asarray([v[1] for v in seen.values()], dtype=object)


def parse_dataset_spec(text: str) -> tuple[str, str, int | None]:
    """``[NAME=]PATH[::MAX_ROWS]`` -> (name, path, max_rows); the default name is
    ``<folder>/<file stem>`` (the trainer's dev-set naming)."""
    from ..reward_data import parse_eval_spec

    spec = parse_eval_spec(text)
    return spec.name, spec.path, spec.max_rows


def load_datasets(specs: Sequence[str], pool: ItemPool, max_bad_fraction: float | None) -> list[EvalDataset]:
    """Load every ``--data`` spec into pairs over ``pool``. DataError names the dataset and why it
    has no usable pairs."""
    datasets: list[EvalDataset] = []
    names: set[str] = set()
    for text in specs:
        name, path, max_rows = parse_dataset_spec(text)
        if name in names:
            raise DataError(f"two datasets are named {name!r}; name them with NAME=PATH")
        names.add(name)
        try:
            result = load_file(path, max_rows=max_rows, max_bad_fraction=max_bad_fraction, name=name)
        except DataError as exc:
            raise DataError(f"dataset {name}: {exc}") from exc
        report = result.report.files[0]
        dataset = EvalDataset(
            name=name, path=str(path), records=result.records,
            load={"rows_read": report.rows_read, "rows_loaded": report.rows_loaded, "malformed": report.malformed},
        )
        dataset.build(pool)
        if dataset.n_pairs == 0:
            raise DataError(f"dataset {name} ({path}) has no usable pairs")
        datasets.append(dataset)
    return datasets


def dataset_seed(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])


def evaluate_model(dataset: EvalDataset, scores: np.ndarray, seed: int) -> dict[str, Any]:
    """Every single-model metric of one model on one dataset (``scores`` indexed by pool index)."""
    chosen, rejected = scores[dataset.chosen], scores[dataset.rejected]
    result = accuracy_block(chosen, rejected)
    result["per_category"] = {
        c: accuracy_block(chosen[dataset.category == c], rejected[dataset.category == c]) for c in dataset.categories
    }
    response_scores = scores[dataset.responses]
    length = length_controlled_accuracy(chosen, rejected, dataset.chosen_len, dataset.rejected_len)
    length["longer_wins_accuracy"] = longer_wins_accuracy(dataset.chosen_len, dataset.rejected_len)[0]
    length["pearson_reward_length"] = pearson(response_scores, dataset.response_len)
    length["spearman_reward_length"] = spearman(response_scores, dataset.response_len)
    result["length"] = length
    probs, labels = calibration_pairs(chosen, rejected, dataset_seed(seed, dataset.name))
    result["calibration"] = {
        "ece": expected_calibration_error(probs, labels),
        "brier": brier_score(probs, labels),
        "n_pairs": int(probs.size),
        "label_mean": float(labels.mean()),
        "bins": reliability_bins(probs, labels),
    }
    result["reward_distribution"] = {
        "all": distribution_summary(response_scores),
        "per_category": {
            c: distribution_summary(response_scores[dataset.response_category == c])
            for c in sorted(set(dataset.response_category.tolist()))
        },
    }
    return result


def compare_models(
    dataset: EvalDataset, scores: dict[str, np.ndarray], labels: Sequence[str], n_boot: int, seed: int
) -> list[dict[str, Any]]:
    """Side by side on the same pairs, for every model pair (a, b) with a before b."""
    out = []
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            delta_a = scores[a][dataset.chosen] - scores[a][dataset.rejected]
            delta_b = scores[b][dataset.chosen] - scores[b][dataset.rejected]
            oa, ob = pair_outcomes(delta_a, 0.0 * delta_a), pair_outcomes(delta_b, 0.0 * delta_b)
            boot = paired_bootstrap_diff(oa, ob, n_boot=n_boot, seed=seed)
            out.append({
                "a": a, "b": b, "n_pairs": int(oa.size), "accuracy_a": float(oa.mean()), "accuracy_b": float(ob.mean()),
                "diff": boot["diff"], "diff_ci_low": boot["low"], "diff_ci_high": boot["high"],
                "agreement": agreement_rate(delta_a, delta_b),
            })
    return out


def build_preference_report(
    datasets: Sequence[EvalDataset],
    scores: dict[str, np.ndarray],
    models: list[dict[str, Any]],
    config: dict[str, Any],
    scoring: dict[str, Any],
) -> dict[str, Any]:
    labels = [m["label"] for m in models]
    seed, n_boot = config["seed"], config["bootstrap"]
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "kind": "preference", "created": utc_now(), "config": config,
        "models": models, "scoring": scoring, "datasets": {}, "summary": {}, "plots": {},
    }
    for d in datasets:
        longer = accuracy_block(d.chosen_len, d.rejected_len)
        report["datasets"][d.name] = {
            "path": d.path, "n_records": len(d.records), "n_pairs": d.n_pairs, "n_unique_responses": int(d.responses.size),
            "categories": d.categories, "load": d.load, "longer_wins": longer,
            "models": {label: evaluate_model(d, scores[label], seed) for label in labels},
            "comparisons": compare_models(d, scores, labels, n_boot, seed),
        }
    for label in labels:
        per = [report["datasets"][d.name]["models"][label] for d in datasets]
        n = sum(p["n_pairs"] for p in per)
        report["summary"][label] = {
            "mean_accuracy": float(np.mean([p["accuracy"] for p in per])),
            "pooled_accuracy": sum(p["accuracy"] * p["n_pairs"] for p in per) / n,
            "n_pairs": n,
            "n_ties": sum(p["n_ties"] for p in per),
        }
    return report
