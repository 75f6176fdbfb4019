"""Reward-model losses and metrics, as small named functions on tensors.

Notation: ``rewards`` is a flat float tensor with one reward per response of a micro-batch
(every response of every record, in one forward); a *pair* ``(better[j], worse[j])`` indexes
into it, and ``group[j]`` says which record (prompt) the pair belongs to. ``delta`` is
``rewards[better] - rewards[worse]``.

* Bradley-Terry: ``-log sigmoid(delta - margin)``.
* Soft labels (``p`` = probability that ``better`` really is better):
  ``-(p log sigmoid(delta - margin) + (1 - p) log sigmoid(-(delta - margin)))``; ``p = 1`` is
  Bradley-Terry.
* K-way rankings (InstructGPT): every record contributes its K(K-1)/2 pairs; pair losses are
  averaged within each record, then over records, so records with large K do not dominate.
  Optional pair weights (e.g. length balancing) make both averages weighted.
* Reward centring (TRL's ``center_rewards_coefficient``): ``coef * mean(rewards ** 2)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "pair_deltas",
    "bradley_terry_loss",
    "soft_label_loss",
    "pair_losses",
    "grouped_mean",
    "ranking_loss",
    "center_rewards_penalty",
    "pair_accuracy",
]


def pair_deltas(rewards: torch.Tensor, better: torch.Tensor, worse: torch.Tensor) -> torch.Tensor:
    """``rewards[better] - rewards[worse]`` for every pair."""
    return rewards[better] - rewards[worse]


def bradley_terry_loss(delta: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair ``-log sigmoid(delta - margin)``."""
    if margin is not None:
        delta = delta - margin
    return -F.logsigmoid(delta)


def soft_label_loss(delta: torch.Tensor, p: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair ``-(p log sigmoid(d) + (1 - p) log sigmoid(-d))`` with ``d = delta - margin``."""
    if margin is not None:
        delta = delta - margin
    return -(p * F.logsigmoid(delta) + (1.0 - p) * F.logsigmoid(-delta))


def pair_losses(
    delta: torch.Tensor, margin: torch.Tensor | None = None, p: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-pair losses: soft-label where ``p`` is given and not NaN, Bradley-Terry elsewhere."""
    if p is None:
        return bradley_terry_loss(delta, margin)
    hard = torch.isnan(p)
    p_filled = torch.where(hard, torch.ones_like(p), p)
    return soft_label_loss(delta, p_filled, margin)


def grouped_mean(
    values: torch.Tensor, group: torch.Tensor, n_groups: int | None = None, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over groups of each group's mean (weighted by ``weight`` when given).

    With weights, group g's loss is ``sum_j w_j v_j / n_g`` and the groups are averaged with
    weights ``sum_j w_j / n_g`` (``n_g`` = pairs in the group): unit weights give the plain
    mean of per-group means.
    """
    if values.numel() == 0:
        return values.sum()
    if n_groups is None:
        n_groups = int(group.max().item()) + 1
    if weight is None:
        weight = torch.ones_like(values)
    weight = weight.to(values.dtype)
    counts = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(
        0, group, torch.ones_like(values)
    )
    weighted = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(0, group, weight * values)
    weights = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(0, group, weight)
    present = counts > 0
    numerator = (weighted[present] / counts[present]).sum()
    denominator = (weights[present] / counts[present]).sum()
    return numerator / denominator.clamp_min(torch.finfo(values.dtype).tiny)


def ranking_loss(
    rewards: torch.Tensor,
    better: torch.Tensor,
    worse: torch.Tensor,
    group: torch.Tensor,
    *,
    n_groups: int | None = None,
    margin: torch.Tensor | None = None,
    p: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """InstructGPT's K-way loss: per-record mean of pairwise losses, averaged over records."""
    delta = pair_deltas(rewards, better, worse)
    return grouped_mean(pair_losses(delta, margin, p), group, n_groups, weight)


def center_rewards_penalty(rewards: torch.Tensor) -> torch.Tensor:
    """``mean(rewards ** 2)``: multiplied by a coefficient, keeps rewards centred on zero."""
    return (rewards.float() ** 2).mean()


def pair_accuracy(delta: torch.Tensor) -> torch.Tensor:
    """Per-pair correctness: 1 when better > worse, 0.5 on a tie, 0 otherwise."""
    return (delta > 0).float() + 0.5 * (delta == 0).float()
