"""HTTP routes. A route validates, tokenises off the event loop, hands items to the model's
batcher and shapes the answer; it never batches or touches tensors itself."""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from client.protocol import (
    CompareRequest,
    CompareResponse,
    CompareResult,
    ErrorResponse,
    ModelCard,
    ModelList,
    ScoreRequest,
    ScoreResponse,
    Usage,
)

from .auth import OPEN_ROUTES, RATE_LIMITED_ROUTES, KeyRing, RateLimiter, required_scope
from .batcher import BatcherStopped, ForwardFailed, QueueFull
from reward_core.formatting import Conversation, encode_conversations, item_to_conversation
from .metrics import ServiceMetrics
from .registry import ServedModel, attach_batchers, load_models
from .score_cache import ScoreCache
from .settings import ServiceSettings

log = logging.getLogger(__name__)
request_log = logging.getLogger("service.requests")

_ERRORS = {
    status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 408, 413, 422, 429, 500, 503, 504)
}
# A caller's X-Request-ID is kept when it looks like an id; anything else is replaced by ours.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
_ROUTES = {"/v1/score", "/v1/compare", "/v1/models", "/healthz", "/readyz", "/metrics", "/get_reward", "/classify", "/pooling"}
_ROUTES |= {"/v1/comparisons", "/v1/comparisons/export", "/v1/label/tasks", "/v1/label/tasks/next", "/label"}


