"""The HTTP routes behind the web console, beside pipeline.api.app's: per-window data, the
pictures of what a window kept, a source probe, and the console's own static files.

  GET  /v1/streams/{id}/windows?after=&limit=&tail=   a page of per-window figures
  GET  /v1/streams/{id}/windows/{index}/frames.png    kept video patches over the frames
  GET  /v1/streams/{id}/windows/{index}/audio.png     the audio, token scores, kept marks
  POST /v1/sources/probe                              open a source under the policy, report it
  GET  /  and  /console/<file>                        the console (no API key: pipeline.api.gate)

Why a mixin (:class:`ConsoleRoutes`) on its own router: Ray Serve binds the methods of the
ingress class and of its bases to the replica, so these routes reach the engine through the
same ``_call`` (errors mapped, tenancy enforced: another key's stream is 404) while
pipeline/api/app.py only includes the router and names the base class.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.api.errors import ApiError
from pipeline.api.gate import tenant
from pipeline.sources.options import HttpSourceOptions

__all__ = ["ConsoleRoutes", "install", "router", "CONSOLE_DIR", "CONSOLE_FILES", "WindowPage", "ProbeRequest",
           "MAX_WINDOW_INDEX", "MAX_PAGE"]

router = APIRouter()
CONSOLE_DIR = Path(__file__).with_name("static")
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
#: the console's files by URL path; these exact paths are open without a key (pipeline.api.gate)
CONSOLE_FILES = {("/" if p.name == "index.html" else f"/console/{p.name}"): p
                 for p in sorted(CONSOLE_DIR.glob("*")) if p.suffix in _TYPES}
_STATIC_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
_PNG_HEADERS = {"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"}
#: the largest window index a query may name (68 years of 1-s windows): larger ones are 422,
#: not a number handed to the store (which answered 500 with its own error text)
MAX_WINDOW_INDEX = 2**31 - 1
MAX_PAGE = 500  # windows in one page
_INDEX = PathParam(ge=0, le=MAX_WINDOW_INDEX, description="the window's index")


class WindowInfo(BaseModel):
    """One window as stored: its media span, tokens in/kept per modality, flags."""

    index: int
    start: float = Field(description="media seconds")
    end: float
    t0: float | None = Field(None, description="wall time of the stream's media time 0 (live sources)")
    audio: dict[str, int] = Field(description='{"in": n, "kept": n}')
    video: dict[str, int]
    video_ratio: float = Field(description="share of video tokens the method kept in this window")
    kept_share: float = Field(description="kept / in over both modalities")
    flags: dict[str, bool] = Field(description="harder, audio_gap, video_gap, discontinuity, final")


class WindowPage(BaseModel):
    stream_id: str
    windows: list[WindowInfo]
    next_after: int = Field(description="pass as `after` for the next page (the last index listed)")
    has_more: bool


class ProbeRequest(BaseModel):
    """``POST /v1/sources/probe``: the source and options a create would take."""

    model_config = ConfigDict(extra="forbid")
    source: str = Field(min_length=1, max_length=4096)
    options: HttpSourceOptions | None = None

    @field_validator("source")
    @classmethod
    def _clean(cls, v: str) -> str:
        if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in v) or not v.strip():
            raise ValueError("must be a non-blank URL without control characters")
        return v.strip()


class ProbeResult(BaseModel):
    model_config = ConfigDict(extra="allow")
    source: str
    ok: bool
    error: str | None = None
    format: str | None = None
    live: bool | None = None
    video: dict[str, Any] | None = Field(None, description="codec, width, height, fps")
    audio: dict[str, Any] | None = Field(None, description="codec, sample_rate, channels")
    elapsed_s: float


def window_info(w: dict[str, Any]) -> dict[str, Any]:
    """The engine's window fields as the API shows them."""
    a_in, a_k, v_in, v_k = (int(w.get(k) or 0) for k in ("audio_in", "audio_kept", "video_in", "video_kept"))
    ratio = w.get("video_ratio")
    flags = {k: bool(w.get(k)) for k in ("harder", "audio_gap", "video_gap", "discontinuity", "final")}
    return {"index": w["index"], "start": w["start"], "end": w["end"], "t0": w.get("t0"),
            "audio": {"in": a_in, "kept": a_k}, "video": {"in": v_in, "kept": v_k},
            "video_ratio": round(float(ratio if ratio is not None else v_k / max(1, v_in)), 4),
            "kept_share": round((a_k + v_k) / max(1, a_in + v_in), 4), "flags": flags}


