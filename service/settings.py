"""Service settings: one pydantic-settings class, filled from ``REWARD_*`` environment variables
and overridden by ``reward serve`` flags (one flag per field)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from reward_core.ensemble import AGGREGATES

# Batch shape per device. On CPU a bigger batch is not faster per token: the model already
# keeps the cores busy on one row of a few hundred tokens, and padding and attention's
# L x L score tensors (which outgrow the caches) only add work. Measured in process on the
# default RM with 2 cores (alpacaeval/dev items, length-sorted): torch 16.7 items/s at 2048
# padded tokens, 12.8 at 16384; ONNX int8 26.7 items/s one row at a time, 25.6 at 2048, 14.6
# in unsorted batches of 16 (60% real tokens). So CPU batches are small and nearly unpadded.
# A GPU needs large batches to fill its SMs and pays for some padding.
CPU_BATCH_TOKENS = 2048
CPU_MAX_PADDING = 0.1
GPU_BATCH_TOKENS = 16384

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "default-rm"


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REWARD_", extra="forbid")

    models: list[str] = Field(
        default_factory=lambda: [f"default={DEFAULT_MODEL_DIR}"],
        description="Models to serve, as name=PATH (or PATH: named after its folder). The first is the default.",
    )
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, description="Port to bind.")
    backend: Literal["torch", "onnx"] = Field(
        "torch", description="Model backend: torch, or onnx for a directory made by `reward export-onnx` (CPU)."
    )
    device: str = Field("cpu", description="cpu, cuda or cuda:N.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights and compute dtype.")
    max_length: int | None = Field(None, description="Override the models' max input tokens (truncation).")
    max_batch_tokens: int | None = Field(
        None, gt=0, description="Padded tokens (rows x longest row) per forward pass (default: "
        f"{CPU_BATCH_TOKENS} on CPU, {GPU_BATCH_TOKENS} on a GPU).",
    )
    max_batch_size: int | None = Field(None, gt=0, description="Rows per forward pass (no cap by default).")
    max_padding: float | None = Field(
        None, ge=0, le=1, description="Largest share of a forward's padded tokens that may be padding; a batch "
        f"is cut before it would pass it (default: {CPU_MAX_PADDING} on CPU, no limit on a GPU; 1: no limit).",
    )
    max_wait_ms: float = Field(
        5.0, ge=0, description="How long the first queued item waits for others to share its batch."
    )
    max_items: int = Field(1024, gt=0, description="Items (or pairs x 2) per request.")
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0, description="Largest request body accepted.")
    tokenizer_threads: int = Field(2, gt=0, description="Threads that tokenise requests off the event loop.")
    torch_threads: int | None = Field(
        None, gt=0, description="Intra-op threads of the backend, torch or onnxruntime (default: all cores)."
    )
    compile: bool = Field(False, description="torch.compile the model's forward (--device cuda only).")
    score_cache_size: int = Field(
        0, ge=0, description="Rewards kept in an LRU cache keyed by model version and encoded input, so repeated "
        "items skip the model (0: off).",
    )
    # Ensembles (reward_core/ensemble.py): the rule a request gets when it names none.
    ensemble_aggregate: Literal[AGGREGATES] | None = Field(  # type: ignore[valid-type]
        None, description=f"How an ensemble model's members' rewards become the reward unless a request says: "
        f"{', '.join(AGGREGATES)} (default: each model's reward_model.json, else mean). Applies to every ensemble served.",
    )
    uncertainty_penalty: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="The λ of mean_minus_var (mean - λ·var of the members' rewards) "
        "unless a request says (default: each ensemble's reward_model.json, else 1.0).",
    )
    trust_remote_code: bool = Field(False, description="Run model code shipped in a model directory.")
    allow_pickle: bool = Field(False, description="Load pickle (.bin) weights; safetensors only otherwise.")
    reload_token: str | None = Field(
        None,
        description="Bearer token that allows POST /v1/models/{name}/reload (hot reload); reloading is off without "
        "one. Prefer the REWARD_RELOAD_TOKEN variable to the flag, which other users can see in ps.",
    )
    log_level: str = Field("info", description="Logging level.")
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text, or as JSON objects (one per line) for a log pipeline."
    )
    # Authentication (service/auth.py). Off when no key is given, which is allowed on loopback only.
    api_key: str | None = Field(
        None, description="One API key with both scopes (score, admin). Prefer --api-keys-file or the env var."
    )
    api_keys: str | None = Field(
        None,
        description="Several API key entries, as in --api-keys-file, separated by spaces or newlines (handy as "
        "REWARD_API_KEYS in a container; sha256= entries keep the secrets out of the environment).",
    )
    api_keys_file: Path | None = Field(
        None,
        description="File of API keys, one per line: KEY or sha256=HEX (the key's SHA-256), optionally "
        "followed by :SCOPES (comma-separated score,admin; default score). # starts a comment.",
    )
    insecure: bool = Field(False, description="Allow binding a non-loopback address without API keys.")
    rate_limit_rps: float | None = Field(
        None, gt=0, description="Scoring requests per second allowed per API key (per client address without keys)."
    )
    rate_limit_burst: int | None = Field(
        None, gt=0, description="Requests a key may send at once above the rate (default: 2 x rate, at least 1)."
    )
    # Limits and backpressure.
    max_field_chars: int = Field(
        200_000, gt=0, description="Characters per text field (prompt, response, message content)."
    )
    max_queue_items: int = Field(
        8192, gt=0, description="Items waiting per model; a request that does not fit is answered 429."
    )
    request_timeout_s: float = Field(
        60.0, gt=0, description="Deadline of a scoring request; past it the answer is 504 and its queued items are dropped."
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="A connection that has not sent a request's whole header within this many seconds "
        "(of opening, or of the request's first bytes) is closed, so trickling sockets cannot pile up.",
    )
    keep_alive_timeout_s: float = Field(
        # Longer than the pools of common clients keep an idle connection (httpx 5 s, aiohttp
        # 15 s, nginx upstreams 60 s), so they drop it first: a server that closes first races
        # the client's next request on that socket, which then fails with a connection reset.
        75.0, gt=0, description="An idle keep-alive connection is closed after this many seconds without a new request.",
    )
    shutdown_drain_s: float = Field(
        2.0, ge=0, description="On SIGTERM, seconds to keep serving while /readyz says not ready, before closing."
    )

    # The comparison loop (service/routers/comparisons.py, reward_core/store.py).
    store: str | None = Field(
        None,
        description="Database for labellers' comparisons and the labelling queue: sqlite:///PATH (a file, created "
        "on first start) or postgresql://USER[:PASSWORD]@HOST[:PORT]/DB. Comparison routes answer 404 without one.",
    )
    labellers: str | None = Field(
        None, description="Labeller ids allowed to submit comparisons, separated by commas or spaces (any id when unset)."
    )

    @field_validator("models")
    @classmethod
    def _at_least_one(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("give at least one model (name=PATH)")
        return value

    @model_validator(mode="after")
    def _batch_budget_for_the_device(self) -> "ServiceSettings":
        on_cpu = self.device == "cpu"
        if self.max_batch_tokens is None:
            self.max_batch_tokens = CPU_BATCH_TOKENS if on_cpu else GPU_BATCH_TOKENS
        if self.max_padding is None and on_cpu:
            self.max_padding = CPU_MAX_PADDING
        return self

    @model_validator(mode="after")
    def _queue_holds_a_request(self) -> "ServiceSettings":
        if self.max_queue_items < self.max_items:
            raise ValueError(
                f"max_queue_items ({self.max_queue_items}) is below max_items ({self.max_items}); a request "
                "of max_items could never be queued"
            )
        return self

    def model_paths(self) -> list[tuple[str, Path]]:
        """(name, path) pairs; names are unique."""
        pairs: list[tuple[str, Path]] = []
        for entry in self.models:
            name, sep, path = entry.partition("=")
            if not sep:
                name, path = Path(entry).name, entry
            if not name:
                raise ValueError(f"model entry {entry!r} has an empty name; use name=PATH")
            if any(n == name for n, _ in pairs):
                raise ValueError(f"model name {name!r} is given twice; names must be unique")
            pairs.append((name, Path(path).expanduser()))
        return pairs
