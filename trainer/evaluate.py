"""``reward eval``: evaluate reward models through the RUNNING service, over HTTP.

Evaluation calls the service with our client (:class:`client.AsyncRewardClient`), never the model
in-process, so what it measures is exactly what a PPO trainer gets from the same service.

Two modes::

    # preference data: accuracy, length, calibration, reward distribution; side by side
    reward eval --url http://127.0.0.1:8000 --data ../shared/data/alpacaeval/dev.jsonl.gz --report out/
    reward eval --model rm-a --model rm-b --data hh=../shared/data/hh-harmless/dev.jsonl.gz --report out/
    reward eval --url http://a:8000 --url http://b:8000 --data d.jsonl --report out/

    # best-of-N of a policy (samples generated in-process with transformers), scored by the service
    reward eval best-of-n --policy path/to/causal-lm --data prompts.jsonl --n 16 \\
        --model proxy --gold-model gold --report out/

``--data [NAME=]PATH[::MAX_ROWS]`` is repeatable and takes every format ``trainer/data.py`` reads;
without ``NAME=`` a dataset is named after its folder and file stem (``alpacaeval/dev``).
Each unique (prompt, response) is scored once (``/v1/score``), even when it appears in several
pairs or datasets; chunks go concurrently (``--chunk-size``, ``--concurrency``). Progress is a
rich bar on stderr; the Markdown report goes to stdout, and with ``--report DIR`` also to
``DIR/report.md`` beside ``DIR/report.json`` and the PNG plots.

Exit status: 0 done; 1 the service could not be used (unreachable after retries, unknown model,
refused request); 2 bad input (unreadable data, a dataset with no usable pairs, bad flags).

Metric definitions (pure numpy functions below, tested on hand-computed fixtures)
---------------------------------------------------------------------------------
* Pairs: every (better, worse) pair a record's ranking implies (K-way records: K(K-1)/2 pairs).
  A pair is right when ``r_chosen > r_rejected``; an exact tie counts as half, and the number of
  ties is reported (``n_ties``). Soft labels (``p_chosen``) are not used.
* ``ci_low``/``ci_high``: 95% Wilson score interval of (right + ties/2) / n, treating pairs as
  independent (pairs from one K-way record are not, so the interval is then a little narrow).
* Length (characters of the response): accuracy on pairs whose chosen answer is shorter, on
  those where it is longer, and their mean (``length_controlled_accuracy``; equal-length pairs
  are in neither); the "longer answer wins" baseline on the same pairs (equal length: half);
  Pearson and Spearman (average ranks) correlation of reward with length over the dataset's
  unique responses.
* Calibration: each pair is shown in a random order (a, b), seeded by ``--seed`` and the dataset
  name (the same order for every model), so labels y = 1[a is the chosen one] are both 0 and 1;
  ``p = sigmoid(r_a - r_b)`` (the service's ``p_a_better``). ECE over 10 equal-width bins of p
  (sum over bins of n_bin/N * |mean p - mean y|; p = 1 falls in the last bin), Brier score
  mean((p - y)^2), and the reliability-diagram data per bin.
* Side by side: the same pairs for every model; difference = accuracy(b) - accuracy(a) with a
  95% paired bootstrap percentile interval (``--bootstrap`` resamples of the pairs, seeded);
  agreement = fraction of pairs where both models pick the same winner (a tie is a pick of its
  own: it agrees only with a tie).
* Best-of-N: for each prompt, N samples; for n = 1, 2, 4, ..., N the expected reward of the best
  of n draws without replacement from the N, computed exactly: with proxy scores sorted
  ascending s_(1) <= ... <= s_(N), E[max] = sum_i C(i-1, n-1) / C(N, n) * s_(i). The gold reward
  of the proxy's pick uses the same weights on the gold scores in proxy order (gold scores of
  proxy-tied samples are averaged: a uniformly random pick among ties). KL = log n - (n-1)/n
  (the analytic best-of-n KL bound), as in Gao, Schulman and Hilton (2022), "Scaling Laws for
  Reward Model Overoptimization". Means over prompts with their standard errors.

JSON report (``report.json``; stable keys; ``null`` where a value is undefined)
------------------------------------------------------------------------------
Both modes::

    schema_version   1
    kind             "preference" | "best_of_n"
    created          ISO-8601 UTC time
    config           the flags that shape the numbers (seed, bootstrap, ci_method "wilson",
                     confidence 0.95, calibration_bins 10, datasets, chunk_size, concurrency...)
    models           [{label, url, model (requested name or null), served_model (name@version),
                       card (the service's /v1/models entry)}]  (best_of_n: the proxy, then gold)
    plots            PNG file names in the report folder: preference {DATASET: {reliability,
                     reward_vs_length}}; best_of_n {best_of_n}; {} without --report or matplotlib
    scoring          {label: {items, seconds, items_per_second}}

kind "preference" adds::

    datasets: {NAME: {
        path, n_records, n_pairs, n_unique_responses, categories [sorted names; "(none)" for
        records without one], load {rows_read, rows_loaded, malformed},
        longer_wins {accuracy, ci_low, ci_high, n_pairs, n_ties}     # the length baseline
        models: {LABEL: {
            accuracy, ci_low, ci_high, n_pairs, n_ties,
            per_category: {CATEGORY: {accuracy, ci_low, ci_high, n_pairs, n_ties}},
            length: {shorter_chosen {accuracy, n_pairs, n_ties}, longer_chosen {...},
                     equal_length_pairs, length_controlled_accuracy, longer_wins_accuracy,
                     pearson_reward_length, spearman_reward_length},
            calibration: {ece, brier, n_pairs, label_mean, bins: [{lower, upper, n, mean_p, frac_a_better}]},
            reward_distribution: {all: STATS, per_category: {CATEGORY: STATS}}
                # STATS = {n, mean, std (population), min, q05, q25, median, q75, q95, max}
        }},
        comparisons: [{a, b, n_pairs, accuracy_a, accuracy_b, diff (b - a), diff_ci_low,
                       diff_ci_high, agreement}]   # every model pair a < b in --url/--model order
    }}
    summary: {LABEL: {mean_accuracy (unweighted over datasets), pooled_accuracy, n_pairs, n_ties}}

kind "best_of_n" adds::

    best_of_n: {policy, n_prompts, n_samples, prompts_source, generation {temperature, top_p,
                top_k, max_new_tokens, max_prompt_length (null: the policy's context minus max_new_tokens),
                prompts_truncated (how many prompts kept only their most recent tokens), seed}, proxy LABEL, gold LABEL | null,
                curve: [{n, kl, proxy_reward, proxy_reward_sem, gold_reward, gold_reward_sem}],
                samples_file "samples.jsonl" (one line per sample: prompt_index, sample_index,
                prompt, response, proxy_score, gold_score)}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from statistics import NormalDist
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .data import DataError, PreferenceRecord, load_file
from .sft import SFTConfigError, fit_to_context, pad_token_id

__all__ = [
    "wilson_interval",
    "pair_outcomes",
    "accuracy_with_ties",
    "length_controlled_accuracy",
    "longer_wins_accuracy",
    "pearson",
    "spearman",
    "sigmoid",
    "calibration_pairs",
    "reliability_bins",
    "expected_calibration_error",
    "brier_score",
    "paired_bootstrap_diff",
    "agreement_rate",
    "distribution_summary",
    "analytic_bon_kl",
    "best_of_n_weights",
    "expected_best_of_n",
    "best_of_n_curve",
    "add_eval_parser",
    "run_eval",
    "SCHEMA_VERSION",
]

SCHEMA_VERSION = 1
CONFIDENCE = 0.95
CALIBRATION_BINS = 10
NO_CATEGORY = "(none)"
EXIT_SERVICE = 1
EXIT_INPUT = 2


# =========================================================================== metric math (numpy)


def _z(confidence: float) -> float:
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval for a proportion ``successes / n`` (successes may be fractional,
    e.g. ties counted half). ``(nan, nan)`` for n = 0."""
    if n <= 0:
        return (math.nan, math.nan)
    z = _z(confidence)
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(max(0.0, p * (1 - p) / n + z * z / (4 * n * n)))
    return (max(0.0, center - half), min(1.0, center + half))


