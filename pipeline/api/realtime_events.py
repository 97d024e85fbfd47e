"""OpenAI Realtime (GA) event shapes as this service speaks them: the session object and its
``session.update`` rules, the items, responses and errors, as plain data (no I/O). What the
service cannot honour (audio output, tools, semantic VAD, other formats) is refused naming the
field, as an ``EventError`` the socket turns into an ``error`` event (pipeline.api.realtime).
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.messages import MAX_ANSWER_TOKENS
from pipeline.core.turns import TurnDetection

__all__ = ["CLIENT_EVENTS", "EventError", "SessionConfig", "UNSUPPORTED_EVENTS", "error_event", "new_id",
           "response_object", "assistant_item", "user_item"]

CLIENT_EVENTS = ("session.update", "input_audio_buffer.append", "input_audio_buffer.commit",
                 "input_audio_buffer.clear", "conversation.item.create", "response.create", "response.cancel")
UNSUPPORTED_EVENTS = {  # OpenAI client events this service cannot honour, and why
    "conversation.item.truncate": "there is no audio output to truncate",
    "conversation.item.delete": "conversation items cannot be deleted here",
    "conversation.item.retrieve": "conversation items cannot be retrieved here",
    "output_audio_buffer.clear": "there is no audio output",
}
MAX_INSTRUCTIONS = 8192
DEFAULT_MAX_TOKENS = 64
_IGNORED_SESSION = ("model", "tracing", "include", "truncation", "prompt", "tool_choice", "object", "id",
                    "expires_at")


class EventError(Exception):
    """A client event refused: ``error`` with ``code`` and ``param`` (the field), socket open
    unless ``fatal``."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value",
                 type_: str = "invalid_request_error", fatal: bool = False) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.type, self.fatal = message, param, code, type_, fatal


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


def error_event(err: EventError, event_id: str | None = None) -> dict[str, Any]:
    return {"type": "error", "error": {"type": err.type, "code": err.code, "message": err.message,
                                       "param": err.param, "event_id": event_id}}


def unsupported(what: str, param: str) -> EventError:
    return EventError(f"{what} is not supported by this service (text answers about the stream only)",
                      param, "unsupported")


@dataclass
class SessionConfig:
    """The parts of OpenAI's session this service honours; the rest is refused or ignored."""

    id: str
    instructions: str = ""
    vad: TurnDetection | None = field(default_factory=TurnDetection)  # None: the client commits
    max_output_tokens: int = DEFAULT_MAX_TOKENS

    def to_dict(self) -> dict[str, Any]:
        td = None if self.vad is None else {
            "type": "server_vad", "threshold": self.vad.threshold, "prefix_padding_ms": self.vad.prefix_padding_ms,
            "silence_duration_ms": self.vad.silence_duration_ms, "create_response": self.vad.create_response,
            "interrupt_response": self.vad.interrupt_response}
        return {"type": "realtime", "object": "realtime.session", "id": self.id, "model": "omnizip-stream",
                "output_modalities": ["text"], "instructions": self.instructions,
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": td}},
                "max_output_tokens": self.max_output_tokens, "tools": []}

    def updated(self, s: Any) -> "SessionConfig":
        """A copy with ``session.update``'s ``session`` applied; EventError naming a bad field."""
        if not isinstance(s, dict):
            raise EventError("session must be an object", "session")
        unknown = sorted(set(s) - {"type", "instructions", "output_modalities", "audio", "max_output_tokens",
                                   "tools", *_IGNORED_SESSION})
        if unknown:
            raise EventError(f"unknown session field(s) {unknown}", f"session.{unknown[0]}", "unknown_parameter")
        if s.get("type", "realtime") != "realtime":
            raise unsupported(f"a {s.get('type')!r} session", "session.type")
        if s.get("tools"):
            raise unsupported("tools (function calling, MCP)", "session.tools")
        out = SessionConfig(self.id, self.instructions, self.vad, self.max_output_tokens)
        if "instructions" in s:
            if not isinstance(s["instructions"], str) or len(s["instructions"]) > MAX_INSTRUCTIONS:
                raise EventError(f"instructions: a string of at most {MAX_INSTRUCTIONS} characters",
                                 "session.instructions")
            out.instructions = s["instructions"]
        if "output_modalities" in s:
            check_modalities(s["output_modalities"], "session.output_modalities")
        if "max_output_tokens" in s:
            out.max_output_tokens = max_tokens(s["max_output_tokens"], "session.max_output_tokens")
        audio = s.get("audio")
        if audio is not None:
            out.vad = _audio(audio, out.vad)
        return out


