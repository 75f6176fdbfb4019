"""Ensembles: K reward models ("members") over one shared backbone, and how their rewards
aggregate into the reward a caller gets.

A model directory with ``"ensemble"`` in its ``reward_model.json`` holds K members that share the
embeddings and the lower blocks of one encoder; each member owns a copy of the top
``top_layers`` blocks, the pooler and a one-output head. The shared part runs once per item and
the members run on its output. Only the first token's row of a member's last block reaches its
head (BERT's pooler reads ``[CLS]``), so that block computes every token's keys and values but
attention and the feed-forward for ``[CLS]`` alone: a member costs a small share of a block.

```json
"ensemble": {"members": 5, "top_layers": 1, "aggregate": "mean", "uncertainty_penalty": 1.0}
```

The members' tensors are ``reward_members.<m>.…`` in ``reward_members.safetensors`` (beside the
HF model's own files, which hold the shared part). The reward columns of an ensemble are the
members' mean, then each member's reward.

Aggregation rules (Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization"):

* ``mean``: the members' mean;
* ``min``: the worst case over members;
* ``mean_minus_var``: uncertainty-weighted, ``mean - uncertainty_penalty * var`` (the members'
  population variance).

Callers (``reward eval best-of-n --proxy-rules``, ``reward ppo --reward-aggregate``) also name
``member:M``, member M's reward alone, read from the members the service returns
(:class:`RewardRule`, :func:`rule_rewards`).

A directory without the field is a single model, read exactly as before. ``reward export-warm``
(``trainer/warm.py``) averages the members' weights into such a single model
(:func:`averaged_members_state`).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

AGGREGATES = ("mean", "min", "mean_minus_var")
ENSEMBLE_PREFIX = "reward_members"
# The members' tensors live in a file of their own, beside the HF model's (the shared part).
ENSEMBLE_FILE = "reward_members.safetensors"
MAX_MEMBERS = 64


class EnsembleError(ValueError):
    """An ``ensemble`` block, or a request for one, that cannot be used, with what to fix."""


@dataclass(frozen=True)
class Ensemble:
    """How many members a model has, how much of the backbone each owns, and the served rule."""

    members: int
    top_layers: int = 1
    aggregate: str = "mean"
    uncertainty_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.members, int) or isinstance(self.members, bool) or not 1 <= self.members <= MAX_MEMBERS:
            raise EnsembleError(f"ensemble.members must be a whole number from 1 to {MAX_MEMBERS}, not {self.members!r}")
        if not isinstance(self.top_layers, int) or isinstance(self.top_layers, bool) or self.top_layers < 0:
            raise EnsembleError(f"ensemble.top_layers must be a whole number >= 0, not {self.top_layers!r}")
        check_aggregate(self.aggregate, self.uncertainty_penalty)
        object.__setattr__(self, "uncertainty_penalty", float(self.uncertainty_penalty))

    def to_json(self) -> dict[str, Any]:
        return {"members": self.members, "top_layers": self.top_layers, "aggregate": self.aggregate,
                "uncertainty_penalty": self.uncertainty_penalty}

    @classmethod
    def from_json(cls, raw: Any) -> "Ensemble":
        if isinstance(raw, Ensemble):
            return raw
        if not isinstance(raw, dict):
            raise EnsembleError('ensemble must be an object such as {"members": 5, "top_layers": 1}')
        known = {"members", "top_layers", "aggregate", "uncertainty_penalty"}
        unknown = set(raw) - known
        if unknown:
            raise EnsembleError(f"ensemble has unknown keys {sorted(unknown)} (known: {', '.join(sorted(known))})")
        if "members" not in raw:
            raise EnsembleError("ensemble.members (how many members) is missing")
        return cls(**raw)


def check_aggregate(rule: str, uncertainty_penalty: float) -> None:
    """Refuse an unknown rule or a penalty that is not a finite number >= 0."""
    if rule not in AGGREGATES:
        raise EnsembleError(f"aggregate must be one of {', '.join(AGGREGATES)}, not {rule!r}")
    if (not isinstance(uncertainty_penalty, (int, float)) or isinstance(uncertainty_penalty, bool)
            or not math.isfinite(uncertainty_penalty) or uncertainty_penalty < 0):
        raise EnsembleError(f"uncertainty_penalty must be a finite number >= 0, not {uncertainty_penalty!r}")


# ---- aggregation (numpy, on the members' rewards [batch, K])


def member_mean_std(members: Any) -> tuple[Any, Any]:
    """The members' mean and population standard deviation per item, each [batch]."""
    import numpy as np

    members = np.asarray(members, dtype=np.float64)
    return members.mean(axis=-1), members.std(axis=-1)


