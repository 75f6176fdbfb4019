"""The one inference path of every scoring route, our own (routers/scoring.py) and the
compatible ones (routers/compat.py): pick the model, check the request's item count and field
lengths, tokenise in a pool of threads off the event loop, hand the encoded items to the model's
batcher, all within the request's deadline, and turn the batcher's backpressure (QueueFull,
BatcherStopped, ForwardFailed) and the deadline into APIErrors. Routes only translate shapes;
none batches, tokenises or touches tensors itself.

What comes back is :class:`Rewards`: every item's whole row (the reward, then each objective
head's for a model with several, or each member's for an ensemble), from which a route takes the
column it was asked for (``objective``) and, when asked, every head's (``return_objectives``).
An ensemble's reward is its members' rewards aggregated per request (``aggregate``,
``uncertainty_penalty``; the served default otherwise), after the batcher and its cache, which
keep whole rows. ``check_objective`` and ``check_ensemble`` refuse what the model cannot give
before any work is done.

Fairness: a request of at most ``SMALL_REQUEST_CHARS`` characters is tokenised in a lane of
its own, so a few huge requests cannot make a one-item request wait for their tokenisation; a
larger one is tokenised in slices of about ``SLICE_CHARS`` characters, each its own job in the
pool, so large requests take turns and one past its deadline stops after the slice it is in.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from pydantic import BaseModel

import numpy as np

from client.protocol import Usage
from reward_core.ensemble import Ensemble, aggregate_rewards, member_mean_std
from reward_core.formatting import Conversation, encode_conversations, encode_texts

from .batcher import BatcherStopped, ForwardFailed, QueueFull, RewardRow
from .errors import APIError, shown
from .metrics import ServiceMetrics
from .registry import ModelRegistry, ServedModel
from .settings import ServiceSettings

log = logging.getLogger(__name__)

# A request with at most this many characters of text is tokenised in the small requests' lane.
SMALL_REQUEST_CHARS = 16_384
# A larger request is tokenised in slices of about this many characters (at least one item each).
SLICE_CHARS = 65_536


def usage_of(encoded: list) -> Usage:
    return Usage(items=len(encoded), tokens=sum(len(e) for e in encoded), truncated=sum(e.truncated for e in encoded))


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def conversation_chars(conversation: Conversation) -> int:
    messages, response = conversation
    return sum(len(m.get("content") or "") for m in messages) + len(response)


def slices(sizes: Sequence[int], budget: int) -> list[tuple[int, int]]:
    """(start, end) ranges of consecutive items of about ``budget`` in total size (one item at least)."""
    ranges: list[tuple[int, int]] = []
    start, total = 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > budget:
            ranges.append((start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        ranges.append((start, len(sizes)))
    return ranges


def long_fields(value: Any, limit: int, path: str = "") -> list[tuple[str, int]]:
    """(field path, length) of every string over ``limit`` characters in a dumped request."""
    if isinstance(value, str):
        return [(path, len(value))] if len(value) > limit else []
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    found: list[tuple[str, int]] = []
    for key, child in children:
        found += long_fields(child, limit, f"{path}.{key}" if path else str(key))
    return found


@dataclass(frozen=True)
class Aggregation:
    """How one request turns an ensemble's members' rewards into its reward: a rule of
    ``reward_core.ensemble.AGGREGATES`` and the λ of ``mean_minus_var``."""

    rule: str
    uncertainty_penalty: float

    @classmethod
    def served(cls, ensemble: Ensemble) -> "Aggregation":
        return cls(ensemble.aggregate, ensemble.uncertainty_penalty)


@dataclass(frozen=True)
class Rewards:
    """The rewards of a request's items, in item order: ``rows[i]`` is item i's reward, then (for
    a model with objectives) each head's, in ``objectives`` order, or (for an ensemble) each
    member's."""

    rows: list[RewardRow]
    objectives: tuple[str, ...] = ()
    # The served ensemble (members, default rule) of the model that scored; None if it is not one.
    ensemble: Ensemble | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def column(self, objective: str | None = None, aggregation: Aggregation | None = None) -> list[float]:
        """One reward per item: the model's reward (the combination), or the head ``objective``
        (checked by ``Inference.check_objective`` beforehand). For an ensemble, its members'
        rewards aggregated by ``aggregation``, or by the served default: every route, even one
        that cannot choose a rule, serves what the operator set."""
        if self.ensemble is not None:
            aggregation = aggregation or Aggregation.served(self.ensemble)
            return aggregate_rewards(self.member_rewards(), aggregation.rule, aggregation.uncertainty_penalty).tolist()
        if objective is None:
            return [row[0] for row in self.rows]
        index = 1 + self.objectives.index(objective)
        return [row[index] for row in self.rows]

    def member_rewards(self) -> np.ndarray:
        """An ensemble's members' rewards, [items, K] (the backend's columns after the first)."""
        return np.asarray([row[1:] for row in self.rows], dtype=np.float64).reshape(len(self.rows), -1)

    def uncertainty(self) -> tuple[list[float], list[float]]:
        """An ensemble's members' mean and population standard deviation per item."""
        mean, std = member_mean_std(self.member_rewards())
        return mean.tolist(), std.tolist()

    def by_objective(self) -> dict[str, list[float]]:
        """Each head's rewards by objective name (empty for a single-head model)."""
        return {name: [row[1 + i] for row in self.rows] for i, name in enumerate(self.objectives)}


