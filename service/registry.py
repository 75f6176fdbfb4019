"""The served models: loading (tokenizer + metadata + backend for each), their batchers,
warm-up, and the hot swap on reload (``ModelRegistry``).

Hot reload (``POST /v1/models/{name}/reload``, routers/models.py) swaps a served model for a
fresh load of its directory (or another one) without stopping the service. The new model is
loaded and warmed up in a worker thread while the old one keeps serving; then the name points at
the new one, and the old one is retired once the requests that already picked it have their
scores. No request fails or waits on the swap itself. Both copies are in memory for that moment.
A directory that cannot load leaves the old model serving (``ReloadFailed`` says why).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reward_core.backends import Backend, OnnxBackend, TorchBackend
from reward_core.ensemble import Ensemble
from reward_core.formatting import encode_conversations
from reward_core.forward import pad_batch, pad_token_id
from reward_core.loading import open_model_dir
from reward_core.model_dir import ModelDirError, RewardModelSpec, is_onnx_export

from .batcher import TokenBudgetBatcher
from .metrics import ServiceMetrics
from .score_cache import ScoreCache
from .settings import ServiceSettings

log = logging.getLogger(__name__)

# The longest path Linux takes (PATH_MAX); a longer model name is not looked up as a directory.
MAX_PATH_CHARS = 4096


@dataclass
class ServedModel:
    name: str
    path: Path
    spec: RewardModelSpec
    tokenizer: Any
    backend: Backend
    batcher: TokenBudgetBatcher | None = None
    label: str = "LABEL_0"  # the head's one class name (config.id2label[0]), as vLLM reports it
    # An ensemble's members and the rule (and λ) a request gets when it names none: the spec's,
    # with `reward serve --ensemble-aggregate / --uncertainty-penalty` laid over it. None otherwise.
    ensemble: Ensemble | None = None
    # Requests between picking this model and getting their scores; a reload retires the
    # model only when none is left, so no accepted request fails or hangs.
    _users: int = field(default=0, repr=False)
    _unused: asyncio.Event | None = field(default=None, repr=False)

    @property
    def display_name(self) -> str:
        return f"{self.name}@{self.spec.version}"

    def warm_up(self) -> None:
        """One real forward, so the first request does not pay for lazy initialisation; it also
        checks that the backend answers one column per head or member the spec names (the reward,
        then each objective's or each ensemble member's), so no request meets a backend that
        cannot give them."""
        encoded = encode_conversations([([{"role": "user", "content": "Hello"}], "Hi!")], self.tokenizer, self.spec)
        answer = self.backend.score_batch(pad_batch(encoded, self.pad_token_id))
        width = 1 if answer.ndim == 1 else answer.shape[1]
        if width == 1 + self.spec.extra_columns:
            return
        if self.spec.ensemble is not None:
            names = f"an ensemble of {self.spec.member_count} members"
            fix = "re-export it or fix its ensemble block"
        else:
            names = self.spec.objective_names
            names = f"{len(names)} objective(s) ({', '.join(names) or 'none'})"
            fix = "re-export or fix its objectives"
        raise ModelDirError(
            f"model {self.name!r}: its {self.backend.name} backend returns {width} reward column(s) but "
            f"reward_model.json names {names}; {fix}"
        )

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
        ensemble=served_ensemble(files.spec.ensemble, settings),
    )


def served_ensemble(ensemble: Ensemble | None, settings: ServiceSettings) -> Ensemble | None:
    """The ensemble as served: its reward_model.json block with the serve settings' rule and λ
    laid over it (the settings were checked when read: a known rule, a finite λ >= 0)."""
    if ensemble is None:
        return None
    overrides = {}
    if settings.ensemble_aggregate is not None:
        overrides["aggregate"] = settings.ensemble_aggregate
    if settings.uncertainty_penalty is not None:
        overrides["uncertainty_penalty"] = settings.uncertainty_penalty
    return dataclasses.replace(ensemble, **overrides)


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
    models = [load_model(name, path, settings) for name, path in settings.model_paths()]
    if (settings.ensemble_aggregate is not None or settings.uncertainty_penalty is not None) and not any(
        m.ensemble is not None for m in models
    ):
        # Not refused: a reload may bring an ensemble in, and gets the setting then.
        log.warning(
            "--ensemble-aggregate / --uncertainty-penalty apply to ensemble models, and none of the served models "
            "(%s) is one", ", ".join(m.name for m in models),
        )
    return models


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


class UnknownModel(LookupError):
    """No served model has this name."""


class ReloadFailed(Exception):
    """The directory could not be loaded; the model keeps serving its current version."""


@dataclass
class Reloaded:
    model: ServedModel  # the one now serving
    previous_version: str | None
    seconds: float


def freeze_long_lived(collect_first: bool = False) -> None:
    """Put what is alive now (the served models, their tokenizers, the libraries) out of the cyclic
    collector's reach. A large request's many small objects set off full collections, which hold
    the GIL, and so the event loop, for as long as they walk every tracked object: frozen, the
    models are not walked (``bench/loop_stall.py``). ``collect_first`` (after a reload): the
    frozen objects are thawed and the garbage among them (a retired model) collected first. At
    start that full collection would cost more than the little garbage loading leaves."""
    if collect_first:
        gc.unfreeze()
        gc.collect()
    gc.freeze()


class ModelRegistry:
    """The served models by name, the first being the default. Owns their batchers (attached,
    warmed up and started at start, stopped at stop) and swaps a model on reload."""

    def __init__(
        self, models: list[ServedModel], settings: ServiceSettings, metrics: ServiceMetrics,
        score_cache: ScoreCache | None = None,
    ) -> None:
        self._models = models  # in serving order; a reload replaces its entry in place
        self._by_name = {m.name: m for m in models}
        self.settings = settings
        self.metrics = metrics
        self.score_cache = score_cache  # shared by reloaded models (keys carry the version)
        self._reload_lock = asyncio.Lock()  # one reload at a time: two would hold three copies in memory

    @property
    def default(self) -> ServedModel:
        return self._models[0]

    def list(self) -> list[ServedModel]:
        return list(self._models)

    def names(self) -> list[str]:
        return list(self._by_name)

    def is_default(self, model: ServedModel) -> bool:
        return model is self._models[0]

    def get(self, name: str) -> ServedModel | None:
        """By name, ``name@version`` (any version: the one served), or the directory served."""
        return self._by_name.get(name) or self._by_name.get(name.split("@", 1)[0]) or self._by_path(name)

    def _by_path(self, name: str) -> ServedModel | None:
        # vLLM-style callers (verl) name the model by the directory they would have served. Any
        # name that cannot be a path here (~nosuchuser, a symlink loop, too long, a NUL) names
        # no served model: the caller gets a 404, not the resolution error.
        if len(name) > MAX_PATH_CHARS:
            return None
        try:
            wanted = Path(name).expanduser().resolve()
        except (OSError, ValueError, RuntimeError):
            return None
        return next((m for m in self._models if m.path == wanted), None)

    async def start(self, executor: Executor | None = None) -> None:
        """Attach the batchers, warm each model up (in ``executor``) and start its batcher."""
        attach_batchers(self._models, self.settings, self.metrics, self.score_cache)
        loop = asyncio.get_running_loop()
        for m in self._models:
            await loop.run_in_executor(executor, m.warm_up)
            m.batcher.start()
        freeze_long_lived()

    async def stop(self, drain_timeout_s: float) -> None:
        """Stop every batcher; what is still queued gets ``drain_timeout_s`` to run."""
        await asyncio.gather(*(m.batcher.stop(drain_timeout_s=drain_timeout_s) for m in self._models))
        gc.unfreeze()  # the models are done with: collectable again (a test process serves many apps)

    async def reload(self, name: str, path: Path | None = None) -> Reloaded:
        """Load ``name``'s directory again (or ``path``), warm it up, swap it in, and retire the
        old model once its requests are answered. UnknownModel, or ReloadFailed (old one serving)."""
        async with self._reload_lock:
            old = self._by_name.get(name)
            if old is None:
                raise UnknownModel(name)
            path = path or old.path
            loop = asyncio.get_running_loop()
            started = time.perf_counter()
            try:
                new = await loop.run_in_executor(None, load_model, name, path, self.settings)
            except ModelDirError as exc:
                raise ReloadFailed(f"{exc}; model {name!r} keeps serving version {old.spec.version}") from exc
            except Exception as exc:  # whatever a directory's files make the loaders raise: still that directory's fault
                log.warning("reload of %s from %s failed", name, path, exc_info=True)
                raise ReloadFailed(
                    f"cannot load {str(path)[:300]!r} ({type(exc).__name__}: {str(exc)[:300]}); fix the directory or "
                    f"give another path; model {name!r} keeps serving version {old.spec.version}"
                ) from exc
            attach_batchers([new], self.settings, self.metrics, self.score_cache)
            try:
                await loop.run_in_executor(None, new.warm_up)
            except ModelDirError as exc:
                raise ReloadFailed(f"{exc}; model {name!r} keeps serving version {old.spec.version}") from exc
            new.batcher.start()
            seconds = time.perf_counter() - started
            # The swap: from here every new request picks the new model.
            self._models[self._models.index(old)] = new
            self._by_name[name] = new
            log.info("reloaded %s: %s -> %s in %.1f s", name, old.spec.version, new.spec.version, seconds)
        await old.retire()
        freeze_long_lived(collect_first=True)  # the old model collected, the new one out of the collector's way
        return Reloaded(model=new, previous_version=old.spec.version, seconds=seconds)
