"""Request and response bodies of the HTTP API (pipeline.api.app), as pydantic models, so a bad
request is refused at the door with a 422 that names the offending field, before the engine
sees it. The OpenAI-compatible models cover what the official ``openai`` client sends and reads;
unknown sampling knobs it may send (temperature, top_p, ...) are accepted and ignored.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.core.messages import MAX_ANSWER_TOKENS
from pipeline.core.records import OmniZipSettings, StreamSpec, Strict
from pipeline.sources.options import HttpSourceOptions

__all__ = [
    "OmniZipSettings", "CreateStreamRequest", "StreamStatus",
    "StreamList", "DeleteResponse", "AskRequest", "AskResponse", "ChatMessage",
    "ChatCompletionRequest", "ChatCompletion", "ChatCompletionChunk", "Usage", "ModelCard",
    "ModelList", "ErrorBody", "ErrorResponse", "MAX_ANSWER_TOKENS", "MAX_QUESTION_CHARS",
]

#: Upper bound on one answer's length: a question must not hold a decoder for minutes.
#: Upper bound on a question's length in characters: /ask's question, or all of a chat's messages.
MAX_QUESTION_CHARS = 8192
MAX_CHAT_MESSAGES = 256


class CreateStreamRequest(StreamSpec):
    """``POST /v1/streams``: what to watch and how hard to compress it (the engine's own
    StreamSpec, so the HTTP layer and the service validate a spec the same way). An HTTP client
    gets typed, bounded source options only: raw FFmpeg options and devices stay with the
    operator (CLI, Python)."""

    options: HttpSourceOptions | None = Field(None, description="source options: transport, timeouts, "
                                              "reconnect policy (bounded)")

    @field_validator("source")
    @classmethod
    def _not_a_session(cls, v: str) -> str:
        if v.strip().lower().startswith("realtime:"):  # nothing but its socket could feed it
            raise ValueError("a realtime session's stream is made by opening the /v1/realtime WebSocket, "
                             "not by POST /v1/streams")
        return v

    def to_spec(self) -> dict[str, Any]:
        """The fields the client set, as the engine's create_stream spec."""
        spec = self.model_dump(exclude_unset=True, exclude_none=True, exclude={"options"})
        if self.options is not None:
            spec["options"] = self.options.to_source_options()
        return spec


class StreamStatus(BaseModel):
    """A stream as the engine reports it; fields the engine adds later pass through."""

    model_config = ConfigDict(extra="allow")
    id: str
    name: str | None = None
    source: str
    status: Literal["pending", "starting", "live", "reconnecting", "ended", "failed"] = Field(
        description="pending: waiting for Ray to place its ingest actor (resources); starting: opening the source")
    error: str | None = None
    created: float = 0.0
    lag_s: float = 0.0
    media_s: float = 0.0
    windows: int = 0
    windows_total: int = 0
    dropped: int = 0
    reconnects: int = 0
    context_tokens: int = 0
    tokens: dict[str, dict[str, int]] = Field(default_factory=dict,
                                              description='{"audio": {"in": n, "kept": n}, "video": {...}}')
    settings: dict[str, Any] = Field(default_factory=dict)


class StreamList(BaseModel):
    streams: list[StreamStatus]


class DeleteResponse(BaseModel):
    id: str
    deleted: bool


class AskRequest(Strict):
    """``POST /v1/streams/{id}/ask``."""

    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    max_tokens: int = Field(64, ge=1, le=MAX_ANSWER_TOKENS)
    stream: bool = Field(False, description="answer as Server-Sent Events, one per token")

    @field_validator("question")
    @classmethod
    def _no_blank_question(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("question must not be blank")
        return v


class AskResponse(BaseModel):
    stream_id: str
    question: str
    answer: str
    completion_tokens: int
    finish_reason: Literal["stop", "length"]
    context_tokens: int = Field(description="tokens of the stream's context the answer was read from")
    windows: int = Field(description="windows in that context")
    created: int = Field(default_factory=lambda: int(time.time()))


# --- OpenAI-compatible ---------------------------------------------------------------------

class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        """The message's text; image/audio parts are refused (the stream is the media)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        bad = [p.type for p in self.content if p.type != "text"]
        if bad:
            raise ValueError(f"only text content parts are supported, got {bad}")
        return "".join(p.text or "" for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``: ``model`` names the stream (id or name); the last user
    message is the question, the system messages and earlier turns are folded in front of it.
    Sampling knobs are accepted and ignored (decoding is greedy)."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, description="the stream's id or name")
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_CHAT_MESSAGES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_ANSWER_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_ANSWER_TOKENS)
    n: int | None = Field(None, ge=1, le=1, description="one choice only")

    @field_validator("messages")
    @classmethod
    def _has_question(cls, msgs: list[ChatMessage]) -> list[ChatMessage]:
        users = [m for m in msgs if m.role == "user"]
        if not users:
            raise ValueError("needs at least one message with role 'user' (the question)")
        if not users[-1].text().strip():
            raise ValueError("the last user message is empty")
        total = sum(len(m.text()) for m in msgs)
        if total > MAX_QUESTION_CHARS:
            raise ValueError(f"the messages hold {total} characters; at most {MAX_QUESTION_CHARS} in all "
                             "(the same cap as a question to /ask)")
        return msgs


    def answer_budget(self, default: int = 64) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class Usage(BaseModel):
    """OpenAI's usage: the prompt is the stream's context plus the question; the context part
    is served from the KV cache (``prompt_tokens_details.cached_tokens``)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None


class ChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: ChoiceMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """A stream, listed as an OpenAI model (its id is what `model` takes)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "omnizip-stream"
    name: str | None = None
    status: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    """OpenAI's error shape, so the openai client surfaces ``message``; 422s add ``detail``."""

    error: ErrorBody
    detail: list[dict[str, Any]] | None = None
