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
"""

from __future__ import annotations

from collections import Counter

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

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
