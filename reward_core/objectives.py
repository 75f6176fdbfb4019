"""Rewards per objective: several reward heads over one backbone, and the rule that combines them
into the one scalar reward a caller gets by default.

A model directory with ``"objectives"`` in its ``reward_model.json`` has one head per named
objective: its classifier (``score`` / ``classifier``) has one output per objective, in the order
of ``names``, so the backbone runs once per item whatever the number of heads. The combination:

* ``"weights"``: a fixed weighted sum of the heads (``weights``, one per objective);
* ``"gate"``: a weighted sum whose weights depend on the prompt, as ArmoRM does: a linear gate
  over the mean of the hidden states of the prompt's tokens, softmaxed over the objectives.
  Its tensors are ``reward_gate.weight`` / ``reward_gate.bias`` in the directory's safetensors.
  The gate needs to see where the prompt ends without seeing the response, so it is for encoders
  that mark segments (``token_type_ids``); a decoder combines with fixed weights.
  ``gate_layer`` says which hidden states it reads, counted as Python indexes the model's
  ``hidden_states``: -1 (the default) the last block's output, -2 the one below it. Below the
  last block, the last block is read at [CLS] alone, which is what lets serving and the trainer
  run that block for [CLS] only (reward_core.forward.bert_top_heads).
  The prompt's tokens attend to the response in every block, so a gate reading a block's output
  is moved by the response too: a response can shift the weights towards a head that rates it
  higher. ``gate_layer`` 0 reads the token embeddings (``hidden_states[0]``), which no other token
  reaches: a gate on the prompt alone, at the cost of an embedding lookup.
  ``gate_temperature`` T (default 1) softmaxes the gate's logits divided by T: below 1 the
  weights sharpen towards the objective the gate ranks first (ArmoRM's gate has such a
  temperature too). It is a rule chosen after training (``reward export-warm --gate-temperature``,
  or the field edited), so the same trained gate can be served sharper; the trainer's routing
  loss reads the gate at T = 1.

```json
"objectives": {"names": ["helpfulness", "truthfulness", "harmlessness"], "combine": "gate"}
"objectives": {"names": ["helpfulness", "truthfulness", "harmlessness"], "combine": "gate", "gate_layer": -2}
"objectives": {"names": ["helpfulness", "truthfulness", "harmlessness"], "combine": "gate", "gate_layer": 0}
"objectives": {"names": ["helpfulness", "truthfulness", "harmlessness"], "combine": "gate", "gate_layer": -2, "gate_temperature": 0.5}
"objectives": {"names": ["helpfulness", "harmlessness"], "combine": "weights", "weights": [0.5, 0.5]}
```

A directory without the field is a single-head model, read exactly as before.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

DEFAULT_OBJECTIVES = ("helpfulness", "truthfulness", "harmlessness")
COMBINE_RULES = ("weights", "gate")
GATE_PREFIX = "reward_gate"
# The gate's tensors live in a file of their own, beside whatever shape the rest of the weights
# take (a full checkpoint, a partial state dict over a base, a LoRA adapter).
GATE_FILE = "reward_gate.safetensors"
# What a model directory or a request may call a head: short, URL- and log-key safe.
OBJECTIVE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


class ObjectivesError(ValueError):
    """An ``objectives`` block that cannot be used, with what to fix."""


@dataclass(frozen=True)
class Objectives:
    """The named heads of a model and how they combine into the reward."""

    names: tuple[str, ...]
    combine: str = "gate"
    weights: tuple[float, ...] | None = None
    gate_layer: int = -1  # which hidden states the gate reads (an index of the model's hidden_states)
    gate_temperature: float = 1.0  # the gate's softmax temperature

    def __post_init__(self) -> None:
        names = tuple(self.names)
        object.__setattr__(self, "names", names)
        if not names:
            raise ObjectivesError("objectives.names must list at least one objective")
        for name in names:
            if not isinstance(name, str) or not OBJECTIVE_NAME.match(name):
                raise ObjectivesError(
                    f"objective name {name!r}: use lower-case letters, digits and '_' (at most 32, starting with a letter)"
                )
        if len(set(names)) != len(names):
            raise ObjectivesError(f"objectives.names has duplicates: {list(names)}")
        if self.combine not in COMBINE_RULES:
            raise ObjectivesError(f"objectives.combine must be one of {', '.join(COMBINE_RULES)}, not {self.combine!r}")
        if self.combine == "weights":
            weights = self.weights if self.weights is not None else tuple(1.0 / len(names) for _ in names)
            if isinstance(weights, dict):
                unknown = set(weights) - set(names)
                if unknown:
                    raise ObjectivesError(f"objectives.weights names unknown objectives {sorted(unknown)}")
                weights = tuple(weights.get(n, 0.0) for n in names)
            weights = tuple(weights)
            if len(weights) != len(names) or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights
            ):
                raise ObjectivesError(f"objectives.weights must be {len(names)} finite numbers, one per objective")
            object.__setattr__(self, "weights", tuple(float(w) for w in weights))
        elif self.weights is not None:
            raise ObjectivesError("objectives.weights is for combine='weights'; a gate learns its weights")
        if isinstance(self.gate_layer, bool) or not isinstance(self.gate_layer, int) or self.gate_layer > 0:
            raise ObjectivesError(
                f"objectives.gate_layer must be 0 (the token embeddings) or a negative integer (-1: the last block's "
                f"output, -2: the one below), not {self.gate_layer!r}"
            )
        if self.gate_layer != -1 and not self.gated:
            raise ObjectivesError("objectives.gate_layer is for combine='gate'")
        t = self.gate_temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ObjectivesError(
                f"objectives.gate_temperature must be a positive number (1: the gate as trained; below 1: sharper), not {t!r}"
            )
        object.__setattr__(self, "gate_temperature", float(t))
        if self.gate_temperature != 1.0 and not self.gated:
            raise ObjectivesError("objectives.gate_temperature is for combine='gate'")

    @property
    def gated(self) -> bool:
        return self.combine == "gate"

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise ObjectivesError(f"unknown objective {name!r}; this model has {', '.join(self.names)}") from None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"names": list(self.names), "combine": self.combine}
        if self.weights is not None:
            data["weights"] = list(self.weights)
        if self.gate_layer != -1:  # files without it read as before
            data["gate_layer"] = self.gate_layer
        if self.gate_temperature != 1.0:  # likewise
            data["gate_temperature"] = self.gate_temperature
        return data

    @classmethod
    def from_json(cls, raw: Any) -> "Objectives":
        if isinstance(raw, Objectives):
            return raw
        if not isinstance(raw, dict):
            raise ObjectivesError('objectives must be an object such as {"names": [...], "combine": "gate"}')
        known = ("names", "combine", "weights", "gate_layer", "gate_temperature")
        unknown = set(raw) - set(known)
        if unknown:
            raise ObjectivesError(f"objectives has unknown keys {sorted(unknown)} (known: {', '.join(known)})")
        names = raw.get("names")
        if not isinstance(names, list):
            raise ObjectivesError("objectives.names must be a list of objective names")
        return cls(names=tuple(names), combine=raw.get("combine", "gate"), weights=raw.get("weights"),
                   gate_layer=raw.get("gate_layer", -1), gate_temperature=raw.get("gate_temperature", 1.0))


def prompt_mean(hidden: Any, attention_mask: Any, token_type_ids: Any) -> Any:
    """Mean of the hidden states over the prompt's tokens (segment 0 of an encoder's text pair,
    [CLS] and the first [SEP] included): what the gate sees of an item. Without segment ids the
    whole attended input is averaged."""
    mask = attention_mask
    if token_type_ids is not None:
        mask = mask * (token_type_ids == 0).to(mask.dtype)
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def combine_heads(heads: Any, objectives: Objectives, gate: Any = None, prompt_features: Any = None) -> Any:
    """[batch, 1 + H]: the combined reward, then each head's, from heads' rewards [batch, H].

    ``gate`` (a Linear from hidden size to H) and ``prompt_features`` ([batch, hidden], from
    :func:`prompt_mean`) are needed for the gate rule."""
    import torch

    if objectives.gated:
        weights = gate_weights(gate, prompt_features, objectives.gate_temperature).to(heads.dtype)
        combined = (weights * heads).sum(dim=-1, keepdim=True)
    else:
        w = torch.tensor(objectives.weights, dtype=heads.dtype, device=heads.device)
        combined = (heads * w).sum(dim=-1, keepdim=True)
    return torch.cat([combined, heads], dim=-1)


def gate_weights(gate: Any, prompt_features: Any, temperature: float = 1.0) -> Any:
    """The gate's weights per objective, [batch, H] (each row sums to 1), at softmax ``temperature``."""
    import torch

    return torch.softmax(gate(prompt_features).float() / temperature, dim=-1)  # / 1.0 is exact