def check_modalities(value: Any, param: str) -> None:
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
        raise EventError("output_modalities: a list such as [\"text\"]", param)
    if "audio" in value:
        raise unsupported("audio output", param)
    if value != ["text"]:
        raise EventError(f"output_modalities: only [\"text\"], got {value}", param)


def max_tokens(value: Any, param: str) -> int:
    if value == "inf":
        return MAX_ANSWER_TOKENS
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ANSWER_TOKENS:
        raise EventError(f"max_output_tokens: an integer in [1, {MAX_ANSWER_TOKENS}] or \"inf\", got {value!r}", param)
    return value


def _audio(audio: Any, vad: TurnDetection | None) -> TurnDetection | None:
    if not isinstance(audio, dict):
        raise EventError("audio must be an object", "session.audio")
    if audio.get("output"):
        raise unsupported("audio output", "session.audio.output")
    inp = audio.get("input")
    if inp is None:
        return vad
    if not isinstance(inp, dict):
        raise EventError("audio.input must be an object", "session.audio.input")
    fmt = inp.get("format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type", "audio/pcm") != "audio/pcm":
            raise unsupported(f"input format {fmt.get('type') if isinstance(fmt, dict) else fmt!r} "
                              "(only audio/pcm at 24000 Hz)", "session.audio.input.format.type")
        if fmt.get("rate", 24000) != 24000:
            raise EventError(f"audio/pcm is taken at 24000 Hz, not {fmt.get('rate')!r}",
                             "session.audio.input.format.rate")
    for name in ("transcription", "noise_reduction"):
        if inp.get(name):
            raise unsupported(f"input {name.replace('_', ' ')}", f"session.audio.input.{name}")
    if "turn_detection" not in inp:
        return vad
    td = inp["turn_detection"]
    if td is None:
        return None
    if not isinstance(td, dict) or td.get("type") != "server_vad":
        kind = td.get("type") if isinstance(td, dict) else td
        raise unsupported(f"turn detection {kind!r} (only server_vad, or null)", "session.audio.input.turn_detection.type")
    base = vad or TurnDetection()
    known = ("threshold", "prefix_padding_ms", "silence_duration_ms", "create_response", "interrupt_response")
    extra = sorted(set(td) - {"type", "idle_timeout_ms", *known})
    if extra:
        raise EventError(f"unknown turn_detection field(s) {extra}", f"session.audio.input.turn_detection.{extra[0]}",
                         "unknown_parameter")
    kw = {k: td.get(k, getattr(base, k)) for k in known}
    kw = {k: (base.__dataclass_fields__[k].default if v is None else v) for k, v in kw.items()}
    try:
        return TurnDetection(**kw)
    except ValueError as exc:
        name = str(exc).split(":", 1)[0]
        raise EventError(str(exc), f"session.audio.input.turn_detection.{name}") from None


def user_item(item_id: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
            "content": content}


def assistant_item(item_id: str, status: str, text: str | None) -> dict[str, Any]:
    content = [] if text is None else [{"type": "output_text", "text": text}]
    return {"id": item_id, "object": "realtime.item", "type": "message", "role": "assistant", "status": status,
            "content": content}


def response_object(resp_id: str, status: str, output: list[dict[str, Any]], max_out: int,
                    details: dict[str, Any] | None = None, usage: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": resp_id, "object": "realtime.response", "status": status, "status_details": details,
            "output": output, "output_modalities": ["text"], "max_output_tokens": max_out, "conversation_id": None,
            "usage": usage, "metadata": None}
