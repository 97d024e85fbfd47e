"""The HTTP front door's checks, before any route runs: API keys, the tenant a key stands for,
the per-key request rate, and the request body's size.

Why an ASGI middleware and not a route dependency: a body over the limit must be refused before
it is read (413 from ``Content-Length``, or as soon as a chunked body passes the limit), and an
unauthenticated client must not reach body parsing at all.

Tenancy: a stream belongs to the tenant of the key that created it. The tenant id is a hash of
the key, so the store never holds a key; keys are compared in constant time and never logged.
With no key configured every client is the anonymous tenant "", and only loopback clients are
served unless the operator said ``insecure``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import math
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ApiGate", "GateSettings", "TokenBucket", "gate_settings", "parse_keys", "tenant", "tenant_of", "OPEN_PATHS"]

# served without a key: the health check and the web console's static files (exact paths,
# pipeline.api.console.CONSOLE_FILES); the console's own API calls carry the key
OPEN_PATHS = frozenset({"/healthz", "/", "/console/console.js", "/console/console.css"})


def tenant_of(key: str) -> str:
    """The tenant id of a key: stable, not reversible, safe to store and show."""
    return "t-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def parse_keys(raw: str | Iterable[str] | None) -> tuple[str, ...]:
    """Keys from ``OMNIZIP_API_KEYS`` (comma-separated) or a list; blank entries dropped. A key
    must be 16-256 printable ASCII characters without spaces or commas (ValueError otherwise,
    without echoing the key)."""
    if raw is None:
        return ()
    items = raw.split(",") if isinstance(raw, str) else list(raw)
    keys = []
    for i, k in enumerate(items):
        k = k.strip()
        if not k:
            continue
        if not 16 <= len(k) <= 256 or any(not 0x21 <= ord(c) <= 0x7e or c == "," for c in k):
            raise ValueError(f"API key #{i + 1}: must be 16-256 printable ASCII characters without "
                             "spaces or commas")
        keys.append(k)
    return tuple(dict.fromkeys(keys))


@dataclass(frozen=True)
class GateSettings:
    """What the front door enforces (``ServiceConfig`` fields of the same names)."""

    api_keys: tuple[str, ...] = ()
    insecure: bool = False  # no keys and clients from anywhere: only when the operator says so
    max_body_bytes: int = 1 << 20
    requests_per_s: float = 20.0  # per key, sustained
    request_burst: int = 40  # per key, at once

    def __repr__(self) -> str:  # keys never appear in logs or tracebacks
        return (f"GateSettings(api_keys=<{len(self.api_keys)} keys>, insecure={self.insecure}, "
                f"max_body_bytes={self.max_body_bytes}, requests_per_s={self.requests_per_s}, "
                f"request_burst={self.request_burst})")


@dataclass
class TokenBucket:
    """``rate`` tokens a second up to ``burst``; ``take`` answers the seconds to wait (0: go)."""

    rate: float
    burst: int
    tokens: float = field(default=-1.0)
    stamp: float = 0.0

    def take(self, now: float) -> float:
        if self.tokens < 0:
            self.tokens, self.stamp = float(self.burst), now
        self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate if self.rate > 0 else math.inf


def _is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return host == "localhost"


def _error(status: int, message: str, type_: str, code: str | int | None = None,
           headers: Mapping[str, str] | None = None) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    body = json.dumps({"error": {"message": message, "type": type_, "param": None,
                                 "code": status if code is None else code}}).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return status, body, hdrs


class ApiGate:
    """ASGI middleware: authenticate, rate-limit and bound the body of every HTTP request. The
    tenant goes into ``request.state.tenant`` for the routes. ``settings`` is read per request
    from ``settings_source()`` so a Serve replica can install its own after start-up."""

    def __init__(self, app: Any, settings_source: Any) -> None:
        self.app = app
        self._settings = settings_source
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        s: GateSettings = self._settings()
        refusal = self._check(scope, s)
        if refusal is not None:
            await self._respond(send, *refusal)
            return
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            receive = await self._bounded_body(scope, receive, send, s.max_body_bytes)
            if receive is None:
                return
        await self.app(scope, receive, send)

    def _check(self, scope: dict, s: GateSettings) -> tuple | None:
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]  # the app's own route, whatever prefix it is mounted under
        if path in OPEN_PATHS:
            scope.setdefault("state", {})["tenant"] = ""
            return None
        if not s.api_keys:
            client = (scope.get("client") or (None, None))[0]
            if not s.insecure and not _is_loopback(client):
                return _error(401, "no API keys are configured, so only loopback clients are served "
                              "(set OMNIZIP_API_KEYS, or start with --insecure)", "authentication_error",
                              "invalid_api_key")
            tenant = ""
        else:
            tenant = self._tenant(scope, s.api_keys)
            if tenant is None:
                return _error(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                              "authentication_error", "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        wait = self._bucket(tenant, s).take(time.monotonic())
        if wait > 0:
            retry = max(1, math.ceil(wait))
            return _error(429, f"rate limit: at most {s.requests_per_s:g} requests a second per key "
                          f"(burst {s.request_burst}); retry in {retry} s", "rate_limit_exceeded",
                          headers={"Retry-After": str(retry)})
        scope.setdefault("state", {})["tenant"] = tenant
        return None

    @staticmethod
    def _tenant(scope: dict, keys: tuple[str, ...]) -> str | None:
        auth = b""
        for k, v in scope.get("headers") or []:
            if k.lower() == b"authorization":
                auth = v
                break
        scheme, _, given = auth.partition(b" ")
        if scheme.lower() != b"bearer" or not given.strip():
            return None
        given = given.strip()
        match = None
        for key in keys:  # every key compared, in constant time each
            if hmac.compare_digest(given, key.encode()):
                match = key
        return tenant_of(match) if match is not None else None

    def _bucket(self, tenant: str, s: GateSettings) -> TokenBucket:
        with self._lock:
            b = self._buckets.get(tenant)
            if b is None or b.rate != s.requests_per_s or b.burst != s.request_burst:
                b = self._buckets[tenant] = TokenBucket(s.requests_per_s, s.request_burst)
            return b

    async def _bounded_body(self, scope: dict, receive: Any, send: Any, limit: int) -> Any:
        """The body read up to ``limit`` bytes and replayed to the app; None (413 sent) past it."""
        too_big = _error(413, f"request body over {limit} bytes", "invalid_request_error", "request_too_large")
        for k, v in scope.get("headers") or []:
            if k.lower() == b"content-length":
                try:
                    if int(v) > limit:
                        await self._respond(send, *too_big)
                        return None
                except ValueError:
                    await self._respond(send, *_error(400, "bad Content-Length", "invalid_request_error"))
                    return None
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._respond(send, *too_big)
                return None
            chunks.append(chunk)
            more = msg.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay

    @staticmethod
    async def _respond(send: Any, status: int, body: bytes, headers: list) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def gate_settings(given: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> GateSettings:
    """The front door's settings: ``given`` (build_app's) over the environment (OMNIZIP_API_KEYS,
    OMNIZIP_INSECURE, OMNIZIP_MAX_BODY_BYTES, OMNIZIP_REQUESTS_PER_S, OMNIZIP_REQUEST_BURST)."""
    import os

    env = os.environ if environ is None else environ
    g = dict(given or {})
    keys = tuple(g.get("api_keys") or ()) + parse_keys(env.get("OMNIZIP_API_KEYS"))
    try:
        return GateSettings(
            api_keys=parse_keys(keys),
            insecure=bool(g.get("insecure", env.get("OMNIZIP_INSECURE", "").strip().lower() in ("1", "true", "yes"))),
            max_body_bytes=int(g.get("max_body_bytes", env.get("OMNIZIP_MAX_BODY_BYTES", 1 << 20))),
            requests_per_s=float(g.get("requests_per_s", env.get("OMNIZIP_REQUESTS_PER_S", 20.0))),
            request_burst=int(g.get("request_burst", env.get("OMNIZIP_REQUEST_BURST", 40))))
    except (TypeError, ValueError) as e:
        raise ValueError(f"front door settings: {e}") from None


def tenant(request: Any) -> str:
    """The tenant the front door (pipeline.api.gate) authenticated this request as."""
    return str(getattr(request.state, "tenant", ""))