def pair_outcomes(chosen: Sequence[float], rejected: Sequence[float]) -> np.ndarray:
    """Per pair: 1 when chosen scores higher, 0.5 on an exact tie, 0 otherwise."""
    delta = np.asarray(chosen, dtype=np.float64) - np.asarray(rejected, dtype=np.float64)
    return np.where(delta > 0, 1.0, np.where(delta == 0, 0.5, 0.0))


def accuracy_with_ties(chosen: Sequence[float], rejected: Sequence[float]) -> tuple[float, int]:
    """(accuracy, number of ties) over pairs; a tie counts as half. ``(nan, 0)`` with no pairs."""
    outcomes = pair_outcomes(chosen, rejected)
    if outcomes.size == 0:
        return (math.nan, 0)
    return (float(outcomes.mean()), int(np.count_nonzero(outcomes == 0.5)))


def _accuracy_block(chosen: np.ndarray, rejected: np.ndarray, confidence: float = CONFIDENCE) -> dict[str, Any]:
    outcomes = pair_outcomes(chosen, rejected)
    n = int(outcomes.size)
    low, high = wilson_interval(float(outcomes.sum()), n, confidence)
    return {
        "accuracy": float(outcomes.mean()) if n else math.nan,
        "ci_low": low,
        "ci_high": high,
        "n_pairs": n,
        "n_ties": int(np.count_nonzero(outcomes == 0.5)),
    }


def length_controlled_accuracy(
    chosen: Sequence[float], rejected: Sequence[float], chosen_lengths: Sequence[int], rejected_lengths: Sequence[int]
) -> dict[str, Any]:
    """Accuracy on the pairs whose chosen answer is shorter, on those where it is longer, and the
    mean of the two (``length_controlled_accuracy``; nan when either group is empty). Pairs of
    equal length are counted in ``equal_length_pairs`` and in neither group."""
    chosen, rejected = np.asarray(chosen, np.float64), np.asarray(rejected, np.float64)
    lc, lr = np.asarray(chosen_lengths), np.asarray(rejected_lengths)
    groups = {}
    for name, mask in (("shorter_chosen", lc < lr), ("longer_chosen", lc > lr)):
        acc, ties = accuracy_with_ties(chosen[mask], rejected[mask])
        groups[name] = {"accuracy": acc, "n_pairs": int(mask.sum()), "n_ties": ties}
    a, b = groups["shorter_chosen"]["accuracy"], groups["longer_chosen"]["accuracy"]
    return {
        **groups,
        "equal_length_pairs": int(np.count_nonzero(lc == lr)),
        "length_controlled_accuracy": (a + b) / 2 if not (math.isnan(a) or math.isnan(b)) else math.nan,
    }


def longer_wins_accuracy(chosen_lengths: Sequence[int], rejected_lengths: Sequence[int]) -> tuple[float, int]:
    """The "longer answer wins" baseline: (accuracy, ties) of scoring each answer by its length."""
    return accuracy_with_ties(chosen_lengths, rejected_lengths)


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; nan when either side is constant or there are fewer than 2 points."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size < 2:
        return math.nan
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum() / denom) if denom > 0 else math.nan


