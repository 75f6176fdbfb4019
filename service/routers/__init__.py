"""The HTTP routes, one router per concern. Each route is a module-level function that takes
what it needs from ``request.app.state`` (the registry, the inference path, settings, metrics,
the comparison store) and only validates and shapes: scoring goes through ``service/inference.py``.

- ``scoring``: /v1/score, /v1/compare
- ``compat``: /get_reward (OpenRLHF), /classify and /pooling (vLLM, as verl calls them)
- ``models``: /v1/models and the hot reload
- ``comparisons``: the comparison store, the labelling queue and the /label page
- ``health``: /healthz, /readyz, /metrics

Every path served is declared, with its scope and limits, in ``service/routes.py``.

``strict_query`` (a dependency of every route, set on the app) refuses a query parameter that a
``/v1`` route does not take, or one given twice, as their JSON bodies refuse an unknown field.

``OffLoopBodyRoute`` (every router's route class) parses and validates a large JSON body in a
worker thread instead of on the event loop.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Coroutine
from email.message import Message
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from client.protocol import API_VERSION


def _query_names(route: APIRoute) -> frozenset[str]:
    """The query parameters a route declares, its dependencies' included."""
    names: set[str] = set()
    dependants = [route.dependant]
    while dependants:
        dependant = dependants.pop()
        names.update(p.alias for p in dependant.query_params)
        dependants.extend(dependant.dependencies)
    return frozenset(names)


async def strict_query(request: Request) -> None:  # async: no trip through the thread pool
    """A ``/v1`` route takes the query parameters it declares, each once: an unknown one (a typo,
    or a body field such as ``model`` put in the URL) was ignored, and of one given twice the
    last was read, so the caller's request was not the one answered. The trainers' routes ignore
    what they do not read, query and body alike, as the servers they imitate."""
    if not request.scope.get("query_string"):  # most requests (every scoring body): nothing to check
        return
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or not route.path.startswith(f"/{API_VERSION}/"):
        return
    taken = _query_names(route)
    errors = []
    for name, count in Counter(k for k, _ in request.query_params.multi_items()).items():
        where = ("query", name if len(name) <= 100 else name[:100] + "...")
        if name not in taken:
            takes = ", ".join(sorted(taken)) if taken else "no query parameters (its input is the JSON body)"
            errors.append({"type": "unknown_query_parameter", "loc": where,
                           "msg": f"unknown query parameter; remove it ({route.path} takes {takes})"})
        elif count > 1:
            errors.append({"type": "repeated_query_parameter", "loc": where, "msg": f"given {count} times; give it once"})
    if errors:
        raise RequestValidationError(errors)


# A body up to this size is parsed and validated on the event loop, as FastAPI does: a worker
# thread's round trip would cost more than the work. Larger ones go to a thread, so the loop (every
# other request, /healthz included) is held for the thread's share of the GIL, not for the whole
# validation. Bodies of many tiny objects validate slowest per byte; one this size holds the loop
# for milliseconds.
OFF_LOOP_BODY_BYTES = 64 * 1024


def _is_json(request: Request) -> bool:
    """FastAPI's test for a body it parses as JSON (application/json or application/*+json)."""
    content_type = request.headers.get("content-type")
    if not content_type:
        return False
    message = Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


class OffLoopBodyRoute(APIRoute):
    """A route whose JSON body, when larger than ``OFF_LOOP_BODY_BYTES``, is parsed and validated
    in a worker thread before FastAPI's own handling runs.

    FastAPI parses and validates a body on the event loop, so a large body of many small objects
    (conversations of thousands of short messages) held every other request meanwhile
    (docs/security.md has the measurements). Here the body's one
    model field validates the parsed body exactly as FastAPI would (same errors, same ``body``
    location) off the loop; the validated model is left where FastAPI reads the parsed JSON
    (Starlette's request cache), and FastAPI's own validation of a model instance returns it as is.
    A body that is not valid JSON is left to FastAPI, which reports it as before."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        params = self.dependant.body_params
        if len(params) != 1 or self.body_field is not params[0]:
            return handler  # no body, or several embedded fields: FastAPI's own path
        field = self.body_field

        def validate(raw: bytes) -> Any:
            try:
                parsed = json.loads(raw)
            except (ValueError, RecursionError):
                return None
            value, errors = field.validate(parsed, {}, loc=("body",))
            if errors:
                raise RequestValidationError(errors, body=parsed)
            return value

        async def off_loop_handler(request: Request) -> Response:
            raw = await request.body()
            if len(raw) > OFF_LOOP_BODY_BYTES and _is_json(request):
                value = await run_in_threadpool(validate, raw)
                if value is not None:
                    request._json = value  # what request.json() returns to FastAPI
            return await handler(request)

        return off_loop_handler
