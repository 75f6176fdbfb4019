"""HTTP routes. A route validates, tokenises off the event loop, hands items to the model's
batcher and shapes the answer; it never batches or touches tensors itself."""

from __future__ import annotations

import asyncio
import logging
import math
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

from .formatting import Conversation, encode_conversations, item_to_conversation
from .metrics import ServiceMetrics
from .registry import ServedModel, attach_batchers, load_models
from .settings import ServiceSettings

log = logging.getLogger(__name__)

_ERRORS = {404: {"model": ErrorResponse}, 413: {"model": ErrorResponse}, 422: {"model": ErrorResponse}}
_ROUTES = {"/v1/score", "/v1/compare", "/v1/models", "/healthz", "/readyz", "/metrics", "/get_reward", "/classify", "/pooling"}


class APIError(Exception):
    """A request the service refuses, with the status and a message saying what to fix."""

    def __init__(self, status: int, type_: str, message: str) -> None:
        super().__init__(message)
        self.status, self.type, self.message = status, type_, message


def _error(
    status: int, type_: str, message: str, request: Request | None = None, details=None, request_id: str | None = None
) -> JSONResponse:
    if request is not None:
        request_id = getattr(request.state, "request_id", None)
    body = ErrorResponse(error=dict(code=status, type=type_, message=message, request_id=request_id, details=details))
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status)


class GuardMiddleware:
    """Pure ASGI: refuses bodies over ``max_body_bytes`` (by Content-Length or while streaming),
    gives each request an id, and records request count and latency per route."""

    def __init__(self, app, *, max_body_bytes: int, metrics: ServiceMetrics) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        route = scope["path"] if scope["path"] in _ROUTES else "other"
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status_holder = {"status": 500}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
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

            async def counting_receive():
                # A body without Content-Length (chunked) is counted as it streams; past the
                # limit we answer 413 ourselves and tell the app the client left.
                nonlocal received, refused
                message = await receive()
                if message["type"] == "http.request" and not refused:
                    received += len(message.get("body", b""))
                    if received > self.max_body_bytes:
                        refused = True
                        await self._refuse_too_large(scope, receive, send_with_id, request_id)
                        return {"type": "http.disconnect"}
                return message

            async def send_unless_refused(message):
                if not refused:
                    await send_with_id(message)

            await self.app(scope, counting_receive, send_unless_refused)
        finally:
            self.metrics.requests.labels(route, str(status_holder["status"])).inc()
            self.metrics.request_latency.labels(route).observe(time.perf_counter() - started)

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
    score_encoded: Callable[..., Any]  # async (model, encode, *args) -> (scores, encoded inputs)


