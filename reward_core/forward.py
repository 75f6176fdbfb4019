"""The reward forward and its inputs: padded token arrays in, one reward per row out.

``reward_forward`` is THE forward of a reward model: the service's backends, the trainer, the
in-process scorer and the ONNX export all call it, so they all read the reward at the same
position. Batch planning and padding live here too, so the trainer's in-process scoring cuts
batches exactly as the service's batcher does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .formatting import EncodedInput


@dataclass
class Batch:
    """Right-padded inputs of one forward pass."""

    input_ids: np.ndarray  # int64 [batch, seq]
    attention_mask: np.ndarray  # int64 [batch, seq]
    token_type_ids: np.ndarray | None  # int64 [batch, seq] for encoders with segments


def plan_batches(
    lengths: list[int], max_batch_tokens: int, max_batch_size: int | None = None, max_padding: float | None = None,
) -> list[list[int]]:
    """Indices grouped into batches: sorted by length, each batch's rows x longest row within
    the budget (a single row longer than the budget gets a batch of its own).

    ``max_padding``: also cut a batch before the share of its padded tokens that are padding
    would pass this fraction. On CPU a forward costs about its padded tokens whatever the rows,
    so padding is pure loss and one-row batches are no slower; on a GPU bigger batches pay for
    their padding, so there it is off (None)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0  # tokens of the rows in ``current``
    for i in order:
        longest = lengths[i]  # ascending order: the new row is the longest
        rows = len(current) + 1
        too_many = max_batch_size is not None and rows > max_batch_size
        too_padded = max_padding is not None and (real + longest) < (1 - max_padding) * rows * longest
        if current and (rows * longest > max_batch_tokens or too_many or too_padded):
            batches.append(current)
            current, real = [], 0
        current.append(i)
        real += longest
    if current:
        batches.append(current)
    return batches


