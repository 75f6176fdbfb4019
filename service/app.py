"""The ASGI app, assembled from the service's layers; nothing here handles a request itself.

- ``settings.py``: the settings; ``registry.py``: the served models (loading, warm-up, reload);
  ``inference.py``: the one scoring path (tokeniser pool, deadline, backpressure);
  ``routers/``: the routes, which only validate and shape; ``routes.py``: the table of every
  route's scope and limits; ``middleware.py``: request ids, body and deadline limits, metrics,
  logs, HEAD on GET routes, API keys and rate limits; ``errors.py``: the error model and its handlers;
  ``lifecycle.py``: readiness and drain.

A request: GuardMiddleware -> HeadMiddleware -> AccessMiddleware -> a router -> Inference -> the model's batcher
(``batcher.py``) -> its backend (``reward_core.backends``).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from starlette.routing import Route

from client.protocol import API_REVISION
from reward_core.store import ComparisonStore

from .auth import KeyRing, RateLimiter
from .errors import install_error_handlers
from .inference import Inference
from .lifecycle import Lifecycle
from .metrics import ServiceMetrics
from .middleware import AccessMiddleware, GuardMiddleware, HeadMiddleware
from .registry import ModelRegistry, ServedModel, load_models
from .routers import comparisons, compat, health, scoring, strict_query
from .routers import models as models_router
from .routes import check_served
from .score_cache import ScoreCache
from .settings import ServiceSettings

log = logging.getLogger(__name__)


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
    score_cache = ScoreCache(settings.score_cache_size, metrics) if settings.score_cache_size else None
    registry = ModelRegistry(models, settings, metrics, score_cache)
    inference = Inference(registry, settings, metrics)
    lifecycle = Lifecycle()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await registry.start(inference.tokenize_pool)
        lifecycle.ready = True
        log.info("ready: %s", ", ".join(m.display_name for m in registry.list()))
        try:
            yield
        finally:
            # The server has stopped accepting and waited for its requests; whatever is still
            # queued gets until its deadline to run.
            lifecycle.begin_drain()
            await registry.stop(drain_timeout_s=settings.request_timeout_s)
            inference.shutdown()

    app = FastAPI(
        title="Reward model service",
        version=API_REVISION,  # the protocol revision within /v1 (client/protocol.py)
        summary="Scores (prompt, response) pairs with reward models, batched across requests.",
        lifespan=lifespan,
        # "/v1/score/" is a 404 naming "/v1/score", not a 307 to an absolute URL built from the
        # Host header (another host, or http:// behind a TLS proxy) that a client may follow.
        redirect_slashes=False,
        # A /v1 route refuses a query parameter it does not take, or one given twice (422).
        dependencies=[Depends(strict_query)],
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.lifecycle = lifecycle
    app.state.registry = registry
    app.state.inference = inference
    app.state.keys = keys  # with API keys on, reload is an `admin`-scope route (AccessMiddleware)
    if store is None and settings.store:
        store = ComparisonStore(settings.store)
    app.state.store = store
    app.state.labellers = comparisons.allowed_labellers(settings.labellers)
    install_error_handlers(app, metrics)

    routers = (scoring.router, models_router.router, health.router, compat.router, comparisons.router)
    for router in routers:
        app.include_router(router)
    # FastAPI's own (docs) routes and the routers' routes, against the table in routes.py.
    check_served([r.path for r in app.routes if isinstance(r, Route)] + [r.path for rt in routers for r in rt.routes])

    limiter = RateLimiter(settings.rate_limit_rps, settings.rate_limit_burst) if settings.rate_limit_rps else None
    # Starlette wraps in reverse order of adding: the guard is outermost, so every refusal by the
    # access check also gets a request id, a metric and a log line.
    app.add_middleware(AccessMiddleware, keys=keys, limiter=limiter, metrics=metrics)
    # HEAD on every GET route, here rather than per route; inside the guard (which logs it as
    # HEAD), outside the access check (which checks it as the GET it runs).
    app.add_middleware(HeadMiddleware, routes=app.router.routes)
    app.add_middleware(
        GuardMiddleware, max_body_bytes=settings.max_body_bytes, request_timeout_s=settings.request_timeout_s, metrics=metrics
    )
    return app
