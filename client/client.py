"""HTTP clients for the reward service: ``RewardClient`` (sync) and ``AsyncRewardClient``.

Both split large inputs into chunks, send the chunks concurrently over one pooled connection
set, retry transient failures with backoff, and merge the answers back in item order. Given
several URLs (replicas serving the same model), they spread requests over them in turn and
fail over to the next replica when one is down or busy.
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

import httpx
import tenacity
from pydantic import BaseModel, ValidationError

from .protocol import (
    API_VERSION,
    ComparisonCreated,
    ComparisonList,
    ComparisonRequest,
    LabelTasksCreated,
    LabelTasksRequest,
    NextLabelTask,
    ComparePair,
    CompareRequest,
    CompareResponse,
    ErrorResponse,
    GetRewardRequest,
    GetRewardResponse,
    MessagesItem,
    ModelCard,
    ModelList,
    PromptResponseItem,
    ScoreRequest,
    ScoreResponse,
    Usage,
    as_item,
)

__all__ = ["RewardClient", "AsyncRewardClient", "RewardServiceError", "ServiceUnavailable", "ProgressCallback", "served_card"]

DEFAULT_URL = "http://127.0.0.1:8000"
USER_AGENT = "reward-client/0.1"

ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(done_items, total_items)`` each time a chunk finishes."""

ItemLike = PromptResponseItem | MessagesItem | Mapping[str, Any]
PairLike = ComparePair | Mapping[str, Any]
ResponseT = TypeVar("ResponseT", ScoreResponse, CompareResponse, GetRewardResponse)

# Failures of the connection rather than of the request: no connection, no connection in
# time, or a pooled keep-alive connection the server closed as the request went out (EOF
# before any answer: RemoteProtocolError; the request met the closing socket: a reset, which
# httpx reports as ReadError or WriteError). Sending again is safe: scoring is a pure
# function and comparison posts carry an Idempotency-Key that their retries reuse.
RETRYABLE_TRANSPORT_ERRORS = (
    httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError,
)
# Overloaded (429) or not ready / stopping (503): the server says "later", often with Retry-After.
RETRYABLE_STATUSES = frozenset({429, 503})

# Looked up at call time (not bound into the retry policy) so tests can replace them.
_sleep = time.sleep
_async_sleep = asyncio.sleep


class RewardServiceError(Exception):
    """The service refused a request, or could not be used; fields from its ErrorResponse."""

    def __init__(self, status: int | None, type: str, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.message = message
        self.request_id = request_id

    def __str__(self) -> str:
        where = f"HTTP {self.status} " if self.status is not None else ""
        rid = f" (request id {self.request_id})" if self.request_id else ""
        return f"{where}{self.type}: {self.message}{rid}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status={self.status!r}, type={self.type!r}, "
            f"message={self.message!r}, request_id={self.request_id!r})"
        )


class ServiceUnavailable(RewardServiceError):
    """The service could not be reached, or stayed unavailable (503), after all retries."""


