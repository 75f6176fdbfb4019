"""Preference datasets for ``reward eval``: responses pooled for scoring, pairs over the pool, and
the preference report (every metric of every model on every dataset, side by side).

Which objective a dataset measures: ``:objective=NAME`` on its ``--data`` spec; else the
default for its folder (:data:`FOLDER_OBJECTIVES`); else none for the whole set, and each of its
categories named like an objective (:data:`CATEGORY_OBJECTIVES`, e.g. ``sanity/dev``'s
``truthful``/``harmless``/``helpful``) is a section of its own. For a model with several heads
(objectives) the report gives each head's accuracy beside the combination's on every set and
section, the matching head highlighted.

Responses to score on their own (``--ood``: inputs unlike the dev sets, for an ensemble's
uncertainty) are :class:`ItemSet` objects over the same pool, so they are scored in the same pass.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from reward_core.objectives import OBJECTIVE_NAME

from ..data import DataError, PreferenceRecord, load_file, load_items
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
from .uncertainty import EnsembleScores, uncertainty_report

NO_CATEGORY = "(none)"

# What our known dev sets measure, by the folder they live in (../shared/data/<folder>/...).
FOLDER_OBJECTIVES = {"alpacaeval": "helpfulness", "hh-harmless": "harmlessness", "truthfulqa": "truthfulness"}
# Categories that name what their pairs measure (sanity/dev's); a category spelled as an
# objective (``harmlessness``) measures that objective too.
CATEGORY_OBJECTIVES = {"helpful": "helpfulness", "truthful": "truthfulness", "harmless": "harmlessness"}
_OBJECTIVE_SUFFIX = re.compile(r":objective=([^:=]*)$")


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
    objective: str | None = None  # what the whole set measures
    category_objectives: dict[str, str] = field(default_factory=dict)  # sections: category -> objective

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


def parse_dataset_spec(text: str) -> tuple[str, str, int | None, str | None]:
    """``[NAME=]PATH[::MAX_ROWS][:objective=OBJECTIVE]`` -> (name, path, max_rows, objective); the
    default name is ``<folder>/<file stem>`` (the trainer's dev-set naming), the objective None
    when not given (see :func:`dataset_objectives` for the defaults)."""
    from ..reward_data import parse_eval_spec

    objective = None
    match = _OBJECTIVE_SUFFIX.search(text) if not Path(text).exists() else None
    if match:
        objective, given, text = match.group(1), text, text[: match.start()]
        if not OBJECTIVE_NAME.match(objective):
            raise DataError(f"--data {given}: objective {objective!r} is not an objective name "
                            "(lower-case letters, digits and '_', e.g. objective=harmlessness)")
    spec = parse_eval_spec(text)
    objective = objective or getattr(spec, "objective", None)
    return spec.name, spec.path, spec.max_rows, objective


def dataset_objectives(path: str, objective: str | None, categories: Sequence[str]) -> tuple[str | None, dict[str, str]]:
    """(what the whole set measures, {category: objective} for the categories that are sections of
    their own): the objective given, else the default for the file's folder, else none and its
    categories named like objectives."""
    objective = objective or FOLDER_OBJECTIVES.get(Path(path).parent.name)
    if objective is not None:
        return objective, {}
    sections = {}
    for c in categories:
        name = CATEGORY_OBJECTIVES.get(c, c if c in CATEGORY_OBJECTIVES.values() else None)
        if name is not None:
            sections[c] = name
    return None, sections


def load_datasets(specs: Sequence[str], pool: ItemPool, max_bad_fraction: float | None) -> list[EvalDataset]:
    """Load every ``--data`` spec into pairs over ``pool``. DataError names the dataset and why it
    has no usable pairs."""
    datasets: list[EvalDataset] = []
    names: set[str] = set()
    for text in specs:
        name, path, max_rows, objective = parse_dataset_spec(text)
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
        dataset.objective, dataset.category_objectives = dataset_objectives(path, objective, dataset.categories)
        datasets.append(dataset)
    return datasets


@dataclass
class ItemSet:
    """Responses scored on their own (an ``--ood`` file): the pool index of each, in file order."""

    name: str
    path: str
    load: dict[str, int]
    items: np.ndarray


def load_item_sets(specs: Sequence[str], pool: ItemPool, max_bad_fraction: float | None) -> list[ItemSet]:
    """Load every ``--ood [NAME=]PATH[::MAX_ROWS]`` into ``pool`` (``trainer.data.load_items``:
    preference rows give each response; prompt/response rows, PPO rollouts). DataError names the
    set and what is wrong."""
    from ..reward_data import parse_eval_spec

    sets: list[ItemSet] = []
    for text in specs:
        spec = parse_eval_spec(text)
        if any(s.name == spec.name for s in sets):
            raise DataError(f"two --ood sets are named {spec.name!r}; name them with --ood NAME=PATH")
        try:
            result = load_items(spec.path, max_rows=spec.max_rows, max_bad_fraction=max_bad_fraction, name=spec.name)
        except DataError as exc:
            raise DataError(f"--ood {spec.name}: {exc}") from exc
        if not result.items:
            raise DataError(f"--ood {spec.name} ({spec.path}) has no responses to score")
        report = result.report
        sets.append(ItemSet(
            name=spec.name, path=str(spec.path),
            load={"rows_read": report.rows_read, "rows_loaded": report.rows_loaded, "malformed": report.malformed},
            items=np.asarray([pool.add(i.prompt, i.response) for i in result.items], np.int64),
        ))
    return sets


def dataset_seed(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])


def _by_category(dataset: EvalDataset, chosen: np.ndarray, rejected: np.ndarray) -> dict[str, dict[str, Any]]:
    return {c: accuracy_block(chosen[dataset.category == c], rejected[dataset.category == c]) for c in dataset.categories}


def evaluate_heads(dataset: EvalDataset, heads: dict[str, np.ndarray]) -> dict[str, Any]:
    """Accuracy of each objective head of one model on one dataset, overall and per category
    (``heads``: objective -> scores indexed by pool index)."""
    per_head = {name: _by_category(dataset, s[dataset.chosen], s[dataset.rejected]) for name, s in heads.items()}
    return {
        "names": list(heads),
        "heads": {name: accuracy_block(s[dataset.chosen], s[dataset.rejected]) for name, s in heads.items()},
        "per_category": {c: {name: per_head[name][c] for name in heads} for c in dataset.categories},
    }


def evaluate_model(
    dataset: EvalDataset, scores: np.ndarray, seed: int, heads: dict[str, np.ndarray] | None = None
) -> dict[str, Any]:
    """Every single-model metric of one model on one dataset (``scores`` indexed by pool index);
    with ``heads`` (a model with objectives: objective -> scores) each head's accuracy too."""
    chosen, rejected = scores[dataset.chosen], scores[dataset.rejected]
    result = accuracy_block(chosen, rejected)
    result["per_category"] = _by_category(dataset, chosen, rejected)
    result["objectives"] = evaluate_heads(dataset, heads) if heads else None
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


def length_baselines(dataset: EvalDataset, mask: np.ndarray | None = None) -> dict[str, dict[str, Any]]:
    """"Longer answer wins" and its opposite, "shorter answer wins", on the pairs of ``mask``
    (all by default): accuracy blocks of scoring each answer by its length, and by minus it."""
    lc, lr = dataset.chosen_len, dataset.rejected_len
    if mask is not None:
        lc, lr = lc[mask], lr[mask]
    return {"longer_wins": accuracy_block(lc, lr), "shorter_wins": accuracy_block(-lc, -lr)}


def objective_sections(
    dataset: EvalDataset, entry: dict[str, Any], label: str, names: Sequence[str]
) -> list[dict[str, Any]]:
    """The per-objective rows of one model with heads ``names`` on one dataset (its report
    ``entry``): the whole set, then each category that measures an objective of its own."""
    model = entry["models"][label]
    rows = [{
        "dataset": dataset.name, "category": None, "objective": dataset.objective, "n_pairs": dataset.n_pairs,
        "combined": {k: model[k] for k in ("accuracy", "ci_low", "ci_high", "n_pairs", "n_ties")},
        "heads": model["objectives"]["heads"],
        "longer_wins": entry["longer_wins"], "shorter_wins": entry["shorter_wins"],
    }]
    for c, objective in sorted(dataset.category_objectives.items()):
        rows.append({
            "dataset": dataset.name, "category": c, "objective": objective, "n_pairs": model["per_category"][c]["n_pairs"],
            "combined": model["per_category"][c], "heads": model["objectives"]["per_category"][c],
            **entry["baselines_per_category"][c],
        })
    for row in rows:
        row["matching_head"] = row["objective"] if row["objective"] in names else None
    return rows


def build_preference_report(
    datasets: Sequence[EvalDataset],
    scores: dict[str, np.ndarray],
    models: list[dict[str, Any]],
    config: dict[str, Any],
    scoring: dict[str, Any],
    heads: dict[str, dict[str, np.ndarray]] | None = None,
    ensembles: dict[str, EnsembleScores] | None = None,
    item_sets: Sequence[ItemSet] = (),
    uncertainty_bins: int = 5,
) -> dict[str, Any]:
    """Every metric of every model on every dataset. ``heads``: for the models with objectives,
    label -> objective -> scores (pool-indexed), from the same requests as ``scores``;
    ``ensembles``: for the ensembles, label -> their members' rewards and spread, from the same
    requests too, which add the ``uncertainty`` block (with ``item_sets``, the ``--ood`` sets)."""
    heads = heads or {}
    labels = [m["label"] for m in models]
    seed, n_boot = config["seed"], config["bootstrap"]
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "kind": "preference", "created": utc_now(), "config": config,
        "models": models, "scoring": scoring, "datasets": {}, "summary": {}, "objectives": {}, "plots": {},
    }
    for d in datasets:
        report["datasets"][d.name] = {
            "path": d.path, "n_records": len(d.records), "n_pairs": d.n_pairs, "n_unique_responses": int(d.responses.size),
            "categories": d.categories, "load": d.load, **length_baselines(d),
            "baselines_per_category": {c: length_baselines(d, d.category == c) for c in d.categories},
            "objective": d.objective, "category_objectives": dict(sorted(d.category_objectives.items())),
            "models": {label: evaluate_model(d, scores[label], seed, heads.get(label)) for label in labels},
            "comparisons": compare_models(d, scores, labels, n_boot, seed),
        }
    by_label = {m["label"]: m for m in models}
    for label in labels:
        if not heads.get(label):
            continue
        names = list(heads[label])
        combine = (by_label[label].get("card") or {}).get("combine")
        if isinstance(combine, dict):  # {"rule": "gate" | "weights", "weights": ...}: the rule; the card has the rest
            combine = combine.get("rule")
        report["objectives"][label] = {
            "names": names, "combine": combine,
            "sections": [row for d in datasets for row in objective_sections(d, report["datasets"][d.name], label, names)],
        }
    if ensembles:  # a report of models that are not ensembles has no uncertainty key at all
        report["uncertainty"] = uncertainty_report(datasets, item_sets, scores, ensembles, seed, n_boot, uncertainty_bins)
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