def _rankdata(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties getting the average of their ranks (scipy's 'average')."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new_group = np.r_[True, xs[1:] != xs[:-1]]
    group = np.cumsum(new_group) - 1
    starts = np.flatnonzero(new_group)
    ends = np.r_[starts[1:], x.size]
    average = (starts + ends - 1) / 2.0 + 1.0
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = average[group]
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson of average ranks)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size < 2:
        return math.nan
    return pearson(_rankdata(x), _rankdata(y))


def sigmoid(x: Any) -> np.ndarray:
    """Numerically stable logistic function."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


def calibration_pairs(
    chosen: Sequence[float], rejected: Sequence[float], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Show each pair in a random order (a, b): returns (p_a_better = sigmoid(r_a - r_b), label =
    1 when a is the chosen answer)."""
    chosen, rejected = np.asarray(chosen, np.float64), np.asarray(rejected, np.float64)
    a_is_chosen = rng.random(chosen.size) < 0.5
    r_a = np.where(a_is_chosen, chosen, rejected)
    r_b = np.where(a_is_chosen, rejected, chosen)
    return sigmoid(r_a - r_b), a_is_chosen.astype(np.float64)


def _bin_index(probs: np.ndarray, n_bins: int) -> np.ndarray:
    return np.clip(np.floor(probs * n_bins).astype(np.int64), 0, n_bins - 1)


def reliability_bins(probs: Sequence[float], labels: Sequence[float], n_bins: int = CALIBRATION_BINS) -> list[dict[str, Any]]:
    """Reliability-diagram data: per equal-width bin of p, its bounds, count, mean p and the
    observed frequency of label 1 (nan for empty bins)."""
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels, np.float64)
    index = _bin_index(probs, n_bins)
    bins = []
    for b in range(n_bins):
        mask = index == b
        n = int(mask.sum())
        bins.append({
            "lower": b / n_bins,
            "upper": (b + 1) / n_bins,
            "n": n,
            "mean_p": float(probs[mask].mean()) if n else math.nan,
            "frac_a_better": float(labels[mask].mean()) if n else math.nan,
        })
    return bins


def expected_calibration_error(probs: Sequence[float], labels: Sequence[float], n_bins: int = CALIBRATION_BINS) -> float:
    """ECE over ``n_bins`` equal-width bins: sum_b n_b / N * |mean p_b - mean y_b|."""
    probs = np.asarray(probs, np.float64)
    if probs.size == 0:
        return math.nan
    total = 0.0
    for b in reliability_bins(probs, labels, n_bins):
        if b["n"]:
            total += b["n"] / probs.size * abs(b["mean_p"] - b["frac_a_better"])
    return total


def brier_score(probs: Sequence[float], labels: Sequence[float]) -> float:
    """Mean squared error of the probabilities against the 0/1 labels."""
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels, np.float64)
    return float(np.mean((probs - labels) ** 2)) if probs.size else math.nan


