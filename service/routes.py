"""The one table of the service's routes and what each needs: the scope of API key
(service/auth.py explains the scopes), whether it counts against the rate limit, whether it has
its own label in the request metrics, whether each request to it is logged, and whether a HEAD
may run its GET.

The access middleware, the guard's metrics and its request log all read the sets derived here,
and ``check_served`` (called by ``create_app``) fails the start when the app serves a route this
table does not describe or the table names one the app does not serve, so they cannot disagree.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Route:
    path: str  # as the router declares it; a {param} segment matches anything between its prefix and suffix
    scope: str | None  # the scope a key needs; None: open, no key asked for
    method_scopes: dict[str, str] = field(default_factory=dict)  # where one path serves both: method -> scope
    rate_limited: bool = False  # does model work, so counts against the rate limit
    metered: bool = True  # has its own route label in reward_requests (else "other")
    logged: bool = True  # each request logged (probes and scrapes would drown the log)
    # HEAD runs the route's GET and drops the body (HeadMiddleware). False for a GET that changes
    # something, which a probe's HEAD must not do: such a route answers HEAD 405.
    head: bool = True

    @property
    def templated(self) -> bool:
        return "{" in self.path

    def matches(self, path: str) -> bool:
        if not self.templated:
            return path == self.path
        prefix, _, rest = self.path.partition("{")
        suffix = rest.partition("}")[2]
        return path.startswith(prefix) and path.endswith(suffix)


ROUTES: tuple[Route, ...] = (
    # Scoring (routers/scoring.py) and the OpenRLHF / vLLM / slime / TEI compatible ones (routers/compat.py).
    Route("/v1/score", "score", rate_limited=True),
    Route("/v1/compare", "score", rate_limited=True),
    Route("/get_reward", "score", rate_limited=True),
    Route("/classify", "score", rate_limited=True),
    Route("/pooling", "score", rate_limited=True),
    Route("/slime_reward", "score", rate_limited=True),
    Route("/predict", "score", rate_limited=True),  # text-embeddings-inference
    Route("/rerank", "score", rate_limited=True),
    # Models (routers/models.py).
    Route("/v1/models", "score"),
    Route("/v1/models/{name}/reload", "admin", metered=False),
    # The comparison loop (routers/comparisons.py). Reading everyone's comparisons is for
    # operators, adding one is not. The labelling page holds no data: its requests carry the
    # key the person types in.
    Route("/v1/comparisons", "score", method_scopes={"GET": "admin"}),
    Route("/v1/comparisons/export", "admin"),
    Route("/v1/label/tasks", "score"),
    Route("/v1/label/tasks/next", "score", head=False),  # its GET leases a task
    Route("/label", None),
    # Health (routers/health.py): probes reach them without a key; /metrics shows traffic and
    # model names, so it is for operators.
    Route("/healthz", None, logged=False),
    Route("/readyz", None, logged=False),
    Route("/metrics", "admin", logged=False),
    # FastAPI's own documentation routes, open so people can read the API.
    Route("/openapi.json", None, metered=False),
    Route("/docs", None, metered=False),
    Route("/docs/oauth2-redirect", None, metered=False),
    Route("/redoc", None, metered=False),
)

OPEN_ROUTES = frozenset(r.path for r in ROUTES if r.scope is None)
RATE_LIMITED_ROUTES = frozenset(r.path for r in ROUTES if r.rate_limited)
METERED_ROUTES = frozenset(r.path for r in ROUTES if r.metered and not r.templated)
UNLOGGED_ROUTES = frozenset(r.path for r in ROUTES if not r.logged)
NO_HEAD_ROUTES = frozenset(r.path for r in ROUTES if not r.head)
_EXACT = {r.path: r for r in ROUTES if not r.templated}
_TEMPLATED = [r for r in ROUTES if r.templated]


def required_scope(path: str, method: str = "GET") -> str | None:
    """The scope a request needs. A path not in the table (an unknown one, say) needs a valid key
    of any scope: None. HEAD needs what GET needs (it runs the GET)."""
    route = _EXACT.get(path) or next((r for r in _TEMPLATED if r.matches(path)), None)
    if route is None:
        return None
    method = "GET" if method.upper() == "HEAD" else method.upper()
    return route.method_scopes.get(method, route.scope)


def check_served(paths: Iterable[str]) -> None:
    """Raise when the paths an app serves and this table differ."""
    served, declared = set(paths), {r.path for r in ROUTES}
    if served != declared:
        raise RuntimeError(
            f"service/routes.py and the routers disagree: served but not declared {sorted(served - declared)}, "
            f"declared but not served {sorted(declared - served)}"
        )
