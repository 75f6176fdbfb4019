"""The image's HEALTHCHECK: GET /healthz where the server listens, exit 0 when it answers 200.

Where it listens: the --host/--port given to `docker run` (flags after the entrypoint's, so the
last one wins, as in argparse), read from the server's command line (/proc/1/cmdline; under
`docker run --init` PID 1 is the init, whose command line holds the server's); else
REWARD_HOST/REWARD_PORT; else 127.0.0.1:8000. A wildcard host (0.0.0.0, ::) is probed on
loopback. Standard library only: it runs in the image's Python, outside the service."""

from __future__ import annotations

import os
import sys
import urllib.request


def flag_value(args: list[str], flag: str) -> str | None:
    """The last value of ``flag`` (``--port 9000``, ``--port=9000`` or an unambiguous prefix
    such as ``--po 9000``, which argparse accepts too)."""
    value = None
    for index, arg in enumerate(args):
        name, eq, inline = arg.partition("=")
        if len(name) >= 4 and flag.startswith(name) and name.startswith("--"):
            if eq:
                value = inline
            elif index + 1 < len(args):
                value = args[index + 1]
    return value


def server_args() -> list[str]:
    try:
        with open("/proc/1/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def probe_url(args: list[str], env: dict[str, str]) -> str:
    host = flag_value(args, "--host") or env.get("REWARD_HOST") or "127.0.0.1"
    port = flag_value(args, "--port") or env.get("REWARD_PORT") or "8000"
    if host in ("0.0.0.0", "::", "[::]", ""):
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{int(port)}/healthz"


def main() -> int:
    url = probe_url(server_args(), dict(os.environ))
    try:
        with urllib.request.urlopen(url, timeout=4) as answer:
            return 0 if answer.status == 200 else 1
    except Exception as exc:  # any failure is "unhealthy"; say why in `docker inspect`
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