class ConsoleRoutes:
    """Routes mixed into pipeline.api.app.OmniZipAPI (which provides ``_call``)."""

    _call: Any

    @router.get("/v1/streams/{stream_id}/windows", response_model=WindowPage,
                summary="Per-window figures, paged: time span, tokens in/kept per modality, flags")
    async def list_windows(self, stream_id: str, request: Request,
                           after: int = Query(-1, ge=-1, le=MAX_WINDOW_INDEX,
                                              description="list windows with a larger index"),
                           limit: int = Query(50, ge=1, le=MAX_PAGE),
                           tail: int | None = Query(None, ge=1, le=MAX_PAGE,
                                                    description="the newest `tail` windows instead")) -> dict:
        start, n = (-tail, tail) if tail is not None else (after + 1, limit)
        ws = await self._call("windows", stream_id, start, stream_id=stream_id, owner=tenant(request), limit=n + 1)
        more = len(ws) > n
        ws = ws[:n]
        return {"stream_id": stream_id, "windows": [window_info(w) for w in ws],
                "next_after": ws[-1]["index"] if ws else max(after, start - 1), "has_more": more}

    async def _picture(self, stream_id: str, index: int, request: Request, kind: str) -> Response:
        from pipeline.viz import window as window_viz

        data = await self._call("window_viz", stream_id, index, stream_id=stream_id, owner=tenant(request))
        if data is None:
            raise ApiError(404, f"no picture of window {index} of stream {stream_id!r} (not stored yet, or "
                           "older than the pictures the store keeps)", "not_found", param="index")

        def draw() -> bytes:
            rec = window_viz.decode_record(data)
            return window_viz.frames_png(rec) if kind == "frames" else window_viz.audio_png(rec)

        return Response(await asyncio.to_thread(draw), media_type="image/png", headers=_PNG_HEADERS)

    @router.get("/v1/streams/{stream_id}/windows/{index}/frames.png", response_class=Response,
                summary="The window's frames: kept video patches outlined, dropped ones dimmed")
    async def window_frames_png(self, stream_id: str, request: Request, index: int = _INDEX) -> Response:
        return await self._picture(stream_id, index, request, "frames")

    @router.get("/v1/streams/{stream_id}/windows/{index}/audio.png", response_class=Response,
                summary="The window's audio: envelope, each token's score, kept tokens marked")
    async def window_audio_png(self, stream_id: str, request: Request, index: int = _INDEX) -> Response:
        return await self._picture(stream_id, index, request, "audio")

    @router.post("/v1/sources/probe", response_model=ProbeResult,
                 summary="Open a source under the service's source policy and report what it carries (<= 5 s)")
    async def probe_source(self, body: ProbeRequest, request: Request) -> dict:
        opts = body.options.to_source_options() if body.options is not None else None
        return await self._call("probe_source", body.source, opts, owner=tenant(request))


@router.get("/", include_in_schema=False)
async def console_index() -> Response:
    return _static("/")


@router.get("/console/{name}", include_in_schema=False)
async def console_file(name: str) -> Response:
    return _static(f"/console/{name}")


def _static(path: str) -> Response:

    p = CONSOLE_FILES.get(path)
    if p is None:
        raise ApiError(404, f"no console file {path!r}", "not_found")
    return Response(p.read_bytes(), media_type=_TYPES[p.suffix], headers=_STATIC_HEADERS)


def install(app: FastAPI) -> None:
    """Add these routes to the ingress app (before @serve.ingress freezes it)."""
    app.include_router(router)
