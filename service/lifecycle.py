"""Readiness of one service instance, shared by the app's lifespan (ready once the models are
warmed up), ``/readyz`` (routers/health.py) and the server's SIGTERM handling (server.py)."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


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