def attach_objectives(model: Any, objectives: Objectives) -> Any:
    """Make an HF sequence classifier with one output per objective a multi-objective reward
    model: it remembers its objectives and, for the gate rule, gets a ``reward_gate`` Linear
    (hidden size -> H; zero-initialised, so an untrained gate weighs the heads equally)."""
    import torch.nn as nn

    n_labels = getattr(model.config, "num_labels", None)
    if n_labels != len(objectives.names):
        raise ObjectivesError(
            f"the model has {n_labels} outputs but objectives names {len(objectives.names)}: {list(objectives.names)}"
        )
    n_blocks = getattr(model.config, "num_hidden_layers", None)
    if isinstance(n_blocks, int) and -objectives.gate_layer > n_blocks + 1:
        raise ObjectivesError(
            f"objectives.gate_layer {objectives.gate_layer}: the model has {n_blocks + 1} hidden states "
            f"(embeddings and {n_blocks} blocks), so use -1 to -{n_blocks + 1}"
        )
    model.reward_objectives = objectives
    if objectives.gated and getattr(model, GATE_PREFIX, None) is None:
        hidden = model.config.hidden_size
        gate = nn.Linear(hidden, len(objectives.names))
        nn.init.zeros_(gate.weight)
        nn.init.zeros_(gate.bias)
        gate.to(next(model.parameters()).dtype)
        setattr(model, GATE_PREFIX, gate)
    model.config.id2label = dict(enumerate(objectives.names))
    model.config.label2id = {n: i for i, n in enumerate(objectives.names)}
    return model


