"""Talk to a stream: ``ws(s)://HOST/v1/realtime``, OpenAI's Realtime API (GA event names and
shapes) over a stream of this service, and the browser's way in.

  POST /v1/realtime/client_secrets   (API key) -> {"value", "expires_at"}: a short-lived,
                                     single-use secret for one session (OMNIZIP_REALTIME_SECRET_TTL_S)
  GET  /v1/realtime                  WebSocket; a server-side client sends ``Authorization: Bearer
                                     <API key>``; a browser offers the subprotocols ``realtime`` and
                                     ``openai-insecure-api-key.<secret>``; ``model`` is accepted and ignored

Why the socket authenticates itself: the front door (pipeline.api.gate) checks HTTP requests
only, so this route compares keys the gate's way (every key, in constant time), refuses an
expired, unknown or used secret at the handshake (before accepting: an HTTP 403), and with no
key configured serves only loopback clients with loopback Host and Origin (a page elsewhere
must not drive a local service: WebSockets have no CORS). Each session is a push stream of
the key (pipeline.engine.realtime), bounded by OMNIZIP_MAX_PUSH_STREAMS_PER_KEY. The event loop
is pipeline.api.realtime_session. A mixin of pipeline.api.app.OmniZipAPI.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from fastapi import APIRouter, FastAPI, Request, WebSocket
from pydantic import BaseModel, ConfigDict, Field

from pipeline.api.errors import ApiError, to_api_error
from pipeline.api.gate import ApiGate, GateSettings, _is_loopback, loopback_host, loopback_origin, tenant
from pipeline.api.realtime_events import EventError, error_event
from pipeline.api.realtime_session import RealtimeLimits, Session

__all__ = ["RealtimeRoutes", "install", "realtime_limits", "router"]

log = logging.getLogger(__name__)
router = APIRouter()
SECRET_PROTOCOL = "openai-insecure-api-key."
_gate_source: list[Any] = [GateSettings]  # the replica's front-door settings, given by install()


def realtime_limits(environ: Any = None) -> RealtimeLimits:
    """OMNIZIP_REALTIME_SECRET_TTL_S, OMNIZIP_REALTIME_MAX_IMAGE_PIXELS, OMNIZIP_REALTIME_MAX_TURN_S;
    ValueError naming a bad one."""
    env = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for name, field, kind, low, high in (("OMNIZIP_REALTIME_SECRET_TTL_S", "secret_ttl_s", float, 1, 3600),
                                         ("OMNIZIP_REALTIME_MAX_IMAGE_PIXELS", "max_image_pixels", int, 1, 1 << 28),
                                         ("OMNIZIP_REALTIME_MAX_TURN_S", "max_turn_s", float, 1, 120)):
        raw = env.get(name)
        if raw is None or raw == "":
            continue
        try:
            v = kind(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not a number") from None
        if not low <= v <= high:
            raise ValueError(f"{name} must be in [{low}, {high}], got {raw!r}")
        out[field] = v
    return RealtimeLimits(**out)


class ExpiresAfter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    anchor: str = Field("created_at", pattern="^created_at$")
    seconds: int = Field(ge=1, le=3600)


class ClientSecretRequest(BaseModel):
    """OpenAI's client_secrets body; ``session`` is accepted (sessions are configured on the socket)."""

    model_config = ConfigDict(extra="forbid")
    expires_after: ExpiresAfter | None = None
    session: dict[str, Any] | None = None


def _bearer(ws: WebSocket) -> str | None:
    scheme, _, given = (ws.headers.get("authorization") or "").partition(" ")
    return given.strip() or None if scheme.lower() == "bearer" else None


def _offered(ws: WebSocket) -> list[str]:
    return [p.strip() for p in (ws.headers.get("sec-websocket-protocol") or "").split(",") if p.strip()]


class RealtimeRoutes:
    """Routes mixed into OmniZipAPI (which provides ``_call``, ``_route`` and ``_service``)."""

    _call: Any
    _service: Any

    def _realtime_limits(self) -> RealtimeLimits:
        if getattr(self, "_rt_limits", None) is None:
            self._rt_limits = realtime_limits()
        return self._rt_limits

    @router.post("/v1/realtime/client_secrets", summary="A short-lived, single-use secret for one realtime session")
    async def realtime_client_secret(self, request: Request, body: ClientSecretRequest | None = None) -> dict[str, Any]:
        ttl = float(body.expires_after.seconds) if body and body.expires_after else self._realtime_limits().secret_ttl_s
        out = await self._call("realtime_secret", tenant(request), ttl)
        return {**out, "session": {"type": "realtime", "object": "realtime.session", "model": "omnizip-stream"}}

    async def _realtime_owner(self, ws: WebSocket, s: GateSettings) -> str | None:
        """Who this socket is (a tenant id; "" without keys), or None: refused at the handshake."""
        secret = next((p[len(SECRET_PROTOCOL):] for p in _offered(ws) if p.startswith(SECRET_PROTOCOL)), None)
        bearer = _bearer(ws)
        if s.api_keys:
            if bearer is not None:
                known = ApiGate._tenant(ws.scope, s.api_keys)  # every key, in constant time each
                if known is not None:
                    return known
                secret = bearer if bearer.startswith("ek_") else None
                if secret is None:
                    return None
            if secret is None:
                return None
            try:
                return await self._service.realtime_redeem.remote(secret)
            except Exception:
                return None
        if s.insecure:
            return ""
        client = (ws.client.host if ws.client else None)
        origin = ws.headers.get("origin")
        if not _is_loopback(client) or not loopback_host(ws.headers.get("host")) or \
                (origin is not None and not loopback_origin(origin)):
            return None
        return ""

    @router.websocket("/v1/realtime")
    async def realtime(self, ws: WebSocket) -> None:
        from pipeline.metrics import get_metrics

        metrics = get_metrics()
        owner = await self._realtime_owner(ws, _gate_source[0]())
        if owner is None:
            metrics.realtime_session("refused")
            await ws.close(code=1008, reason="missing, invalid, expired or used credentials")
            return
        offered = _offered(ws)
        await ws.accept(subprotocol="realtime" if "realtime" in offered else None)
        try:
            opened = await self._call("realtime_open", owner)
        except ApiError as e:
            metrics.realtime_session("refused")
            code = "session_limit_exceeded" if e.status == 429 else f"http_{e.status}"
            await ws.send_json({"event_id": "event_open", **error_event(EventError(e.message, e.param, code))})
            await ws.close(code=1008 if e.status < 500 else 1011)
            return
        metrics.realtime_session("opened")
        try:
            await Session(ws, self, owner, opened, self._realtime_limits()).run()
        except Exception as exc:  # the socket broke, or the engine went away mid-session
            log.info("realtime session %s ended: %r", opened["status"]["id"], to_api_error(exc).message)
        finally:
            try:
                await ws.close()
            except Exception:
                pass


def install(app: FastAPI, settings_source: Any) -> None:
    """Add these routes to the ingress app (before @serve.ingress freezes it); ``settings_source()``
    gives the front door's settings (the keys) as the gate reads them."""
    _gate_source[0] = settings_source
    app.include_router(router)
