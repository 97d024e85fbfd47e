"""One realtime response: the turn (text, or spoken audio with optional text) asked of the
stream's decoder, its pieces sent as OpenAI Realtime events in GA order (``response.created``,
``response.output_item.added``, ``conversation.item.added``, ``response.content_part.added``,
``response.output_text.delta``..., then the ``.done`` events and ``response.done`` with status
and usage, the stream's cached context in ``input_token_details.cached_tokens``). A cancelled
task (``response.cancel``, or speech: barge-in) still closes every open part, status cancelled.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from pipeline.api.realtime_events import assistant_item, new_id, response_object
from pipeline.core.messages import AnswerEnd, AnswerStart

__all__ = ["Turn", "run_response"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Turn:
    """What the user said since the last response: text, and/or 24-kHz PCM (a spoken turn)."""

    text: str | None = None
    audio: bytes | None = None

    @classmethod
    def merge(cls, turns: list["Turn"], instructions: str | None) -> "Turn":
        texts = [t.text for t in turns if t.text]
        audio = b"".join(t.audio for t in turns if t.audio)
        words = "\n".join(texts)
        if instructions:
            words = f"{instructions}\n\n{words}" if words else instructions
        return cls(words or None, audio or None)


async def run_response(s: Any, turn: Turn, max_tokens: int, ended_at: float | None) -> None:
    """Stream one answer for session ``s`` (pipeline.api.realtime_session.Session)."""
    resp_id, item_id = new_id("resp"), new_id("item")
    base = {"response_id": resp_id, "item_id": item_id, "output_index": 0}
    s.emit({"type": "response.created", "response": response_object(resp_id, "in_progress", [], max_tokens)})
    s.emit({"type": "response.output_item.added", "response_id": resp_id, "output_index": 0,
            "item": assistant_item(item_id, "in_progress", None)})
    prev = s.items[-1] if s.items else None
    s.items.append(item_id)
    s.emit({"type": "conversation.item.added", "previous_item_id": prev, "item": assistant_item(item_id, "in_progress", None)})
    s.emit({"type": "response.content_part.added", **base, "content_index": 0, "part": {"type": "text", "text": ""}})
    parts: list[str] = []
    start: AnswerStart | None = None
    end: AnswerEnd | None = None
    status, details, gen = "completed", None, None
    audio_tokens = 0
    t0 = time.monotonic() if ended_at is None else ended_at
    try:
        route = await s.api._route(s.sid, s.owner, False)
        if turn.audio:
            from pipeline.sources.appended import pcm_to_16k

            audio = await asyncio.to_thread(pcm_to_16k, turn.audio)
            audio_tokens = math.ceil(audio.size / 640)
            gen = route.decoder.ask_spoken.options(num_returns="streaming").remote(
                s.sid, audio.tobytes(), turn.text, max_tokens)
        else:
            gen = route.decoder.ask.options(num_returns="streaming").remote(s.sid, turn.text, max_tokens, None)
        async for ref in gen:
            ev = await ref
            if isinstance(ev, AnswerStart):
                start = ev
            elif isinstance(ev, AnswerEnd):
                end = ev
            elif isinstance(ev, str):
                if not parts:
                    s.metrics.observe_realtime_latency(time.monotonic() - t0)
                parts.append(ev)
                s.emit({"type": "response.output_text.delta", **base, "content_index": 0, "delta": ev})
        if end is not None and end.finish_reason == "length":
            status, details = "incomplete", {"type": "incomplete", "reason": "max_output_tokens"}
    except asyncio.CancelledError:
        status, details = "cancelled", {"type": "cancelled", "reason": s.cancel_reason}
        if gen is not None:
            try:
                import ray

                ray.cancel(gen)
            except Exception:
                pass
    except Exception as exc:  # the decoder refused or is away: the response fails, the socket stays
        from pipeline.api.errors import to_api_error

        err = to_api_error(exc, s.sid)
        log.warning("session %s: response failed: %s", s.sid, err.message)
        status = "failed"
        details = {"type": "failed", "error": {"type": "server_error" if err.status >= 500 else "invalid_request_error",
                                               "code": str(err.status), "message": err.message}}
    text = "".join(parts)
    item_status = "completed" if status == "completed" else "incomplete"
    s.emit({"type": "response.output_text.done", **base, "content_index": 0, "text": text})
    s.emit({"type": "response.content_part.done", **base, "content_index": 0, "part": {"type": "text", "text": text}})
    done_item = assistant_item(item_id, item_status, text)
    s.emit({"type": "response.output_item.done", "response_id": resp_id, "output_index": 0, "item": done_item})
    s.emit({"type": "conversation.item.done", "previous_item_id": prev, "item": done_item})
    usage = None
    if start is not None:
        q = start.question_tokens
        out = end.completion_tokens if end is not None else len(parts)
        usage = {"total_tokens": start.context_tokens + q + out, "input_tokens": start.context_tokens + q,
                 "output_tokens": out,
                 "input_token_details": {"cached_tokens": start.context_tokens, "text_tokens": q - audio_tokens,
                                         "audio_tokens": audio_tokens, "image_tokens": 0,
                                         "cached_tokens_details": {"text_tokens": start.context_tokens,
                                                                   "audio_tokens": 0, "image_tokens": 0}},
                 "output_token_details": {"text_tokens": out, "audio_tokens": 0}}
    s.emit({"type": "response.done", "response": response_object(resp_id, status, [done_item], max_tokens,
                                                                 details, usage)})
    s.metrics.realtime_response(status)
