"""The HTTP front door's checks, before any route runs: API keys, the tenant a key stands for,
the per-key request rate, the requests one client holds open at once, the request body's size
and the time it may take to arrive, and (with no key configured) the Host and Origin a request
names.

Why an ASGI middleware and not a route dependency: a body over the limit must be refused before
it is read (413 from ``Content-Length``, or as soon as a chunked body passes the limit), and an
unauthenticated client must not reach body parsing at all.

Tenancy: a stream belongs to the tenant of the key that created it. The tenant id is a hash of
the key, so the store never holds a key; keys are compared in constant time and never logged.
With no key configured every client is the anonymous tenant "", and only loopback clients are
served unless the operator said ``insecure``; then only requests whose Host is a loopback name or
address are served and a state-changing request's Origin, if sent, must be a loopback origin:
a page from ``http://rebind.test`` whose name a DNS server turns into 127.0.0.1 must not drive
the API from the user's browser (DNS rebinding).

Slow clients: a Serve replica serves at most ``max_ongoing_requests`` requests, and a request
holds its slot while its body arrives. So open paths never read a body (they take GET and HEAD
only), every body must arrive within ``body_timeout_s`` (408 after), and one client (a key, or
an unauthenticated peer address) holds at most ``max_open_per_client`` requests open at once
(429 past it), whatever the path.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import math
import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.config import parse_bool

__all__ = ["ApiGate", "GateSettings", "TokenBucket", "gate_settings", "parse_keys", "tenant", "tenant_of",
           "OPEN_PATHS", "PUBLISHER_PREFIX", "loopback_host", "loopback_origin"]

# served without a key: the health check and the web console's static files (exact paths,
# pipeline.api.console.CONSOLE_FILES); the console's own API calls carry the key
OPEN_PATHS = frozenset({"/healthz", "/", "/console/console.js", "/console/console.css", "/console/camera.js"})
OPEN_METHODS = ("GET", "HEAD")  # an open path never reads a body
# a push stream's publisher (WHIP, pipeline.api.whip) authenticates with the stream's publish
# token, which the route checks; it is rate-limited, bounded and timed as any client, by address
PUBLISHER_PREFIX = "/v1/whip/"
BODY_METHODS = ("POST", "PUT", "PATCH")
STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")


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
    max_open_per_client: int = 16  # requests one key (or unauthenticated peer) holds open at once
    body_timeout_s: float = 10.0  # a request body must have arrived within this

    def __post_init__(self) -> None:
        if self.max_open_per_client < 1:
            raise ValueError(f"max_open_per_client must be >= 1, got {self.max_open_per_client}")
        if not 0 < self.body_timeout_s <= 3600:
            raise ValueError(f"body_timeout_s must be in (0, 3600], got {self.body_timeout_s}")

    def __repr__(self) -> str:  # keys never appear in logs or tracebacks
        return (f"GateSettings(api_keys=<{len(self.api_keys)} keys>, insecure={self.insecure}, "
                f"max_body_bytes={self.max_body_bytes}, requests_per_s={self.requests_per_s}, "
                f"request_burst={self.request_burst}, max_open_per_client={self.max_open_per_client}, "
                f"body_timeout_s={self.body_timeout_s})")


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


_PORT = re.compile(r"(?::[0-9]{1,5})?")


def loopback_host(value: str | None) -> bool:
    """Whether a Host header (or an origin's authority) names this machine by a loopback name:
    ``localhost``, a dotted-quad in 127.0.0.0/8 or ``[::1]``, with or without a port. Every other
    spelling is refused, even one that resolves to loopback (``127.1``, ``0x7f000001``, a trailing
    dot, ``*.localhost``, ``127.0.0.1.nip.io``): a rebinding attacker controls names, not these."""
    if not value:
        return False
    v = value.strip().lower()
    if v.startswith("["):
        addr, sep, port = v[1:].partition("]")
        try:
            ok = bool(sep) and ipaddress.IPv6Address(addr) == ipaddress.IPv6Address("::1")
        except ValueError:
            return False
        return ok and _PORT.fullmatch(port) is not None
    host, _, port = v.partition(":")
    if _PORT.fullmatch(v[len(host):]) is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.IPv4Address(host).is_loopback  # strict dotted-quad, no leading zeros
    except ValueError:
        return False


def loopback_origin(value: str) -> bool:
    """Whether an Origin header is ``http(s)://`` + a loopback host (``null`` is not)."""
    scheme, sep, rest = value.strip().lower().partition("://")
    return bool(sep) and scheme in ("http", "https") and "/" not in rest and loopback_host(rest)


def _header(scope: dict, name: bytes) -> str | None:
    for k, v in scope.get("headers") or []:
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def _error(status: int, message: str, type_: str, code: str | int | None = None,
           headers: Mapping[str, str] | None = None) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    body = json.dumps({"error": {"message": message, "type": type_, "param": None,
                                 "code": status if code is None else code}}).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return status, body, hdrs


class ApiGate:
    """ASGI middleware: authenticate, rate-limit, bound the open requests of each client and
    bound the body (size and time) of every HTTP request. The tenant goes into
    ``request.state.tenant`` for the routes (on an open path: the tenant of a valid key if one
    was sent, else ""). ``settings`` is read per request from ``settings_source()`` so a Serve
    replica can install its own after start-up."""

    def __init__(self, app: Any, settings_source: Any) -> None:
        self.app = app
        self._settings = settings_source
        self._buckets: dict[str, TokenBucket] = {}
        self._open: dict[str, int] = {}
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
        client = scope["state"]["tenant"] or "peer:" + str((scope.get("client") or ("?",))[0])
        if not self._enter(client, s.max_open_per_client):
            await self._respond(send, *_error(
                429, f"too many requests open at once: at most {s.max_open_per_client} per client; "
                "wait for one to finish", "rate_limit_exceeded", headers={"Retry-After": "1"}))
            return
        try:
            if scope.get("method") in BODY_METHODS:
                receive = await self._bounded_body(scope, receive, send, s)
                if receive is None:
                    return
            await self.app(scope, receive, send)
        finally:
            self._leave(client)

    def _enter(self, client: str, bound: int) -> bool:
        with self._lock:
            n = self._open.get(client, 0)
            if n >= bound:
                return False
            self._open[client] = n + 1
            return True

    def _leave(self, client: str) -> None:
        with self._lock:
            n = self._open.get(client, 1) - 1
            if n > 0:
                self._open[client] = n
            else:
                self._open.pop(client, None)

    def _check(self, scope: dict, s: GateSettings) -> tuple | None:
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]  # the app's own route, whatever prefix it is mounted under
        keyless = not s.api_keys and not s.insecure
        if keyless:
            refusal = self._rebinding(scope)
            if refusal is not None:
                return refusal
        if path in OPEN_PATHS:
            if scope.get("method") not in OPEN_METHODS:
                return _error(405, f"{path} takes GET or HEAD only", "invalid_request_error",
                              headers={"Allow": ", ".join(OPEN_METHODS)})
            scope.setdefault("state", {})["tenant"] = (self._tenant(scope, s.api_keys) or "") if s.api_keys else ""
            return None
        if path.startswith(PUBLISHER_PREFIX):
            peer = "peer:" + str((scope.get("client") or ("?",))[0])
            wait = self._bucket(peer, s).take(time.monotonic())
            if wait > 0:
                retry = max(1, math.ceil(wait))
                return _error(429, f"rate limit: at most {s.requests_per_s:g} requests a second per client; "
                              f"retry in {retry} s", "rate_limit_exceeded", headers={"Retry-After": str(retry)})
            scope.setdefault("state", {})["tenant"] = ""
            return None
        if not s.api_keys:
            client = (scope.get("client") or (None, None))[0]
            if keyless and not _is_loopback(client):
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
    def _rebinding(scope: dict) -> tuple | None:
        """Keyless (loopback) mode: the Host must name loopback, and a state-changing request's
        Origin, when sent, must be a loopback origin (the console is same-origin)."""
        host = _header(scope, b"host")
        if not loopback_host(host):
            return _error(421, f"Host {host!r} is not a loopback name: with no API keys configured only "
                          "requests to localhost, 127.0.0.0/8 or [::1] are served (a guard against DNS "
                          "rebinding; set OMNIZIP_API_KEYS to serve other names)", "invalid_request_error",
                          "host_not_allowed")
        origin = _header(scope, b"origin")
        if scope.get("method") in STATE_CHANGING and origin is not None and not loopback_origin(origin):
            return _error(403, f"Origin {origin[:200]!r} is not a loopback origin: with no API keys configured "
                          "only pages served from localhost, 127.0.0.0/8 or [::1] may change state",
                          "invalid_request_error", "origin_not_allowed")
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

    async def _bounded_body(self, scope: dict, receive: Any, send: Any, s: GateSettings) -> Any:
        """The body read up to ``max_body_bytes`` within ``body_timeout_s`` and replayed to the
        app; None when refused (413 too big, 408 too slow, 400 bad length) or the client left."""
        limit = s.max_body_bytes
        too_big = _error(413, f"request body over {limit} bytes", "invalid_request_error", "request_too_large")
        length = _header(scope, b"content-length")
        if length is not None:
            if not length.strip().isdigit():
                await self._respond(send, *_error(400, "bad Content-Length", "invalid_request_error"))
                return None
            if int(length) > limit:
                await self._respond(send, *too_big)
                return None
        try:
            body = await asyncio.wait_for(self._read(receive, limit), s.body_timeout_s)
        except TimeoutError:
            await self._respond(send, *_error(
                408, f"request body not received within {s.body_timeout_s:g} s", "invalid_request_error",
                "request_timeout", {"Connection": "close"}))
            return None
        if body is None:
            return None
        if isinstance(body, int):
            await self._respond(send, *too_big)
            return None
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay

    @staticmethod
    async def _read(receive: Any, limit: int) -> bytes | int | None:
        """The whole body; its size so far (an int) once past ``limit``; None on disconnect."""
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                return size
            chunks.append(chunk)
            more = msg.get("more_body", False)
        return b"".join(chunks)

    @staticmethod
    async def _respond(send: Any, status: int, body: bytes, headers: list) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def gate_settings(given: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> GateSettings:
    """The front door's settings: ``given`` (build_app's) over the environment (OMNIZIP_API_KEYS,
    OMNIZIP_INSECURE, OMNIZIP_MAX_BODY_BYTES, OMNIZIP_REQUESTS_PER_S, OMNIZIP_REQUEST_BURST,
    OMNIZIP_MAX_OPEN_PER_CLIENT, OMNIZIP_BODY_TIMEOUT_S)."""
    import os

    env = os.environ if environ is None else environ
    g = dict(given or {})
    keys = tuple(g.get("api_keys") or ()) + parse_keys(env.get("OMNIZIP_API_KEYS"))
    try:
        return GateSettings(
            api_keys=parse_keys(keys),
            insecure=bool(g.get("insecure", parse_bool(env.get("OMNIZIP_INSECURE", ""), "OMNIZIP_INSECURE"))),
            max_body_bytes=int(g.get("max_body_bytes", env.get("OMNIZIP_MAX_BODY_BYTES", 1 << 20))),
            requests_per_s=float(g.get("requests_per_s", env.get("OMNIZIP_REQUESTS_PER_S", 20.0))),
            request_burst=int(g.get("request_burst", env.get("OMNIZIP_REQUEST_BURST", 40))),
            max_open_per_client=int(g.get("max_open_per_client", env.get("OMNIZIP_MAX_OPEN_PER_CLIENT", 16))),
            body_timeout_s=float(g.get("body_timeout_s", env.get("OMNIZIP_BODY_TIMEOUT_S", 10.0))))
    except (TypeError, ValueError) as e:
        raise ValueError(f"front door settings: {e}") from None


def tenant(request: Any) -> str:
    """The tenant the front door (pipeline.api.gate) authenticated this request as."""
    return str(getattr(request.state, "tenant", ""))
