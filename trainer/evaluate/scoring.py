"""Scoring through the running service with our client (:class:`client.AsyncRewardClient`), never
the model in-process: the served models to score with (:class:`Target`), each service checked and
its model card recorded, every unique item scored once per model in concurrent chunks."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

from ..utils import progress_bar
from .datasets import ItemPool

if TYPE_CHECKING:
    from .config import EvalConfig


@dataclass
class Target:
    """One served reward model: a URL and a model name (None: the service's default);
    ``members``: also ask an ensemble for each member's reward (``return_members``)."""

    url: str
    model: str | None
    members: bool = False
    label: str = ""
    served_model: str = ""
    card: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "url": self.url, "model": self.model, "served_model": self.served_model, "card": self.card}


def make_targets(urls: Sequence[str], models: Sequence[str]) -> list[Target]:
    """--url/--model combinations: one URL with several models, several URLs (each with its
    default model, or the one --model), or as many URLs as models (zipped)."""
    urls = list(urls) or [os.environ.get("REWARD_URL", _default_url())]
    models = list(models)
    if len(urls) == 1:
        targets = [Target(urls[0], m) for m in (models or [None])]
    elif len(models) <= 1:
        targets = [Target(u, models[0] if models else None) for u in urls]
    elif len(models) == len(urls):
        targets = [Target(u, m) for u, m in zip(urls, models)]
    else:
        raise ValueError(
            f"{len(urls)} --url and {len(models)} --model: give one URL with several models, several URLs "
            "with at most one model, or as many models as URLs (paired in order)"
        )
    return targets


def _default_url() -> str:
    from client.client import DEFAULT_URL

    return DEFAULT_URL


def _label_targets(targets: list[Target]) -> None:
    names = [t.model or t.card.get("name") or "default" for t in targets]
    for t, name in zip(targets, names):
        t.label = name if names.count(name) == 1 else f"{name}@{t.url.split('://', 1)[-1]}"
    labels = [t.label for t in targets]
    for i, t in enumerate(targets):
        if labels.count(t.label) > 1:
            t.label = f"{t.label}#{i + 1}"


def _client_options(config: EvalConfig) -> dict[str, Any]:
    return dict(
        timeout=config.timeout, max_retries=config.max_retries, backoff=config.backoff, backoff_max=max(config.backoff, 20.0),
        chunk_size=config.chunk_size, max_concurrency=config.concurrency,
        api_key=config.api_key or os.environ.get("REWARD_API_KEY"),
    )


async def resolve_targets(clients: dict[str, Any], targets: list[Target]) -> None:
    """Ask each service for its models: checks it is reachable (with retries) and that the model
    exists, and records its card. Raises RewardServiceError."""
    from client import served_card

    listings: dict[str, Any] = {}
    for t in targets:
        if t.url not in listings:
            listings[t.url] = await clients[t.url].models()
        card = served_card(listings[t.url], t.model, t.url)
        t.card = card.model_dump()
        t.served_model = f"{card.name}@{card.version}"
    _label_targets(targets)


def card_objectives(card: dict[str, Any]) -> list[str]:
    """The objectives (reward heads) a model card lists; [] for a single-head model."""
    return list(card.get("objectives") or [])


async def score_items(client: Any, target: Target, items: list[dict], normalize: bool, progress: Callable[[int, int], None]):
    """THE scoring call of ``reward eval``: every item with one target, through the client.
    Returns (rewards, {objective: rewards}, members); the heads' rewards come from the same
    requests (``return_objectives``) when the target's card lists objectives, else the dict is
    empty; ``members`` is each member's reward [items, K] when the target asks for them, else None."""
    from client import RewardServiceError

    objectives = card_objectives(target.card)
    kwargs: dict[str, Any] = {"return_objectives": True} if objectives else {}
    if target.members:
        kwargs["return_members"] = True
    response = await client.score(items, model=target.model, normalize=normalize, progress=progress, **kwargs)

    def column(values: Any, what: str) -> np.ndarray:
        if values is None or len(values) != len(items):
            got = "none" if values is None else len(values)
            raise RewardServiceError(None, "invalid_response", f"{target.url} returned {got} {what} for {len(items)} items")
        return np.asarray(values, dtype=np.float64)

    scores = column(response.scores, "scores")
    by_objective = getattr(response, "objectives", None) or {}
    heads = {name: column(by_objective.get(name), f"'{name}' rewards") for name in objectives}
    members = None
    if target.members:
        members = column(response.members, "members' rewards")
        if members.ndim != 2:
            raise RewardServiceError(None, "invalid_response", f"{target.url} returned members' rewards of uneven length")
    return scores, heads, members


async def score_pool(
    clients: dict[str, Any], targets: list[Target], items: list[dict], normalize: bool, progress: Any
) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """Score every pool item with every target, chunks in flight concurrently. Returns scores per
    label, per-label timing, per label of a model with objectives each head's scores, and per
    label of a target that asks for them each member's scores [items, K]."""
    scores, timing, heads, members = {}, {}, {}, {}
    for t in targets:
        task = progress.add_task(f"scoring {t.label}", total=len(items))
        started = time.perf_counter()
        scores[t.label], per_head, per_member = await score_items(
            clients[t.url], t, items, normalize, lambda done, total, task=task: progress.update(task, completed=done)
        )
        seconds = time.perf_counter() - started
        if per_head:
            heads[t.label] = per_head
        if per_member is not None:
            members[t.label] = per_member
        timing[t.label] = {"items": len(items), "seconds": seconds, "items_per_second": len(items) / seconds if seconds else None}
    return scores, timing, heads, members


async def with_clients(urls: Iterable[str], config: EvalConfig, body: Callable[[dict[str, Any]], Any]):
    from client import AsyncRewardClient

    clients = {u: AsyncRewardClient(u, **_client_options(config)) for u in dict.fromkeys(urls)}
    try:
        return await body(clients)
    finally:
        for c in clients.values():
            await c.aclose()


def score_through_service(config: EvalConfig, targets: list[Target], pool: ItemPool, *, resolve: bool):
    """Score every item of ``pool`` with every target, chunked and concurrent, with a progress bar;
    ``resolve`` first checks each target is served (resolve_targets) and records its card (so a
    model with objectives gets its heads scored too). Returns (scores, timing, heads, members), as
    :func:`score_pool`."""

    async def body(clients):
        if resolve:
            await resolve_targets(clients, targets)
        with progress_bar() as progress:
            return await score_pool(clients, targets, pool.items, config.normalize, progress)

    return asyncio.run(with_clients([t.url for t in targets], config, body))


def service_error_message(exc: Exception) -> str:
    from client import ServiceUnavailable

    text = str(exc)
    if isinstance(exc, ServiceUnavailable):
        text += "; is `reward serve` running there? (set --url or REWARD_URL)"
    return text