def pad_token_id(tokenizer: Any) -> int:
    """The id padded positions get: the tokenizer's pad token, else EOS, else 0.

    Padded positions are masked everywhere (the reward is read at the mask's last 1, losses skip
    them), so any id in the vocabulary would do; EOS is what HF generation pads with.
    """
    for candidate in (tokenizer.pad_token_id, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(candidate, (list, tuple)):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return 0


def pad_batch(encoded: list[EncodedInput], pad_token_id: int) -> Batch:
    longest = max(len(e) for e in encoded)
    input_ids = np.full((len(encoded), longest), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((len(encoded), longest), dtype=np.int64)
    with_types = encoded[0].token_type_ids is not None
    token_type_ids = np.zeros((len(encoded), longest), dtype=np.int64) if with_types else None
    for row, e in enumerate(encoded):
        n = len(e)
        input_ids[row, :n] = e.input_ids
        attention_mask[row, :n] = 1
        if token_type_ids is not None:
            token_type_ids[row, :n] = e.token_type_ids
    return Batch(input_ids, attention_mask, token_type_ids)


def pad_columns(batch: Batch, multiple: int) -> Batch:
    """Right-pad the sequence axis to a multiple of ``multiple`` (masked out, so rewards do not
    change): tensor cores want multiples of 8, and a compiled graph sees fewer distinct shapes."""
    seq = batch.input_ids.shape[1]
    extra = -seq % multiple
    if extra == 0:
        return batch

    def widen(array: np.ndarray | None, fill: int) -> np.ndarray | None:
        if array is None:
            return None
        return np.pad(array, ((0, 0), (0, extra)), constant_values=fill)

    # Pad id 0 is as good as any: the mask hides these columns and pooling reads the last 1 of the mask.
    return Batch(widen(batch.input_ids, 0), widen(batch.attention_mask, 0), widen(batch.token_type_ids, 0))


def reward_forward(
    model: Any, architecture: str, input_ids: Any, attention_mask: Any, token_type_ids: Any = None,
    *, positions_from_mask: bool | None = None, read_positions_only: bool = True,
):
    """One reward per right-padded row: THE forward of a reward model, shared by the service
    (``TorchBackend.score_batch``) and the trainer, so both read the same position.

    For a model with several objectives this is the combined reward; :func:`reward_columns`
    gives each head's beside it.
    """
    return reward_columns(
        model, architecture, input_ids, attention_mask, token_type_ids, positions_from_mask=positions_from_mask,
        read_positions_only=read_positions_only,
    )[:, 0]


def reward_columns(
    model: Any, architecture: str, input_ids: Any, attention_mask: Any, token_type_ids: Any = None,
    *, positions_from_mask: bool | None = None, read_positions_only: bool = True,
):
    """[batch, 1 + H]: the reward, then each objective head's (H = 0 for a single-head model), from
    one backbone pass (:func:`reward_heads`). Several objectives combine by
    :func:`reward_core.objectives.combine_heads`. An ensemble's columns are the members' mean,
    then each member's reward (:mod:`reward_core.ensemble`; the service aggregates them)."""
    import torch

    from .ensemble import ensemble_of
    from .objectives import GATE_PREFIX, combine_heads, objectives_of

    heads, features = reward_heads(
        model, architecture, input_ids, attention_mask, token_type_ids, positions_from_mask=positions_from_mask,
        read_positions_only=read_positions_only,
    )
    objectives = objectives_of(model)
    if objectives is None:
        if ensemble_of(model) is not None:  # the members' mean, then each member
            return torch.cat([heads.mean(dim=-1, keepdim=True), heads], dim=-1)
        return heads[:, :1]
    return combine_heads(heads, objectives, getattr(model, GATE_PREFIX, None), features)


def reward_heads(
    model: Any, architecture: str, input_ids: Any, attention_mask: Any, token_type_ids: Any = None,
    *, positions_from_mask: bool | None = None, inputs_embeds: Any = None, read_positions_only: bool = True,
):
    """(heads [batch, H], prompt features [batch, hidden] or None): every head's reward from one
    backbone pass, and what a gate reads (only computed for a gated model).

    Encoders: ``model(...).logits`` (the heads on [CLS]). Decoders with a ``score`` head: the
    base model's hidden state at the last attended token through ``score``; other decoders fall
    back to the model's own pooling.

    The position read is the last 1 of ``attention_mask``, never derived from pad ids, so a pad
    token equal to EOS (or none at all) cannot move it. Rows may also be left-padded (as
    OpenRLHF and TRL pad): position ids then count attended tokens only, so a row's reward
    does not depend on which side it was padded.

    ``positions_from_mask=True`` always derives position ids from the mask (for right-padded rows
    they equal the default ones), so a traced graph (the ONNX export) has no data-dependent
    branch; ``None`` decides per batch, skipping the cumsum when no row is left-padded.

    ``inputs_embeds`` (encoders) replaces ``input_ids``: the trainer feeds the cached output of
    frozen lower blocks this way (trainer/frozen_cache.py). For an ensemble the heads are its
    members, [batch, K], and ``inputs_embeds`` is the shared part's output.

    ``read_positions_only``: a BERT sequence classifier runs its top block only at the positions
    read after it (:func:`bert_top_heads`), which gives the full block's rewards at a fraction of
    its cost; the ONNX export turns it off, so the graph keeps the blocks onnxruntime fuses.
    """
    from .ensemble import ensemble_of, ensemble_rewards
    from .objectives import gate_layer_of, prompt_mean

    if ensemble_of(model) is not None:  # the members are the heads; inputs_embeds is the shared part's output
        return ensemble_rewards(model, input_ids, attention_mask, token_type_ids, shared_hidden=inputs_embeds), None
    gate_layer = gate_layer_of(model)
    head = getattr(model, "score", None) if architecture == "decoder" else None
    if head is not None:
        import torch

        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if positions_from_mask or (positions_from_mask is None and not bool(attention_mask[:, 0].all())):
            kwargs["position_ids"] = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        hidden = model.base_model(**kwargs).last_hidden_state
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (positions * attention_mask.long()).argmax(dim=1)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return head(pooled), None  # decoders combine by fixed weights (load refuses a gate)
    kwargs = {"attention_mask": attention_mask}
    if inputs_embeds is not None:
        kwargs["inputs_embeds"] = inputs_embeds
    else:
        kwargs["input_ids"] = input_ids
    if token_type_ids is not None:
        kwargs["token_type_ids"] = token_type_ids
    if read_positions_only and inputs_embeds is None and gate_layer in (None, -1, -2, 0) and top_block_read_sparsely(model):
        lower = lower_blocks(model)(**kwargs)  # every block but the top one, through the model's own code
        features = embedding_gate_features(model, input_ids, attention_mask, token_type_ids) if gate_layer == 0 else None
        return bert_top_heads(model, list(model.base_model.encoder.layer)[-1:], lower, attention_mask, token_type_ids,
                              gate_features=features)
    if gate_layer is None:
        return model(**kwargs).logits, None
    out = model(**kwargs, output_hidden_states=True)
    return out.logits, prompt_mean(out.hidden_states[gate_layer], attention_mask, token_type_ids)


def embedding_gate_features(model: Any, input_ids: Any, attention_mask: Any, token_type_ids: Any):
    """What a gate with ``gate_layer`` 0 reads: the mean of the prompt's token embeddings (the
    model's ``hidden_states[0]``, positions counted as the model counts them for these rows), which
    nothing of the response reaches. For paths that hand the blocks their input some other way
    (the trainer's cached frozen blocks)."""
    from .objectives import prompt_mean

    embeddings = model.base_model.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
    return prompt_mean(embeddings, attention_mask, token_type_ids)


def top_block_read_sparsely(model: Any) -> bool:
    """Whether ``model`` is BERT's sequence classifier, whose top block is read only at [CLS] (the
    pooler) and, for a gate, at the prompt's tokens, and which :func:`bert_top_heads` computes
    exactly: BERT blocks, absolute positions, and no dropout at work."""
    import torch.nn as nn

    base = getattr(model, "base_model", None)
    blocks = getattr(getattr(base, "encoder", None), "layer", None)
    if type(model).__name__ != "BertForSequenceClassification" or getattr(base, "pooler", None) is None or not blocks:
        return False
    if model.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        return False  # training with dropout goes through the model's own forward
    position_type = getattr(model.config, "position_embedding_type", "absolute")
    return position_type in (None, "absolute") and all(hasattr(getattr(b, "attention", None), "self") for b in blocks)


def lower_blocks(model: Any) -> Any:
    """The model's embeddings and every block but the top one, called through the base model's
    own forward (masks, positions and token types as the model handles them); made once per model."""
    from .bert import LowerBlocks

    lower = model.__dict__.get("_reward_lower_blocks")
    if lower is None:
        lower = LowerBlocks(model.base_model, len(model.base_model.encoder.layer) - 1)
        model.__dict__["_reward_lower_blocks"] = lower
    return lower


def bert_top_heads(model: Any, blocks: list[Any], hidden: Any, attention_mask: Any, token_type_ids: Any,
                   gate_features: Any = None):
    """(heads, prompt features or None) of a BERT sequence classifier from the hidden states below
    ``blocks`` (its top blocks): every one of them but the last in full, the last only at the
    positions read after it. Keys and values still cover every token, so the numbers are the
    full blocks'. The positions: [CLS] for the pooler; the prompt segment too when a gate reads
    the top block's output (``gate_layer`` -1); a gate reading lower takes its features on the way.
    A gate on the embeddings (``gate_layer`` 0) reads ``gate_features``
    (:func:`embedding_gate_features`), which the caller computes from the input ids."""
    from .bert import additive_mask, bert_block
    from .objectives import gate_layer_of, prompt_mean

    gate_layer = gate_layer_of(model)
    query_rows = 1
    if gate_layer == -1:  # up to the last prompt token of any row ([CLS] prompt [SEP] starts a right-padded row)
        query_rows = hidden.shape[1]
        if token_type_ids is not None:
            import torch

            prompt = attention_mask.bool() & (token_type_ids == 0)
            positions = torch.arange(1, prompt.shape[1] + 1, device=prompt.device)
            query_rows = max(1, int((positions * prompt).max()))
    mask = additive_mask(attention_mask, hidden.dtype)
    states = [hidden]  # the hidden states from ``hidden`` up, as the model's hidden_states end
    for block in blocks[:-1]:
        states.append(bert_block(block, states[-1], mask))
    top = bert_block(blocks[-1], states[-1], mask, query_rows)
    logits = model.classifier(model.dropout(model.base_model.pooler(top)))
    if gate_layer is None:
        return logits, None
    if gate_layer == 0:
        if gate_features is None:
            raise ValueError("a gate on the token embeddings needs gate_features (embedding_gate_features)")
        return logits, gate_features
    if gate_layer == -1:
        types = None if token_type_ids is None else token_type_ids[:, :query_rows]
        return logits, prompt_mean(top, attention_mask[:, :query_rows], types)
    return logits, prompt_mean(states[gate_layer + 1], attention_mask, token_type_ids)
