"""One /v1/realtime socket: OpenAI Realtime client events in, server events out, over one
stream of this service (pipeline.engine.realtime). Appended audio and images go to the
stream's ingest actor (which windows them and runs turn detection); a turn (a committed or
VAD-detected audio buffer, or text items) is answered by the stream's decoder from its warm
context, streamed as ``response.output_text.delta``. Receiving goes on while an answer streams,
so speech (barge-in) or ``response.cancel`` stops it; every event out passes one sender task.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.api.realtime_events import (CLIENT_EVENTS, UNSUPPORTED_EVENTS, EventError, SessionConfig,
                                          check_modalities, error_event, max_tokens, new_id, unsupported, user_item)
from pipeline.api.realtime_response import Turn, run_response
from pipeline.metrics import get_metrics
from pipeline.sources.appended import PCM_RATE, check_image, check_pcm

__all__ = ["MAX_EVENT_BYTES", "RealtimeLimits", "Session"]

log = logging.getLogger(__name__)

MAX_EVENT_BYTES = 15 << 20  # OpenAI's bound on one client event
MAX_TEXT = 8192


@dataclass(frozen=True)
class RealtimeLimits:
    """What one session may send (pipeline.api.realtime.realtime_limits reads them from the environment)."""

    max_image_pixels: int = 4096 * 4096
    max_turn_s: float = 60.0
    secret_ttl_s: float = 60.0


@dataclass
class _Buffer:
    """The input audio buffer: PCM since ``start_ms`` of the session's audio."""

    pcm: bytearray = field(default_factory=bytearray)
    start_ms: float = 0.0
    speech_ms: float | None = None  # where the detected speech starts (VAD)

    @property
    def ms(self) -> float:
        return len(self.pcm) / 2 * 1000.0 / PCM_RATE

    def cut(self, a_ms: float, b_ms: float) -> bytes:
        a = max(0, int(round((a_ms - self.start_ms) * PCM_RATE / 1000.0)) * 2)
        b = max(a, int(round((b_ms - self.start_ms) * PCM_RATE / 1000.0)) * 2)
        return bytes(self.pcm[a:b])

    def drop_before(self, ms: float) -> None:
        n = max(0, int(round((ms - self.start_ms) * PCM_RATE / 1000.0)) * 2)
        n = min(n, len(self.pcm))
        del self.pcm[:n]
        self.start_ms += n / 2 * 1000.0 / PCM_RATE


