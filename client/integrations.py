"""Reward functions for other trainers, backed by the reward service through our client.

TRL's ``GRPOTrainer(reward_funcs=[...])`` calls each function with keyword arguments only::

    reward_func(prompts=..., completions=..., completion_ids=..., **dataset_columns, trainer_state=..., ...)

and takes back one ``float | None`` per completion (``None`` becomes NaN and is skipped). It
calls an ``async def`` function on its own event loop, concurrently with the other async ones
(it tells them apart with ``inspect.iscoroutinefunction``), and logs each function under its
``__name__``. :func:`trl_reward_func` and :func:`trl_async_reward_func` build such functions;
:func:`text_reward_fn` is a plain ``reward_fn(texts) -> list[float]`` for trainers that hand over
already-formatted texts.

The TRL functions pickle (an object, and a partial of an ``async def``), unlike closures: TRL's ``AsyncGRPOTrainer``
(``trl.experimental.async_grpo``) pickles its ``reward_funcs`` into a spawned rollout process.

Each takes one service URL or a list of replicas' URLs (spread and failed over by the client).
For a model with several reward heads, ``objective=`` makes a function return that head's reward
instead of the combination; TRL logs each function under its name (``reward_<objective>`` by
default then), and sums them with its ``reward_weights``, so one function per objective is how
to train on heads with weights of your own. For an ensemble, ``aggregate=`` ("mean", "min",
"mean_minus_var") and ``uncertainty_penalty=`` (the λ of mean - λ·var) choose how its members'
rewards become the reward instead of the served default (logged as ``reward_<aggregate>``).
Like the rest of ``client``, this module imports neither torch, TRL nor the service.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Awaitable, Callable, Literal, Sequence

from .client import DEFAULT_URL, AsyncRewardClient, RewardClient, RewardServiceError

__all__ = [
    "trl_reward_func", "trl_async_reward_func", "text_reward_fn", "completions_to_items", "TRLRewardFunction",
]

log = logging.getLogger(__name__)

OnError = Literal["raise", "none"]


def _text_of(content: Any) -> str:
    # Messages may carry multimodal content parts ([{"type": "text", "text": ...}, ...]); a
    # reward model reads their text.
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type", "text") == "text")
    return "" if content is None else str(content)


def _messages(messages: Sequence[dict]) -> list[dict[str, str]]:
    # TRL messages can hold more keys (tool_calls, reasoning...); the protocol takes role + content.
    return [{"role": m["role"], "content": _text_of(m.get("content"))} for m in messages]


def completions_to_items(prompts: Sequence[Any], completions: Sequence[Any]) -> list[dict]:
    """TRL's (prompts, completions), standard (strings) or conversational (message lists), as
    score items: ``{"prompt", "response"}`` or ``{"messages"}`` ending with the assistant turn."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions; TRL passes one prompt per completion")
    items = []
    for prompt, completion in zip(prompts, completions):
        if isinstance(completion, str):
            prompt_part = prompt if isinstance(prompt, str) else _messages(prompt)
            items.append({"prompt": prompt_part, "response": completion})
            continue
        conversation = ([{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt)) + _messages(completion)
        if not conversation or conversation[-1]["role"] != "assistant":
            # A completion that ends in a tool call has no final assistant text: score it empty.
            conversation.append({"role": "assistant", "content": ""})
        items.append({"messages": conversation})
    return items


def _name(name: str | None, objective: str | None, aggregate: str | None = None) -> str:
    if name is not None:
        return name
    chosen = objective if objective is not None else aggregate
    return f"reward_{chosen}" if chosen is not None else "reward_model"


def _failed(n: int, exc: Exception, on_error: OnError) -> list[float | None]:
    if on_error == "raise":
        raise exc
    log.warning("reward service failed (%s); returning None for %d completions", exc, n)
    return [None] * n


class TRLRewardFunction:
    """The synchronous TRL reward function built by :func:`trl_reward_func`. An object rather than
    a closure so that it pickles: TRL's ``AsyncGRPOTrainer`` (``trl.experimental.async_grpo``)
    sends its ``reward_funcs`` to a spawned rollout process with ``pickle`` and refuses closures.
    TRL names a reward function by ``__name__`` (``get_callable_name``), so it carries one.
    ``.client`` is its :class:`RewardClient` (close it when done); a copy made by pickling opens a
    client of its own."""

    def __init__(
        self, url: str | Sequence[str], name: str, score_options: dict[str, Any], on_error: OnError,
        client_options: dict[str, Any], client: RewardClient | None = None,
    ) -> None:
        self.url = _url_value(url)
        self.__name__ = self.__qualname__ = name
        self.score_options = score_options
        self.on_error = on_error
        self.client_options = client_options
        self._own_client = client is None
        self.client = client or RewardClient(self.url, **self.client_options)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.__name__} url={self.url!r}>"

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None, **kwargs: Any) -> list[float | None]:
        items = completions_to_items(prompts, completions)
        if not items:
            return []
        try:
            return list(self.client.score(items, **self.score_options).scores)
        except RewardServiceError as exc:
            return _failed(len(items), exc, self.on_error)

    def __getstate__(self) -> dict[str, Any]:
        if not self._own_client:
            raise TypeError(
                f"{self.__name__} was built around a RewardClient passed as client=, which does not pickle: "
                "pass the URL and the client's options to trl_reward_func instead"
            )
        return {k: v for k, v in self.__dict__.items() if k != "client"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.client = RewardClient(self.url, **self.client_options)


class _NamedPartial(functools.partial):
    """A partial that shows its name, not what it binds (the client's options may hold an API key)."""

    def __repr__(self) -> str:
        return f"<TRL reward function {getattr(self, '__name__', '?')}>"


async def _async_trl_reward(
    prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None, *, _url: str | list[str],
    _score_options: dict[str, Any], _on_error: OnError, _client_options: dict[str, Any], **kwargs: Any,
) -> list[float | None]:
    """What :func:`trl_async_reward_func` returns, with its settings bound by ``functools.partial``.

    A partial of a module-level ``async def`` rather than an object with an async ``__call__``:
    ``inspect.iscoroutinefunction`` sees through a partial on every Python this project supports,
    and a partial pickles (for ``AsyncGRPOTrainer``) with what it binds. Each call opens its client
    on the loop it runs on (an httpx async client cannot move between loops)."""
    items = completions_to_items(prompts, completions)
    if not items:
        return []
    try:
        async with AsyncRewardClient(_url, **_client_options) as rm:
            return list((await rm.score(items, **_score_options)).scores)
    except RewardServiceError as exc:
        return _failed(len(items), exc, _on_error)


def _url_value(url: str | Sequence[str]) -> str | list[str]:
    """The URL, or the replicas' URLs as a list: what a reward function keeps to open its clients
    again after pickling (a caller's generator of URLs would be spent after the first)."""
    return url if isinstance(url, str) else list(url)


def _score_options(model, normalize, objective, aggregate, uncertainty_penalty) -> dict[str, Any]:
    return {"model": model, "normalize": normalize, "objective": objective, "aggregate": aggregate,
            "uncertainty_penalty": uncertainty_penalty}


def trl_reward_func(
    url: str | Sequence[str] = DEFAULT_URL,
    *,
    model: str | None = None,
    normalize: bool = False,
    objective: str | None = None,
    aggregate: str | None = None,
    uncertainty_penalty: float | None = None,
    on_error: OnError = "raise",
    name: str | None = None,
    client: RewardClient | None = None,
    **client_options: Any,
) -> TRLRewardFunction:
    """A synchronous TRL reward function scoring completions with the service at ``url``.

    ``objective``: for a model with several reward heads, that head's reward instead of their
    combination (the service refuses a name the model does not have, naming its heads).
    ``aggregate`` / ``uncertainty_penalty``: for an ensemble, the rule (and λ) its members'
    rewards aggregate by instead of the served default.
    ``name``: what TRL logs it under; ``reward_model``, or ``reward_<objective>`` with an objective
    (``reward_<aggregate>`` with a rule).
    ``on_error="none"`` returns ``None`` for every completion when the service fails after the
    client's retries (TRL then ignores them) instead of raising. Extra keyword arguments go to
    :class:`RewardClient` (timeout, max_retries, chunk_size...). The function pickles (for TRL's
    ``AsyncGRPOTrainer``) unless it was given a ``client``.
    """
    return TRLRewardFunction(
        url, _name(name, objective, aggregate), _score_options(model, normalize, objective, aggregate, uncertainty_penalty),
        on_error, client_options, client=client,
    )


def trl_async_reward_func(
    url: str | Sequence[str] = DEFAULT_URL,
    *,
    model: str | None = None,
    normalize: bool = False,
    objective: str | None = None,
    aggregate: str | None = None,
    uncertainty_penalty: float | None = None,
    on_error: OnError = "raise",
    name: str | None = None,
    **client_options: Any,
) -> Callable[..., Awaitable[list[float | None]]]:
    """The ``async def`` flavour: TRL awaits it concurrently with its other async reward functions
    (``objective``, ``aggregate``, ``uncertainty_penalty`` and ``name`` as for :func:`trl_reward_func`).

    TRL runs async reward functions on an event loop of its own, so each call opens its client
    on the loop it runs on (an httpx async client cannot move between loops). It pickles.
    """
    reward_func = _NamedPartial(
        _async_trl_reward, _url=_url_value(url),
        _score_options=_score_options(model, normalize, objective, aggregate, uncertainty_penalty), _on_error=on_error,
        _client_options=client_options,
    )
    reward_func.__name__ = reward_func.__qualname__ = _name(name, objective, aggregate)  # type: ignore[attr-defined]
    return reward_func


def text_reward_fn(
    url: str | Sequence[str] = DEFAULT_URL, *, model: str | None = None, objective: str | None = None,
    aggregate: str | None = None, uncertainty_penalty: float | None = None,
    client: RewardClient | None = None, **client_options: Any
) -> Callable[..., list[float]]:
    """``reward_fn(texts, prompts=None) -> list[float]`` for trainers that pass already-formatted
    texts (prompt + response, chat template applied): scored as ``/get_reward`` scores them
    (``objective``: a head's reward instead of the combination; ``aggregate`` /
    ``uncertainty_penalty``: an ensemble's rule instead of the served default)."""
    rm = client or RewardClient(url, **client_options)

    def reward_fn(texts: Sequence[str], prompts: Sequence[str] | None = None) -> list[float]:
        return rm.score_texts(
            list(texts), prompts=list(prompts) if prompts is not None else None, model=model, objective=objective,
            aggregate=aggregate, uncertainty_penalty=uncertainty_penalty,
        )

    reward_fn.client = rm  # type: ignore[attr-defined]
    return reward_fn
