"""Loaded models by name: tokenizer + metadata + backend + batcher for each."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reward_core.backends import Backend, OnnxBackend, TorchBackend
from reward_core.formatting import encode_conversations
from reward_core.forward import pad_batch, pad_token_id
from reward_core.loading import open_model_dir
from reward_core.model_dir import ModelDirError, RewardModelSpec, is_onnx_export

from .batcher import TokenBudgetBatcher
from .metrics import ServiceMetrics
from .score_cache import ScoreCache
from .settings import ServiceSettings

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    name: str
    path: Path
    spec: RewardModelSpec
    tokenizer: Any
    backend: Backend
    batcher: TokenBudgetBatcher | None = None
    label: str = "LABEL_0"  # the head's one class name (config.id2label[0]), as vLLM reports it
    # Requests between picking this model and getting their scores; a reload retires the
    # model only when none is left, so no accepted request fails or hangs.
    _users: int = field(default=0, repr=False)
    _unused: asyncio.Event | None = field(default=None, repr=False)

    @property
    def display_name(self) -> str:
        return f"{self.name}@{self.spec.version}"

    def warm_up(self) -> None:
        """One real forward, so the first request does not pay for lazy initialisation."""
        encoded = encode_conversations([([{"role": "user", "content": "Hello"}], "Hi!")], self.tokenizer, self.spec)
        self.backend.score_batch(pad_batch(encoded, self.pad_token_id))

    @contextlib.contextmanager
    def in_use(self):
        """Held around tokenising + scoring; enter it before the first await after picking the model."""
        if self._unused is None:
            self._unused = asyncio.Event()
        self._users += 1
        self._unused.clear()
        try:
            yield self
        finally:
            self._users -= 1
            if self._users == 0:
                self._unused.set()

    async def retire(self) -> None:
        """Wait for the requests still using this model, then stop its batcher."""
        if self._users and self._unused is not None:
            await self._unused.wait()
        if self.batcher is not None:
            await self.batcher.stop()

    @property
    def pad_token_id(self) -> int:
        return pad_token_id(self.tokenizer)


def load_model(name: str, path: Path, settings: ServiceSettings) -> ServedModel:
    """Load one model directory, or raise ModelDirError saying what is wrong with it."""
    files = open_model_dir(path, trust_remote_code=settings.trust_remote_code, max_length=settings.max_length, name=name)
    backend = _backend_for(files.path, files.spec, settings)
    log.info("loaded model %s from %s (%s, max_length=%d)", name, path, files.spec.architecture, files.spec.max_length)
    return ServedModel(
        name=name, path=files.path.resolve(), spec=files.spec, tokenizer=files.tokenizer, backend=backend, label=files.label,
    )


def _backend_for(path: Path, spec: RewardModelSpec, settings: ServiceSettings) -> Backend:
    if settings.backend == "onnx":
        return OnnxBackend(path, spec, device=settings.device, dtype=settings.dtype, threads=settings.torch_threads)
    if is_onnx_export(path) and not any(path.glob("*.safetensors")):
        raise ModelDirError(f"{path} is an ONNX export (reward export-onnx); serve it with --backend onnx")
    return TorchBackend(
        path, spec, device=settings.device, dtype=settings.dtype,
        trust_remote_code=settings.trust_remote_code, allow_pickle=settings.allow_pickle, compile=settings.compile,
    )


def load_models(settings: ServiceSettings) -> list[ServedModel]:
    return [load_model(name, path, settings) for name, path in settings.model_paths()]


def attach_batchers(
    models: list[ServedModel], settings: ServiceSettings, metrics: ServiceMetrics, cache: ScoreCache | None = None
) -> None:
    """Give each model its batcher (not started); ``cache``: the service's score cache, if on."""
    for m in models:
        m.batcher = TokenBudgetBatcher(
            m.backend,
            model_name=m.name,
            pad_token_id=m.pad_token_id,
            max_batch_tokens=settings.max_batch_tokens,
            max_wait_ms=settings.max_wait_ms,
            max_batch_size=settings.max_batch_size,
            max_padding=settings.max_padding,
            max_queue_items=settings.max_queue_items,
            metrics=metrics,
            cache=cache,
            cache_key=f"{m.path}@{m.spec.version}",
        )
