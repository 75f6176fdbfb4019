"""The one inference path of every scoring route, our own (routers/scoring.py) and the
compatible ones (routers/compat.py): pick the model, check the request's item count and field
lengths, tokenise in a pool of threads off the event loop, hand the encoded items to the model's
batcher, all within the request's deadline, and turn the batcher's backpressure (QueueFull,
BatcherStopped, ForwardFailed) and the deadline into APIErrors. Routes only translate shapes;
none batches, tokenises or touches tensors itself.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import Request

from client.protocol import CompareRequest, ScoreRequest, Usage
from reward_core.formatting import Conversation, encode_conversations, encode_texts

from .batcher import BatcherStopped, ForwardFailed, QueueFull
from .errors import APIError
from .metrics import ServiceMetrics
from .registry import ModelRegistry, ServedModel
from .settings import ServiceSettings

log = logging.getLogger(__name__)


def usage_of(encoded: list) -> Usage:
    return Usage(items=len(encoded), tokens=sum(len(e) for e in encoded), truncated=sum(e.truncated for e in encoded))


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def long_fields(value: Any, limit: int, path: str = "") -> list[tuple[str, int]]:
    """(field path, length) of every string over ``limit`` characters in a dumped request."""
    if isinstance(value, str):
        return [(path, len(value))] if len(value) > limit else []
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    found: list[tuple[str, int]] = []
    for key, child in children:
        found += long_fields(child, limit, f"{path}.{key}" if path else str(key))
    return found


class Inference:
    """Held by the app (``app.state.inference``); its tokeniser pool lives as long as the app."""

    def __init__(self, registry: ModelRegistry, settings: ServiceSettings, metrics: ServiceMetrics) -> None:
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self.tokenize_pool = ThreadPoolExecutor(max_workers=settings.tokenizer_threads, thread_name_prefix="tokenize")

    def shutdown(self) -> None:
        self.tokenize_pool.shutdown(wait=False)

    def pick_model(self, name: str | None) -> ServedModel:
        if name is None:
            return self.registry.default  # the default; a reload swaps it in place
        model = self.registry.get(name)
        if model is None:
            served = ", ".join(self.registry.names())
            raise APIError(404, "model_not_found", f"model {name!r} is not served here; served: {served} (GET /v1/models)")
        return model

    def check_count(self, n: int, what: str) -> None:
        if n > self.settings.max_items:
            raise APIError(
                413, "too_many_items",
                f"{n} {what} in one request is over the limit of {self.settings.max_items}; split the "
                "request (the client does it for you) or raise --max-items",
            )

    def check_field_lengths(self, body: ScoreRequest | CompareRequest) -> None:
        limit = self.settings.max_field_chars
        too_long = long_fields(body.model_dump(include={"items", "pairs"}), limit)
        if too_long:
            where, n = too_long[0]
            more = f" (and {len(too_long) - 1} more fields)" if len(too_long) > 1 else ""
            raise APIError(
                413, "field_too_long",
                f"{where}: {n} characters is over the limit of {limit} per field{more}; "
                "shorten it (the model reads at most max_length tokens of an item anyway) or raise --max-field-chars",
            )

    async def score_conversations(
        self, http: Request, model: ServedModel, conversations: list[Conversation]
    ) -> tuple[list[float], Usage]:
        """/v1/score and /v1/compare: (prompt messages, response) conversations, formatted by the
        model's template."""
        scores, encoded = await self.score_encoded(http, model, len(conversations), encode_conversations, conversations)
        return scores, usage_of(encoded)

    async def score_texts(self, http: Request, model: ServedModel, texts: list[str], **kwargs) -> tuple[list[float], list]:
        """The compatible routes: texts already rendered by the caller (``encode_texts`` options
        as keywords). Returns (scores, the EncodedInputs)."""
        return await self.score_encoded(http, model, len(texts), encode_texts, texts, **kwargs)

    async def score_encoded(
        self, http: Request, model: ServedModel, n_items: int, encode: Callable[..., list], *args, **kwargs
    ) -> tuple[list[float], list]:
        """THE scoring path of every route: ``encode(*args, tokenizer, spec, **kwargs)`` in the
        tokeniser pool, then the model's batcher, within the request's deadline. Returns (scores,
        the EncodedInputs) in order; refusals (queue full, deadline, failed forward) become APIErrors."""
        settings = self.settings
        http.state.model, http.state.items = model.name, n_items
        started = getattr(http.state, "started", time.perf_counter())
        remaining = settings.request_timeout_s - (time.perf_counter() - started)
        try:
            model.batcher.check_room(n_items)  # shed load before paying for tokenisation
            with model.in_use():  # a reload waits for this before retiring the model
                return await asyncio.wait_for(self._tokenize_and_score(http, model, encode, args, kwargs), max(remaining, 0.0))
        except QueueFull as full:
            retry_after = max(1, math.ceil(full.retry_after_s))
            raise APIError(
                429, "queue_full",
                f"model {model.name!r} is at capacity ({full}); retry after {retry_after} s (Retry-After) "
                "or send fewer items at once",
                headers={"Retry-After": str(retry_after)},
            ) from None
        except asyncio.TimeoutError:  # (the builtin TimeoutError from Python 3.11 on)
            raise APIError(
                504, "deadline_exceeded",
                f"not scored within the request deadline of {settings.request_timeout_s:g} s (--request-timeout-s); "
                "its items still waiting were dropped. The service is overloaded or the request is too large; "
                "retry later or split it",
            ) from None
        except ForwardFailed as failure:
            log.error("request %s: model %s failed on its batch: %s", http.state.request_id, model.name, failure)
            raise APIError(
                500, "forward_failed",
                f"model {model.name!r} failed on the batch holding this request ({failure}); quote the "
                "request id when reporting it. Other requests are unaffected; retrying may succeed",
            ) from None
        except BatcherStopped:
            raise APIError(503, "stopping", "the service is shutting down; retry on another instance",
                           headers={"Retry-After": "1"}) from None

    async def _tokenize_and_score(self, http: Request, model: ServedModel, encode, args, kwargs) -> tuple[list[float], list]:
        loop = asyncio.get_running_loop()
        encoded = await loop.run_in_executor(self.tokenize_pool, lambda: encode(*args, model.tokenizer, model.spec, **kwargs))
        empty = [i for i, e in enumerate(encoded) if len(e) == 0]
        if empty:  # a model cannot read zero tokens (e.g. "" with add_special_tokens false)
            raise APIError(
                422, "empty_input",
                f"input {empty[0]} is empty after tokenisation ({len(empty)} such inputs); send non-empty text "
                "or let the service add the special tokens",
            )
        truncated = sum(e.truncated for e in encoded)
        if truncated:
            self.metrics.truncated_items.labels(model.name).inc(truncated)
        http.state.tokens = sum(len(e) for e in encoded)
        return await model.batcher.score(encoded), encoded