def objectives_of(model: Any) -> Objectives | None:
    """The objectives a loaded model was given by :func:`attach_objectives`, or None."""
    return getattr(model, "reward_objectives", None)


def gate_layer_of(model: Any) -> int | None:
    """Which hidden states a gated model's gate reads (``objectives.gate_layer``); None for a model
    without a gate."""
    objectives = objectives_of(model)
    if objectives is None or not objectives.gated or getattr(model, GATE_PREFIX, None) is None:
        return None
    return objectives.gate_layer


def gate_state(model: Any) -> dict[str, Any]:
    """The gate's tensors as saved in GATE_FILE (empty without a gate)."""
    gate = getattr(model, GATE_PREFIX, None)
    if gate is None:
        return {}
    return {f"{GATE_PREFIX}.{k}": v.detach().contiguous() for k, v in gate.state_dict().items()}


@contextlib.contextmanager
def without_gate(model: Any) -> Iterator[Any]:
    """The model without its gate submodule for the block (HF's save_pretrained then writes only
    the HF model; the gate goes to GATE_FILE)."""
    gate = getattr(model, GATE_PREFIX, None)
    if gate is not None:
        delattr(model, GATE_PREFIX)
    try:
        yield model
    finally:
        if gate is not None:
            setattr(model, GATE_PREFIX, gate)
