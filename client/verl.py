"""verl custom reward functions backed by the reward service: rewards from this service with the
verl you have, no verl change and no vLLM reward servers of verl's own.

verl (checked against volcengine/verl at b178a3cd) loads a custom reward function from
``custom_reward_function.path`` (a file path, or ``pkg://client.verl`` for an installed package)
and ``custom_reward_function.name``, merges ``custom_reward_function.reward_kwargs`` into its
keyword arguments, and calls it with keywords only:

* the ``naive`` reward managers (``verl.workers.reward_manager`` and the reward loop's)::

      compute_score(data_source=..., solution_str=..., ground_truth=..., extra_info=..., **kwargs)

  one response at a time, returning a float (or a dict with ``"score"``). The reward loop awaits
  an ``async def`` function (it checks ``inspect.iscoroutinefunction``) and runs a plain one in a
  thread pool: :func:`compute_score_async` and :func:`compute_score`.
* the ``batch`` reward manager::

      compute_score(data_sources=..., solution_strs=..., ground_truths=..., extra_infos=..., **kwargs)

  returning one score per response: :func:`compute_score_batch`.

``solution_str`` is the decoded response only; verl hands no prompt to a reward function. The
prompt comes from the sample's ``extra_info``: put it there when preparing the data set, under
``"prompt"`` (a string or chat messages), or name the key with ``reward_kwargs.prompt_key``
(verl's own GSM8K preprocessing stores ``"question"``, which is tried next). The service
formats the (prompt, response) itself, as the model was trained (``/v1/score``).

Settings, as ``reward_kwargs`` (e.g. ``+custom_reward_function.reward_kwargs.reward_url=...``
on verl's Hydra command line) or environment variables seen by verl's reward workers:
``reward_url`` / ``REWARD_URL`` (one URL or several separated by commas: replicas),
``reward_model`` / ``REWARD_MODEL`` (a served model name; the default model otherwise),
``reward_api_key`` / ``REWARD_API_KEY`` (when the service has API keys on), ``prompt_key``,
``normalize``, ``reward_objective`` / ``REWARD_OBJECTIVE`` (a model with several reward heads:
that head's reward instead of their combination), ``reward_aggregate`` / ``REWARD_AGGREGATE`` and
``reward_uncertainty_penalty`` / ``REWARD_UNCERTAINTY_PENALTY`` (an ensemble: the rule ``mean``,
``min`` or ``mean_minus_var`` and its λ, instead of the served default), ``reward_return_uncertainty``
(an ensemble: each score comes back as ``{"score", "reward_mean", "reward_std"}``, a dict verl's
reward managers take, logging the keys beside ``score`` as reward_extra_info). Other keywords
verl passes (``reward_router_address``, ``reward_model_tokenizer``...) are ignored.

Like the rest of ``client``, this imports neither torch, verl nor the service; its imports are
absolute so verl can load it by file path.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from typing import Any, Sequence

from client.client import DEFAULT_URL, AsyncRewardClient, RewardClient

__all__ = ["compute_score", "compute_score_async", "compute_score_batch", "verl_item"]

PROMPT_KEYS = ("prompt", "question")

_lock = threading.Lock()
_sync_clients: dict[tuple, RewardClient] = {}
_async_clients: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple, AsyncRewardClient]]" = (
    weakref.WeakKeyDictionary()
)


def _urls(kwargs: dict) -> tuple[str, ...]:
    value = kwargs.get("reward_url") or os.environ.get("REWARD_URL") or DEFAULT_URL
    if isinstance(value, str):
        value = value.split(",")
    return tuple(u.strip() for u in value if u and u.strip())


def _options(kwargs: dict) -> tuple[tuple[str, ...], str | None]:
    return _urls(kwargs), kwargs.get("reward_api_key") or os.environ.get("REWARD_API_KEY") or None


def _model(kwargs: dict) -> str | None:
    return kwargs.get("reward_model") or os.environ.get("REWARD_MODEL") or None


def _objective(kwargs: dict) -> str | None:
    return kwargs.get("reward_objective") or os.environ.get("REWARD_OBJECTIVE") or None


def _uncertainty_penalty(kwargs: dict) -> float | None:
    value = kwargs.get("reward_uncertainty_penalty")
    if value is None:
        value = os.environ.get("REWARD_UNCERTAINTY_PENALTY") or None
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"reward_uncertainty_penalty (or REWARD_UNCERTAINTY_PENALTY) must be a number >= 0, the λ of mean - λ·var; "
            f"got {value!r}"
        ) from None


def _score_options(kwargs: dict) -> dict[str, Any]:
    """The keywords of ``client.score`` from verl's reward_kwargs (and the environment)."""
    return {
        "model": _model(kwargs), "normalize": bool(kwargs.get("normalize", False)), "objective": _objective(kwargs),
        "aggregate": kwargs.get("reward_aggregate") or os.environ.get("REWARD_AGGREGATE") or None,
        "uncertainty_penalty": _uncertainty_penalty(kwargs),
        "return_uncertainty": bool(kwargs.get("reward_return_uncertainty", False)),
    }


