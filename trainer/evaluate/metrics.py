"""The metric math of ``reward eval``: pure numpy functions, tested on hand-computed fixtures.

Definitions
-----------
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
* Uncertainty (an ensemble): AUROC of a score for telling positives (pairs the reward gets wrong;
  out-of-distribution items) from negatives, by the rank formula (Mann-Whitney U):
  (sum of the positives' mid-ranks - P(P+1)/2) / (P N), so a tied score counts half; 1 when every
  positive scores above every negative, 0.5 for a score that tells nothing, undefined (nan) without
  both classes. Its 95% interval: percentile bootstrap that resamples positives and negatives
  each within their class (so every resample has both), seeded. Accuracy per quantile bin: the
  pairs sorted by the score (stable), cut into bins of equal size (the first bins one larger when
  they do not divide), each an accuracy block.
* Best-of-N: for each prompt, N samples; for n = 1, 2, 4, ..., N the expected reward of the best
  of n draws without replacement from the N, computed exactly: with proxy scores sorted
  ascending s_(1) <= ... <= s_(N), E[max] = sum_i C(i-1, n-1) / C(N, n) * s_(i). The gold reward
  of the proxy's pick uses the same weights on the gold scores in proxy order (gold scores of
  proxy-tied samples are averaged: a uniformly random pick among ties). KL = log n - (n-1)/n
  (the analytic best-of-n KL bound), as in Gao, Schulman and Hilton (2022), "Scaling Laws for
  Reward Model Overoptimization". Means over prompts with their standard errors.

"""

from __future__ import annotations

import math
from functools import lru_cache
from statistics import NormalDist
from typing import Any, Sequence

import numpy as np

CONFIDENCE = 0.95
CALIBRATION_BINS = 10


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


def accuracy_block(chosen: np.ndarray, rejected: np.ndarray, confidence: float = CONFIDENCE) -> dict[str, Any]:
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


# --------------------------------------------------------------------------- uncertainty


def auroc(scores: Sequence[float], positive: Sequence[bool], weights: Any = None) -> Any:
    """Area under the ROC curve of ``scores`` for telling ``positive`` items from the others, by
    the rank formula with mid-ranks (ties count half); nan without both classes.

    ``weights`` [resamples, items] counts each item per resample (a bootstrap) and gives one AUROC
    per row. Written per group of tied scores, which is the rank formula with counts: U = sum over
    groups g of pos_g * (neg below g + neg_g / 2), AUROC = U / (P N)."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(positive, bool)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"scores {s.shape} and positive {y.shape} must be one value per item")
    w = np.ones((1, s.size)) if weights is None else np.atleast_2d(np.asarray(weights, np.float64))
    if s.size == 0:
        out = np.full(w.shape[0], math.nan)
    else:
        order = np.argsort(s, kind="mergesort")
        ordered = s[order]
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        w = w[:, order]
        pos = np.add.reduceat(w * y[order], starts, axis=1)
        neg = np.add.reduceat(w * ~y[order], starts, axis=1)
        below = np.cumsum(neg, axis=1) - neg
        u = (pos * (below + 0.5 * neg)).sum(axis=1)
        n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), math.nan)
    return float(out[0]) if weights is None else out


def auroc_interval(
    scores: Sequence[float], positive: Sequence[bool], n_boot: int = 2000, seed: Any = 0, confidence: float = CONFIDENCE
) -> dict[str, Any]:
    """AUROC with a percentile interval from ``n_boot`` bootstrap resamples, positives and
    negatives each resampled within their class (seeded: the same ``seed`` and class sizes give
    the same resamples, so scores of the same items are compared on the same draws)."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(positive, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    block = {"auroc": auroc(s, y), "ci_low": math.nan, "ci_high": math.nan, "n_positive": n_pos, "n_negative": n_neg}
    if n_pos == 0 or n_neg == 0:
        return block
    rng = np.random.default_rng(seed)
    pos_index, neg_index = np.flatnonzero(y), np.flatnonzero(~y)
    boots = np.empty(n_boot, dtype=np.float64)
    per_chunk = max(1, 4_000_000 // s.size)  # bound memory: at most ~4M weights at a time
    for start in range(0, n_boot, per_chunk):
        k = min(per_chunk, n_boot - start)
        weights = np.zeros((k, s.size))
        weights[:, pos_index] = rng.multinomial(n_pos, np.full(n_pos, 1 / n_pos), size=k)
        weights[:, neg_index] = rng.multinomial(n_neg, np.full(n_neg, 1 / n_neg), size=k)
        boots[start : start + k] = auroc(s, y, weights)
    alpha = 1 - confidence
    block["ci_low"], block["ci_high"] = (float(q) for q in np.quantile(boots, [alpha / 2, 1 - alpha / 2]))
    return block


def accuracy_by_quantile(
    uncertainty: Sequence[float], chosen: Sequence[float], rejected: Sequence[float], n_bins: int
) -> list[dict[str, Any]]:
    """Pairs sorted by ``uncertainty`` (stable) and cut into ``n_bins`` bins of equal size (fewer
    when there are fewer pairs), lowest first: each bin's range of uncertainty and accuracy block."""
    u = np.asarray(uncertainty, np.float64)
    chosen, rejected = np.asarray(chosen, np.float64), np.asarray(rejected, np.float64)
    order = np.argsort(u, kind="mergesort")
    bins = []
    for b, index in enumerate(np.array_split(order, min(n_bins, u.size))):
        bins.append({"bin": b + 1, "uncertainty_low": float(u[index].min()), "uncertainty_high": float(u[index].max()),
                     **accuracy_block(chosen[index], rejected[index])})
    return bins


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


def standard_error(x: np.ndarray) -> float:
    """Standard error of the mean of ``x``; NaN for fewer than two values."""
    return float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.nan


def best_of_n_per_prompt(proxy_scores: np.ndarray, ns: Sequence[int], values: np.ndarray | None = None) -> np.ndarray:
    """Per n and prompt, the expected proxy score of the proxy's best-of-n pick, or of ``values``
    (e.g. gold scores) at that pick: [len(ns), prompts]. Scores are (prompts, N)."""
    return np.array([[expected_best_of_n(proxy_scores[p], n, None if values is None else values[p])
                      for p in range(proxy_scores.shape[0])] for n in ns])


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
    ns = list(ns) if ns is not None else default_bon_ns(proxy.shape[1])
    out: dict[str, list] = {"n": ns, "kl": [analytic_bon_kl(n) for n in ns], "proxy": [], "proxy_sem": [],
                            "gold": None if gold is None else [], "gold_sem": None if gold is None else []}
    for per_prompt in best_of_n_per_prompt(proxy, ns):
        out["proxy"].append(float(per_prompt.mean()))
        out["proxy_sem"].append(standard_error(per_prompt))
    if gold is not None:
        for per_prompt in best_of_n_per_prompt(proxy, ns, gold):
            out["gold"].append(float(per_prompt.mean()))
            out["gold_sem"].append(standard_error(per_prompt))
    return out
