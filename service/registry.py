"""Loaded models by name: tokenizer + metadata + backend + batcher for each."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .backend import Backend, TorchBackend
from .batcher import TokenBudgetBatcher
from .formatting import encode_conversations
from .metrics import ServiceMetrics
from .score_cache import ScoreCache
from .model_dir import ModelDirError, RewardModelSpec, load_spec, load_tokenizer
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
        from .batcher import pad_batch

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
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else 0


def load_model(name: str, path: Path, settings: ServiceSettings) -> ServedModel:
    """Load one model directory, or raise ModelDirError saying what is wrong with it."""
    from transformers import AutoConfig

    path = Path(path)
    if not path.is_dir():
        raise ModelDirError(f"model {name!r}: {path} is not a directory")
    if not (path / "config.json").is_file():
        raise ModelDirError(f"model {name!r}: {path} has no config.json (not a Hugging Face model directory)")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=settings.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelDirError(f"model {name!r}: cannot read {path / 'config.json'}: {exc}") from exc
    raw_base = None
    meta = path / "reward_model.json"
    if meta.is_file():
        try:
            raw_base = json.loads(meta.read_text()).get("base_model")
        except (json.JSONDecodeError, AttributeError):
            raw_base = None  # load_spec reports the broken file properly
    tokenizer = load_tokenizer(path, settings.trust_remote_code, raw_base)
    spec = load_spec(path, config, tokenizer)
    if settings.max_length is not None:
        spec = replace(spec, max_length=settings.max_length)
    backend = _backend_for(path, spec, settings)
    log.info("loaded model %s from %s (%s, max_length=%d)", name, path, spec.architecture, spec.max_length)
    id2label = getattr(config, "id2label", None) or {}
    label = str(id2label.get(0, id2label.get("0", "LABEL_0")))
    return ServedModel(name=name, path=path.resolve(), spec=spec, tokenizer=tokenizer, backend=backend, label=label)


def _backend_for(path: Path, spec: RewardModelSpec, settings: ServiceSettings) -> Backend:
    from .onnx_backend import OnnxBackend, is_onnx_export

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