def paired_bootstrap_diff(
    outcomes_a: Sequence[float],
    outcomes_b: Sequence[float],
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> dict[str, float]:
    """mean(b) - mean(a) over the same pairs, with a percentile interval from ``n_boot`` paired
    bootstrap resamples of the pairs (seeded)."""
    a, b = np.asarray(outcomes_a, np.float64), np.asarray(outcomes_b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes need the same pairs: {a.shape} vs {b.shape}")
    n = a.size
    if n == 0:
        return {"diff": math.nan, "low": math.nan, "high": math.nan, "n_boot": n_boot}
    d = b - a
    rng = np.random.default_rng(seed)
    boots = np.empty(n_boot, dtype=np.float64)
    per_chunk = max(1, 4_000_000 // n)  # bound memory: at most ~4M indices at a time
    for start in range(0, n_boot, per_chunk):
        k = min(per_chunk, n_boot - start)
        boots[start : start + k] = d[rng.integers(0, n, size=(k, n))].mean(axis=1)
    alpha = 1 - confidence
    low, high = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return {"diff": float(d.mean()), "low": float(low), "high": float(high), "n_boot": n_boot}


def agreement_rate(delta_a: Sequence[float], delta_b: Sequence[float]) -> float:
    """Fraction of pairs where two models pick the same winner (sign of r_first - r_second)."""
    sa, sb = np.sign(np.asarray(delta_a, np.float64)), np.sign(np.asarray(delta_b, np.float64))
    return float(np.mean(sa == sb)) if sa.size else math.nan


def distribution_summary(values: Sequence[float]) -> dict[str, Any]:
    """n, mean, population std, min, 5/25/50/75/95% quantiles (linear), max."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return {k: (0 if k == "n" else math.nan) for k in ("n", "mean", "std", "min", "q05", "q25", "median", "q75", "q95", "max")}
    q = np.quantile(v, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {
        "n": int(v.size), "mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
        "q05": float(q[0]), "q25": float(q[1]), "median": float(q[2]), "q75": float(q[3]), "q95": float(q[4]),
        "max": float(v.max()),
    }


# --------------------------------------------------------------------------- best-of-N


def analytic_bon_kl(n: int) -> float:
    """KL(best-of-n || base) = log n - (n - 1) / n (the analytic upper bound, exact for distinct samples)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


@lru_cache(maxsize=256)
def _weights(N: int, n: int) -> tuple[float, ...]:
    total = math.comb(N, n)
    # int / int is correctly rounded in Python, however large the binomials are.
    return tuple(math.comb(i, n - 1) / total for i in range(N))


def best_of_n_weights(N: int, n: int) -> np.ndarray:
    """w[i] = P(the i-th smallest of N (0-based) is the max of n draws without replacement)
    = C(i, n-1) / C(N, n); the weights sum to 1."""
    if not 1 <= n <= N:
        raise ValueError(f"need 1 <= n <= N, got n={n}, N={N}")
    return np.asarray(_weights(N, n), dtype=np.float64)


def _mean_over_ties(keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``values`` (ordered like the sorted ``keys``) with each run of equal keys replaced by its mean."""
    out = values.astype(np.float64, copy=True)
    new_group = np.r_[True, keys[1:] != keys[:-1]]
    starts = np.flatnonzero(new_group)
    ends = np.r_[starts[1:], keys.size]
    for s, e in zip(starts, ends):
        if e - s > 1:
            out[s:e] = out[s:e].mean()
    return out


def expected_best_of_n(proxy: Sequence[float], n: int, values: Sequence[float] | None = None) -> float:
    """Exact expectation, over the C(N, n) subsets of n of the N samples, of the proxy score of the
    subset's proxy-best sample (``values=None``), or of ``values`` (e.g. gold scores) at that
    sample; among proxy ties the pick is uniformly random."""
    proxy = np.asarray(proxy, np.float64)
    order = np.argsort(proxy, kind="stable")
    keys = proxy[order]
    v = keys if values is None else _mean_over_ties(keys, np.asarray(values, np.float64)[order])
    return float(best_of_n_weights(proxy.size, n) @ v)


def default_bon_ns(N: int) -> list[int]:
    """1, 2, 4, ... up to N, and N itself."""
    ns, n = [], 1
    while n <= N:
        ns.append(n)
        n *= 2
    if ns[-1] != N:
        ns.append(N)
    return ns


def best_of_n_curve(
    proxy_scores: Any, gold_scores: Any = None, ns: Sequence[int] | None = None
) -> dict[str, list]:
    """The best-of-n curve over prompts. ``proxy_scores`` (and ``gold_scores``) are (prompts, N)
    (or (N,) for one prompt). Returns lists aligned with ``n``: ``kl``, ``proxy`` (mean over
    prompts of the expected proxy max), ``proxy_sem``, and ``gold``/``gold_sem`` (gold score of
    the proxy's pick; None without gold scores)."""
    proxy = np.atleast_2d(np.asarray(proxy_scores, np.float64))
    gold = None if gold_scores is None else np.atleast_2d(np.asarray(gold_scores, np.float64))
    if gold is not None and gold.shape != proxy.shape:
        raise ValueError(f"gold scores {gold.shape} do not match proxy scores {proxy.shape}")
    P, N = proxy.shape
    ns = list(ns) if ns is not None else default_bon_ns(N)

    def sem(x: np.ndarray) -> float:
        return float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.nan

    out: dict[str, list] = {"n": ns, "kl": [analytic_bon_kl(n) for n in ns], "proxy": [], "proxy_sem": [],
                            "gold": None if gold is None else [], "gold_sem": None if gold is None else []}
    for n in ns:
        per_prompt = np.array([expected_best_of_n(proxy[p], n) for p in range(P)])
        out["proxy"].append(float(per_prompt.mean()))
        out["proxy_sem"].append(sem(per_prompt))
        if gold is not None:
            per_prompt_gold = np.array([expected_best_of_n(proxy[p], n, gold[p]) for p in range(P)])
            out["gold"].append(float(per_prompt_gold.mean()))
            out["gold_sem"].append(sem(per_prompt_gold))
    return out


# =========================================================================== data


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

    @property
    def has_categories(self) -> bool:
        return any(r.category is not None for r in self.records)

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
    from .reward import parse_eval_spec

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


def _dataset_seed(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])


# =========================================================================== evaluation


def evaluate_model(dataset: EvalDataset, scores: np.ndarray, seed: int) -> dict[str, Any]:
    """Every single-model metric of one model on one dataset (``scores`` indexed by pool index)."""
    chosen, rejected = scores[dataset.chosen], scores[dataset.rejected]
    result = _accuracy_block(chosen, rejected)
    result["per_category"] = {
        c: _accuracy_block(chosen[dataset.category == c], rejected[dataset.category == c]) for c in dataset.categories
    }
    response_scores = scores[dataset.responses]
    length = length_controlled_accuracy(chosen, rejected, dataset.chosen_len, dataset.rejected_len)
    length["longer_wins_accuracy"] = longer_wins_accuracy(dataset.chosen_len, dataset.rejected_len)[0]
    length["pearson_reward_length"] = pearson(response_scores, dataset.response_len)
    length["spearman_reward_length"] = spearman(response_scores, dataset.response_len)
    result["length"] = length
    probs, labels = calibration_pairs(chosen, rejected, _dataset_seed(seed, dataset.name))
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
        "schema_version": SCHEMA_VERSION, "kind": "preference", "created": _now(), "config": config,
        "models": models, "scoring": scoring, "datasets": {}, "summary": {}, "plots": {},
    }
    for d in datasets:
        longer = _accuracy_block(d.chosen_len, d.rejected_len)
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


# =========================================================================== scoring through the service


@dataclass
class Target:
    """One served reward model: a URL and a model name (None: the service's default)."""

    url: str
    model: str | None
    label: str = ""
    served_model: str = ""
    card: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "url": self.url, "model": self.model, "served_model": self.served_model, "card": self.card}


def make_targets(urls: Sequence[str], models: Sequence[str]) -> list[Target]:
    """--url/--model combinations: one URL with several models, several URLs (each with its
    default model, or the one --model), or as many URLs as models (zipped)."""
    urls = list(urls) or [os.environ.get("REWARD_URL", _default_url())]
    models = list(models)
    if len(urls) == 1:
        targets = [Target(urls[0], m) for m in (models or [None])]
    elif len(models) <= 1:
        targets = [Target(u, models[0] if models else None) for u in urls]
    elif len(models) == len(urls):
        targets = [Target(u, m) for u, m in zip(urls, models)]
    else:
        raise ValueError(
            f"{len(urls)} --url and {len(models)} --model: give one URL with several models, several URLs "
            "with at most one model, or as many models as URLs (paired in order)"
        )
    return targets


def _default_url() -> str:
    from client.client import DEFAULT_URL

    return DEFAULT_URL


def _label_targets(targets: list[Target]) -> None:
    names = [t.model or t.card.get("name") or "default" for t in targets]
    for t, name in zip(targets, names):
        t.label = name if names.count(name) == 1 else f"{name}@{t.url.split('://', 1)[-1]}"
    labels = [t.label for t in targets]
    for i, t in enumerate(targets):
        if labels.count(t.label) > 1:
            t.label = f"{t.label}#{i + 1}"


def _client_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        timeout=args.timeout, max_retries=args.max_retries, backoff=args.backoff, backoff_max=max(args.backoff, 20.0),
        chunk_size=args.chunk_size, max_concurrency=args.concurrency,
        api_key=args.api_key or os.environ.get("REWARD_API_KEY"),
    )


async def resolve_targets(clients: dict[str, Any], targets: list[Target]) -> None:
    """Ask each service for its models: checks it is reachable (with retries) and that the model
    exists, and records its card. Raises RewardServiceError."""
    from client import served_card

    listings: dict[str, Any] = {}
    for t in targets:
        if t.url not in listings:
            listings[t.url] = await clients[t.url].models()
        card = served_card(listings[t.url], t.model, t.url)
        t.card = card.model_dump()
        t.served_model = f"{card.name}@{card.version}"
    _label_targets(targets)


def _progress():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True)
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, disable=not console.is_terminal, transient=True,
    )


