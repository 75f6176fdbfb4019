"""The ASGI middleware around every route, outermost first:

- ``GuardMiddleware``: the request id (X-Request-ID), the body-size limit and a compressed body
  (415), the request deadline
  over the whole request (body included), the request count and latency per route, one log line
  per request, and a JSON 500 for a bug of ours.
- ``HeadMiddleware``: HEAD on a GET route is answered as the GET, without the body (probes,
  balancers, ``curl -I``), for every GET route at once.
- ``AccessMiddleware``: the API key and its scope, and the caller's rate limit, before any body
  is read. Which route needs what comes from the one table in ``service/routes.py``. A request
  with more than one Authorization header is refused (400): which one counts would otherwise
  depend on who reads the headers (a proxy, the access check, the reload route).

Every answer carries ``X-Content-Type-Options: nosniff`` (set by the guard), so a browser never
reads an API answer as anything but its declared type.

Both are pure ASGI and answer refusals themselves in the error shape of ``service/errors.py``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import uuid

from fastapi.responses import JSONResponse
from starlette.routing import BaseRoute, Match

from .auth import KeyRing, RateLimiter
from .errors import error_response
from .metrics import ServiceMetrics
from .routes import (
    METERED_ROUTES,
    NO_HEAD_ROUTES,
    OPEN_ROUTES,
    RATE_LIMITED_ROUTES,
    UNLOGGED_ROUTES,
    required_scope,
)

log = logging.getLogger(__name__)
request_log = logging.getLogger("service.requests")

# A caller's X-Request-ID is kept when it looks like an id; anything else is replaced by ours.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


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
        route = scope["path"] if scope["path"] in METERED_ROUTES else "other"
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
                message["headers"] = list(message["headers"]) + [
                    (b"x-request-id", request_id.encode("latin-1")), (b"x-content-type-options", b"nosniff"),
                ]
            await send(message)

        declared = headers.get(b"content-length")
        encoding = headers.get(b"content-encoding", b"").decode("latin-1").strip()
        try:
            if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
                await self._refuse_too_large(scope, receive, send_with_id, request_id)
                return
            if encoding.lower() not in ("", "identity"):
                # Bodies are read as they come: a compressed one would be refused as "not JSON",
                # which names the wrong fault.
                self.metrics.rejections.labels("unsupported_content_encoding").inc()
                await error_response(
                    415, "unsupported_content_encoding",
                    f"Content-Encoding {encoding[:40]!r} is not accepted; send the body uncompressed (no "
                    "Content-Encoding header, or identity)",
                    request_id=request_id,
                )(scope, receive, send_with_id)
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
                    await error_response(status, kind, f"{message} ({self.hard_timeout_s - 1:g} s, --request-timeout-s)",
                                         request_id=request_id)(scope, receive, send_with_id)
                    return
                # A bug of ours, not the caller's: logged with its traceback, answered as JSON
                # with the request id (by us, so the X-Request-ID header is on it too).
                log.exception("request %s failed", request_id)
                if too_late:
                    raise
                message = f"internal error: {type(exc).__name__}; quote the request id when reporting it"
                await error_response(500, "internal_error", message, request_id=request_id)(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            self.metrics.requests.labels(route, str(status_holder["status"])).inc()
            self.metrics.request_latency.labels(route).observe(elapsed)
            if route not in UNLOGGED_ROUTES:  # probes and scrapes would drown the log
                fields = {k: state[k] for k in ("model", "items", "tokens", "key_id") if k in state}
                request_log.info(
                    "request", extra=dict(
                        request_id=request_id, method=scope.get("method"), route=scope["path"][:200],
                        status=status_holder["status"], latency_ms=round(1000 * elapsed, 1), **fields,
                    ),
                )

    async def _refuse_too_large(self, scope, receive, send, request_id: str) -> None:
        self.metrics.rejections.labels("body_too_large").inc()
        await error_response(413, "body_too_large", self._too_large_message(), request_id=request_id)(scope, receive, send)

    def _too_large_message(self) -> str:
        return (
            f"request body is over the limit of {self.max_body_bytes} bytes; send fewer items per "
            "request (the client splits large inputs into chunks) or raise --max-body-bytes"
        )


class HeadMiddleware:
    """Pure ASGI, inside the guard and outside the access check: a HEAD request to a route that
    serves GET but not HEAD (FastAPI's routes serve only the methods they declare) is passed on as
    that GET, and its answer goes out with the same status and headers (Content-Length
    included) and no body, as Starlette's own routes and TEI answer HEAD. The access check sees
    the GET, so HEAD needs the scope GET needs. A route whose GET changes something (the table's
    ``head=False``: leasing a label task) is left to answer 405: a probe must not change state.

    ``routes``: the app's routes (``app.router.routes``), matched as the router matches them."""

    def __init__(self, app, *, routes: list[BaseRoute]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD" or not self._runs_as_get(scope):
            return await self.app(scope, receive, send)

        async def send_without_body(message):
            if message["type"] == "http.response.body" and message.get("body"):
                message = {**message, "body": b""}
            await send(message)

        # A copy: the server keeps its own scope saying HEAD (uvicorn sends no body for it either).
        await self.app({**scope, "method": "GET"}, receive, send_without_body)

    def _runs_as_get(self, scope) -> bool:
        if scope["path"] in NO_HEAD_ROUTES:
            return False
        as_get = {**scope, "method": "GET"}
        for route in self.routes:  # the first route matching the path decides, as in the router
            if route.matches(scope)[0] is Match.FULL:
                return False  # it serves HEAD itself (Starlette's routes: the docs)
            if route.matches(as_get)[0] is Match.FULL:
                return True
        return False


class AccessMiddleware:
    """Pure ASGI, inside the guard: checks the Bearer key (service/auth.py) and the scope its
    route needs (service/routes.py), and the caller's rate limit, before any body is read. Open
    routes pass without a key."""

    def __init__(self, app, *, keys: KeyRing, limiter: RateLimiter | None, metrics: ServiceMetrics) -> None:
        self.app = app
        self.keys = keys
        self.limiter = limiter
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        authorizations = sum(1 for name, _ in scope.get("headers") or [] if name == b"authorization")
        if authorizations > 1:
            self.metrics.rejections.labels("ambiguous_authorization").inc()
            refusal = error_response(
                400, "ambiguous_authorization",
                f"the request has {authorizations} Authorization headers; send exactly one ('Authorization: Bearer <key>')",
                request_id=state.get("request_id"),
            )
            return await refusal(scope, receive, send)
        if scope["path"] in OPEN_ROUTES:
            return await self.app(scope, receive, send)
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
                refusal = error_response(
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
            return error_response(
                401, "unauthenticated", "this route needs an API key: send the header 'Authorization: Bearer <key>' "
                "(RewardClient(api_key=...) does)", request_id=request_id, headers={"WWW-Authenticate": "Bearer"},
            )
        key = self.keys.find(presented.strip())
        if key is None:
            self.metrics.rejections.labels("unauthenticated").inc()
            return error_response(
                401, "unauthenticated", "the API key is not valid for this service; check the key you were given",
                request_id=request_id, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        state["key_id"] = key.key_id
        needed = required_scope(scope["path"], scope.get("method", "GET"))
        if needed is not None and needed not in key.scopes:
            self.metrics.rejections.labels("forbidden").inc()
            return error_response(
                403, "forbidden", f"{scope['path']} needs the {needed!r} scope and this key has only "
                f"{', '.join(sorted(key.scopes))}; ask the operator for a key with {needed!r}",
                request_id=request_id,
            )
        return None
