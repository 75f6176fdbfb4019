"""A size-bounded LRU of raw rewards, for workloads that score the same responses again
(repeated evaluations, best-of-N over overlapping samples, PPO re-scoring a replayed batch).

The key is the model (its directory and version) plus a hash of the ENCODED input: the token
ids after formatting and truncation are exactly what the model reads, so two requests that
render to the same tokens share an entry whatever route or wording of the request they came
by, and a reloaded model (new version) never reads the old one's entries. Values are raw
rewards; normalisation is applied by the route afterwards, as for uncached scores.

A value is an item's whole row of rewards (the batcher's ``RewardRow``): the model's reward and,
for a model with objectives, each head's beside it. One entry per input, whatever the request
asked for: a request for a head and one for the combination read the same row, each its own
column of it, so neither can be answered with the other's number.

Used from the event loop only (the batcher's ``score``), so it needs no lock.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Sequence

import numpy as np

from reward_core.formatting import EncodedInput
from .metrics import ServiceMetrics


class ScoreCache:
    def __init__(self, max_entries: int, metrics: ServiceMetrics | None = None) -> None:
        if max_entries <= 0:
            raise ValueError("a score cache needs room for at least one entry")
        self.max_entries = max_entries
        self.metrics = metrics
        self._entries: OrderedDict[bytes, tuple[float, ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def keys(model_key: str, encoded: Sequence[EncodedInput]) -> list[bytes]:
        prefix = hashlib.blake2b(model_key.encode(), digest_size=16).digest()
        keys = []
        for e in encoded:
            digest = hashlib.blake2b(prefix, digest_size=16)
            digest.update(np.asarray(e.input_ids, dtype=np.int64).tobytes())
            if e.token_type_ids is not None:  # the same ids split into other segments read differently
                digest.update(b"types")
                digest.update(np.asarray(e.token_type_ids, dtype=np.int64).tobytes())
            keys.append(digest.digest())
        return keys

    def lookup(self, model_name: str, keys: Sequence[bytes]) -> list[tuple[float, ...] | None]:
        found: list[tuple[float, ...] | None] = []
        for key in keys:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            found.append(value)
        if self.metrics is not None:
            hits = sum(v is not None for v in found)
            self.metrics.score_cache_hits.labels(model_name).inc(hits)
            self.metrics.score_cache_misses.labels(model_name).inc(len(found) - hits)
        return found

    def store(self, keys: Sequence[bytes], rows: Sequence[tuple[float, ...]]) -> None:
        for key, row in zip(keys, rows):
            self._entries[key] = row
            self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        if self.metrics is not None:
            self.metrics.score_cache_entries.set(len(self._entries))
