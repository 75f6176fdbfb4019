"""Does an ensemble's uncertainty mean something? For a served ensemble (its model card has
``ensemble``), ``reward eval`` asks whether the members' disagreement picks out the pairs its
reward gets wrong, whether accuracy falls as it rises, and whether it is higher on inputs unlike
the dev sets (``--ood``). The members' rewards and each item's ``ensemble_std`` come from the same
requests as the reward (``return_members``, ``return_uncertainty``): no second pass.

A pair is wrong when the served reward (the rule in effect: ``--aggregate`` or the served default)
ranks the rejected answer above the chosen one. Exact ties are left out of the AUROC (counted in
``n_ties``) and count half in the accuracies, as everywhere in the report.

Per-pair uncertainty scores (:data:`PAIR_SCORES`):

* ``member_diff_std``: the population standard deviation over members of each member's
  ``r_chosen - r_rejected``: how much the members disagree about the pair itself (the first
  score, and the one the quantile bins use);
* ``mean_item_std``: the mean of the two answers' ``ensemble_std`` (what a caller of
  ``/v1/score`` sees per item), which also counts disagreement the pair's difference cancels;
* ``member_disagreement``: ``1 - |2a - 1|`` with ``a`` the share of members that rank the chosen
  answer higher (a tie half): 0 when all members agree, 1 when they are split evenly;
* ``spread_over_margin``: ``member_diff_std / |mean of the members' differences|``, the members'
  spread measured in units of the margin they agree on (infinite when that margin is 0). The raw
  std grows with the margin (members that put two answers far apart also differ more in how far),
  so it can rank confident pairs as uncertain; this ratio cannot. Under a normal approximation the
  chance that a member ranks the pair the other way, Phi(-1/ratio), orders pairs the same way.
* ``small_margin``: ``-|r_chosen - r_rejected|`` of the served reward, which needs no ensemble: the
  baseline the ensemble's scores have to beat to show they add anything beyond the reward itself.

The math is in ``metrics.py`` (``auroc``, ``auroc_interval``, ``accuracy_by_quantile``); this
module builds the report's ``uncertainty`` block from it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from reward_core.ensemble import member_agreement

from .metrics import accuracy_block, accuracy_by_quantile, auroc_interval, distribution_summary, pair_outcomes

PAIR_SCORES = ("member_diff_std", "mean_item_std", "member_disagreement", "spread_over_margin", "small_margin")
BINNED_BY = PAIR_SCORES[0]


@dataclass
class EnsembleScores:
    """What the service answered for one ensemble target, per pool item, beside its reward: each
    member's reward [items, K] and the members' population std [items]; and the rule the reward was
    aggregated by (``uncertainty_penalty`` None unless the rule is mean_minus_var)."""

    members: np.ndarray
    item_std: np.ndarray
    aggregate: str
    uncertainty_penalty: float | None


def _seed(seed: int, *names: str) -> list[int]:
    return [seed, *(zlib.crc32(n.encode("utf-8")) for n in names)]


def pair_uncertainty(
    ensemble: EnsembleScores, chosen: np.ndarray, rejected: np.ndarray, served: np.ndarray,
) -> dict[str, np.ndarray]:
    """Each of :data:`PAIR_SCORES` per pair (``chosen``/``rejected``: pool indices; ``served``: the
    served reward per pool item)."""
    members_chosen, members_rejected = ensemble.members[chosen], ensemble.members[rejected]
    agreement = member_agreement(members_chosen, members_rejected)
    differences = members_chosen - members_rejected
    spread = differences.std(axis=1)
    margin = np.abs(differences.mean(axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        # 0/0 (members identical and level) is no spread at all; x/0 with x > 0 is the most uncertain
        spread_over_margin = np.where(spread == 0, 0.0, spread / margin)
    return {
        "member_diff_std": spread,
        "mean_item_std": (ensemble.item_std[chosen] + ensemble.item_std[rejected]) / 2,
        "member_disagreement": 1 - np.abs(2 * agreement - 1),
        "spread_over_margin": spread_over_margin,
        "small_margin": -np.abs(served[chosen] - served[rejected]),
    }


def uncertainty_section(
    chosen: np.ndarray, rejected: np.ndarray, responses: np.ndarray, scores: np.ndarray, ensemble: EnsembleScores,
    n_bins: int, n_boot: int, seed: Any,
) -> dict[str, Any]:
    """One set of pairs (pool indices) judged by one ensemble: its accuracy, the AUROC of each pair
    score for the pairs it gets wrong, accuracy per quantile of ``member_diff_std``, and the spread
    of ``ensemble_std`` over its unique ``responses``."""
    served_chosen, served_rejected = scores[chosen], scores[rejected]
    outcome = pair_outcomes(served_chosen, served_rejected)
    decided = outcome != 0.5
    wrong = outcome == 0.0
    uncertainty = pair_uncertainty(ensemble, chosen, rejected, scores)
    return {
        "n_pairs": int(outcome.size), "n_wrong": int(wrong.sum()), "n_ties": int((~decided).sum()),
        "accuracy": accuracy_block(served_chosen, served_rejected),
        # the same seed for every score: they are compared on the same resamples of the pairs
        "pair_error_auroc": {name: auroc_interval(u[decided], wrong[decided], n_boot, seed) for name, u in uncertainty.items()},
        "bins": accuracy_by_quantile(uncertainty[BINNED_BY], served_chosen, served_rejected, n_bins),
        "item_std": distribution_summary(ensemble.item_std[responses]),
    }


def ood_section(item_set: Any, dev_items: np.ndarray, ensemble: EnsembleScores, n_boot: int, seed: Any) -> dict[str, Any]:
    """One ``--ood`` set against the dev sets' items: the spread of ``ensemble_std`` on its unique
    items, and the AUROC of ``ensemble_std`` for telling them (positives) from the dev items. Its
    items that are also dev items are left out of both (``n_shared_with_dev``)."""
    items = np.unique(item_set.items)
    outside = np.setdiff1d(items, dev_items)
    std = ensemble.item_std
    positive = np.r_[np.ones(outside.size, bool), np.zeros(dev_items.size, bool)]
    return {
        "path": item_set.path, "load": item_set.load, "n_items": int(outside.size),
        "n_shared_with_dev": int(items.size - outside.size),
        "item_std": distribution_summary(std[outside]),
        "auroc": auroc_interval(np.r_[std[outside], std[dev_items]], positive, n_boot, seed),
    }


def uncertainty_report(
    datasets: Sequence[Any], item_sets: Sequence[Any], scores: dict[str, np.ndarray], ensembles: dict[str, EnsembleScores],
    seed: int, n_boot: int, n_bins: int,
) -> dict[str, Any]:
    """The report's ``uncertainty`` block: per ensemble label, a section per dataset
    (:class:`.datasets.EvalDataset`) and one over every set's pairs, and one per ``--ood`` set
    (:class:`.datasets.ItemSet`)."""
    out = {}
    for label, ensemble in ensembles.items():
        s = scores[label]
        sections = {
            d.name: uncertainty_section(d.chosen, d.rejected, d.responses, s, ensemble, n_bins, n_boot, _seed(seed, label, d.name))
            for d in datasets
        }
        dev_items = np.unique(np.concatenate([d.responses for d in datasets]))
        overall = uncertainty_section(
            np.concatenate([d.chosen for d in datasets]), np.concatenate([d.rejected for d in datasets]), dev_items, s,
            ensemble, n_bins, n_boot, _seed(seed, label),
        )
        out[label] = {
            "members": int(ensemble.members.shape[1]), "aggregate": ensemble.aggregate,
            "uncertainty_penalty": ensemble.uncertainty_penalty, "pair_scores": list(PAIR_SCORES), "binned_by": BINNED_BY,
            "n_bins": n_bins, "bootstrap": n_boot, "datasets": sections, "overall": overall,
            "ood": {i.name: ood_section(i, dev_items, ensemble, n_boot, _seed(seed, label, "ood", i.name)) for i in item_sets},
        }
    return out
