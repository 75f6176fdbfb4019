"""Loaded models by name: tokenizer + metadata + backend + batcher for each."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .backend import TorchBackend
from .batcher import TokenBudgetBatcher
from .formatting import encode_conversations
from .metrics import ServiceMetrics
from .model_dir import ModelDirError, RewardModelSpec, load_spec, load_tokenizer
from .settings import ServiceSettings

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    name: str
    path: Path
    spec: RewardModelSpec
    tokenizer: Any
    backend: TorchBackend
    batcher: TokenBudgetBatcher | None = None

    @property
    def display_name(self) -> str:
        return f"{self.name}@{self.spec.version}"

    def warm_up(self) -> None:
        """One real forward, so the first request does not pay for lazy initialisation."""
        from .batcher import pad_batch

        encoded = encode_conversations([([{"role": "user", "content": "Hello"}], "Hi!")], self.tokenizer, self.spec)
        self.backend.score_batch(pad_batch(encoded, self.pad_token_id))

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
    backend = TorchBackend(
        path, spec, device=settings.device, dtype=settings.dtype,
        trust_remote_code=settings.trust_remote_code, allow_pickle=settings.allow_pickle,
    )
    log.info("loaded model %s from %s (%s, max_length=%d)", name, path, spec.architecture, spec.max_length)
    return ServedModel(name=name, path=path.resolve(), spec=spec, tokenizer=tokenizer, backend=backend)


def load_models(settings: ServiceSettings) -> list[ServedModel]:
    return [load_model(name, path, settings) for name, path in settings.model_paths()]


def attach_batchers(models: list[ServedModel], settings: ServiceSettings, metrics: ServiceMetrics) -> None:
    for m in models:
        m.batcher = TokenBudgetBatcher(
            m.backend,
            model_name=m.name,
            pad_token_id=m.pad_token_id,
            max_batch_tokens=settings.max_batch_tokens,
            max_wait_ms=settings.max_wait_ms,
            max_batch_size=settings.max_batch_size,
            max_queue_items=settings.max_queue_items,
            metrics=metrics,
        )
