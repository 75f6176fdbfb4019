"""Scoring through the running service with our client (:class:`client.AsyncRewardClient`), never
the model in-process: the served models to score with (:class:`Target`), each service checked and
its model card recorded, every unique item scored once per model in concurrent chunks. A model
with objectives gets each head's rewards from the same requests; an ensemble each member's reward
and the members' spread (:class:`.uncertainty.EnsembleScores`)."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

from ..utils import progress_bar
from .datasets import ItemPool
from .uncertainty import EnsembleScores

if TYPE_CHECKING:
    from .config import EvalConfig


@dataclass
class Target:
    """One served reward model: a URL and a model name (None: the service's default)."""

    url: str
    model: str | None
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


def card_ensemble(card: dict[str, Any]) -> dict[str, Any] | None:
    """The ``ensemble`` block of a model card (members, served aggregate and penalty), or None."""
    return card.get("ensemble") or None


def rule_in_effect(ensemble: dict[str, Any], aggregate: str | None, uncertainty_penalty: float | None) -> tuple[str, float | None]:
    """The rule and λ an ensemble's reward is aggregated by: those asked for, else the served
    default (λ None unless the rule is mean_minus_var)."""
    rule = aggregate or ensemble["aggregate"]
    if rule != "mean_minus_var":
        return rule, None
    return rule, float(uncertainty_penalty if uncertainty_penalty is not None else ensemble["uncertainty_penalty"])


class EnsembleFlagError(ValueError):
    """--aggregate, --uncertainty-penalty or --ood given for models they cannot apply to."""


def check_ensemble_flags(targets: Sequence[Target], config: EvalConfig) -> None:
    """Refuse, before any scoring, what the service would refuse on every request (and --ood with
    no ensemble to measure), naming the fix. Needs the targets' cards (:func:`resolve_targets`)."""
    asked = [f for f, v in (("--aggregate", config.aggregate), ("--uncertainty-penalty", config.uncertainty_penalty)) if v is not None]
    for t in targets:
        ensemble = card_ensemble(t.card)
        where = f"{t.label} ({t.served_model} at {t.url})"
        if ensemble is None:
            if asked:
                raise EnsembleFlagError(
                    f"{' and '.join(asked)} choose how an ensemble's members' rewards become its reward, and {where} is not an "
                    "ensemble (its /v1/models card has no 'ensemble'): leave them out, or evaluate an ensemble")
            continue
        rule = config.aggregate or ensemble["aggregate"]
        if config.uncertainty_penalty is not None and rule != "mean_minus_var":
            given = "--aggregate" if config.aggregate else "its served default"
            raise EnsembleFlagError(
                f"--uncertainty-penalty is the λ of mean_minus_var, and {where} would aggregate by {rule!r} ({given}): "
                "add --aggregate mean_minus_var, or leave --uncertainty-penalty out")
        if config.normalize and rule != "mean":
            raise EnsembleFlagError(
                f"--normalize uses the reward mean/std of the members' mean, and {where} would aggregate by {rule!r}: "
                "add --aggregate mean, or leave --normalize out")
    if config.ood and not any(card_ensemble(t.card) for t in targets):
        labels = ", ".join(t.label for t in targets)
        raise EnsembleFlagError(
            f"--ood compares an ensemble's spread of member rewards on other inputs with the dev sets', and no model "
            f"evaluated ({labels}) is an ensemble (no 'ensemble' on its /v1/models card): leave --ood out, or evaluate an ensemble")


async def score_items(
    client: Any, target: Target, items: list[dict], normalize: bool, progress: Callable[[int, int], None],
    aggregate: str | None = None, uncertainty_penalty: float | None = None,
):
    """THE scoring call of ``reward eval``: every item with one target, through the client.
    Returns (rewards, {objective: rewards}, EnsembleScores | None); the heads' rewards come from the
    same requests (``return_objectives``) when the target's card lists objectives, else the dict
    is empty; for an ensemble (its card has ``ensemble``) the members' rewards and spread come from
    them too (``return_members``, ``return_uncertainty``), its reward aggregated by ``aggregate``
    and ``uncertainty_penalty`` when given (else the served default)."""
    from client import RewardServiceError

    objectives = card_objectives(target.card)
    ensemble = card_ensemble(target.card)
    kwargs: dict[str, Any] = {"return_objectives": True} if objectives else {}
    if ensemble:
        kwargs.update(return_members=True, return_uncertainty=True, aggregate=aggregate, uncertainty_penalty=uncertainty_penalty)
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
    if ensemble:
        rows = column(response.members, "rows of member rewards")
        if rows.ndim != 2 or rows.shape[1] != ensemble["members"]:
            raise RewardServiceError(None, "invalid_response", f"{target.url} returned member rewards of shape "
                                     f"{rows.shape} for {len(items)} items of an ensemble of {ensemble['members']}")
        members = EnsembleScores(rows, column(response.ensemble_std, "ensemble_std values"),
                                 *rule_in_effect(ensemble, aggregate, uncertainty_penalty))
    return scores, heads, members


async def score_pool(
    clients: dict[str, Any], targets: list[Target], items: list[dict], normalize: bool, progress: Any,
    aggregate: str | None = None, uncertainty_penalty: float | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, dict[str, np.ndarray]], dict[str, EnsembleScores]]:
    """Score every pool item with every target, chunks in flight concurrently. Returns scores per
    label, per-label timing, per label of a model with objectives each head's scores, and per
    label of an ensemble its members' rewards and spread (``aggregate`` and
    ``uncertainty_penalty`` go to the ensembles)."""
    scores, timing, heads, ensembles = {}, {}, {}, {}
    for t in targets:
        task = progress.add_task(f"scoring {t.label}", total=len(items))
        started = time.perf_counter()
        scores[t.label], per_head, members = await score_items(
            clients[t.url], t, items, normalize, lambda done, total, task=task: progress.update(task, completed=done),
            aggregate, uncertainty_penalty,
        )
        seconds = time.perf_counter() - started
        if per_head:
            heads[t.label] = per_head
        if members is not None:
            ensembles[t.label] = members
        timing[t.label] = {"items": len(items), "seconds": seconds, "items_per_second": len(items) / seconds if seconds else None}
    return scores, timing, heads, ensembles


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
    model with objectives gets its heads scored too, an ensemble its members), then refuses
    ensemble flags that cannot apply (EnsembleFlagError). Returns (scores, timing, heads,
    ensembles), as :func:`score_pool`."""

    async def body(clients):
        if resolve:
            await resolve_targets(clients, targets)
            check_ensemble_flags(targets, config)
        with progress_bar() as progress:
            return await score_pool(clients, targets, pool.items, config.normalize, progress,
                                    config.aggregate, config.uncertainty_penalty)

    return asyncio.run(with_clients([t.url for t in targets], config, body))


def service_error_message(exc: Exception) -> str:
    from client import ServiceUnavailable

    text = str(exc)
    if isinstance(exc, ServiceUnavailable):
        text += "; is `reward serve` running there? (set --url or REWARD_URL)"
    return text