def aggregate_rewards(members: Any, rule: str = "mean", uncertainty_penalty: float = 1.0) -> Any:
    """One reward per item [batch] from the members' rewards [batch, K] by ``rule``."""
    import numpy as np

    check_aggregate(rule, uncertainty_penalty)
    members = np.asarray(members, dtype=np.float64)
    if rule == "min":
        return members.min(axis=-1)
    mean = members.mean(axis=-1)
    if rule == "mean":
        return mean
    return mean - uncertainty_penalty * members.var(axis=-1)


MEMBER_RULE = "member:"


@dataclass(frozen=True)
class RewardRule:
    """How a caller turns an ensemble's members' rewards into its reward: one of AGGREGATES (the
    service's rules), or ``member:M``, member M's reward alone (the single proxy an over-
    optimisation experiment compares the ensemble's rules with; a caller reads it from the
    members the service returns, as the service has no such rule)."""

    aggregate: str | None = None
    member: int | None = None

    def __str__(self) -> str:
        return f"{MEMBER_RULE}{self.member}" if self.member is not None else str(self.aggregate)

    def check_members(self, members: int) -> None:
        """Refuse a member index the ensemble does not have."""
        if self.member is not None and self.member >= members:
            raise EnsembleError(f"rule {self} names member {self.member}, but the ensemble has {members} "
                                f"(member:0 to member:{members - 1})")


def parse_reward_rule(text: str) -> RewardRule:
    """``mean``, ``min``, ``mean_minus_var`` or ``member:M`` (M >= 0), else an EnsembleError saying what is allowed."""
    text = text.strip()
    if text in AGGREGATES:
        return RewardRule(aggregate=text)
    if text.startswith(MEMBER_RULE):
        index = text[len(MEMBER_RULE):]
        if index.isdigit():
            return RewardRule(member=int(index))
    raise EnsembleError(f"unknown reward rule {text!r}: give one of {', '.join(AGGREGATES)} or member:M "
                        f"(member M's reward alone, M from 0)")


def rule_rewards(members: Any, rule: RewardRule, uncertainty_penalty: float = 1.0) -> Any:
    """One reward per item [batch] from the members' rewards [batch, K] by ``rule``: the
    service's formula (:func:`aggregate_rewards`), or member M's column."""
    import numpy as np

    members = np.asarray(members, dtype=np.float64)
    if rule.member is not None:
        rule.check_members(members.shape[-1])
        return members[..., rule.member]
    return aggregate_rewards(members, rule.aggregate, uncertainty_penalty)


def member_agreement(members_a: Any, members_b: Any) -> Any:
    """Per pair, the share of members that rank ``a`` above ``b`` (a tie counts half), [batch]."""
    import numpy as np

    a, b = np.asarray(members_a, dtype=np.float64), np.asarray(members_b, dtype=np.float64)
    return ((a > b).astype(np.float64) + 0.5 * (a == b)).mean(axis=-1)


# ---- the members as a torch module