def usage_of(encoded: list) -> Usage:
    return Usage(items=len(encoded), tokens=sum(len(e) for e in encoded), truncated=sum(e.truncated for e in encoded))


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
        elif kind == "too_short" and where in ("items", "pairs"):
            lines.append(f"{where}: is empty; send at least one")
        else:
            lines.append(f"{where}: {msg}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(lines) + more


def create_app(settings: ServiceSettings | None = None, models: list[ServedModel] | None = None) -> FastAPI:
    """The ASGI app. ``models`` already loaded (by ``reward serve``) or loaded here from settings."""
    settings = settings or ServiceSettings()
    metrics = ServiceMetrics()
    if models is None:
        models = load_models(settings)
    by_name = {m.name: m for m in models}
    tokenize_pool = ThreadPoolExecutor(max_workers=settings.tokenizer_threads, thread_name_prefix="tokenize")
    state = {"ready": False}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        attach_batchers(models, settings, metrics)
        loop = asyncio.get_running_loop()
        for m in models:
            await loop.run_in_executor(tokenize_pool, m.warm_up)
            m.batcher.start()
        state["ready"] = True
        log.info("ready: %s", ", ".join(m.display_name for m in models))
        try:
            yield
        finally:
            state["ready"] = False
            for m in models:
                await m.batcher.stop()
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

    @app.exception_handler(RequestValidationError)
    async def _on_validation_error(request: Request, exc: RequestValidationError):
        metrics.rejections.labels("validation").inc()
        errors = exc.errors()
        details = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in errors[:20]]
        return _error(422, "validation_error", _validation_message(errors), request, details)

    @app.exception_handler(APIError)
    async def _on_api_error(request: Request, exc: APIError):
        metrics.rejections.labels(exc.type).inc()
        return _error(exc.status, exc.type, exc.message, request)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in message:
            kind, message = "invalid_body", "the body could not be read as JSON; send a UTF-8 JSON object"
        elif exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see /docs for the API"
        return _error(exc.status_code, kind, message, request)

    @app.exception_handler(Exception)
    async def _on_unexpected(request: Request, exc: Exception):
        log.exception("request %s failed", getattr(request.state, "request_id", "?"))
        return _error(500, "internal_error", f"internal error: {type(exc).__name__}; quote the request id when reporting it", request)

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

    def _by_path(name: str) -> ServedModel | None:
        # vLLM-style callers (verl) name the model by the directory they would have served.
        try:
            wanted = Path(name).expanduser().resolve()
        except (OSError, ValueError):
            return None
        return next((m for m in models if m.path == wanted), None)

    async def score_encoded(model: ServedModel, encode: Callable[..., list], *args, **kwargs) -> tuple[list[float], list]:
        """``encode(*args, tokenizer, spec, **kwargs)`` in the tokeniser pool, then the model's
        batcher: (scores, the EncodedInputs), in order."""
        loop = asyncio.get_running_loop()
        with model.in_use():  # a reload waits for this before retiring the model
            encoded = await loop.run_in_executor(
                tokenize_pool, lambda: encode(*args, model.tokenizer, model.spec, **kwargs)
            )
            truncated = sum(e.truncated for e in encoded)
            if truncated:
                metrics.truncated_items.labels(model.name).inc(truncated)
            return await model.batcher.score(encoded), encoded

    async def score_conversations(model: ServedModel, conversations: list[Conversation]) -> tuple[list[float], Usage]:
        scores, encoded = await score_encoded(model, encode_conversations, conversations)
        return scores, usage_of(encoded)

    @app.post("/v1/score", response_model=ScoreResponse, responses=_ERRORS, tags=["scoring"])
    async def score(request: ScoreRequest) -> ScoreResponse:
        """Score each item: one reward per item, in item order."""
        model = pick_model(request.model)
        check_count(len(request.items), "items")
        if request.normalize and not model.spec.normalize_available:
            raise APIError(
                400, "normalize_unavailable",
                f"model {model.name!r} has no reward_mean/reward_std in its reward_model.json, so "
                "normalize is not possible; send normalize=false or serve a model trained by `reward train-rm`",
            )
        scores, usage = await score_conversations(model, [item_to_conversation(i) for i in request.items])
        if request.normalize:
            mean, std = model.spec.reward_mean, model.spec.reward_std
            scores = [(s - mean) / std for s in scores]
        return ScoreResponse(model=model.display_name, scores=scores, usage=usage)

    @app.post("/v1/compare", response_model=CompareResponse, responses=_ERRORS, tags=["scoring"])
    async def compare(request: CompareRequest) -> CompareResponse:
        """Score both responses of each pair; p_a_better = sigmoid(reward_a - reward_b)."""
        model = pick_model(request.model)
        check_count(2 * len(request.pairs), "responses (2 per pair)")
        conversations: list[Conversation] = []
        for pair in request.pairs:
            messages, _ = item_to_conversation({"prompt": pair.prompt, "response": ""})
            conversations += [(messages, pair.a), (messages, pair.b)]
        scores, usage = await score_conversations(model, conversations)
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
        """Models are loaded and warmed up (readiness)."""
        if not state["ready"]:
            return _error(503, "not_ready", "models are loading or the service is stopping", request)
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
    app.include_router(compat_router)
    app.include_router(admin_router)
    app.add_middleware(GuardMiddleware, max_body_bytes=settings.max_body_bytes, metrics=metrics)
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
