"""The HTTP server around the app: uvicorn, with a drain period on SIGTERM.

Stopping, in order: the first SIGTERM (or Ctrl-C) flips /readyz to 503 and keeps serving for
``--shutdown-drain-s`` so a load balancer sees it and stops sending traffic; then uvicorn stops
accepting connections and waits for the requests in flight to be answered (bounded by the
request deadline); then the app's lifespan ends, letting the batchers finish what they hold.
A second signal stops at once.
"""

from __future__ import annotations

import time

import uvicorn
from fastapi import FastAPI

from .settings import ServiceSettings


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_s: float) -> None:
        super().__init__(config)
        self.lifecycle = app.state.lifecycle
        self.drain_s = drain_s
        self.drain_started: float | None = None

    def handle_exit(self, sig, frame) -> None:
        if self.drain_started is None and not self.should_exit:
            # Not recorded in uvicorn's captured signals: a drained shutdown is a clean exit (0).
            self.drain_started = time.monotonic()
            self.lifecycle.begin_drain()
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_started is not None and time.monotonic() - self.drain_started >= self.drain_s:
            return True
        return await super().on_tick(counter)


def server_for(app: FastAPI, settings: ServiceSettings, *, host: str | None = None, port: int | None = None) -> DrainingServer:
    config = uvicorn.Config(
        app, host=host or settings.host, port=settings.port if port is None else port,
        log_config=None,  # our handlers (service/logs.py), not uvicorn's
        log_level=settings.log_level.lower(), access_log=False,  # the guard middleware logs each request
        # Requests in flight at shutdown get until their deadline, plus a little to write the answer.
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
    )
    return DrainingServer(config, app, settings.shutdown_drain_s)