async def score_pool(
    clients: dict[str, Any], targets: list[Target], items: list[dict], normalize: bool, progress: Any
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Score every pool item with every target, chunks in flight concurrently. Returns scores per
    label and per-label timing."""
    scores, timing = {}, {}
    for t in targets:
        task = progress.add_task(f"scoring {t.label}", total=len(items))
        started = time.perf_counter()
        response = await clients[t.url].score(
            items, model=t.model, normalize=normalize, progress=lambda done, total, task=task: progress.update(task, completed=done)
        )
        seconds = time.perf_counter() - started
        if len(response.scores) != len(items):
            from client import RewardServiceError

            raise RewardServiceError(None, "invalid_response", f"{t.url} returned {len(response.scores)} scores for {len(items)} items")
        scores[t.label] = np.asarray(response.scores, dtype=np.float64)
        timing[t.label] = {"items": len(items), "seconds": seconds, "items_per_second": len(items) / seconds if seconds else None}
    return scores, timing


async def _with_clients(urls: Iterable[str], args: argparse.Namespace, body: Callable[[dict[str, Any]], Any]):
    from client import AsyncRewardClient

    clients = {u: AsyncRewardClient(u, **_client_options(args)) for u in dict.fromkeys(urls)}
    try:
        return await body(clients)
    finally:
        for c in clients.values():
            await c.aclose()


# =========================================================================== CLI


def score_through_service(args: argparse.Namespace, targets: list[Target], pool: ItemPool, *, resolve: bool):
    """Score every item of ``pool`` with every target, chunked and concurrent, with a progress bar;
    ``resolve`` first checks each target is served (resolve_targets)."""

    async def body(clients):
        if resolve:
            await resolve_targets(clients, targets)
        with _progress() as progress:
            return await score_pool(clients, targets, pool.items, args.normalize, progress)

    return asyncio.run(_with_clients([t.url for t in targets], args, body))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_service_flags(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Flags shared by both modes. On the best-of-n subparser they default to SUPPRESS so values
    given before ``best-of-n`` are not overwritten by the subparser's defaults."""

    def d(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--url", dest="urls", action="append", default=d(None), metavar="URL",
                        help="reward service URL; repeatable for side by side (default: env REWARD_URL or http://127.0.0.1:8000)")
    parser.add_argument("--model", dest="models", action="append", default=d(None), metavar="NAME",
                        help="served model name; repeatable for side by side on one service (default: the service's default)")
    parser.add_argument("--report", default=d(None), metavar="DIR", help="write report.json, report.md and PNG plots here")
    parser.add_argument("--seed", type=int, default=d(0), help="seed for calibration order, bootstrap and sampling (default 0)")
    parser.add_argument("--normalize", action="store_true", default=d(False), help="score with the model's reward mean/std normalisation")
    parser.add_argument("--no-plots", dest="plots", action="store_false", default=d(True), help="skip the PNG plots")
    # 32 x 4 = 128 items in flight: enough for full batches, and on a slow CPU service (a few
    # items/s) still well inside its request deadline; 64 x 8 was not (504s under load).
    parser.add_argument("--chunk-size", type=_positive_int, default=d(32), help="items per request (default 32)")
    parser.add_argument("--concurrency", type=_positive_int, default=d(4), help="requests in flight (default 4)")
    parser.add_argument("--timeout", type=float, default=d(120.0), help="seconds per request (default 120)")
    parser.add_argument("--max-retries", type=int, default=d(5), help="retries on connection errors, 429 and 503 (default 5)")
    parser.add_argument("--backoff", type=float, default=d(0.5), help="base of the exponential backoff in seconds (default 0.5)")
    parser.add_argument("--api-key", default=d(None), help="sent as 'Authorization: Bearer KEY' (env REWARD_API_KEY)")


_SERVICE_DEFAULTS = dict(urls=None, models=None, report=None, seed=0, normalize=False, plots=True, chunk_size=32,
                         concurrency=4, timeout=120.0, max_retries=5, backoff=0.5, api_key=None)


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    # allow_abbrev=False: with abbreviations the eval parser would claim best-of-n's flags
    # (`--n` looks like an abbreviation of --normalize / --no-plots).
    parser = subparsers.add_parser(
        "eval", allow_abbrev=False, help="evaluate served reward models: accuracy, length, calibration, side by side, best-of-N",
        description=(
            "Evaluate reward models through the running service (HTTP, our client). Default mode: preference "
            "accuracy (Wilson 95% CI, per category), length-controlled accuracy and reward/length correlation, "
            "calibration (ECE, Brier, reliability diagram), reward distributions; several --url/--model compare side "
            "by side (paired bootstrap). `reward eval best-of-n -h`: the best-of-N curve of a policy."
        ),
    )
    _add_service_flags(parser, suppress=False)
    parser.add_argument("--data", action="append", default=None, metavar="[NAME=]PATH[::MAX_ROWS]",
                        help="preference data in any format trainer/data.py reads (repeatable); default name <folder>/<stem>")
    parser.add_argument("--bootstrap", type=_positive_int, default=2000, help="paired bootstrap resamples (default 2000)")
    parser.add_argument("--max-bad-fraction", type=float, default=0.01,
                        help="abort when more than this fraction of a file's rows are malformed (default 0.01)")
    parser.set_defaults(func=run_eval, eval_mode="preference")

    modes = parser.add_subparsers(dest="eval_mode", metavar="MODE")
    bon = modes.add_parser(
        "best-of-n", allow_abbrev=False, help="best-of-N curve of a policy scored by the service (proxy and gold)",
        description=(
            "For each prompt, sample N responses from a causal LM (in-process, transformers generate) and score them "
            "with the service; report the exact expected best-of-n reward for n = 1, 2, 4, ..., N with the analytic "
            "KL log n - (n-1)/n, and with --gold-model/--gold-url the gold reward of the proxy's pick."
        ),
    )
    _add_service_flags(bon, suppress=True)
    bon.add_argument("--policy", required=True, metavar="DIR", help="Hugging Face causal-LM directory")
    source = bon.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", metavar="FILE",
                        help='prompts: .txt (one per line) or JSONL (a string, {"prompt": str | messages} or {"messages"})')
    source.add_argument("--data", dest="bon_data", metavar="PATH", help="preference data file: its distinct prompts")
    bon.add_argument("--max-prompts", type=_positive_int, default=None, help="use the first N prompts")
    bon.add_argument("--n", dest="n_samples", type=_positive_int, default=16, help="samples per prompt, N (default 16)")
    bon.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    bon.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0: off)")
    bon.add_argument("--top-k", type=int, default=0, help="top-k sampling (default 0: off)")
    bon.add_argument("--max-new-tokens", type=_positive_int, default=128, help="tokens per sample (default 128)")
    bon.add_argument("--max-prompt-length", type=_positive_int, default=None,
                     help="prompt tokens kept, the most recent ones (default: the policy's context minus --max-new-tokens)")
    bon.add_argument("--batch-size", type=_positive_int, default=16, help="sequences per generate call (default 16)")
    bon.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    bon.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="policy dtype")
    bon.add_argument("--trust-remote-code", action="store_true", help="run model code from the policy directory")
    bon.add_argument("--gold-model", default=None, metavar="NAME", help="gold reward model served by the proxy's service (or --gold-url's)")
    bon.add_argument("--gold-url", default=None, metavar="URL", help="service of the gold reward model (its default model unless --gold-model)")
    bon.set_defaults(func=run_eval, eval_mode="best-of-n")
    return parser


