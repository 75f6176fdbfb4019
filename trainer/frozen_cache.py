"""Frozen lower blocks, computed once: in ``--train-mode top`` only the top blocks, the pooler and
the heads learn, so the output of the blocks below is the same every epoch and for every head.
:class:`FrozenPrefixCache` computes it once per distinct input (float16, in memory) and the
training forward then runs only the trained blocks on it.

It works on encoders whose base model has ``embeddings`` and ``encoder.layer`` (BERT and its
family, MiniLM included): the prefix is the base model with its block list cut to the frozen
blocks; the suffix is the same model with the embeddings replaced by a pass-through and the block
list cut to the trained ones, so masks, pooler, heads and gate go through the model's own code
(:func:`reward_core.forward.reward_heads`). :meth:`FrozenPrefixCache.check` compares the two
paths with the plain forward before training starts.

With a store directory (``--frozen-cache-dir``) the rows also go to disk, as safetensors shards
under a fingerprint of the frozen weights, and a later run reads back the rows it needs instead
of computing them: a retrain on grown data (the comparison loop's step 2, again) computes only
the new inputs, and so do a resumed run and another seed of the same recipe. Another base, or
another split between frozen and trained blocks, has another fingerprint and never meets them.

The last trained block runs only where its output is read (:func:`reward_core.forward.bert_top_heads`): a BERT
sequence classifier reads the top block at [CLS] (the pooler) and, for a gate, at the prompt's
tokens; every other position of that block is computed and thrown away. Its queries are cut to
the prompt segment, while keys and values still cover the whole input, so the heads and the gate
get the same numbers as the full block at a fraction of the cost (the prompt is usually a small
part of a (prompt, response) input).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

from .reward_config import TrainingConfigError

log = logging.getLogger(__name__)

# Rows per shard file are capped by size: writing a shard copies its tensors once more in memory.
STORE_SHARD_BYTES = 512 * 2**20


def _row_key(ids: Sequence[int], types: Sequence[int] | None) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(bytes(memoryview(_as_int64(ids))))
    if types is not None:
        digest.update(b"|")
        digest.update(bytes(memoryview(_as_int64(types))))
    return digest.digest()


def _as_int64(values: Sequence[int]):
    import numpy as np

    return np.ascontiguousarray(np.asarray(values, dtype=np.int64))


def _pass_through() -> Any:
    """A module standing in for the embeddings: the cached hidden states come in as ``inputs_embeds``."""
    import torch.nn as nn

    class PassThrough(nn.Module):
        def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None, **_: Any):
            return inputs_embeds

    return PassThrough()


class FrozenPrefixCache:
    """The frozen blocks' output per distinct (input ids, token types), float16 on the CPU; with
    ``store``, also kept on disk across runs (see the module docstring)."""

    def __init__(self, model: Any, trained_blocks: int, store: str | os.PathLike | None = None) -> None:
        base = getattr(model, "base_model", None)
        encoder = getattr(base, "encoder", None)
        blocks = getattr(encoder, "layer", None)
        if base is None or getattr(base, "embeddings", None) is None or blocks is None:
            raise TrainingConfigError(
                f"--cache-frozen needs an encoder with embeddings and encoder.layer (BERT's family); "
                f"{type(model).__name__} has not; leave it off"
            )
        from reward_core.ensemble import ensemble_of

        # an ensemble's members own their blocks, so every block of the model itself may be frozen
        self.ensemble = ensemble_of(model) is not None
        if not (0 if self.ensemble else 1) <= trained_blocks < len(blocks):
            raise TrainingConfigError(
                f"--cache-frozen needs frozen blocks below the trained ones: --top-layers {trained_blocks} of {len(blocks)}"
            )
        self.model, self.base, self.encoder = model, base, encoder
        self.blocks = list(blocks)
        self.split = len(self.blocks) - trained_blocks
        self.rows: dict[bytes, Any] = {}
        from reward_core.forward import top_block_read_sparsely
        from reward_core.objectives import gate_layer_of

        gate_layer = gate_layer_of(model)
        self.gate_on_embeddings = gate_layer == 0  # read from the input ids, beside the cache
        gate_layer = -1 if gate_layer is None else gate_layer
        # hidden_states[split] is the cached output; the gate may read it or any trained block's
        if not self.gate_on_embeddings and len(self.blocks) + 1 + gate_layer < self.split:
            raise TrainingConfigError(
                f"--cache-frozen: --gate-layer {gate_layer} reads a frozen block's output below the cached one "
                f"(--top-layers {trained_blocks}); use --gate-layer -{trained_blocks + 1} or above, 0 (the token "
                "embeddings), or more --top-layers"
            )
        # the top block at the read positions only (BERT sequence classifiers; see the module docstring)
        self.read_positions_only = not self.ensemble and top_block_read_sparsely(model)
        self.store = Path(store) / self.fingerprint() if store is not None else None
        self.read_from_store = 0

    def fingerprint(self) -> str:
        """A digest of everything the cached rows depend on besides the input: the model's class,
        the split and every tensor of the embeddings and the frozen blocks."""
        import torch

        digest = hashlib.blake2b(digest_size=16)
        digest.update(f"{type(self.model).__name__}|frozen={self.split}|".encode())
        modules = [("embeddings", self.base.embeddings)] + [(f"block{i}", b) for i, b in enumerate(self.blocks[: self.split])]
        for prefix, module in modules:
            for name, tensor in sorted(module.state_dict().items()):
                tensor = tensor.detach().to("cpu").contiguous()
                digest.update(f"{prefix}.{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
                digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def _read_store(self, todo: dict[bytes, Any]) -> None:
        """Move every row of ``todo`` found in the store into the cache (and out of ``todo``)."""
        from safetensors import safe_open

        if self.store is None or not self.store.is_dir():
            return
        for shard in sorted(self.store.glob("rows-*.safetensors")):
            if not todo:
                return
            try:
                with safe_open(str(shard), framework="pt") as f:
                    for name in f.keys():
                        key = bytes.fromhex(name)
                        if key in todo:
                            self.rows[key] = f.get_tensor(name)
                            del todo[key]
                            self.read_from_store += 1
            except Exception as exc:  # a damaged shard costs its rows' compute, not the run
                log.warning("frozen cache: skipping %s (%s); its rows are computed again", shard, exc)

    def _write_store(self, keys: Sequence[bytes]) -> None:
        """The rows of ``keys`` as new shards; each appears whole or not at all (written, then
        renamed). The run needs only the rows in memory, so a store it cannot write to (a full
        disk) costs a warning, not the run."""
        if self.store is None or not keys:
            return
        from safetensors import SafetensorError

        try:
            self._write_shards(keys)
        except (OSError, SafetensorError) as exc:
            log.warning("frozen cache: could not store rows in %s (%s); training goes on from memory", self.store, exc)

    def _write_shards(self, keys: Sequence[bytes]) -> None:
        from safetensors.torch import save_file

        self.store.mkdir(parents=True, exist_ok=True)
        about = self.store / "about.json"
        if not about.exists():
            hidden = self.rows[keys[0]].shape[-1]
            about.write_text(json.dumps({"model": type(self.model).__name__, "frozen_blocks": self.split,
                                         "hidden_size": int(hidden), "dtype": "float16"}, indent=2) + "\n")
        shard: dict[str, Any] = {}
        size = 0
        for i, key in enumerate(keys):
            row = self.rows[key]
            shard[key.hex()] = row
            size += row.numel() * row.element_size()
            if size >= STORE_SHARD_BYTES or i == len(keys) - 1:
                final = self.store / f"rows-{uuid.uuid4().hex}.safetensors"
                partial = self.store / f".{final.name}.partial"
                try:
                    save_file(shard, str(partial))
                    os.replace(partial, final)
                finally:
                    partial.unlink(missing_ok=True)
                shard, size = {}, 0

    @contextlib.contextmanager
    def _blocks(self, which: list[Any], pass_through: bool) -> Iterator[None]:
        import torch.nn as nn

        original_blocks, original_embeddings = self.encoder.layer, self.base.embeddings
        self.encoder.layer = nn.ModuleList(which)
        if pass_through:
            self.base.embeddings = _pass_through()
        try:
            yield
        finally:
            self.encoder.layer = original_blocks
            self.base.embeddings = original_embeddings

    def fill(self, encoded: Sequence[Any], pad_id: int, max_tokens: int, device: Any, progress: Any = None) -> int:
        """Compute the prefix of every input not cached yet (length-sorted batches of at most
        ``max_tokens`` padded tokens), after reading what the store holds. Returns how many were
        computed; those go to the store."""
        import torch

        from reward_core.forward import pad_batch, plan_batches

        todo: dict[bytes, Any] = {}
        for e in encoded:
            key = _row_key(e.input_ids, e.token_type_ids)
            if key not in self.rows and key not in todo:
                todo[key] = e
        self._read_store(todo)
        if progress is not None and len(todo) < len(encoded):
            progress(len(encoded) - len(todo))
        items = list(todo.items())
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self._blocks(self.blocks[: self.split], pass_through=False):
                for batch_rows in plan_batches([len(e) for _, e in items], max_tokens):
                    batch = pad_batch([items[i][1] for i in batch_rows], pad_id)
                    kwargs = {
                        "input_ids": torch.from_numpy(batch.input_ids).to(device),
                        "attention_mask": torch.from_numpy(batch.attention_mask).to(device),
                    }
                    if batch.token_type_ids is not None:
                        kwargs["token_type_ids"] = torch.from_numpy(batch.token_type_ids).to(device)
                    hidden = self.base(**kwargs).last_hidden_state.to("cpu", torch.float16)
                    for row, i in enumerate(batch_rows):
                        self.rows[items[i][0]] = hidden[row, : len(items[i][1])].clone()
                    if progress is not None:
                        progress(len(batch_rows))
        finally:
            self.model.train(was_training)
        self._write_store([key for key, _ in items])
        return len(items)

    def hidden_for(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
        """The cached prefix output of a right-padded chunk, [rows, seq, hidden] float32."""
        import torch

        lengths = attention_mask.sum(dim=1).tolist()
        ids = input_ids.cpu().numpy()
        types = token_type_ids.cpu().numpy() if token_type_ids is not None else None
        seq = input_ids.shape[1]
        hidden = None
        for r, n in enumerate(lengths):
            key = _row_key(ids[r, :n], types[r, :n] if types is not None else None)
            cached = self.rows.get(key)
            if cached is None:
                raise KeyError("an input was not cached; FrozenPrefixCache.fill must see every training input")
            if hidden is None:
                hidden = torch.zeros(len(lengths), seq, cached.shape[1], dtype=torch.float32)
            # copied into place, not cat/stack: under CPU bf16 autocast those refuse the float16 rows
            hidden[r, :n] = cached
        return hidden.to(input_ids.device)

    def heads(self, architecture: str, input_ids: Any, attention_mask: Any, token_type_ids: Any):
        """(heads, prompt features) of a chunk through the trained blocks only."""
        from reward_core.forward import bert_top_heads, embedding_gate_features, reward_heads

        hidden = self.hidden_for(input_ids, attention_mask, token_type_ids)
        if self.ensemble:  # the members run on the shared part's output
            return reward_heads(self.model, architecture, None, attention_mask, token_type_ids, inputs_embeds=hidden)
        features = None
        if self.gate_on_embeddings:  # frozen too, and cheap: computed again rather than cached
            features = embedding_gate_features(self.model, input_ids, attention_mask, token_type_ids)
        if self.read_positions_only:
            return bert_top_heads(self.model, self.blocks[self.split:], hidden, attention_mask, token_type_ids,
                                  gate_features=features)
        with self._blocks(self.blocks[self.split:], pass_through=True):
            heads, passed_through = reward_heads(self.model, architecture, None, attention_mask, token_type_ids,
                                                 inputs_embeds=hidden)
        return heads, features if self.gate_on_embeddings else passed_through

    def check(self, architecture: str, chunk: tuple[Any, Any, Any], atol: float = 2e-2) -> float:
        """Largest difference between the cached path and the plain forward on one chunk (float16
        storage costs a little precision); raises when they disagree beyond ``atol``."""
        import torch

        from reward_core.forward import reward_heads

        with torch.no_grad():
            plain, _ = reward_heads(self.model, architecture, *chunk, read_positions_only=False)
            cached, _ = self.heads(architecture, *chunk)
        diff = float((plain - cached).abs().max())
        if diff > atol:
            raise TrainingConfigError(
                f"--cache-frozen: the cached forward differs from the model's by {diff:.3g}; this architecture's "
                "blocks do not run apart from its embeddings; leave --cache-frozen off"
            )
        return diff