class Inference:
    """Held by the app (``app.state.inference``); its tokeniser pool lives as long as the app."""

    def __init__(self, registry: ModelRegistry, settings: ServiceSettings, metrics: ServiceMetrics) -> None:
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self.tokenize_pool = ThreadPoolExecutor(max_workers=settings.tokenizer_threads, thread_name_prefix="tokenize")
        # Small requests' own lane: never behind a large request's slices.
        self.small_pool = ThreadPoolExecutor(max_workers=settings.tokenizer_threads, thread_name_prefix="tokenize-small")

    def shutdown(self) -> None:
        self.tokenize_pool.shutdown(wait=False)
        self.small_pool.shutdown(wait=False)

    def pick_model(self, name: str | None) -> ServedModel:
        if name is None:
            return self.registry.default  # the default; a reload swaps it in place
        model = self.registry.get(name)
        if model is None:
            served = ", ".join(self.registry.names())
            raise APIError(404, "model_not_found", f"model {shown(name)} is not served here; served: {served} (GET /v1/models)")
        return model

    def check_count(self, n: int, what: str) -> None:
        if n > self.settings.max_items:
            raise APIError(
                413, "too_many_items",
                f"{n} {what} in one request is over the limit of {self.settings.max_items}; split the "
                "request (our Python client does it for you) or raise --max-items",
            )

    @staticmethod
    def check_objective(model: ServedModel, objective: str | None, return_objectives: bool = False) -> None:
        """A 422 unless the model has the head ``objective`` (when named) and has heads at all
        (when ``return_objectives``): before any work, naming what the model has."""
        if objective is None and not return_objectives:
            return
        names = model.spec.objective_names
        asked = f"objective {objective[:64]!r}" if objective is not None else "return_objectives"
        if model.ensemble is not None:
            raise APIError(
                422, "no_objectives",
                f"model {model.name!r} is an ensemble of {model.ensemble.members} members, not a model with several "
                f"objectives, so {asked} does not apply; leave it out (`aggregate` chooses how the members' rewards "
                "combine, `return_members` returns each member's). GET /v1/models describes each model",
            )
        if not names:
            raise APIError(
                422, "no_objectives",
                f"model {model.name!r} has one reward head, not several objectives, so {asked} does not apply; "
                "leave it out (the model's reward is `scores`). GET /v1/models lists each model's objectives",
            )
        if objective is not None and objective not in names:
            raise APIError(
                422, "unknown_objective",
                f"model {model.name!r} has no objective {objective[:64]!r}; its objectives are "
                f"{', '.join(names)} (or leave objective out for their combination)",
            )

    @staticmethod
    def check_ensemble(
        model: ServedModel, aggregate: str | None = None, uncertainty_penalty: float | None = None, *,
        return_uncertainty: bool = False, return_members: bool = False, normalize: bool = False,
    ) -> Aggregation | None:
        """How this request aggregates the model's members (the served default for what it does not
        say), or None for a model that is not an ensemble; a 422 before any work for what cannot
        apply. The protocol has already refused an unknown rule and a λ that is not a finite number
        >= 0 (client/protocol.py)."""
        ensemble = model.ensemble
        if ensemble is None:
            asked = [name for name, value in (
                ("aggregate", aggregate is not None), ("uncertainty_penalty", uncertainty_penalty is not None),
                ("return_uncertainty", return_uncertainty), ("return_members", return_members),
            ) if value]
            if asked:
                what = "several objectives" if model.spec.objective_names else "one reward model"
                raise APIError(
                    422, "not_an_ensemble",
                    f"model {model.name!r} is not an ensemble (it has {what}), so {', '.join(asked)} "
                    f"{'does' if len(asked) == 1 else 'do'} not apply; leave {'it' if len(asked) == 1 else 'them'} out "
                    "(its reward is `scores`). GET /v1/models shows which models are ensembles (`ensemble`)",
                )
            return None
        rule = aggregate or ensemble.aggregate
        whose = "sent" if aggregate is not None else f"model {model.name!r}'s served default"
        if uncertainty_penalty is not None and rule != "mean_minus_var":
            raise APIError(
                422, "penalty_without_mean_minus_var",
                f"uncertainty_penalty is the λ of the rule mean_minus_var (mean - λ·var), but this request aggregates "
                f"by {rule!r} ({whose}); send aggregate=\"mean_minus_var\" with it, or leave uncertainty_penalty out",
            )
        if normalize and rule != "mean":
            raise APIError(
                422, "normalize_with_aggregate",
                f"normalize uses model {model.name!r}'s reward_mean/reward_std, the statistics of its members' mean, "
                f"not of the rule {rule!r} ({whose}); send aggregate=\"mean\" with normalize, or normalize=false",
            )
        penalty = uncertainty_penalty if uncertainty_penalty is not None else ensemble.uncertainty_penalty
        return Aggregation(rule, penalty)

    def admit(self, body: BaseModel, n_items: int, what: str) -> None:
        """What every scoring route, ours and the compatible ones, checks before any work: the
        item count (``n_items`` of ``what``) and the length of every text field of the body."""
        self.check_count(n_items, what)
        self.check_field_lengths(body)

    def check_field_lengths(self, body: BaseModel) -> None:
        limit = self.settings.max_field_chars
        too_long = long_fields(body.model_dump(exclude_none=True), limit)
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
    ) -> tuple[Rewards, list]:
        """/v1/score, /v1/compare and the compatible routes' chat forms: (prompt messages,
        response) conversations, formatted by the model's template. Returns (rewards, the
        EncodedInputs), as ``score_texts`` does."""
        sizes = [conversation_chars(c) for c in conversations]
        return await self.score_encoded(http, model, encode_conversations, conversations, sizes)

    async def score_texts(
        self, http: Request, model: ServedModel, texts: list[str], *, prompt_prefixes: list[str | None] | None = None,
        **kwargs,
    ) -> tuple[Rewards, list]:
        """The compatible routes: texts already rendered by the caller (``encode_texts`` options
        as keywords). Returns (rewards, the EncodedInputs)."""
        sizes = [len(t) for t in texts]
        per_item = {"prompt_prefixes": prompt_prefixes} if prompt_prefixes is not None else {}
        return await self.score_encoded(http, model, encode_texts, texts, sizes, per_item, **kwargs)

    async def score_encoded(
        self, http: Request, model: ServedModel, encode: Callable[..., list], items: list, sizes: list[int],
        per_item: dict[str, list] | None = None, **kwargs,
    ) -> tuple[Rewards, list]:
        """THE scoring path of every route: ``encode(items, tokenizer, spec, **per_item, **kwargs)``
        in the tokeniser pool (``sizes``: each item's characters, for the lane and the slices;
        ``per_item``: keyword lists cut along with the items), then the model's batcher, within
        the request's deadline. Returns (the rewards, the EncodedInputs) in order; refusals
        (queue full, deadline, failed forward) become APIErrors."""
        settings = self.settings
        n_items = len(items)
        http.state.model, http.state.items = model.name, n_items
        started = getattr(http.state, "started", time.perf_counter())
        remaining = settings.request_timeout_s - (time.perf_counter() - started)
        try:
            model.batcher.check_room(n_items)  # shed load before paying for tokenisation
            with model.in_use():  # a reload waits for this before retiring the model
                return await asyncio.wait_for(
                    self._tokenize_and_score(http, model, encode, items, sizes, per_item or {}, kwargs), max(remaining, 0.0)
                )
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

    async def _tokenize(self, model: ServedModel, encode, items: list, sizes: list[int], per_item: dict, kwargs) -> list:
        loop = asyncio.get_running_loop()
        pool = self.small_pool if sum(sizes) <= SMALL_REQUEST_CHARS else self.tokenize_pool
        encoded: list = []
        for start, end in slices(sizes, SLICE_CHARS):
            cut = {k: v[start:end] for k, v in per_item.items()}
            job = functools.partial(encode, items[start:end], model.tokenizer, model.spec, **cut, **kwargs)
            encoded += await loop.run_in_executor(pool, job)
        return encoded

    async def _tokenize_and_score(
        self, http: Request, model: ServedModel, encode, items: list, sizes: list[int], per_item: dict, kwargs
    ) -> tuple[Rewards, list]:
        encoded = await self._tokenize(model, encode, items, sizes, per_item, kwargs)
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
        rows = await model.batcher.score_rows(encoded)  # widths checked at warm-up (ServedModel.warm_up)
        return Rewards(rows, model.spec.objective_names, model.ensemble), encoded