class APIError(Exception):
    """A request the service refuses, with the status and a message saying what to fix."""

    def __init__(self, status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type_, message, headers


def _error(
    status: int, type_: str, message: str, request: Request | None = None, details=None, request_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    if request is not None:
        request_id = getattr(request.state, "request_id", None)
    body = ErrorResponse(error=dict(code=status, type=type_, message=message, request_id=request_id, details=details))
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


class Lifecycle:
    """Readiness as /readyz reports it: not ready while loading, and from the first SIGTERM on
    (``draining``), so a load balancer stops sending traffic before the server stops accepting."""

    def __init__(self) -> None:
        self.ready = False
        self.draining = False

    def begin_drain(self) -> None:
        if not self.draining:
            log.info("draining: /readyz now answers 503; in-flight requests are being finished")
        self.draining = True
        self.ready = False


class GuardMiddleware:
    """Pure ASGI: refuses bodies over ``max_body_bytes`` (by Content-Length or while streaming),
    gives each request an id, records request count and latency per route, logs each request,
    and bounds every request's whole life (body included: a body trickled in byte by byte must
    not hold a connection for ever) by the deadline plus a second of grace."""

    def __init__(self, app, *, max_body_bytes: int, request_timeout_s: float, metrics: ServiceMetrics) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.hard_timeout_s = request_timeout_s + 1.0
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        route = scope["path"] if scope["path"] in _ROUTES else "other"
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["started"] = started  # the request's deadline counts from here
        status_holder = {"status": 500, "started": False}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status_holder["status"], status_holder["started"] = message["status"], True
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        declared = headers.get(b"content-length")
        try:
            if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
                await self._refuse_too_large(scope, receive, send_with_id, request_id)
                return
            received = 0
            refused = False
            body_complete = False

            async def counting_receive():
                # A body without Content-Length (chunked) is counted as it streams; past the
                # limit we answer 413 ourselves and tell the app the client left.
                nonlocal received, refused, body_complete
                message = await receive()
                if message["type"] == "http.request" and not refused:
                    body_complete = not message.get("more_body", False)
                    received += len(message.get("body", b""))
                    if received > self.max_body_bytes:
                        refused = True
                        await self._refuse_too_large(scope, receive, send_with_id, request_id)
                        return {"type": "http.disconnect"}
                return message

            async def send_unless_refused(message):
                if not refused:
                    await send_with_id(message)

            try:
                await asyncio.wait_for(self.app(scope, counting_receive, send_unless_refused), self.hard_timeout_s)
            except Exception as exc:
                too_late = status_holder["started"] or refused
                if isinstance(exc, asyncio.TimeoutError) and time.perf_counter() - started >= self.hard_timeout_s:
                    if too_late:
                        return
                    status, kind, message = (
                        (504, "deadline_exceeded", "not answered within the request deadline") if body_complete else
                        (408, "body_timeout", "the request body did not arrive within the request deadline; "
                                              "send it at once (with Content-Length)")
                    )
                    self.metrics.rejections.labels(kind).inc()
                    await _error(status, kind, f"{message} ({self.hard_timeout_s - 1:g} s, --request-timeout-s)",
                                 request_id=request_id)(scope, receive, send_with_id)
                    return
                # A bug of ours, not the caller's: logged with its traceback, answered as JSON
                # with the request id (by us, so the X-Request-ID header is on it too).
                log.exception("request %s failed", request_id)
                if too_late:
                    raise
                message = f"internal error: {type(exc).__name__}; quote the request id when reporting it"
                await _error(500, "internal_error", message, request_id=request_id)(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            self.metrics.requests.labels(route, str(status_holder["status"])).inc()
            self.metrics.request_latency.labels(route).observe(elapsed)
            if route not in ("/healthz", "/readyz", "/metrics"):  # probes and scrapes would drown the log
                fields = {k: state[k] for k in ("model", "items", "tokens", "key_id") if k in state}
                request_log.info(
                    "request", extra=dict(
                        request_id=request_id, method=scope.get("method"), route=scope["path"][:200],
                        status=status_holder["status"], latency_ms=round(1000 * elapsed, 1), **fields,
                    ),
                )

    async def _refuse_too_large(self, scope, receive, send, request_id: str) -> None:
        self.metrics.rejections.labels("body_too_large").inc()
        await _error(413, "body_too_large", self._too_large_message(), request_id=request_id)(scope, receive, send)

    def _too_large_message(self) -> str:
        return (
            f"request body is over the limit of {self.max_body_bytes} bytes; send fewer items per "
            "request (the client splits large inputs into chunks) or raise --max-body-bytes"
        )


@dataclass
class Scoring:
    """What a route module needs from the app: model lookup, the item limit, and the one way to
    score (tokenise off the loop, then the model's batcher). Routes in ``compat`` use it so no
    endpoint has a forward path of its own."""

    pick_model: Callable[[str | None], ServedModel]
    check_count: Callable[[int, str], None]
    score_encoded: Callable[..., Any]  # async (http, model, n_items, encode, *args) -> (scores, encoded inputs)


def usage_of(encoded: list) -> Usage:
    return Usage(items=len(encoded), tokens=sum(len(e) for e in encoded), truncated=sum(e.truncated for e in encoded))


class AccessMiddleware:
    """Pure ASGI, inside the guard: checks the Bearer key and its scope (service/auth.py) and
    the caller's rate limit before any body is read. Open routes pass without a key."""

    def __init__(self, app, *, keys: KeyRing, limiter: RateLimiter | None, metrics: ServiceMetrics) -> None:
        self.app = app
        self.keys = keys
        self.limiter = limiter
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_ROUTES:
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        caller = (scope.get("client") or ("unknown",))[0]
        if self.keys.enabled:
            refusal = self._check_key(scope, state)
            if refusal is not None:
                return await refusal(scope, receive, send)
            caller = state["key_id"]
        if self.limiter is not None and scope["path"] in RATE_LIMITED_ROUTES:
            wait = self.limiter.acquire(caller)
            if wait > 0:
                self.metrics.rejections.labels("rate_limited").inc()
                refusal = _error(
                    429, "rate_limited",
                    f"over the rate limit of {self.limiter.rate:g} requests/s for this "
                    f"{'key' if self.keys.enabled else 'client'}; retry after the Retry-After seconds",
                    request_id=state.get("request_id"), headers={"Retry-After": str(max(1, math.ceil(wait)))},
                )
                return await refusal(scope, receive, send)
        return await self.app(scope, receive, send)

    def _check_key(self, scope, state) -> JSONResponse | None:
        request_id = state.get("request_id")
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            self.metrics.rejections.labels("unauthenticated").inc()
            return _error(
                401, "unauthenticated", "this route needs an API key: send the header 'Authorization: Bearer <key>' "
                "(RewardClient(api_key=...) does)", request_id=request_id, headers={"WWW-Authenticate": "Bearer"},
            )
        key = self.keys.find(presented.strip())
        if key is None:
            self.metrics.rejections.labels("unauthenticated").inc()
            return _error(
                401, "unauthenticated", "the API key is not valid for this service; check the key you were given",
                request_id=request_id, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        state["key_id"] = key.key_id
        needed = required_scope(scope["path"], scope.get("method", "GET"))
        if needed is not None and needed not in key.scopes:
            self.metrics.rejections.labels("forbidden").inc()
            return _error(
                403, "forbidden", f"{scope['path']} needs the {needed!r} scope and this key has only "
                f"{', '.join(sorted(key.scopes))}; ask the operator for a key with {needed!r}",
                request_id=request_id,
            )
        return None


def _field_path(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    # Drop the discriminator tags pydantic puts in the path of a tagged union.
    parts = [p for p in parts if p not in ("prompt_response", "messages") or p == parts[-1]]
    return ".".join(parts) or "body"


def _validation_message(errors: list[dict]) -> str:
    lines = []
    for err in errors[:5]:
        loc, kind, msg = tuple(err.get("loc", ())), err.get("type", ""), err.get("msg", "")
        where = _field_path(loc)
        if kind == "json_invalid":
            lines.append(f"the body is not valid JSON ({err.get('ctx', {}).get('error', msg)}); send a UTF-8 JSON object")
        elif kind == "missing":
            lines.append(f"{where}: required field is missing")
        elif kind == "extra_forbidden":
            lines.append(f"{where}: unknown field; remove it (check its spelling)")
        elif kind == "model_attributes_type" and where == "body":
            lines.append(
                'the body must be a JSON object such as {"items": [...]}, sent with the header '
                "Content-Type: application/json"
            )
        elif kind == "too_short" and where in ("items", "pairs"):
            lines.append(f"{where}: is empty; send at least one")
        else:
            lines.append(f"{where}: {msg}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(lines) + more


def _long_fields(value: Any, limit: int, path: str = "") -> list[tuple[str, int]]:
    """(field path, length) of every string over ``limit`` characters in a dumped request."""
    if isinstance(value, str):
        return [(path, len(value))] if len(value) > limit else []
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    found: list[tuple[str, int]] = []
    for key, child in children:
        found += _long_fields(child, limit, f"{path}.{key}" if path else str(key))
    return found


def create_app(
    settings: ServiceSettings | None = None, models: list[ServedModel] | None = None, keys: KeyRing | None = None,
    store=None,
) -> FastAPI:
    """The ASGI app. ``models`` already loaded (by ``reward serve``) or loaded here from settings;
    ``keys``: the API keys (none: authentication off); ``store``: the comparison store already
    opened (by ``reward serve``), else opened here from ``settings.store`` when set."""
    settings = settings or ServiceSettings()
    metrics = ServiceMetrics()
    if models is None:
        models = load_models(settings)
    keys = keys or KeyRing([])
    by_name = {m.name: m for m in models}
    tokenize_pool = ThreadPoolExecutor(max_workers=settings.tokenizer_threads, thread_name_prefix="tokenize")
    lifecycle = Lifecycle()
    score_cache = ScoreCache(settings.score_cache_size, metrics) if settings.score_cache_size else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        attach_batchers(models, settings, metrics, score_cache)
        loop = asyncio.get_running_loop()
        for m in models:
            await loop.run_in_executor(tokenize_pool, m.warm_up)
            m.batcher.start()
        lifecycle.ready = True
        log.info("ready: %s", ", ".join(m.display_name for m in models))
        try:
            yield
        finally:
            # The server has stopped accepting and waited for its requests; whatever is still
            # queued gets until its deadline to run.
            lifecycle.begin_drain()
            await asyncio.gather(*(m.batcher.stop(drain_timeout_s=settings.request_timeout_s) for m in models))
            tokenize_pool.shutdown(wait=False)

    app = FastAPI(
        title="Reward model service",
        version="1",
        summary="Scores (prompt, response) pairs with reward models, batched across requests.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.models = by_name
    app.state.metrics = metrics
    app.state.lifecycle = lifecycle
    app.state.score_cache = score_cache  # shared by reloaded models (keys carry the version)

    @app.exception_handler(RequestValidationError)
    async def _on_validation_error(request: Request, exc: RequestValidationError):
        metrics.rejections.labels("validation").inc()
        errors = exc.errors()
        details = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in errors[:20]]
        return _error(422, "validation_error", _validation_message(errors), request, details)

    @app.exception_handler(APIError)
    async def _on_api_error(request: Request, exc: APIError):
        if exc.status != 500:  # a failure of ours, counted as reward_forward_failures, not a refusal
            metrics.rejections.labels(exc.type).inc()
        return _error(exc.status, exc.type, exc.message, request, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in message:
            kind, message = "invalid_body", "the body could not be read as JSON; send a UTF-8 JSON object"
        elif exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see /docs for the API"
        return _error(exc.status_code, kind, message, request)

    def pick_model(name: str | None) -> ServedModel:
        if name is None:
            return models[0]  # the default; `models` changes in place when one is reloaded
        model = by_name.get(name) or by_name.get(name.split("@", 1)[0]) or _by_path(name)
        if model is None:
            raise APIError(404, "model_not_found", f"model {name!r} is not served here; served: {', '.join(by_name)} (GET /v1/models)")
        return model

    def check_count(n: int, what: str) -> None:
        if n > settings.max_items:
            raise APIError(
                413, "too_many_items",
                f"{n} {what} in one request is over the limit of {settings.max_items}; split the "
                "request (the client does it for you) or raise --max-items",
            )

    def check_field_lengths(body: ScoreRequest | CompareRequest) -> None:
        too_long = _long_fields(body.model_dump(include={"items", "pairs"}), settings.max_field_chars)
        if too_long:
            where, n = too_long[0]
            more = f" (and {len(too_long) - 1} more fields)" if len(too_long) > 1 else ""
            raise APIError(
                413, "field_too_long",
                f"{where}: {n} characters is over the limit of {settings.max_field_chars} per field{more}; "
                "shorten it (the model reads at most max_length tokens of an item anyway) or raise --max-field-chars",
            )

    def _by_path(name: str) -> ServedModel | None:
        # vLLM-style callers (verl) name the model by the directory they would have served.
        try:
            wanted = Path(name).expanduser().resolve()
        except (OSError, ValueError):
            return None
        return next((m for m in models if m.path == wanted), None)

    async def score_encoded(
        http: Request, model: ServedModel, n_items: int, encode: Callable[..., list], *args, **kwargs
    ) -> tuple[list[float], list]:
        """THE scoring path of every route: ``encode(*args, tokenizer, spec, **kwargs)`` in the
        tokeniser pool, then the model's batcher, within the request's deadline. Returns (scores,
        the EncodedInputs) in order; refusals (queue full, deadline, failed forward) become APIErrors."""
        http.state.model, http.state.items = model.name, n_items
        started = getattr(http.state, "started", time.perf_counter())
        remaining = settings.request_timeout_s - (time.perf_counter() - started)
        try:
            model.batcher.check_room(n_items)  # shed load before paying for tokenisation
            with model.in_use():  # a reload waits for this before retiring the model
                return await asyncio.wait_for(_tokenize_and_score(http, model, encode, args, kwargs), max(remaining, 0.0))
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

    async def _tokenize_and_score(http: Request, model: ServedModel, encode, args, kwargs) -> tuple[list[float], list]:
        loop = asyncio.get_running_loop()
        encoded = await loop.run_in_executor(tokenize_pool, lambda: encode(*args, model.tokenizer, model.spec, **kwargs))
        empty = [i for i, e in enumerate(encoded) if len(e) == 0]
        if empty:  # a model cannot read zero tokens (e.g. "" with add_special_tokens false)
            raise APIError(
                422, "empty_input",
                f"input {empty[0]} is empty after tokenisation ({len(empty)} such inputs); send non-empty text "
                "or let the service add the special tokens",
            )
        truncated = sum(e.truncated for e in encoded)
        if truncated:
            metrics.truncated_items.labels(model.name).inc(truncated)
        http.state.tokens = sum(len(e) for e in encoded)
        return await model.batcher.score(encoded), encoded

    async def score_conversations(
        http: Request, model: ServedModel, conversations: list[Conversation]
    ) -> tuple[list[float], Usage]:
        scores, encoded = await score_encoded(http, model, len(conversations), encode_conversations, conversations)
        return scores, usage_of(encoded)

    @app.post("/v1/score", response_model=ScoreResponse, responses=_ERRORS, tags=["scoring"])
    async def score(request: ScoreRequest, http: Request) -> ScoreResponse:
        """Score each item: one reward per item, in item order."""
        model = pick_model(request.model)
        check_count(len(request.items), "items")
        check_field_lengths(request)
        if request.normalize and not model.spec.normalize_available:
            raise APIError(
                400, "normalize_unavailable",
                f"model {model.name!r} has no reward_mean/reward_std in its reward_model.json, so "
                "normalize is not possible; send normalize=false or serve a model trained by `reward train-rm`",
            )
        scores, usage = await score_conversations(http, model, [item_to_conversation(i) for i in request.items])
        if request.normalize:
            mean, std = model.spec.reward_mean, model.spec.reward_std
            scores = [(s - mean) / std for s in scores]
        return ScoreResponse(model=model.display_name, scores=scores, usage=usage)

    @app.post("/v1/compare", response_model=CompareResponse, responses=_ERRORS, tags=["scoring"])
    async def compare(request: CompareRequest, http: Request) -> CompareResponse:
        """Score both responses of each pair; p_a_better = sigmoid(reward_a - reward_b)."""
        model = pick_model(request.model)
        check_count(2 * len(request.pairs), "responses (2 per pair)")
        check_field_lengths(request)
        conversations: list[Conversation] = []
        for pair in request.pairs:
            messages, _ = item_to_conversation({**pair.model_dump(include={"prompt"}), "response": ""})
            conversations += [(messages, pair.a), (messages, pair.b)]
        scores, usage = await score_conversations(http, model, conversations)
        results = []
        for a, b in zip(scores[0::2], scores[1::2]):
            results.append(CompareResult(reward_a=a, reward_b=b, p_a_better=_sigmoid(a - b)))
        return CompareResponse(model=model.display_name, results=results, usage=usage)

    @app.get("/v1/models", response_model=ModelList, tags=["models"])
    async def list_models() -> ModelList:
        return ModelList(data=[_card(m, m is models[0]) for m in models])

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, Any]:
        """The process is up (liveness)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"model": ErrorResponse}})
    async def readyz(request: Request):
        """Models are loaded and warmed up, and the service is not stopping (readiness)."""
        if not lifecycle.ready:
            why = "the service is stopping (draining)" if lifecycle.draining else "models are loading"
            return _error(503, "not_ready", why, request)
        return {"status": "ready", "models": [m.display_name for m in models]}

    @app.get("/metrics", tags=["health"], response_class=Response)
    async def prometheus_metrics() -> Response:
        for m in models:
            if m.batcher is not None:
                metrics.queue_depth.labels(m.name).set(m.batcher.queue_depth)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    from .admin import router as admin_router
    from .compat import router as compat_router

    app.state.scoring = Scoring(pick_model=pick_model, check_count=check_count, score_encoded=score_encoded)
    app.state.served = models  # the list admin.reload swaps a reloaded model into
    app.state.keys = keys  # with API keys on, reload is an `admin`-scope route (AccessMiddleware)
    app.include_router(compat_router)
    app.include_router(admin_router)
    from .comparisons import install as install_comparisons
    from reward_core.store import ComparisonStore

    if store is None and settings.store:
        store = ComparisonStore(settings.store)
    install_comparisons(app, store, settings.labellers)
    limiter = RateLimiter(settings.rate_limit_rps, settings.rate_limit_burst) if settings.rate_limit_rps else None
    # Starlette wraps in reverse order of adding: the guard is outermost, so every refusal by the
    # access check also gets a request id, a metric and a log line.
    app.add_middleware(AccessMiddleware, keys=keys, limiter=limiter, metrics=metrics)
    app.add_middleware(
        GuardMiddleware, max_body_bytes=settings.max_body_bytes, request_timeout_s=settings.request_timeout_s, metrics=metrics
    )
    return app


def _card(m: ServedModel, is_default: bool) -> ModelCard:
    return ModelCard(
        name=m.name, version=m.spec.version or "", path=str(m.path), backend=m.backend.name,
        max_length=m.spec.max_length, dtype=m.backend.dtype, device=m.backend.device,
        architecture=m.spec.architecture, normalize_available=m.spec.normalize_available, default=is_default,
    )


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)