class _RetryableStatus(Exception):
    """A 429/503 answer, raised inside the retry loop so tenacity sees it as a failure."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response


def served_card(listing: ModelList, model: str | None, url: str) -> ModelCard:
    """The card of ``model`` in a service's model list (its default when ``model`` is None), or a
    RewardServiceError (404) naming what is served."""
    cards = listing.data
    if model is None:
        card = next((c for c in cards if c.default), cards[0] if cards else None)
    else:
        card = next((c for c in cards if c.name == model), None)
    if card is None:
        served = ", ".join(c.name for c in cards) or "none"
        raise RewardServiceError(404, "model_not_found", f"model {model!r} is not served at {url} (served: {served})")
    return card


def _retry_after_seconds(response: httpx.Response) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def error_from_response(response: httpx.Response) -> RewardServiceError:
    """The typed error for a non-2xx answer, from its ErrorResponse body or, failing that, its text."""
    status = response.status_code
    cls = ServiceUnavailable if status == 503 else RewardServiceError
    header_request_id = response.headers.get("x-request-id")
    try:
        detail = ErrorResponse.model_validate(response.json()).error
    except (ValueError, ValidationError):
        # Not our service's error shape (a proxy's HTML page, a bare text body): keep the text.
        text = response.text.strip()[:1000] or response.reason_phrase or "no body"
        return cls(status, f"http_{status}", text, header_request_id)
    return cls(status, detail.type, detail.message, detail.request_id or header_request_id)


def _ensemble_fields(
    aggregate: str | None, uncertainty_penalty: float | None, return_uncertainty: bool, return_members: bool
) -> dict[str, Any]:
    """The ensemble fields (protocol 1.2) of a score or compare request."""
    return {"aggregate": aggregate, "uncertainty_penalty": uncertainty_penalty,
            "return_uncertainty": return_uncertainty, "return_members": return_members}


def _chunks(seq: Sequence, size: int) -> list[Sequence]:
    return [seq[i : i + size] for i in range(0, len(seq), size)]


def _merge(responses: list[ResponseT]) -> ResponseT:
    """One response from per-chunk responses given in item order."""
    first = responses[0]
    if isinstance(first, GetRewardResponse):
        logs: dict[str, list[float]] = {}
        for r in responses:
            for key, values in r.extra_logs.items():
                logs.setdefault(key, []).extend(values)
        return GetRewardResponse(
            rewards=[x for r in responses for x in r.rewards], scores=[x for r in responses for x in r.scores], extra_logs=logs
        )
    usage = Usage(
        items=sum(r.usage.items for r in responses),
        tokens=sum(r.usage.tokens for r in responses),
        truncated=sum(r.usage.truncated for r in responses),
    )
    if isinstance(first, ScoreResponse):
        objectives = None
        if first.objectives is not None:
            objectives = {name: [x for r in responses for x in (r.objectives or {}).get(name, [])] for name in first.objectives}

        def joined(field: str) -> list | None:  # a per-item list of the answers, None when not asked for
            if getattr(first, field) is None:
                return None
            return [x for r in responses for x in (getattr(r, field) or [])]

        return ScoreResponse(
            model=first.model, scores=[s for r in responses for s in r.scores], objectives=objectives,
            ensemble_mean=joined("ensemble_mean"), ensemble_std=joined("ensemble_std"), members=joined("members"),
            usage=usage,
        )
    return CompareResponse(model=first.model, results=[x for r in responses for x in r.results], usage=usage)


class _ClientCore:
    """Configuration, request building and retry policy shared by the sync and async clients."""

    def __init__(
        self,
        base_url: str | Sequence[str] = DEFAULT_URL,
        *,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        backoff_max: float = 20.0,
        chunk_size: int = 64,
        max_concurrency: int = 8,
        headers: Mapping[str, str] | None = None,
        api_key: str | None = None,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be 0 or more, got {max_retries}")
        # Several URLs (replicas of one model): each request starts at the next replica in turn
        # and, when one is unreachable or answers 429/503, moves on to the next one at once.
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise ValueError("give at least one service URL")
        self.base_urls = [u.rstrip("/") for u in urls]
        self.base_url = self.base_urls[0]
        self._turn = itertools.count()  # next() is atomic in CPython: safe across threads
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.chunk_size = chunk_size
        self.max_concurrency = max_concurrency
        self.headers = {"User-Agent": USER_AGENT, "Accept": "application/json", **(headers or {})}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        # Enough pooled connections for every concurrent chunk, kept alive between calls.
        self._limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)

    def __repr__(self) -> str:
        where = self.base_url if len(self.base_urls) == 1 else self.base_urls
        return f"{type(self).__name__}({where!r})"

    def _first_replica(self) -> int:
        return next(self._turn) % len(self.base_urls)

    def _where(self, path: str) -> str:
        if len(self.base_urls) == 1:
            return self.base_url + path
        return f"{path} on any of {', '.join(self.base_urls)}"

    # -- request building --------------------------------------------------------------------

    @staticmethod
    def _items(items: Iterable[ItemLike]) -> list[PromptResponseItem | MessagesItem]:
        built = []
        for index, item in enumerate(items):
            try:
                built.append(as_item(item))
            except ValidationError as exc:
                # Name the item: pydantic alone would not say which of thousands is wrong.
                raise ValueError(f"item {index}: {exc}") from exc
        if not built:
            raise ValueError("no items to score; give at least one")
        return built

    @staticmethod
    def _pairs(pairs: Iterable[PairLike]) -> list[ComparePair]:
        built = []
        for index, pair in enumerate(pairs):
            try:
                built.append(pair if isinstance(pair, ComparePair) else ComparePair.model_validate(pair))
            except ValidationError as exc:
                raise ValueError(f"pair {index}: {exc}") from exc
        if not built:
            raise ValueError("no pairs to compare; give at least one")
        return built

    def _pairs_per_chunk(self) -> int:
        # The server counts two responses per pair against its item limit, so a compare chunk
        # holds chunk_size // 2 pairs to stay within the same limit as a score chunk.
        return max(1, self.chunk_size // 2)

    def _text_bodies(
        self, texts: Sequence[str], prompts: Sequence[str] | None, model: str | None, objective: str | None = None,
        ensemble: Mapping[str, Any] | None = None,
    ) -> list[dict]:
        texts = list(texts)
        if prompts is not None and len(prompts) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(prompts)} prompts; give one prompt per text or none")
        bodies = []
        for start in range(0, len(texts), self.chunk_size):
            chunk_prompts = list(prompts[start : start + self.chunk_size]) if prompts is not None else None
            request = GetRewardRequest(
                query=texts[start : start + self.chunk_size], prompts=chunk_prompts, model=model, objective=objective,
                **(ensemble or {}),
            )
            bodies.append(self._body(request))
        return bodies

    @staticmethod
    def _body(request: BaseModel) -> dict:
        return request.model_dump(mode="json", exclude_none=True)

    def _score_bodies(
        self, items: Iterable[ItemLike], model: str | None, normalize: bool, objective: str | None, return_objectives: bool,
        ensemble: Mapping[str, Any],
    ) -> tuple[list[dict], list[int]]:
        chunks = _chunks(self._items(items), self.chunk_size)
        bodies = [
            self._scoring_body(ScoreRequest(
                model=model, items=list(c), normalize=normalize, objective=objective, return_objectives=return_objectives,
                **ensemble,
            ))
            for c in chunks
        ]
        return bodies, [len(c) for c in chunks]

    def _compare_bodies(
        self, pairs: Iterable[PairLike], model: str | None, objective: str | None, return_objectives: bool,
        ensemble: Mapping[str, Any],
    ) -> tuple[list[dict], list[int]]:
        chunks = _chunks(self._pairs(pairs), self._pairs_per_chunk())
        bodies = [
            self._scoring_body(CompareRequest(
                model=model, pairs=list(c), objective=objective, return_objectives=return_objectives, **ensemble
            ))
            for c in chunks
        ]
        return bodies, [len(c) for c in chunks]

    # Flags of a newer protocol revision, sent only when true: a service older than that revision
    # refuses fields it does not know (return_objectives: 1.1; return_uncertainty, return_members: 1.2).
    _FLAGS_SENT_WHEN_TRUE = ("return_objectives", "return_uncertainty", "return_members")

    def _scoring_body(self, request: ScoreRequest | CompareRequest) -> dict:
        body = self._body(request)  # None fields (objective, aggregate, uncertainty_penalty) are left out there
        for flag in self._FLAGS_SENT_WHEN_TRUE:
            if not body[flag]:
                del body[flag]
        return body

    @staticmethod
    def _comparison(comparison: ComparisonRequest | Mapping[str, Any], fields: dict[str, Any]) -> tuple[dict, dict]:
        """(body, headers) of POST /v1/comparisons. A fresh Idempotency-Key unless one is given:
        the retries of this call then reuse it, so a POST whose answer was lost is stored once."""
        import uuid

        key = fields.pop("idempotency_key", None) or str(uuid.uuid4())
        if not isinstance(comparison, ComparisonRequest):
            comparison = ComparisonRequest.model_validate({**dict(comparison), **fields})
        return comparison.model_dump(mode="json", exclude_none=True), {"Idempotency-Key": key}

    @staticmethod
    def _comparison_filters(**filters: Any) -> dict[str, Any]:
        return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in filters.items() if v is not None}

    # -- retry policy ------------------------------------------------------------------------

    def _wait_seconds(self, retry_state: tenacity.RetryCallState) -> float:
        # Exponential backoff with full jitter (uniform in [0, min(max, base * 2**n)]): many
        # RL workers hitting one restarting service would otherwise retry in lockstep and
        # knock it over again. tenacity gives us this, attempt counting and sync/async
        # loops with one policy instead of two hand-written retry loops.
        if retry_state.attempt_number < len(self.base_urls):
            return 0.0  # the next try goes to a replica not tried yet: no reason to wait
        wait = tenacity.wait_random_exponential(multiplier=self.backoff, max=self.backoff_max)(retry_state)
        outcome = retry_state.outcome
        failure = outcome.exception() if outcome is not None else None
        if isinstance(failure, _RetryableStatus):
            retry_after = _retry_after_seconds(failure.response)
            if retry_after is not None:
                wait = max(wait, retry_after)
        return min(wait, self.backoff_max)

    def _retry_kwargs(self) -> dict:
        return dict(
            # One try per replica, then max_retries more (one URL: 1 + max_retries, as before).
            stop=tenacity.stop_after_attempt(self.max_retries + len(self.base_urls)),
            wait=self._wait_seconds,
            retry=tenacity.retry_if_exception_type((*RETRYABLE_TRANSPORT_ERRORS, _RetryableStatus)),
            reraise=True,
        )

    @staticmethod
    def _check(response: httpx.Response) -> httpx.Response:
        if response.status_code in RETRYABLE_STATUSES:
            raise _RetryableStatus(response)
        if response.is_error:
            raise error_from_response(response)
        return response

    def _final_error(self, exc: Exception, path: str, tries: int) -> RewardServiceError:
        """The typed error for what was left once retries ended (or were not allowed)."""
        url = self._where(path)
        if isinstance(exc, _RetryableStatus):
            return error_from_response(exc.response)
        if isinstance(exc, RETRYABLE_TRANSPORT_ERRORS):
            return ServiceUnavailable(
                None,
                "connection_error",
                f"cannot reach the reward service at {url} after {tries} tries: {type(exc).__name__}: {exc}",
            )
        if isinstance(exc, httpx.TimeoutException):
            return RewardServiceError(
                None,
                "timeout",
                f"the reward service at {url} did not answer in time (timeout {self.timeout} s): "
                f"{type(exc).__name__}; raise timeout or send smaller chunks",
            )
        return RewardServiceError(None, "transport_error", f"request to {url} failed: {type(exc).__name__}: {exc}")

    def _parse(self, model: type[BaseModel], response: httpx.Response, path: str):
        try:
            return model.model_validate(response.json())
        except (ValueError, ValidationError) as exc:
            raise RewardServiceError(
                response.status_code,
                "invalid_response",
                f"{self._where(path)} answered with something that is not a {model.__name__}: {exc}",
                response.headers.get("x-request-id"),
            ) from exc


class RewardClient(_ClientCore):
    """Synchronous client. Thread-safe; chunks are sent from a pool of ``max_concurrency`` threads.

    >>> with RewardClient("http://127.0.0.1:8000") as client:
    ...     client.score([{"prompt": "2+2?", "response": "4"}]).scores
    """

    def __init__(self, base_url: str = DEFAULT_URL, *, transport: httpx.BaseTransport | None = None, **options: Any) -> None:
        super().__init__(base_url, **options)
        self._replicas = [
            httpx.Client(base_url=url, headers=self.headers, timeout=self.timeout, limits=self._limits, transport=transport)
            for url in self.base_urls
        ]
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        with self._executor_lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True, cancel_futures=True)
                self._executor = None
        for http in self._replicas:
            http.close()

    def __enter__(self) -> "RewardClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- API ---------------------------------------------------------------------------------

    def score(
        self,
        items: Iterable[ItemLike],
        model: str | None = None,
        normalize: bool = False,
        *,
        objective: str | None = None,
        return_objectives: bool = False,
        aggregate: str | None = None,
        uncertainty_penalty: float | None = None,
        return_uncertainty: bool = False,
        return_members: bool = False,
        progress: ProgressCallback | None = None,
    ) -> ScoreResponse:
        """One reward per item, in item order. Items are protocol items or dicts.

        For a model with several reward heads: ``objective`` scores with that head instead of
        their combination; ``return_objectives`` also returns each head's rewards
        (``response.objectives``, by name).

        For an ensemble: ``aggregate`` ("mean", "min", "mean_minus_var") and
        ``uncertainty_penalty`` (the λ of mean - λ·var) choose how its members' rewards become
        the reward (the served default otherwise); ``return_uncertainty`` also returns their
        mean and standard deviation per item (``ensemble_mean``, ``ensemble_std``),
        ``return_members`` each member's reward (``members[i][m]``)."""
        bodies, sizes = self._score_bodies(
            items, model, normalize, objective, return_objectives,
            _ensemble_fields(aggregate, uncertainty_penalty, return_uncertainty, return_members),
        )
        return self._send_chunks(f"/{API_VERSION}/score", bodies, sizes, ScoreResponse, progress)

    def compare(
        self,
        pairs: Iterable[PairLike],
        model: str | None = None,
        *,
        objective: str | None = None,
        return_objectives: bool = False,
        aggregate: str | None = None,
        uncertainty_penalty: float | None = None,
        return_uncertainty: bool = False,
        return_members: bool = False,
        progress: ProgressCallback | None = None,
    ) -> CompareResponse:
        """Rewards of both responses of each pair and P(a better than b), in pair order;
        ``objective`` / ``return_objectives`` as for :meth:`score` (each result's ``objectives``);
        the ensemble keywords too (``return_uncertainty`` adds each result's ``member_agreement``
        and the members' mean and spread for a and b; ``return_members`` ``members_a``/``_b``)."""
        bodies, sizes = self._compare_bodies(
            pairs, model, objective, return_objectives,
            _ensemble_fields(aggregate, uncertainty_penalty, return_uncertainty, return_members),
        )
        return self._send_chunks(f"/{API_VERSION}/compare", bodies, sizes, CompareResponse, progress)

    def score_texts(
        self, texts: Sequence[str], prompts: Sequence[str] | None = None, model: str | None = None,
        *, objective: str | None = None, aggregate: str | None = None, uncertainty_penalty: float | None = None,
    ) -> list[float]:
        """Rewards of already-formatted texts (prompt + response, chat template applied), via
        ``/get_reward``; ``prompts[i]``, when a prefix of ``texts[i]``, marks its prompt part;
        ``objective``: a head's rewards instead of the combination; ``aggregate`` /
        ``uncertainty_penalty``: an ensemble's rule instead of the served default."""
        if not texts:
            return []
        bodies = self._text_bodies(
            texts, prompts, model, objective, {"aggregate": aggregate, "uncertainty_penalty": uncertainty_penalty}
        )
        sizes = [len(b["query"]) for b in bodies]
        return self._send_chunks("/get_reward", bodies, sizes, GetRewardResponse, None).rewards

    def models(self) -> ModelList:
        path = f"/{API_VERSION}/models"
        return self._parse(ModelList, self._request("GET", path), path)

    def health(self) -> bool:
        """Whether the process answers /healthz (one try, no retries)."""
        return self._probe("/healthz")

    def ready(self) -> bool:
        """Whether models are loaded and warm (/readyz; one try, no retries)."""
        return self._probe("/readyz")

    def wait_ready(self, timeout: float = 60.0, interval: float = 0.5) -> None:
        """Poll /readyz until ready; raise ServiceUnavailable after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() >= deadline:
                raise ServiceUnavailable(None, "not_ready", f"the reward service at {self.base_url} was not ready after {timeout} s")
            _sleep(min(interval, max(0.0, deadline - time.monotonic())))

    # -- the comparison loop -----------------------------------------------------------------

    def submit_comparison(self, comparison: ComparisonRequest | Mapping[str, Any] | None = None, **fields: Any) -> ComparisonCreated:
        """Store a labeller's comparison: a ComparisonRequest, a dict, or its fields as keywords
        (``prompt``, ``responses``, ``ranking`` or ``choice``, ``labeller``, ...). Pass
        ``idempotency_key=`` to make repeats of your own call store once too."""
        body, headers = self._comparison(comparison or {}, fields)
        path = f"/{API_VERSION}/comparisons"
        return self._parse(ComparisonCreated, self._request("POST", path, body, headers=headers), path)

    def list_comparisons(self, *, since: datetime | None = None, until: datetime | None = None, labeller: str | None = None,
                         category: str | None = None, after: int | None = None, limit: int | None = None) -> ComparisonList:
        """One page of stored comparisons (admin scope); pass ``after=page.next_after`` for the next."""
        params = self._comparison_filters(since=since, until=until, labeller=labeller, category=category, after=after, limit=limit)
        path = f"/{API_VERSION}/comparisons"
        return self._parse(ComparisonList, self._request("GET", path, params=params), path)

    def export_comparisons(self, *, since: datetime | None = None, until: datetime | None = None,
                           labeller: str | None = None, category: str | None = None) -> list[dict]:
        """Every matching comparison as rows of the trainer's rankings format (admin scope)."""
        import json

        params = self._comparison_filters(since=since, until=until, labeller=labeller, category=category)
        response = self._request("GET", f"/{API_VERSION}/comparisons/export", params=params)
        return [json.loads(line) for line in response.text.splitlines() if line.strip()]

    def add_label_tasks(self, tasks: Iterable[Mapping[str, Any]]) -> list[int]:
        """Queue (prompt, responses[, category, source]) tasks for the /label page; their ids."""
        body = self._body(LabelTasksRequest.model_validate({"tasks": list(tasks)}))
        path = f"/{API_VERSION}/label/tasks"
        return self._parse(LabelTasksCreated, self._request("POST", path, body), path).ids

    def next_label_task(self, labeller: str, lease_s: float | None = None) -> NextLabelTask:
        params = self._comparison_filters(labeller=labeller, lease_s=lease_s)
        path = f"/{API_VERSION}/label/tasks/next"
        return self._parse(NextLabelTask, self._request("GET", path, params=params), path)

    # -- internals ---------------------------------------------------------------------------

    def _probe(self, path: str) -> bool:
        # With replicas, one that answers is enough: requests move past the others.
        for http in self._replicas:
            try:
                if http.get(path).is_success:
                    return True
            except httpx.HTTPError:
                pass
        return False

    def _request(
        self, method: str, path: str, body: dict | None = None, *, headers: Mapping[str, str] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> httpx.Response:
        tries, first = 0, self._first_replica()

        def send_once() -> httpx.Response:
            nonlocal tries
            tries += 1
            http = self._replicas[(first + tries - 1) % len(self._replicas)]
            return self._check(http.request(method, path, json=body, headers=headers, params=params))

        retrying = tenacity.Retrying(sleep=lambda seconds: _sleep(seconds), **self._retry_kwargs())
        try:
            return retrying(send_once)
        except RewardServiceError:
            raise
        except (_RetryableStatus, httpx.HTTPError) as exc:
            raise self._final_error(exc, path, tries) from exc

    def _send_chunk(self, path: str, body: dict, response_model: type[ResponseT]) -> ResponseT:
        return self._parse(response_model, self._request("POST", path, body), path)

    def _pool(self) -> ThreadPoolExecutor:
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="reward-client")
            return self._executor

    def _send_chunks(
        self,
        path: str,
        bodies: list[dict],
        sizes: list[int],
        response_model: type[ResponseT],
        progress: ProgressCallback | None,
    ) -> ResponseT:
        total, done = sum(sizes), 0
        if len(bodies) == 1:
            result = self._send_chunk(path, bodies[0], response_model)
            if progress:
                progress(total, total)
            return result
        pool = self._pool()
        futures: dict[Future, int] = {pool.submit(self._send_chunk, path, b, response_model): i for i, b in enumerate(bodies)}
        results: list[ResponseT | None] = [None] * len(bodies)
        pending = set(futures)
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    index = futures[future]
                    results[index] = future.result()  # re-raises the chunk's error
                    done += sizes[index]
                    if progress:
                        progress(done, total)
        finally:
            # On the first failure, drop the chunks not yet started: the call fails anyway.
            for future in pending:
                future.cancel()
        return _merge(results)  # type: ignore[arg-type]


