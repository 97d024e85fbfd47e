"""What travels between the engine's stages: one message type per hand-over, each carrying its
window's own timing (media span, the stream's live clock) so no stage keeps side tables.

    IngestActor --RawWindow--> EncoderWorker --CompressedItem--> DecoderActor

Both satisfy pipeline.core.queues.QueuedWindow (stream_id, index, backpressure, lag). No torch import:
the ingest actors use this module and never load torch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.sources.windows import AVWindow

__all__ = ["AnswerEnd", "AnswerStart", "CompressedItem", "MAX_ANSWER_TOKENS", "QuestionRoute", "RawWindow", "SubmitReply",
           "Timing", "check_question", "lag_of"]


def lag_of(t0: float | None, end: float, now: float | None = None) -> float | None:
    """Seconds the window ending at media time ``end`` is behind live (None for unpaced files)."""
    if t0 is None:
        return None
    return (time.time() if now is None else now) - (t0 + end)


@dataclass(frozen=True)
class Timing:
    """A window's place in media time and on the stream's live clock."""

    start: float  # media seconds
    end: float
    t0: float | None  # wall time of media time 0 for live / realtime sources; None for files

    def lag(self, now: float | None = None) -> float | None:
        return lag_of(self.t0, self.end, now)


@dataclass
class RawWindow:
    """One decoded 2-s window (pipeline.sources.windows.AVWindow) on its way to its encoder worker."""

    stream_id: str
    window: AVWindow
    t0: float | None
    arrived: float  # wall time it left ingestion
    backpressure: bool = False  # a file that can wait: never dropped, ingestion waits instead

    @property
    def index(self) -> int:
        return int(self.window.index)

    @property
    def timing(self) -> Timing:
        return Timing(float(self.window.start), float(self.window.end), self.t0)

    def lag(self, now: float) -> float | None:
        return self.timing.lag(now)


@dataclass
class CompressedItem:
    """One compressed window (``payload`` = CompressedWindow.to_bytes) on its way to the decoder,
    as stored: the decoder can equally read it back from the store."""

    stream_id: str
    index: int
    timing: Timing
    payload: bytes
    backpressure: bool = False

    def lag(self, now: float) -> float | None:
        return self.timing.lag(now)


#: the most tokens one answer may have: the API's bound and the decoder's, one number
MAX_ANSWER_TOKENS = 1024


def check_question(question: str | None, messages: list | None, max_tokens: int) -> None:
    """The one check of a question every road shares (HTTP, the CLI, the engine's own callers):
    ValueError naming the field. The HTTP models bound the same fields with the same numbers."""
    if messages is None and (not isinstance(question, str) or not question.strip()):
        raise ValueError("question: must be a non-empty string")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_ANSWER_TOKENS:
        raise ValueError(f"max_tokens: must be an integer in [1, {MAX_ANSWER_TOKENS}], got {max_tokens!r}")


@dataclass(frozen=True)
class QuestionRoute:
    """Where a question goes, found once by the engine: the stream (ownership checked, by id or
    by name) and the handle of the decoder that holds its context, which the caller then asks
    directly so the answer's pieces come straight from the decoder."""

    stream_id: str
    decoder: Any  # the DecoderActor's handle


@dataclass(frozen=True)
class AnswerStart:
    """First event of an answer: the prompt it is read from (the stream's cached context and
    the question's own tokens, for OpenAI's ``usage``) and the windows in that context."""

    context_tokens: int
    question_tokens: int
    windows: int = 0


@dataclass(frozen=True)
class AnswerEnd:
    """Last event of an answer: tokens generated and why it stopped ("stop" or "length")."""

    completion_tokens: int
    finish_reason: str


@dataclass(frozen=True)
class SubmitReply:
    """The encoder's answer to a submitted window: what became of it (pipeline.core.queues.Added, or
    "restarted" when the encoder is not the incarnation the producer last spoke to: nothing was
    queued, the producer resends what was not durable yet; "moved" when the stream was handed to
    another worker), the encoder's incarnation, and the
    newest index of the stream whose effects are durable in the store (stored, or held in the
    stored method state)."""

    added: str
    incarnation: str
    durable_through: int

    RESTARTED = "restarted"
    MOVED = "moved"  # the stream is no longer on this worker: ask the record where it went