def _backbone_parts(model: Any) -> tuple[Any, Any, Any]:
    """(base model, its block list, the classifier) of a BERT-family sequence classifier, or a clear refusal."""
    base = getattr(model, "base_model", None)
    blocks = getattr(getattr(base, "encoder", None), "layer", None)
    classifier = getattr(model, "classifier", None)
    import torch.nn as nn

    if (base is None or getattr(base, "embeddings", None) is None or blocks is None or not isinstance(classifier, nn.Linear)
            or getattr(base, "pooler", None) is None or not hasattr(blocks[0], "attention")
            or not hasattr(blocks[0].attention, "self") or not hasattr(blocks[0].attention.self, "query")):
        raise EnsembleError(
            f"an ensemble over a shared backbone needs a BERT-family encoder (embeddings, encoder.layer, pooler and a "
            f"linear classifier, as MiniLM has); {type(model).__name__} is not one"
        )
    position_type = getattr(model.config, "position_embedding_type", "absolute")
    if position_type not in (None, "absolute"):
        raise EnsembleError(f"an ensemble's member blocks support absolute positions, not {position_type!r}")
    return base, blocks, classifier


def _member(blocks: list[Any], pooler: Any, classifier: Any) -> Any:
    import torch.nn as nn

    member = nn.Module()
    member.layers = nn.ModuleList([copy.deepcopy(b) for b in blocks])
    member.pooler = copy.deepcopy(pooler)
    member.classifier = copy.deepcopy(classifier)
    return member


def _make_members_module(model: Any, ensemble: Ensemble) -> Any:
    import torch
    import torch.nn as nn

    from .bert import LowerBlocks, additive_mask, bert_block

    base, blocks, classifier = _backbone_parts(model)
    if classifier.out_features != 1:
        raise EnsembleError(f"an ensemble's members have one output each; the model's classifier has {classifier.out_features}")
    n_blocks = len(blocks)
    if ensemble.top_layers > n_blocks:
        raise EnsembleError(f"ensemble.top_layers {ensemble.top_layers} is more than the model's {n_blocks} blocks")
    top = list(blocks)[n_blocks - ensemble.top_layers:]

    class EnsembleMembers(nn.Module):
        """K members (own top blocks, pooler and head each) on the shared backbone's output."""

        def __init__(self) -> None:
            super().__init__()
            self.members = nn.ModuleList([_member(top, base.pooler, classifier) for _ in range(ensemble.members)])
            self.ensemble = ensemble

        def forward(self, shared_hidden: Any, attention_mask: Any) -> Any:
            """The members' rewards [batch, K] from the shared part's output [batch, L, D]."""
            mask = additive_mask(attention_mask, shared_hidden.dtype)
            rewards = []
            for member in self.members:
                hidden = shared_hidden
                n = len(member.layers)
                for j, block in enumerate(member.layers):
                    hidden = bert_block(block, hidden, mask, query_rows=1 if j == n - 1 else None)
                rewards.append(member.classifier(member.pooler(hidden))[:, 0])
            return torch.stack(rewards, dim=-1)

    module = EnsembleMembers()
    module.to(next(model.parameters()).dtype)
    return module, LowerBlocks(base, n_blocks - ensemble.top_layers)


def attach_ensemble(model: Any, ensemble: Ensemble) -> Any:
    """Give a BERT-family sequence classifier (one output) K members over its lower blocks: each
    starts as a copy of the model's top blocks, pooler and head (the trainer re-seeds the heads)."""
    members, shared = _make_members_module(model, ensemble)
    setattr(model, ENSEMBLE_PREFIX, members)
    model.reward_ensemble = ensemble
    model.reward_shared_backbone = shared
    return model


def ensemble_of(model: Any) -> Ensemble | None:
    """The ensemble a loaded model was given by :func:`attach_ensemble`, or None."""
    return getattr(model, "reward_ensemble", None)


def members_state(model: Any) -> dict[str, Any]:
    """The members' tensors as saved in ENSEMBLE_FILE (empty without an ensemble)."""
    members = getattr(model, ENSEMBLE_PREFIX, None)
    if members is None:
        return {}
    return {f"{ENSEMBLE_PREFIX}.{k}": v.detach().contiguous() for k, v in members.state_dict().items()}