def _fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
    for key, value in _SERVICE_DEFAULTS.items():
        if not hasattr(args, key):
            setattr(args, key, value)
    return args


def run_eval(args: argparse.Namespace) -> int:
    _fill_defaults(args)
    if getattr(args, "eval_mode", None) == "best-of-n":
        return run_best_of_n(args)
    return run_preference_eval(args)


def _fail(message: str, code: int) -> int:
    print(f"reward eval: {message}", file=sys.stderr)
    return code


def service_error_message(exc: Exception) -> str:
    from client import ServiceUnavailable

    text = str(exc)
    if isinstance(exc, ServiceUnavailable):
        text += "; is `reward serve` running there? (set --url or REWARD_URL)"
    return text


def run_preference_eval(args: argparse.Namespace) -> int:
    from client import RewardServiceError

    if not args.data:
        return _fail("give preference data with --data [NAME=]PATH (or use `reward eval best-of-n`)", EXIT_INPUT)
    try:
        targets = make_targets(args.urls or [], args.models or [])
    except ValueError as exc:
        return _fail(str(exc), EXIT_INPUT)
    pool = ItemPool()
    try:
        datasets = load_datasets(args.data, pool, args.max_bad_fraction)
    except DataError as exc:
        return _fail(f"{exc}; nothing to evaluate", EXIT_INPUT)
    for d in datasets:
        print(f"reward eval: {d.name}: {len(d.records)} records, {d.n_pairs} pairs", file=sys.stderr)
    print(f"reward eval: {len(pool)} unique responses to score with {len(targets)} model(s)", file=sys.stderr)

    try:
        scores, timing = score_through_service(args, targets, pool, resolve=True)
    except RewardServiceError as exc:
        return _fail(service_error_message(exc), EXIT_SERVICE)

    config = {
        "seed": args.seed, "bootstrap": args.bootstrap, "ci_method": "wilson", "confidence": CONFIDENCE,
        "calibration_bins": CALIBRATION_BINS, "normalize": args.normalize, "chunk_size": args.chunk_size,
        "concurrency": args.concurrency,
        "datasets": [{"name": d.name, "path": d.path} for d in datasets],
    }
    report = build_preference_report(datasets, scores, [t.describe() for t in targets], config, timing)
    return finish_report(report, args, scores=scores, datasets=datasets)


