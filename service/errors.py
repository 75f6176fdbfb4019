"""The error model: every refusal is ``{"error": {code, type, message, request_id, details?}}``
(``client.protocol.ErrorResponse``) with a message saying what to fix.

- ``APIError``: raised by routes and the inference path; the handler turns it into that JSON.
- ``error_response``: the JSON response itself, for the middleware (which answers before any
  route runs) and the handlers.
- ``error_responses``: the OpenAPI ``responses=`` entries of the routers, from the one list of
  statuses each kind of route can answer with.
- ``install_error_handlers``: validation errors, APIErrors and Starlette's HTTP errors (404, 405,
  unreadable body) all answered in that shape.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from client.protocol import ErrorResponse, error_path

from .metrics import ServiceMetrics
from .routes import ROUTES


class APIError(Exception):
    """A request the service refuses, with the status and a message saying what to fix."""

    def __init__(self, status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type_, message, headers


def error_response(
    status: int, type_: str, message: str, request: Request | None = None, details=None, request_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    if request is not None:
        request_id = getattr(request.state, "request_id", None)
    body = ErrorResponse(error=dict(code=status, type=type_, message=message, request_id=request_id, details=details))
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


def error_responses(*statuses: int) -> dict[int, dict]:
    """OpenAPI ``responses=`` documenting ``statuses`` as ErrorResponse bodies."""
    return {status: {"model": ErrorResponse} for status in statuses}


# The refusals any scoring route can give (auth, limits, deadline, failed forward).
SCORING_ERRORS = error_responses(400, 401, 403, 404, 408, 413, 415, 422, 429, 500, 503, 504)
# Reload: the scoring refusals but the deadline (a reload is not bounded by it).
RELOAD_ERRORS = error_responses(400, 401, 403, 404, 408, 413, 415, 422, 429, 500, 503)
# The comparison store's routes: no model work, so no queue or deadline; 409 for a reused key.
STORE_ERRORS = error_responses(400, 401, 403, 404, 409, 413, 415, 422, 503)
NOT_READY_ERRORS = error_responses(503)


def _validation_message(errors: list[dict]) -> str:
    lines = []
    for err in errors[:5]:
        loc, kind, msg = tuple(err.get("loc", ())), err.get("type", ""), err.get("msg", "")
        where = error_path(loc)
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


def shown(name: str, limit: int = 200) -> str:
    """A name the caller sent, quoted for an error message: cut to ``limit`` characters (with its
    length), so a huge one is not echoed back whole."""
    if len(name) <= limit:
        return repr(name)
    return f"{name[:limit]!r}... ({len(name)} characters)"


def _unreadable_body_message(cause: BaseException | None) -> str:
    """Why FastAPI could not read a body as JSON (it answers them all "There was an error parsing
    the body"): not UTF-8, nested too deeply for the parser, a number too long to convert."""
    if isinstance(cause, UnicodeDecodeError):
        return (
            f"the body is not UTF-8 text (byte 0x{cause.object[cause.start]:02x} at position {cause.start} is not valid "
            "UTF-8); send the JSON encoded as UTF-8"
        )
    if isinstance(cause, RecursionError):
        return "the body's JSON is nested too deeply to read; no request of this API nests more than a few levels"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return "the body holds a number with thousands of digits, which is not read; send numbers of ordinary size"
    return "the body could not be read as JSON; send a UTF-8 JSON object"


def install_error_handlers(app: FastAPI, metrics: ServiceMetrics) -> None:
    """Answer validation errors, APIErrors and HTTP errors in the error shape, counting refusals."""

    @app.exception_handler(RequestValidationError)
    async def _on_validation_error(request: Request, exc: RequestValidationError):
        metrics.rejections.labels("validation").inc()
        errors = exc.errors()
        details = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in errors[:20]]
        return error_response(422, "validation_error", _validation_message(errors), request, details)

    @app.exception_handler(APIError)
    async def _on_api_error(request: Request, exc: APIError):
        if exc.status != 500:  # a failure of ours, counted as reward_forward_failures, not a refusal
            metrics.rejections.labels(exc.type).inc()
        return error_response(exc.status, exc.type, exc.message, request, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = str(exc.detail)
        # The path as sent: request.url would read "//v1/score" as the host "v1" and the path "/score".
        path = request.scope["path"][:200]
        if exc.status_code == 400 and "parsing the body" in message:
            kind, message = "invalid_body", _unreadable_body_message(exc.__cause__)
        elif exc.status_code == 404:
            message = f"no route {request.method} {path}; see /docs for the API"
            bare = path.rstrip("/")
            if bare != path and any(route.matches(bare) for route in ROUTES):
                message = f"no route {request.method} {path}; the route is {bare}, without the trailing slash"
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            message = f"{path} does not take {request.method}; send {' or '.join(allowed.split(', ')) or 'another method'}"
        return error_response(exc.status_code, kind, message, request, headers=exc.headers)