class Session:
    """The event loop of one socket; ``api`` is the replica (``_route``), ``opened`` the engine's
    realtime_open answer."""

    def __init__(self, ws: Any, api: Any, owner: str, opened: dict[str, Any], limits: RealtimeLimits) -> None:
        self.ws, self.api, self.owner, self.limits = ws, api, owner, limits
        self.sid: str = opened["status"]["id"]
        self.ingest = opened["ingest"]
        self.cfg = SessionConfig(self.sid)
        self.key = new_id("sess")  # this socket as the stream's publisher
        self.out: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.buf = _Buffer()
        self.audio_ms = 0.0  # the session's appended audio so far
        self.items: list[str] = []
        self.pending: list[Turn] = []  # user input since the last response
        self.response: asyncio.Task | None = None
        self.cancel_reason = "client_cancelled"
        self.metrics = get_metrics()

    # -- the sender --
    def emit(self, event: dict[str, Any]) -> None:
        self.out.put_nowait({"event_id": new_id("event"), **event})

    async def _send_loop(self) -> None:
        while True:
            ev = await self.out.get()
            if ev is None:
                return
            await self.ws.send_text(json.dumps(ev))

    # -- the loop --
    async def run(self) -> None:
        sender = asyncio.create_task(self._send_loop())
        try:
            await self.ingest.realtime_attach.remote(self.key)
            self.emit({"type": "session.created", "session": self.cfg.to_dict()})
            while True:
                msg = await self.ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                if not await self._one(msg):
                    break
        finally:
            await self._cancel_response("client_cancelled", quiet=True)
            try:
                await self.ingest.realtime_detach.remote(self.key)
            except Exception:  # the stream was deleted meanwhile
                pass
            self.out.put_nowait(None)
            try:
                await asyncio.wait_for(sender, 5)
            except Exception:
                sender.cancel()

    async def _one(self, msg: dict[str, Any]) -> bool:
        """One client message; False when the session cannot go on."""
        text = msg.get("text")
        if text is None:
            self.emit(error_event(EventError("binary frames are not events: send JSON text", None, "invalid_event")))
            return True
        if len(text) > MAX_EVENT_BYTES:
            self.emit(error_event(EventError(f"the event is {len(text)} bytes; at most {MAX_EVENT_BYTES} (15 MiB)",
                                             None, "event_too_large")))
            return True
        try:
            ev = json.loads(text)
        except (ValueError, RecursionError) as exc:
            self.emit(error_event(EventError(f"the event is not valid JSON: {str(exc)[:120]}", None, "invalid_json")))
            return True
        event_id = ev.get("event_id") if isinstance(ev, dict) and isinstance(ev.get("event_id"), str) else None
        try:
            if not isinstance(ev, dict) or not isinstance(ev.get("type"), str):
                raise EventError("an event is a JSON object with a string `type`", "type", "invalid_event")
            kind = ev["type"]
            self.metrics.realtime_event(kind if kind in CLIENT_EVENTS else "other")
            if kind in UNSUPPORTED_EVENTS:
                raise EventError(f"{kind} is not supported: {UNSUPPORTED_EVENTS[kind]}", "type", "unsupported")
            if kind not in CLIENT_EVENTS:
                raise EventError(f"unknown event type {kind[:80]!r}; known: {list(CLIENT_EVENTS)}", "type",
                                 "unknown_event")
            await getattr(self, "_" + kind.replace(".", "_"))(ev)
        except EventError as err:
            self.emit(error_event(err, event_id))
            return not err.fatal
        return True

    # -- session --
    async def _session_update(self, ev: dict[str, Any]) -> None:
        new = self.cfg.updated(ev.get("session"))
        if (new.vad is None) != (self.cfg.vad is None) or new.vad != self.cfg.vad:
            settings = None if new.vad is None else {
                k: getattr(new.vad, k) for k in ("threshold", "prefix_padding_ms", "silence_duration_ms",
                                                 "create_response", "interrupt_response")}
            await self.ingest.realtime_vad.remote(settings)
            self.buf.speech_ms = None
        self.cfg = new
        self.emit({"type": "session.updated", "session": self.cfg.to_dict()})

    # -- audio --
    def _b64(self, value: Any, param: str) -> bytes:
        if not isinstance(value, str):
            raise EventError(f"{param}: base64 text", param)
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise EventError(f"{param}: not valid base64", param, "invalid_base64") from None

    async def _input_audio_buffer_append(self, ev: dict[str, Any]) -> None:
        pcm = self._b64(ev.get("audio"), "audio")
        try:
            check_pcm(pcm)
        except ValueError as exc:
            raise EventError(f"audio: {exc}", "audio", "invalid_audio") from None
        if self.buf.ms + len(pcm) / 2 * 1000.0 / PCM_RATE > self.limits.max_turn_s * 1000 and self.cfg.vad is None:
            raise EventError(f"audio: the buffer would hold over {self.limits.max_turn_s:g} s of audio; commit or "
                             "clear it first", "audio", "buffer_full")
        reply = await self.ingest.realtime_audio.remote(self.key, pcm, self.cfg.vad is not None)
        if reply.get("error"):
            raise EventError(f"audio: {reply['error']}", "audio", "append_too_fast")
        if not self.buf.pcm:
            self.buf.start_ms = reply["ms"]
        self.buf.pcm += pcm
        self.audio_ms = reply["ms"] + len(pcm) / 2 * 1000.0 / PCM_RATE
        for kind, ms in reply["events"]:
            await self._vad_event(kind, ms)
        if self.cfg.vad is not None and self.buf.speech_ms is None:  # keep only the prefix padding
            self.buf.drop_before(self.audio_ms - self.cfg.vad.prefix_padding_ms - 100)
        elif self.buf.ms > self.limits.max_turn_s * 1000:
            self.buf.drop_before(self.audio_ms - self.limits.max_turn_s * 1000)

    async def _vad_event(self, kind: str, ms: int) -> None:
        vad = self.cfg.vad
        if kind == "speech_started":
            self.buf.speech_ms = float(max(ms, self.buf.start_ms))
            self.next_item = new_id("item")
            self.emit({"type": "input_audio_buffer.speech_started", "audio_start_ms": int(ms), "item_id": self.next_item})
            if vad is not None and vad.interrupt_response:
                await self._cancel_response("turn_detected")
        elif kind == "speech_stopped" and self.buf.speech_ms is not None:
            item = getattr(self, "next_item", None) or new_id("item")
            self.emit({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": int(ms), "item_id": item})
            pcm = self.buf.cut(self.buf.speech_ms, ms)
            self.buf.drop_before(ms)
            self.buf.speech_ms = None
            self._commit(pcm, item)
            self.metrics.realtime_turn("vad")
            if vad is not None and vad.create_response:
                self._start_response(None, ended_at=time.monotonic())

    def _commit(self, pcm: bytes, item: str) -> None:
        prev = self.items[-1] if self.items else None
        self.emit({"type": "input_audio_buffer.committed", "item_id": item, "previous_item_id": prev})
        self._added(item, [{"type": "input_audio", "transcript": None}])
        self.pending.append(Turn(audio=pcm))

    def _added(self, item: str, content: list[dict[str, Any]]) -> None:
        prev = self.items[-1] if self.items else None
        self.items.append(item)
        body = user_item(item, content)
        self.emit({"type": "conversation.item.added", "previous_item_id": prev, "item": body})
        self.emit({"type": "conversation.item.done", "previous_item_id": prev, "item": body})

    async def _input_audio_buffer_commit(self, ev: dict[str, Any]) -> None:
        start = self.buf.speech_ms if self.buf.speech_ms is not None else self.buf.start_ms
        pcm = self.buf.cut(start, self.buf.start_ms + self.buf.ms)
        if len(pcm) < PCM_RATE // 10 * 2:
            raise EventError(f"the input audio buffer holds {len(pcm) // 2 * 1000 // PCM_RATE} ms of audio; at least "
                             "100 ms to commit", None, "input_audio_buffer_commit_empty")
        self.buf = _Buffer(start_ms=self.audio_ms)
        await self.ingest.realtime_turn_reset.remote()
        self._commit(pcm, new_id("item"))
        self.metrics.realtime_turn("commit")

    async def _input_audio_buffer_clear(self, ev: dict[str, Any]) -> None:
        self.buf = _Buffer(start_ms=self.audio_ms)
        await self.ingest.realtime_turn_reset.remote()
        self.emit({"type": "input_audio_buffer.cleared"})

    # -- items --
    async def _conversation_item_create(self, ev: dict[str, Any]) -> None:
        item = ev.get("item")
        if not isinstance(item, dict):
            raise EventError("item must be an object", "item")
        if item.get("type", "message") != "message":
            raise unsupported(f"{item.get('type')!r} items (tools)", "item.type")
        if item.get("role") != "user":
            raise EventError(f"only user messages are taken, not role {item.get('role')!r}", "item.role")
        content = item.get("content")
        if not isinstance(content, list) or not content:
            raise EventError("item.content: a non-empty list of input_text, input_image or input_audio parts",
                             "item.content")
        texts, audio, images, shown = [], b"", [], []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            where = f"item.content[{i}]"
            if kind == "input_text":
                t = part.get("text")
                if not isinstance(t, str) or not t.strip() or len(t) > MAX_TEXT:
                    raise EventError(f"{where}.text: a non-empty string of at most {MAX_TEXT} characters", f"{where}.text")
                texts.append(t)
                shown.append({"type": "input_text", "text": t})
            elif kind == "input_image":
                images.append(self._image(part.get("image_url"), f"{where}.image_url"))
                shown.append({"type": "input_image", "detail": part.get("detail", "auto")})
            elif kind == "input_audio":
                pcm = self._b64(part.get("audio"), f"{where}.audio")
                try:
                    check_pcm(pcm)
                except ValueError as exc:
                    raise EventError(f"{where}.audio: {exc}", f"{where}.audio", "invalid_audio") from None
                if len(pcm) / 2 / PCM_RATE > self.limits.max_turn_s:
                    raise EventError(f"{where}.audio: at most {self.limits.max_turn_s:g} s", f"{where}.audio")
                audio += pcm
                shown.append({"type": "input_audio", "transcript": part.get("transcript")})
            else:
                raise EventError(f"{where}.type: input_text, input_image or input_audio, not {kind!r}", f"{where}.type")
        for data, param in images:  # the camera: placed on the stream's timeline by arrival
            reply = await self.ingest.realtime_image.remote(self.key, data, self.limits.max_image_pixels)
            if reply.get("error"):
                raise EventError(f"{param}: {reply['error']}", param, "invalid_image")
        self._added(str(item.get("id") or new_id("item"))[:64], shown)
        if texts or audio:
            self.pending.append(Turn(text="\n".join(texts) or None, audio=audio or None))
            self.metrics.realtime_turn("item")

    def _image(self, url: Any, param: str) -> tuple[bytes, str]:
        if not isinstance(url, str) or not url.startswith("data:"):
            raise EventError(f"{param}: a data URL (data:image/jpeg;base64,... or data:image/png;base64,...)", param)
        head, sep, payload = url.partition(",")
        if not sep or not head.endswith(";base64") or head[5:-7] not in ("image/jpeg", "image/png", "image/jpg"):
            raise EventError(f"{param}: only base64 data URLs of image/jpeg or image/png, not {head[:60]!r}", param,
                             "invalid_image")
        data = self._b64(payload, param)
        try:
            check_image(data, self.limits.max_image_pixels)  # from the header: a bomb is refused unread
        except ValueError as exc:
            raise EventError(f"{param}: {exc}", param, "invalid_image") from None
        return data, param

    # -- responses --
    async def _response_create(self, ev: dict[str, Any]) -> None:
        r = ev.get("response") or {}
        if not isinstance(r, dict):
            raise EventError("response must be an object", "response")
        if r.get("tools"):
            raise unsupported("tools (function calling, MCP)", "response.tools")
        if "output_modalities" in r:
            check_modalities(r["output_modalities"], "response.output_modalities")
        if r.get("audio", {}).get("output") if isinstance(r.get("audio"), dict) else r.get("audio"):
            raise unsupported("audio output", "response.audio")
        if r.get("input") is not None:
            raise unsupported("response.input (out-of-band items)", "response.input")
        limit = max_tokens(r["max_output_tokens"], "response.max_output_tokens") if "max_output_tokens" in r else None
        instructions = r.get("instructions")
        if instructions is not None and (not isinstance(instructions, str) or len(instructions) > MAX_TEXT):
            raise EventError(f"instructions: a string of at most {MAX_TEXT} characters", "response.instructions")
        if self.response is not None and not self.response.done():
            raise EventError("a response is in progress; cancel it or wait for response.done", None,
                             "conversation_already_has_active_response")
        if not self.pending:
            raise EventError("there is no user input since the last response: add a message or commit audio first",
                             None, "no_input")
        self._start_response(limit, instructions=instructions)

    def _start_response(self, limit: int | None, instructions: str | None = None, ended_at: float | None = None) -> None:
        if self.response is not None and not self.response.done():
            return  # one at a time; the turn waits in `pending` for the next response
        turns, self.pending = self.pending, []
        turn = Turn.merge(turns, instructions if instructions is not None else self.cfg.instructions)
        self.cancel_reason = "client_cancelled"
        self.response = asyncio.create_task(run_response(
            self, turn, limit or self.cfg.max_output_tokens, ended_at))

    async def _response_cancel(self, ev: dict[str, Any]) -> None:
        if self.response is None or self.response.done():
            raise EventError("there is no response in progress to cancel", None, "response_cancel_not_active")
        await self._cancel_response("client_cancelled")

    async def _cancel_response(self, reason: str, quiet: bool = False) -> None:
        task = self.response
        if task is None or task.done():
            return
        self.cancel_reason = reason
        await asyncio.sleep(0)  # a task cancelled before its first step would run none of it (no done events)
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            if not quiet:
                log.debug("session %s: response cancelled (%s)", self.sid, reason)
