"""Start the real service and stop it: `reward serve` in a subprocess on 127.0.0.1 and a free
port, as a user would, or the same app and server in a thread of the test process
(``in_process_server``) when a test needs to reach into the backend (fault injection)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # bench/ imports this module too

from trainer.loop import wait_until_ready  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(
        self, args: list[str], log_path: Path, env: dict[str, str] | None = None, entry: list[str] | None = None,
        port: int | None = None,
    ) -> None:
        """``entry``: the program to run instead of ``python -m reward_cli`` (a test wrapper);
        ``port``: a fixed port (to restart a server where its clients expect it)."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        entry = entry or ["-m", "reward_cli"]
        command = [sys.executable, *entry, "serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self._log = open(log_path, "wb")
        # No drain pause on stop unless a test asks for one: it only slows the suite down.
        self.process = subprocess.Popen(
            command, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "REWARD_SHUTDOWN_DRAIN_S": "0", **(env or {})},
        )

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Until /readyz answers 200 (the loop's and the demo's own wait); the error carries the log."""
        try:
            wait_until_ready(self.url, self.process, timeout, self.log_path)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}:\n{self.logs()}") from None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@contextlib.contextmanager
def running_server(
    args: list[str], log_path: Path, env: dict[str, str] | None = None, entry: list[str] | None = None,
    port: int | None = None,
) -> Iterator[ServerProcess]:
    with _serving(lambda: [ServerProcess(args, log_path, env, entry, port)]) as (server,):
        yield server


@contextlib.contextmanager
def running_servers(*specs: tuple[list[str], Path]) -> Iterator[list[ServerProcess]]:
    """Several servers, each ``(args, log_path)`` as :func:`running_server` takes them, started
    together so their start-ups overlap; yielded once all are ready, stopped together."""
    with _serving(lambda: (ServerProcess(args, log_path) for args, log_path in specs)) as servers:
        yield servers


@contextlib.contextmanager
def _serving(start) -> Iterator[list[ServerProcess]]:
    """Start the servers ``start()`` yields (one after another, without waiting), wait until every
    one is ready, and stop all that started, also when a later one fails to start."""
    servers: list[ServerProcess] = []
    try:
        for server in start():
            servers.append(server)
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop()


@contextlib.contextmanager
def in_process_server(app, settings) -> Iterator[str]:
    """Serve ``app`` with the service's own server class in a background thread; yields its URL."""
    from service.server import server_for

    server = server_for(app, settings, host="127.0.0.1", port=free_port())
    thread = threading.Thread(target=server.run, name="in-process-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("in-process server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
