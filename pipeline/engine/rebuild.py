"""A decoder's rebuild of one stream's context from the store, and what keeps it from
crash-looping (issue 19).

Streamed: the stored windows are read in batches twice, first for their sizes only (the
payloads dropped batch by batch), then from the oldest window that fits the budget: each payload
is decoded, prefilled and freed (omnizip.models.rolling.RollingContext.rebuild), so the peak
stays near the context's own size. Holding every stored window, its decoded copy and one
whole-context prefill at once peaked at 4.5x the steady memory and got the decoder OOM-killed.

Guarded: before a rebuild the decoder writes the attempt's time into the stream's record
(``rebuild_attempts``) and clears it once the context is built; a decoder that dies meanwhile
(OOM kill, crash) leaves it there. When ``attempts`` unfinished rebuilds of one stream lie within
``window_s``, the next one is refused: the stream is marked failed with the reason
(``context_failed``) instead of Ray restarting the decoder into the same death for ever.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.errors import StreamFailed
from pipeline.store.contract import StoredWindow, StreamNotFound, StreamStore

__all__ = ["ATTEMPTS_KEY", "FAILED_KEY", "RebuildGuard", "RebuildRefused", "rebuild_from_store", "window_tokens"]

log = logging.getLogger(__name__)

ATTEMPTS_KEY = "rebuild_attempts"  # record field: start times (epoch s) of rebuilds not finished
FAILED_KEY = "context_failed"  # record field: why the stream's context is not rebuilt any more


class RebuildRefused(StreamNotFound, StreamFailed):
    """The stream's context failed for good (the reason is the message): not rebuilt again, so
    a push answers 'unknown here' and a question names the reason."""


def window_tokens(w: StoredWindow) -> int:
    """A stored window's tokens in the context, from its fields (the encoder writes the kept
    counts); the payload is decoded only for a window stored without them."""
    a, v = w.fields.get("audio_kept"), w.fields.get("video_kept")
    if isinstance(a, int) and isinstance(v, int) and not isinstance(a, bool):
        return a + v
    from omnizip.models import CompressedWindow

    return CompressedWindow.from_bytes(w.payload).n_tokens


def rebuild_from_store(ctx: Any, store: StreamStore, sid: str, batch: int = 8) -> StoredWindow | None:
    """Stream ``sid``'s stored windows into the RollingContext ``ctx`` (only the newest that
    fit are read twice and prefilled); the newest window put in, without its payload, or None
    when the store holds none."""
    from omnizip.models import CompressedWindow

    sizes = [(w.index, window_tokens(w)) for w in store.iter_windows(sid, 0, batch)]
    if not sizes:
        return None
    skip = ctx.rebuild_skip(sizes)
    newest: list[StoredWindow] = []

    def windows() -> Iterator[Any]:
        for w in store.iter_windows(sid, sizes[skip][0], batch):
            newest[:] = [StoredWindow(w.index, w.media_start, w.media_end, b"", dict(w.fields))]
            yield CompressedWindow.from_bytes(w.payload)

    ctx.rebuild(windows(), skipped=skip)
    return newest[0] if newest else None


def _is_memory_error(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "memory" in str(exc).lower())


@dataclass(frozen=True)
class RebuildGuard:
    """At most ``attempts`` unfinished rebuilds of one stream within ``window_s`` seconds."""

    attempts: int = 3
    window_s: float = 600.0

    def begin(self, store: StreamStore, sid: str, record_extra: dict[str, Any], now: float | None = None) -> None:
        """Record a rebuild's start; RebuildRefused (the stream marked failed first) when the
        earlier ones never finished."""
        if record_extra.get(FAILED_KEY):
            raise RebuildRefused(str(record_extra[FAILED_KEY]))
        now = time.time() if now is None else now
        past = [float(t) for t in record_extra.get(ATTEMPTS_KEY) or []
                if isinstance(t, (int, float)) and 0 <= now - t <= self.window_s]
        if len(past) >= self.attempts:
            reason = (f"context rebuild failed: the decoder died {len(past)} times within {self.window_s:.0f} s "
                      "while rebuilding this stream's context (out of memory?); give the decoders more memory "
                      "or create the stream again with a smaller context_tokens")
            store.update_stream(sid, {FAILED_KEY: reason, "status": "failed", "error": reason, ATTEMPTS_KEY: []})
            log.error("stream %s: %s", sid, reason)
            raise RebuildRefused(reason)
        store.update_stream(sid, {ATTEMPTS_KEY: past + [now]})

    def end(self, store: StreamStore, sid: str, exc: BaseException | None = None) -> None:
        """The rebuild is over: clear the attempts, unless it ran out of memory (that counts as a death)."""
        if exc is not None and _is_memory_error(exc):
            return
        try:
            store.update_stream(sid, {ATTEMPTS_KEY: []})
        except Exception:  # the store away: the attempt stays counted, a later success clears it
            log.warning("stream %s: could not clear its rebuild attempts", sid)
