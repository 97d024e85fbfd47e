"""WHIP (RFC 9725): how a publisher (OBS, a browser, any WebRTC client) sends its camera and
microphone to a push stream. The stream is created through the API (``{"source": "whip:"}``);
its answer carries the WHIP URL and the publish token; the publisher then talks only to:

  OPTIONS /v1/whip/{id}              the methods, and the operator's ICE servers (with the token)
  POST    /v1/whip/{id}              an SDP offer (application/sdp) -> 201, the answer, Location
  PATCH   /v1/whip/{id}/{session}    405: no trickle ICE (the answer holds every candidate)
  DELETE  /v1/whip/{id}/{session}    stop publishing

These paths take no API key (pipeline.api.gate.PUBLISHER_PREFIX): ``Authorization: Bearer
<publish token>`` is checked by the engine (pipeline.engine.push) in constant time. Errors have
the API's body. A mixin of pipeline.api.app.OmniZipAPI, as pipeline.api.console's routes are.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi import Path as PathParam
from fastapi.responses import Response

from pipeline.api.errors import ApiError
from pipeline.sources.sdp import MAX_OFFER_BYTES

__all__ = ["WhipRoutes", "absolute_ingest", "install", "router"]

router = APIRouter()
def _id() -> Any:
    """A path id's bounds (a fresh Path per parameter: FastAPI binds one object to one name)."""
    return PathParam(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")


_ALLOW = "OPTIONS, POST"
_SESSION_ALLOW = "DELETE"


def _token(request: Request) -> str | None:
    scheme, _, given = (request.headers.get("authorization") or "").partition(" ")
    return given.strip() or None if scheme.lower() == "bearer" else None


def absolute_ingest(status: dict[str, Any], request: Request) -> dict[str, Any]:
    """A stream status whose ``ingest.url`` is absolute (what OBS's Server field takes)."""
    ingest = status.get("ingest")
    if isinstance(ingest, dict) and str(ingest.get("url", "")).startswith("/"):
        base = str(request.base_url).rstrip("/")
        status = {**status, "ingest": {**ingest, "url": base + ingest["url"]}}
    return status


class WhipRoutes:
    """Routes mixed into pipeline.api.app.OmniZipAPI (which provides ``_call`` and ``_config``)."""

    _call: Any
    _config: Any

    def _links(self) -> list[str]:
        return [s.link() for s in self._config.push_settings().servers]

    @router.options("/v1/whip/{stream_id}", include_in_schema=False)
    async def whip_options(self, request: Request, stream_id: str = _id()) -> Response:
        headers = {"Allow": _ALLOW, "Accept-Post": "application/sdp"}
        links = self._links()
        if links and _token(request):  # TURN credentials go only to a publisher of this stream
            await self._call("publish_check", stream_id, _token(request), stream_id=stream_id)
            headers["Link"] = ", ".join(links)
        return Response(status_code=204, headers=headers)

    @router.post("/v1/whip/{stream_id}", status_code=201, response_class=Response,
                 summary="WHIP: publish to a push stream (SDP offer in, SDP answer out)")
    async def whip_publish(self, request: Request, stream_id: str = _id()) -> Response:
        ctype = (request.headers.get("content-type") or "").split(";", 1)[0].strip().lower()
        if ctype != "application/sdp":
            raise ApiError(415, f"the offer must be sent as application/sdp, not {ctype[:60] or 'no type'!r}",
                           param="content-type", headers={"Accept-Post": "application/sdp"})
        body = await request.body()
        if len(body) > MAX_OFFER_BYTES:
            raise ApiError(413, f"the SDP offer is {len(body)} bytes; at most {MAX_OFFER_BYTES}", param="sdp")
        out = await self._call("publish", stream_id, _token(request), body, stream_id=stream_id)
        headers = {"Location": f"/v1/whip/{stream_id}/{out['session']}", "ETag": f'"{out["session"]}"'}
        links = self._links()
        if links:
            headers["Link"] = ", ".join(links)
        return Response(out["sdp"], status_code=201, media_type="application/sdp", headers=headers)

    @router.patch("/v1/whip/{stream_id}/{session}", include_in_schema=False)
    async def whip_patch(self, stream_id: str = _id(), session: str = _id()) -> Response:
        raise ApiError(405, "trickle ICE and ICE restarts are not supported: the answer holds every "
                       "candidate; publish again for a new session", headers={"Allow": _SESSION_ALLOW})

    @router.delete("/v1/whip/{stream_id}/{session}", summary="WHIP: stop publishing")
    async def whip_delete(self, request: Request, stream_id: str = _id(), session: str = _id()) -> Response:
        await self._call("unpublish", stream_id, _token(request), session, stream_id=stream_id)
        return Response(status_code=200)


def install(app: FastAPI) -> None:
    """Add these routes to the ingress app (before @serve.ingress freezes it)."""
    app.include_router(router)
