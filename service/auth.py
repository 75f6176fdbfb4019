"""Who may call what: API keys with scopes, per-key rate limits, and the loopback-only rule.

Keys are kept as SHA-256 digests only; a presented key is hashed and compared with
``hmac.compare_digest`` against every known digest, so neither the comparison time nor the
process memory gives a key away. Keys are never logged: logs carry ``key_id``, the first 8 hex
characters of the digest.

Scopes:

- ``score``: the scoring routes (``/v1/score``, ``/v1/compare``) and ``/v1/models``.
- ``admin``: operator routes: ``/metrics`` (traffic and model names), reload, and reading the
  stored comparisons (``GET /v1/comparisons``, ``/v1/comparisons/export``).

Labellers and the jobs that queue label tasks need ``score``: ``POST /v1/comparisons``,
``/v1/label/tasks`` and ``/v1/label/tasks/next``. The labelling page ``/label`` is open (it holds
no data; its requests carry the key the person types in).

``/healthz``, ``/readyz``, ``/docs`` and ``/openapi.json`` stay open so probes and people can
reach them without a key.

Which route needs which scope, and which count against the rate limit, is declared once in
``service/routes.py``; ``service/middleware.py`` (``AccessMiddleware``) enforces it with the keys
and the limiter defined here.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import time
from dataclasses import dataclass
from pathlib import Path

SCOPES = ("score", "admin")


class KeyFileError(ValueError):
    """An API key entry that cannot be understood; the message says which and why."""


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    digest: str  # SHA-256 hex of the key
    scopes: frozenset[str]

    @property
    def key_id(self) -> str:
        return self.digest[:8]


def parse_key_entry(entry: str, where: str = "key") -> ApiKey:
    """``KEY`` or ``sha256=HEX``, optionally followed by ``:scope,scope`` (default: score)."""
    secret, sep, scope_text = entry.strip().partition(":")
    scopes = frozenset(s.strip() for s in scope_text.split(",") if s.strip()) if sep else frozenset({"score"})
    unknown = sorted(scopes - set(SCOPES))
    if unknown or not scopes:
        raise KeyFileError(f"{where}: scopes must be among {', '.join(SCOPES)}, got {scope_text!r}")
    if secret.startswith("sha256="):
        digest = secret[len("sha256="):].lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise KeyFileError(f"{where}: sha256= must be followed by 64 hex characters (printf %s KEY | sha256sum)")
        return ApiKey(digest, scopes)
    if len(secret) < 16 or any(c.isspace() for c in secret):
        raise KeyFileError(f"{where}: a key needs at least 16 characters and no spaces (python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return ApiKey(key_digest(secret), scopes)


def load_keys(api_key: str | None, api_keys_file: Path | None, api_keys: str | None = None) -> list[ApiKey]:
    """The keys of ``--api-key`` (both scopes), ``--api-keys`` (entries separated by white space)
    and ``--api-keys-file`` (one entry per line, ``#`` comments)."""
    keys: list[ApiKey] = []
    if api_key:
        keys.append(parse_key_entry(f"{api_key}:{','.join(SCOPES)}", "--api-key"))
    for number, entry in enumerate((api_keys or "").split(), 1):
        keys.append(parse_key_entry(entry, f"--api-keys entry {number}"))
    if api_keys_file is not None:
        try:
            lines = Path(api_keys_file).read_text().splitlines()
        except OSError as exc:
            raise KeyFileError(f"cannot read the API keys file {api_keys_file}: {exc.strerror}") from exc
        for number, line in enumerate(lines, 1):
            line = line.split("#", 1)[0].strip()
            if line:
                keys.append(parse_key_entry(line, f"{api_keys_file}:{number}"))
        if not keys:
            raise KeyFileError(f"the API keys file {api_keys_file} holds no keys")
    return keys


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


class KeyRing:
    def __init__(self, keys: list[ApiKey]) -> None:
        self.keys = keys

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def find(self, presented: str) -> ApiKey | None:
        digest = key_digest(presented)
        found = None
        for key in self.keys:  # no early exit: the time taken does not depend on which key matched
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found


class RateLimiter:
    """A token bucket per caller: ``rate`` requests per second on average, ``burst`` at once."""

    def __init__(self, rate: float, burst: int | None = None, max_callers: int = 100_000) -> None:
        self.rate = rate
        self.burst = float(burst or max(1, math.ceil(2 * rate)))
        self.max_callers = max_callers
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, last refill time)

    def acquire(self, caller: str, now: float | None = None) -> float:
        """0 when the request may go ahead, else the seconds until it would."""
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(caller, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1:
            if len(self._buckets) >= self.max_callers and caller not in self._buckets:
                self._buckets.clear()  # bounded memory under many client addresses; full buckets are the default anyway
            self._buckets[caller] = (tokens - 1, now)
            return 0.0
        self._buckets[caller] = (tokens, now)
        return (1 - tokens) / self.rate
