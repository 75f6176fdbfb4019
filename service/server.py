"""The HTTP server around the app: uvicorn, with a drain period on SIGTERM.

Stopping, in order: the first SIGTERM (or Ctrl-C) flips /readyz to 503 and keeps serving for
``--shutdown-drain-s`` so a load balancer sees it and stops sending traffic; then uvicorn stops
accepting connections and waits for the requests in flight to be answered (bounded by the
request deadline); then the app's lifespan ends, letting the batchers finish what they hold.
A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import time

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from .settings import ServiceSettings


class OneWriteAnswerTransport:
    """A connection's transport whose writes within one turn of the event loop go out as one.

    uvicorn writes an answer's status line and headers, then its body, in two calls. A replica
    killed between them (SIGKILL, the OOM killer) leaves an answer whose headers are out and whose
    body never comes; a proxy in front has already passed the headers on and cannot retry it. Sent
    as one write, a small answer leaves whole or not at all, and an unanswered request is one a
    balancer can send to another replica. The writes are joined and sent on the next turn of the
    loop (``call_soon``), before it waits on any socket; closing sends what is held first."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._held:
            self._loop.call_soon(self._send_held)
        self._held.append(bytes(data))

    def _send_held(self) -> None:
        if self._held:
            data = b"".join(self._held)
            self._held.clear()
            self._transport.write(data)

    def close(self) -> None:
        self._send_held()
        self._transport.close()

    def abort(self) -> None:
        self._held.clear()
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._held))

    def __getattr__(self, name: str):  # everything else is the transport's own
        return getattr(self._transport, name)


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with each answer sent in one write (:class:`OneWriteAnswerTransport`)
    and a header-read timeout, which uvicorn lacks: a connection that
    has not sent a complete request header ``header_timeout_s`` after it opened (or after the
    first bytes of its next request) is closed. Without it a client can hold sockets open for
    ever by never finishing its headers. The body has its own bound (the request deadline,
    GuardMiddleware's 408).

    Between requests the connection is idle, and only uvicorn's keep-alive timeout applies:
    closing an idle pooled connection early races the client reusing it (the request lands on a
    socket being closed and comes back as a connection reset), so idle connections are closed by
    one timer whose default outlasts the common clients' pool expiry."""

    header_timeout_s = 10.0  # set per server by ``server_for`` (a subclass per settings)

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # flow control keeps the real transport
        self.transport = OneWriteAnswerTransport(transport, self.loop)  # type: ignore[assignment]
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_headers()

    def on_response_complete(self) -> None:
        # Idle now (no header timer runs while a request is answered): only the keep-alive timer,
        # until the next request's bytes arrive (data_received). super() starts a pipelined
        # request already buffered; part of its header may be here already.
        super().on_response_complete()
        if self.conn.trailing_data[0]:
            self._watch_headers()

    def connection_lost(self, exc) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _watch_headers(self) -> None:
        # IDLE: h11 has not read a whole request line and header block of the next request.
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._arm_header_timer()
        else:
            self._cancel_header_timer()

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            if self.cycle is None or self.cycle.response_complete:
                self.transport.close()


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
        http=type("Protocol", (HeaderTimeoutProtocol,), {"header_timeout_s": settings.header_timeout_s}),
        timeout_keep_alive=settings.keep_alive_timeout_s,
    )
    return DrainingServer(config, app, settings.shutdown_drain_s)
