"""Probes and the scrape: ``GET /healthz`` (liveness), ``GET /readyz`` (readiness: models warmed up
and not draining; see service/lifecycle.py) and ``GET /metrics`` (Prometheus). HEAD, which some
balancers' health checks send, is answered for every GET route by ``HeadMiddleware``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..errors import NOT_READY_ERRORS, error_response
from ..lifecycle import Lifecycle
from ..metrics import ServiceMetrics
from ..registry import ModelRegistry
from . import OffLoopBodyRoute

router = APIRouter(tags=["health"], route_class=OffLoopBodyRoute)


@router.get("/healthz")
async def healthz() -> dict[str, Any]:
    """The process is up (liveness)."""
    return {"status": "ok"}


@router.get("/readyz", responses=NOT_READY_ERRORS)
async def readyz(request: Request):
    """Models are loaded and warmed up, and the service is not stopping (readiness)."""
    lifecycle: Lifecycle = request.app.state.lifecycle
    if not lifecycle.ready:
        why = "the service is stopping (draining)" if lifecycle.draining else "models are loading"
        return error_response(503, "not_ready", why, request)
    registry: ModelRegistry = request.app.state.registry
    return {"status": "ready", "models": [m.display_name for m in registry.list()]}


@router.get("/metrics", response_class=Response)
async def prometheus_metrics(request: Request) -> Response:
    registry: ModelRegistry = request.app.state.registry
    metrics: ServiceMetrics = request.app.state.metrics
    for m in registry.list():
        if m.batcher is not None:
            metrics.queue_depth.labels(m.name).set(m.batcher.queue_depth)
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