@contextlib.contextmanager
def without_members(model: Any) -> Iterator[Any]:
    """The model without its members for the block (HF's save_pretrained then writes only the
    shared part and the model's own head; the members go to ENSEMBLE_FILE)."""
    members = getattr(model, ENSEMBLE_PREFIX, None)
    if members is not None:
        delattr(model, ENSEMBLE_PREFIX)
    try:
        yield model
    finally:
        if members is not None:
            setattr(model, ENSEMBLE_PREFIX, members)


def load_members_state(model: Any, state: dict[str, Any]) -> None:
    """Lay ENSEMBLE_FILE's tensors into an attached ensemble (strict: every member tensor)."""
    members = getattr(model, ENSEMBLE_PREFIX)
    members.load_state_dict({k.removeprefix(ENSEMBLE_PREFIX + "."): v for k, v in state.items()})
    members.to(next(model.parameters()).dtype)


def member_parts(model: Any) -> dict[str, str]:
    """Where each part a member owns sits in the model itself: ``{"layers.<j>": "<blocks>.<N-T+j>",
    "pooler": ..., "classifier": ...}`` (member-relative name -> the model's module name)."""
    ensemble = ensemble_of(model)
    if ensemble is None:
        raise EnsembleError("the model is not an ensemble: it has no members")
    base, blocks, classifier = _backbone_parts(model)
    names = {id(module): name for name, module in model.named_modules()}
    first_top_block = len(blocks) - ensemble.top_layers
    parts = {f"layers.{j}": f"{names[id(blocks)]}.{first_top_block + j}" for j in range(ensemble.top_layers)}
    parts.update(pooler=names[id(base.pooler)], classifier=names[id(classifier)])
    return parts


def averaged_members_state(model: Any, members: Sequence[int] | None = None) -> dict[str, Any]:
    """WARM (Ramé et al. 2024, "WARM: On the Benefits of Weight Averaged Reward Models"): the
    chosen members' top blocks, pooler and head averaged parameter by parameter (all members by
    default), under the names of the model's own top blocks, pooler and classifier
    (:func:`member_parts`). Laid into the model without its members, they make one ordinary
    model that costs what a single model costs.

    WARM's premise is that models fine-tuned from one shared pretrained initialisation stay
    linearly connected, so their weight average is a model of its own; the trainer's members
    start from the same pretrained top blocks for that reason. Their heads, seeded apart, are
    averaged like any other layer."""
    import torch

    parts = member_parts(model)
    count = ensemble_of(model).members
    chosen = list(range(count)) if members is None else list(members)
    if not chosen:
        raise EnsembleError("choose at least one member to average")
    if len(set(chosen)) != len(chosen):
        raise EnsembleError(f"members to average are named more than once: {chosen}")
    outside = [m for m in chosen if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m < count]
    if outside:
        raise EnsembleError(f"members {outside} do not exist: the ensemble has members 0 to {count - 1}")

    def own_name(key: str) -> str:
        part = next(p for p in parts if key.startswith(p + "."))
        return parts[part] + key[len(part):]

    states = [getattr(model, ENSEMBLE_PREFIX).members[m].state_dict() for m in chosen]
    averaged = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            # summed in float64 so the mean does not depend on the members' order
            value = torch.stack([s[key].to(torch.float64) for s in states]).mean(0).to(first.dtype)
        else:  # an integer buffer (none in BERT's blocks today) is not a weight: it must agree
            if any(not torch.equal(s[key], first) for s in states[1:]):
                raise EnsembleError(f"the members' {key} differ and cannot be averaged")
            value = first
        averaged[own_name(key)] = value.detach().clone().contiguous()
    return averaged


def ensemble_rewards(model: Any, input_ids: Any, attention_mask: Any, token_type_ids: Any = None,
                     *, position_ids: Any = None, shared_hidden: Any = None) -> Any:
    """The members' rewards [batch, K]: the shared part once (or ``shared_hidden``, its output
    computed before, as the trainer's frozen cache gives it), then every member on it."""
    if shared_hidden is None:
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        shared_hidden = model.reward_shared_backbone(**kwargs)
    return getattr(model, ENSEMBLE_PREFIX)(shared_hidden, attention_mask)
