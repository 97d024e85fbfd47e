"""The HTTP routes of watches and their events, beside pipeline.api.app's (a router and a mixin
as pipeline.api.console: the methods reach the engine through the ingress class's ``_call``, so
errors are mapped and tenancy enforced: another key's stream is 404).

  POST   /v1/streams/{id}/watches             a standing question -> 201 (webhook.secret shown once)
  GET    /v1/streams/{id}/watches             the stream's watches, their state and webhook status
  GET    /v1/streams/{id}/watches/{watch_id}  one watch
  DELETE /v1/streams/{id}/watches/{watch_id}  stop it (its pending deliveries go with it)
  GET    /v1/streams/{id}/events              JSON pages (?after=&limit=), or Server-Sent Events with
                                              ``Accept: text/event-stream`` (``id:`` = event id,
                                              ``data:`` = the event JSON), resuming after
                                              ``Last-Event-ID`` (or ``after``)
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import StreamingResponse

from pipeline.api.errors import ApiError
from pipeline.api.gate import tenant
from pipeline.core.watches import WatchSpec

__all__ = ["WatchRoutes", "install", "router", "EVENTS_POLL_S", "KEEPALIVE_S"]

router = APIRouter()
EVENTS_POLL_S = 0.5  # an SSE client's new events reach it within this (the replica polls the engine)
KEEPALIVE_S = 15.0  # an SSE comment this often keeps proxies from closing an idle stream
MAX_PAGE = 500
_EVENT_ID = r"^\d{1,20}-\d{1,20}$"
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _check_event_id(value: str | None, param: str) -> str | None:
    import re

    if value is None or value == "":
        return None
    if not re.match(_EVENT_ID, value):
        raise ApiError(422, f"{param}: an event id is <ms>-<seq> as the events carry (e.g. 1712345678901-0)",
                       param=param)
    return value


class WatchRoutes:
    """Routes mixed into pipeline.api.app.OmniZipAPI (which provides ``_call``)."""

    _call: Any

    async def _watch_call(self, method: str, stream_id: str, watch_id: str, owner: str) -> Any:
        try:
            return await self._call(method, stream_id, watch_id, owner=owner)
        except ApiError as e:
            if e.status == 404 and "no watch" in e.message:
                raise ApiError(404, f"no watch {watch_id!r} on stream {stream_id!r}", "not_found",
                               param="watch_id") from None
            if e.status == 404:
                raise ApiError(404, f"no stream {stream_id!r}", "not_found", param="stream_id") from None
            raise

    @router.post("/v1/streams/{stream_id}/watches", status_code=201,
                 summary="A standing question evaluated after the stream's windows; events and webhooks")
    async def create_watch(self, stream_id: str, body: WatchSpec, request: Request) -> dict:
        return await self._call("create_watch", stream_id, body.model_dump(exclude_unset=True),
                                stream_id=stream_id, owner=tenant(request))

    @router.get("/v1/streams/{stream_id}/watches", summary="The stream's watches")
    async def list_watches(self, stream_id: str, request: Request) -> dict:
        return {"stream_id": stream_id,
                "watches": await self._call("list_watches", stream_id, stream_id=stream_id, owner=tenant(request))}

    @router.get("/v1/streams/{stream_id}/watches/{watch_id}", summary="One watch: spec, state, webhook status")
    async def get_watch(self, stream_id: str, watch_id: str, request: Request) -> dict:
        return await self._watch_call("get_watch", stream_id, watch_id, tenant(request))

    @router.delete("/v1/streams/{stream_id}/watches/{watch_id}", summary="Stop a watch")
    async def delete_watch(self, stream_id: str, watch_id: str, request: Request) -> dict:
        await self._watch_call("delete_watch", stream_id, watch_id, tenant(request))
        return {"id": watch_id, "deleted": True}

    @router.get("/v1/streams/{stream_id}/events",
                summary="The stream's watch events: JSON pages, or SSE with Accept: text/event-stream")
    async def list_events(self, stream_id: str, request: Request,
                          after: str | None = Query(None, max_length=41, description="events after this id"),
                          limit: int = Query(100, ge=1, le=MAX_PAGE)) -> Any:
        owner = tenant(request)
        start = _check_event_id(after, "after")
        sse = "text/event-stream" in request.headers.get("accept", "")
        if sse:
            start = _check_event_id(request.headers.get("last-event-id"), "Last-Event-ID") or start
        first = await self._call("watch_events", stream_id, start, limit, stream_id=stream_id, owner=owner)
        if not sse:
            return {"stream_id": stream_id, "events": first, "next_after": first[-1]["id"] if first else start,
                    "has_more": len(first) >= limit}
        return StreamingResponse(self._event_stream(stream_id, owner, start, first, request),
                                 media_type="text/event-stream", headers=_SSE_HEADERS)

    async def _event_stream(self, stream_id: str, owner: str, after: str | None, first: list[dict],
                            request: Request) -> AsyncIterator[str]:
        page, quiet_since = first, time.monotonic()
        while True:
            for e in page:
                yield f"id: {e['id']}\ndata: {json.dumps(e)}\n\n"
                after = e["id"]
            if page:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= KEEPALIVE_S:
                yield ": keepalive\n\n"
                quiet_since = time.monotonic()
            if await request.is_disconnected():
                return
            await asyncio.sleep(0 if len(page) >= MAX_PAGE else EVENTS_POLL_S)
            try:
                page = await self._call("watch_events", stream_id, after, MAX_PAGE, stream_id=stream_id, owner=owner)
            except ApiError as e:  # the stream was deleted, or the engine is away: said in-band, then closed
                yield f"event: error\ndata: {json.dumps(e.body())}\n\n"
                return


def install(app: FastAPI) -> None:
    """Add these routes to the ingress app (before @serve.ingress freezes it)."""
    app.include_router(router)