class AsyncRewardClient(_ClientCore):
    """Asyncio client; chunks are sent concurrently, at most ``max_concurrency`` at a time.

    >>> async with AsyncRewardClient("http://127.0.0.1:8000") as client:
    ...     (await client.score([{"prompt": "2+2?", "response": "4"}])).scores
    """

    def __init__(self, base_url: str = DEFAULT_URL, *, transport: httpx.AsyncBaseTransport | None = None, **options: Any) -> None:
        super().__init__(base_url, **options)
        self._replicas = [
            httpx.AsyncClient(base_url=url, headers=self.headers, timeout=self.timeout, limits=self._limits, transport=transport)
            for url in self.base_urls
        ]

    # -- lifecycle ---------------------------------------------------------------------------

    async def aclose(self) -> None:
        for http in self._replicas:
            await http.aclose()

    async def __aenter__(self) -> "AsyncRewardClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- API ---------------------------------------------------------------------------------

    async def score(
        self,
        items: Iterable[ItemLike],
        model: str | None = None,
        normalize: bool = False,
        *,
        objective: str | None = None,
        return_objectives: bool = False,
        aggregate: str | None = None,
        uncertainty_penalty: float | None = None,
        return_uncertainty: bool = False,
        return_members: bool = False,
        progress: ProgressCallback | None = None,
    ) -> ScoreResponse:
        """One reward per item, in item order (see RewardClient.score)."""
        bodies, sizes = self._score_bodies(
            items, model, normalize, objective, return_objectives,
            _ensemble_fields(aggregate, uncertainty_penalty, return_uncertainty, return_members),
        )
        return await self._send_chunks(f"/{API_VERSION}/score", bodies, sizes, ScoreResponse, progress)

    async def compare(
        self,
        pairs: Iterable[PairLike],
        model: str | None = None,
        *,
        objective: str | None = None,
        return_objectives: bool = False,
        aggregate: str | None = None,
        uncertainty_penalty: float | None = None,
        return_uncertainty: bool = False,
        return_members: bool = False,
        progress: ProgressCallback | None = None,
    ) -> CompareResponse:
        """Rewards of both responses of each pair and P(a better than b), in pair order (see
        RewardClient.compare)."""
        bodies, sizes = self._compare_bodies(
            pairs, model, objective, return_objectives,
            _ensemble_fields(aggregate, uncertainty_penalty, return_uncertainty, return_members),
        )
        return await self._send_chunks(f"/{API_VERSION}/compare", bodies, sizes, CompareResponse, progress)

    async def score_texts(
        self, texts: Sequence[str], prompts: Sequence[str] | None = None, model: str | None = None,
        *, objective: str | None = None, aggregate: str | None = None, uncertainty_penalty: float | None = None,
    ) -> list[float]:
        """Rewards of already-formatted texts (prompt + response, chat template applied), via
        ``/get_reward``; ``prompts[i]``, when a prefix of ``texts[i]``, marks its prompt part;
        ``objective``: a head's rewards instead of the combination; ``aggregate`` /
        ``uncertainty_penalty``: an ensemble's rule instead of the served default."""
        if not texts:
            return []
        bodies = self._text_bodies(
            texts, prompts, model, objective, {"aggregate": aggregate, "uncertainty_penalty": uncertainty_penalty}
        )
        sizes = [len(b["query"]) for b in bodies]
        return (await self._send_chunks("/get_reward", bodies, sizes, GetRewardResponse, None)).rewards

    async def models(self) -> ModelList:
        path = f"/{API_VERSION}/models"
        return self._parse(ModelList, await self._request("GET", path), path)

    async def health(self) -> bool:
        """Whether the process answers /healthz (one try, no retries)."""
        return await self._probe("/healthz")

    async def ready(self) -> bool:
        """Whether models are loaded and warm (/readyz; one try, no retries)."""
        return await self._probe("/readyz")

    async def wait_ready(self, timeout: float = 60.0, interval: float = 0.5) -> None:
        """Poll /readyz until ready; raise ServiceUnavailable after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not await self.ready():
            if loop.time() >= deadline:
                raise ServiceUnavailable(None, "not_ready", f"the reward service at {self.base_url} was not ready after {timeout} s")
            await _async_sleep(min(interval, max(0.0, deadline - loop.time())))

    # -- the comparison loop -----------------------------------------------------------------

    async def submit_comparison(
        self, comparison: ComparisonRequest | Mapping[str, Any] | None = None, **fields: Any
    ) -> ComparisonCreated:
        """Store a labeller's comparison (see RewardClient.submit_comparison)."""
        body, headers = self._comparison(comparison or {}, fields)
        path = f"/{API_VERSION}/comparisons"
        return self._parse(ComparisonCreated, await self._request("POST", path, body, headers=headers), path)

    async def add_label_tasks(self, tasks: Iterable[Mapping[str, Any]]) -> list[int]:
        """Queue (prompt, responses[, category, source]) tasks for the /label page; their ids."""
        body = self._body(LabelTasksRequest.model_validate({"tasks": list(tasks)}))
        path = f"/{API_VERSION}/label/tasks"
        return self._parse(LabelTasksCreated, await self._request("POST", path, body), path).ids

    # -- internals ---------------------------------------------------------------------------

    async def _probe(self, path: str) -> bool:
        for http in self._replicas:
            try:
                if (await http.get(path)).is_success:
                    return True
            except httpx.HTTPError:
                pass
        return False

    async def _request(
        self, method: str, path: str, body: dict | None = None, *, headers: Mapping[str, str] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> httpx.Response:
        tries, first = 0, self._first_replica()

        async def send_once() -> httpx.Response:
            nonlocal tries
            tries += 1
            http = self._replicas[(first + tries - 1) % len(self._replicas)]
            return self._check(await http.request(method, path, json=body, headers=headers, params=params))

        retrying = tenacity.AsyncRetrying(sleep=lambda seconds: _async_sleep(seconds), **self._retry_kwargs())
        try:
            return await retrying(send_once)
        except RewardServiceError:
            raise
        except (_RetryableStatus, httpx.HTTPError) as exc:
            raise self._final_error(exc, path, tries) from exc

    async def _send_chunks(
        self,
        path: str,
        bodies: list[dict],
        sizes: list[int],
        response_model: type[ResponseT],
        progress: ProgressCallback | None,
    ) -> ResponseT:
        total, done = sum(sizes), 0
        semaphore = asyncio.Semaphore(self.max_concurrency)

        async def send(body: dict, size: int) -> ResponseT:
            nonlocal done
            async with semaphore:
                result = self._parse(response_model, await self._request("POST", path, body), path)
            done += size
            if progress:
                progress(done, total)
            return result

        tasks = [asyncio.ensure_future(send(b, n)) for b, n in zip(bodies, sizes)]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            # gather does not stop the other chunks when one fails; cancel them so no request
            # outlives the call that wanted it.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return _merge(list(results))