def finish_report(report: dict[str, Any], args: argparse.Namespace, **plot_data: Any) -> int:
    """Write plots, report.json and report.md under --report (when given); print the Markdown."""
    from .eval_report import render_markdown, write_plots

    if args.report:
        out = Path(args.report)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return _fail(f"cannot create the report folder {out}: {exc}", EXIT_INPUT)
        if args.plots:
            report["plots"] = write_plots(report, out, **plot_data)
        (out / "report.json").write_text(json.dumps(to_jsonable(report), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        markdown = render_markdown(report)
        (out / "report.md").write_text(markdown, encoding="utf-8")
    else:
        markdown = render_markdown(report)
    sys.stdout.write(markdown)
    sys.stdout.flush()
    if args.report:
        print(f"reward eval: report written to {Path(args.report) / 'report.json'} and report.md", file=sys.stderr)
    return 0


# =========================================================================== best-of-N


def read_prompt_file(path: str | Path) -> list[list[dict]]:
    """Prompts as chat messages: a ``.txt`` file (one prompt per non-blank line) or JSONL
    (``.jsonl``/``.jsonl.gz``; per line a JSON string, ``{"prompt": str | messages}`` or
    ``{"messages": [...]}``). DataError lists the bad lines."""
    import gzip

    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompt file not found: {path}")
    opener = gzip.open if path.name.endswith(".gz") else open
    prompts, problems = [], []
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    plain = not any(path.name.endswith(s) for s in (".jsonl", ".jsonl.gz", ".json", ".json.gz"))
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if plain:
            prompts.append([{"role": "user", "content": line.strip()}])
            continue
        try:
            prompts.append(_prompt_messages(json.loads(line)))
        except (ValueError, TypeError, KeyError) as exc:
            problems.append(f"{path}:{number}: {exc}")
    if problems:
        raise DataError("bad prompt lines:\n" + "\n".join(problems[:20]))
    if not prompts:
        raise DataError(f"no prompts in {path}")
    return prompts


def _prompt_messages(obj: Any) -> list[dict]:
    if isinstance(obj, str):
        value: Any = obj
    elif isinstance(obj, dict) and "prompt" in obj:
        value = obj["prompt"]
    elif isinstance(obj, dict) and "messages" in obj:
        value = obj["messages"]
    else:
        raise ValueError('expected a JSON string, {"prompt": ...} or {"messages": [...]}')
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("empty prompt")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise ValueError("a prompt is a string or a non-empty list of messages")
    messages = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError("each message is {\"role\": str, \"content\": str}")
        messages.append({"role": m["role"], "content": m["content"]})
    if messages[-1]["role"] == "assistant":
        raise ValueError("the prompt ends with an assistant turn; the policy writes that turn")
    return messages


def load_bon_prompts(args: argparse.Namespace) -> tuple[list[list[dict]], str]:
    """The prompts for best-of-N and where they came from."""
    if args.prompts:
        prompts, source = read_prompt_file(args.prompts), str(args.prompts)
    else:
        result = load_file(args.bon_data, max_bad_fraction=getattr(args, "max_bad_fraction", 0.01))
        seen: dict[str, list[dict]] = {}
        for r in result.records:
            seen.setdefault(json.dumps(r.prompt, sort_keys=True, ensure_ascii=False), r.prompt)
        prompts, source = list(seen.values()), str(args.bon_data)
    if args.max_prompts:
        prompts = prompts[: args.max_prompts]
    return prompts, source


def policy_prompt_text(messages: Sequence[dict], tokenizer: Any) -> tuple[str, bool]:
    """(text, add_special_tokens): the chat template with the generation prompt when the tokenizer
    has one, else the HH transcript ending in ``"\\n\\nAssistant:"`` (the service's fallback format)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True), False
    roles = {"user": "Human", "assistant": "Assistant", "system": "System", "tool": "Tool"}
    text = "".join(f"\n\n{roles.get(m['role'], m['role'].title())}: {m['content']}" for m in messages)
    return text + "\n\nAssistant:", True


def generate_samples(
    policy: str | Path,
    prompts: Sequence[Sequence[dict]],
    n_samples: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 128,
    max_prompt_length: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    on_prompt_done: Callable[[int], None] | None = None,
    truncated_prompts: list[int] | None = None,
) -> list[list[str]]:
    """N sampled completions per prompt from a causal LM (``generate`` with do_sample). Prompt i
    is sampled with seed ``seed + i``, so its samples do not depend on the other prompts. A prompt
    longer than ``max_prompt_length`` or than the policy's context leaves after ``max_new_tokens``
    keeps its most recent tokens (as ``reward ppo`` does); the indices of those prompts are
    appended to ``truncated_prompts`` when given."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bar shows the sampling progress

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(policy, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    limit = fit_to_context(model.config, max_prompt_length, "--max-prompt-length", max_new_tokens, "--max-new-tokens")
    model.to(device).eval()
    pad_id = pad_token_id(tokenizer)
    out: list[list[str]] = []
    for i, messages in enumerate(prompts):
        text, specials = policy_prompt_text(messages, tokenizer)
        ids = tokenizer(text, add_special_tokens=specials, return_tensors="pt")["input_ids"].to(device)
        if ids.shape[1] > limit:
            ids = ids[:, -limit:]
            if truncated_prompts is not None:
                truncated_prompts.append(i)
        set_seed(seed + i)
        samples: list[str] = []
        while len(samples) < n_samples:
            k = min(batch_size, n_samples - len(samples))
            with torch.inference_mode():
                generated = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=temperature,
                    top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens, num_return_sequences=k,
                    pad_token_id=pad_id,
                )
            new = generated[:, ids.shape[1]:]
            samples += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
        out.append(samples)
        if on_prompt_done:
            on_prompt_done(i + 1)
    return out


def run_best_of_n(args: argparse.Namespace) -> int:
    from client import RewardServiceError

    urls, models = list(args.urls or []), list(args.models or [])
    if len(urls) > 1 or len(models) > 1:
        return _fail("best-of-n takes one proxy reward model (one --url, one --model); the gold one is --gold-model/--gold-url", EXIT_INPUT)
    proxy = make_targets(urls, models)[0]
    gold = None
    if args.gold_model or args.gold_url:
        gold = Target(args.gold_url or proxy.url, args.gold_model)
    targets = [proxy] + ([gold] if gold else [])
    if args.temperature <= 0:
        return _fail("--temperature must be > 0 (best-of-N needs sampling)", EXIT_INPUT)
    policy = Path(args.policy)
    if not (policy / "config.json").is_file():
        return _fail(f"--policy {policy} is not a Hugging Face model directory (no config.json)", EXIT_INPUT)
    try:
        prompts, source = load_bon_prompts(args)
    except DataError as exc:
        return _fail(f"{exc}; nothing to evaluate", EXIT_INPUT)

    async def check(clients):
        await resolve_targets(clients, targets)

    try:  # before generating: a wrong URL or model name should not cost a generation run
        asyncio.run(_with_clients([t.url for t in targets], args, check))
    except RewardServiceError as exc:
        return _fail(service_error_message(exc), EXIT_SERVICE)

    N = args.n_samples
    print(f"reward eval: best-of-{N}: {len(prompts)} prompts from {source}, policy {policy}", file=sys.stderr)
    truncated: list[int] = []
    try:
        with _progress() as progress:
            task = progress.add_task("sampling", total=len(prompts))
            samples = generate_samples(
                policy, prompts, N, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                max_new_tokens=args.max_new_tokens, max_prompt_length=args.max_prompt_length,
                batch_size=args.batch_size, seed=args.seed, device=args.device, dtype=args.dtype,
                trust_remote_code=args.trust_remote_code, truncated_prompts=truncated,
                on_prompt_done=lambda done: progress.update(task, completed=done),
            )
    except SFTConfigError as exc:  # the flags leave no room for a prompt in the policy's context
        return _fail(str(exc), EXIT_INPUT)
    if truncated:
        print(f"reward eval: {len(truncated)} of {len(prompts)} prompts were longer than the policy takes; "
              "their most recent tokens were kept (--max-prompt-length)", file=sys.stderr)
    pool = ItemPool()
    index = np.array([[pool.add(p, s) for s in row] for p, row in zip(prompts, samples)], dtype=np.int64)

    try:
        scores, timing = score_through_service(args, targets, pool, resolve=False)
    except RewardServiceError as exc:
        return _fail(service_error_message(exc), EXIT_SERVICE)

    proxy_scores = scores[proxy.label][index]
    gold_scores = scores[gold.label][index] if gold else None
    curve = best_of_n_curve(proxy_scores, gold_scores)
    rows = [
        {"n": n, "kl": curve["kl"][i], "proxy_reward": curve["proxy"][i], "proxy_reward_sem": curve["proxy_sem"][i],
         "gold_reward": curve["gold"][i] if gold else None, "gold_reward_sem": curve["gold_sem"][i] if gold else None}
        for i, n in enumerate(curve["n"])
    ]
    generation = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
                  "max_new_tokens": args.max_new_tokens, "max_prompt_length": args.max_prompt_length, "seed": args.seed}
    report = {
        "schema_version": SCHEMA_VERSION, "kind": "best_of_n", "created": _now(),
        "config": {"seed": args.seed, "normalize": args.normalize, "chunk_size": args.chunk_size,
                   "concurrency": args.concurrency, **generation},
        "models": [t.describe() for t in targets], "scoring": timing, "plots": {},
        "best_of_n": {
            "policy": str(policy), "n_prompts": len(prompts), "n_samples": N, "prompts_source": source,
            "generation": {**generation, "prompts_truncated": len(truncated)}, "proxy": proxy.label, "gold": gold.label if gold else None,
            "curve": rows, "samples_file": "samples.jsonl" if args.report else None,
        },
    }
    if args.report:
        out = Path(args.report)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
            for p, (messages, row) in enumerate(zip(prompts, samples)):
                for s, text in enumerate(row):
                    line = {"prompt_index": p, "sample_index": s, "prompt": messages, "response": text,
                            "proxy_score": float(proxy_scores[p, s]),
                            "gold_score": float(gold_scores[p, s]) if gold_scores is not None else None}
                    f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return finish_report(report, args)


# =========================================================================== helpers


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def to_jsonable(value: Any) -> Any:
    """numpy scalars/arrays to Python; nan/inf to None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [to_jsonable(v) for v in value.tolist()]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reward", description="Evaluate served reward models.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_eval_parser(subparsers)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