def _scores(response: Any) -> list[Any]:
    """Each item's score as verl takes it: the reward, or with return_uncertainty a dict whose
    ``score`` is the reward and whose other keys verl logs (reward_extra_info)."""
    if response.ensemble_mean is None:
        return [float(s) for s in response.scores]
    return [
        {"score": float(s), "reward_mean": float(m), "reward_std": float(d)}
        for s, m, d in zip(response.scores, response.ensemble_mean, response.ensemble_std)
    ]


def _prompt_of(extra_info: Any, prompt_key: str | None) -> Any:
    info = dict(extra_info) if extra_info is not None else {}
    keys = (prompt_key,) if prompt_key else PROMPT_KEYS
    for key in keys:
        value = info.get(key)
        if value is not None:
            return value
    raise ValueError(
        f"no prompt for the reward model in extra_info (looked for {', '.join(map(repr, keys))}; it has "
        f"{sorted(info) or 'nothing'}): store the prompt in each sample's extra_info when preparing the data, "
        "or name its key with custom_reward_function.reward_kwargs.prompt_key"
    )


def verl_item(solution_str: str, extra_info: Any = None, prompt_key: str | None = None) -> dict:
    """One verl sample as a score item: ``{"prompt", "response"}``. The prompt may be a string or
    chat messages (verl's parquet files give them back as arrays of dicts)."""
    prompt = _prompt_of(extra_info, prompt_key)
    if not isinstance(prompt, str):
        prompt = [{"role": str(m["role"]), "content": str(m["content"])} for m in list(prompt)]
    return {"prompt": prompt, "response": solution_str}


def _client(key: tuple[tuple[str, ...], str | None]) -> RewardClient:
    with _lock:
        client = _sync_clients.get(key)
        if client is None:
            client = _sync_clients[key] = RewardClient(list(key[0]), api_key=key[1])
        return client


def _async_client(key: tuple[tuple[str, ...], str | None]) -> AsyncRewardClient:
    # An httpx async client belongs to one event loop: one client per loop (verl keeps its
    # reward worker's loop for the whole run, so connections are reused).
    loop = asyncio.get_running_loop()
    with _lock:
        per_loop = _async_clients.setdefault(loop, {})
        client = per_loop.get(key)
        if client is None:
            client = per_loop[key] = AsyncRewardClient(list(key[0]), api_key=key[1])
        return client


def compute_score(
    data_source: Any = None, solution_str: str = "", ground_truth: Any = None, extra_info: Any = None, **kwargs: Any
) -> float | dict[str, float]:
    """verl's ``compute_score`` signature: the reward of one response, from the service (a dict
    with ``reward_return_uncertainty``)."""
    item = verl_item(solution_str, extra_info, kwargs.get("prompt_key"))
    response = _client(_options(kwargs)).score([item], **_score_options(kwargs))
    return _scores(response)[0]


async def compute_score_async(
    data_source: Any = None, solution_str: str = "", ground_truth: Any = None, extra_info: Any = None, **kwargs: Any
) -> float | dict[str, float]:
    """The ``async def`` flavour, awaited by verl's reward loop (many samples concurrently; the
    service batches them)."""
    item = verl_item(solution_str, extra_info, kwargs.get("prompt_key"))
    client = _async_client(_options(kwargs))
    response = await client.score([item], **_score_options(kwargs))
    return _scores(response)[0]


def compute_score_batch(
    data_sources: Sequence[Any] = (),
    solution_strs: Sequence[str] = (),
    ground_truths: Sequence[Any] = (),
    extra_infos: Sequence[Any] | None = None,
    **kwargs: Any,
) -> list[float] | list[dict[str, float]]:
    """verl's ``batch`` reward manager signature: one reward per response (or dict, with
    ``reward_return_uncertainty``), in one request (the client splits large batches into chunks)."""
    infos = list(extra_infos) if extra_infos is not None else [None] * len(solution_strs)
    if len(infos) != len(solution_strs):
        raise ValueError(f"{len(solution_strs)} responses but {len(infos)} extra_infos")
    items = [verl_item(s, e, kwargs.get("prompt_key")) for s, e in zip(solution_strs, infos)]
    if not items:
        return []
    response = _client(_options(kwargs)).score(items, **_score_options(kwargs))
    return _scores(response)


# verl may load this file by path (``custom_reward_function.path=/path/to/client/verl.py``) under
# a module name of its own that is not in ``sys.modules``. A function of such a module pickles by
# value, with the globals it reaches: the client cache and its lock, which do not pickle. verl
# ships the reward function to other processes: the reward loop's ``remote`` manager hands it to
# Ray workers (``RewardComputeWorker``), and ``reward_model.launch_reward_fn_async`` sends the
# reward manager to a Ray task. So a copy loaded by path hands out the installed module's
# functions (``from client.client import`` above already needs the package installed): they
# pickle by reference, as with ``pkg://client.verl``, and share one client cache.
if __name__ != "client.verl":
    import client.verl as _installed  # noqa: PLW0406 - the installed copy, not this file

    compute_score = _installed.compute_score
    compute_score_async = _installed.compute_score_async
    compute_score_batch = _installed.compute_score_batch
    verl_item = _installed.verl_item
