"""A BERT block run apart from the model's own forward, the pieces that the forward's top block
(:func:`reward_core.forward.bert_top_heads`) and an ensemble's members (:mod:`reward_core.ensemble`)
share: one block whose outputs may be cut to the first rows, its attention mask, and the
embeddings plus lower blocks run through the base model's own code. Imports no other module of
the core.
"""

from __future__ import annotations

from typing import Any


def additive_mask(attention_mask: Any, dtype: Any) -> Any:
    import torch

    mask = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - mask) * torch.finfo(dtype).min


def bert_block(block: Any, hidden: Any, additive_mask: Any, query_rows: int | None = None) -> Any:
    """One BERT block (no dropout) on ``hidden`` [batch, L, D]; with ``query_rows`` the output of
    the first ``query_rows`` tokens' rows alone ([batch, query_rows, D]): keys and values still
    come from every token, attention and the feed-forward run for those rows only."""
    import torch.nn.functional as F

    attention = block.attention.self
    heads, head_size = attention.num_attention_heads, attention.attention_head_size
    batch, length, _ = hidden.shape
    queries_in = hidden if query_rows is None else hidden[:, :query_rows]
    rows = queries_in.shape[1]
    q = attention.query(queries_in).view(batch, rows, heads, head_size).transpose(1, 2)
    k = attention.key(hidden).view(batch, length, heads, head_size).transpose(1, 2)
    v = attention.value(hidden).view(batch, length, heads, head_size).transpose(1, 2)
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask)
    context = context.transpose(1, 2).reshape(batch, rows, heads * head_size)
    attended = block.attention.output.LayerNorm(block.attention.output.dense(context) + queries_in)
    return block.output.LayerNorm(block.output.dense(block.intermediate(attended)) + attended)


class LowerBlocks:
    """The embeddings and the lower ``n_shared`` blocks of a BERT-family model, called through the
    base model's own forward (masks, positions and token types as the model handles them) with its
    block list cut: an ensemble's shared part, or everything below a top block run where it is
    read. Not an nn.Module of its own: its parameters are the model's, saved once."""

    def __init__(self, base: Any, n_shared: int) -> None:
        import copy

        import torch.nn as nn

        self.base = copy.copy(base)
        self.base._modules = dict(base._modules)
        encoder = copy.copy(base.encoder)
        encoder._modules = dict(base.encoder._modules)
        encoder._modules["layer"] = nn.ModuleList(list(base.encoder.layer)[:n_shared])
        self.base._modules["encoder"] = encoder
        self.base._modules["pooler"] = None

    def __call__(self, **kwargs: Any) -> Any:
        return self.base(**kwargs).last_hidden_state
