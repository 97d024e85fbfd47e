"""What each stage reports about a stream, typed, and the one place that merges them into the
status a client sees (``stream_status``). Drops are keyed by reason in each stage; the status
names them ``<reason>`` (ingest, encoder) and ``decoder_<reason>`` (decoder)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.records import StreamRecord
from pipeline.redact import redact
from pipeline.store.contract import WindowSpan

__all__ = ["DecoderStats", "EncoderStats", "IngestStats", "TokenCounts", "missing_windows", "stream_status"]


@dataclass
class IngestStats:
    """One stream's ingest actor: its status is the stream's status while the source runs."""

    status: str = "starting"
    error: str | None = None
    windows_total: int = 0
    reconnects: int = 0
    media_s: float = 0.0
    t0: float | None = None
    live: bool = False
    last_index: int | None = None
    done: bool = False
    drops: dict[str, int] = field(default_factory=dict)
    decode_errors: int = 0  # corrupt packets the source skipped (the windows are flagged `damaged`)
    duration_s: float | None = None  # a file's declared duration: reaching less is `ended_early`
    push: dict[str, Any] | None = None  # a push stream's publisher figures (pipeline.sources.push.PushStats)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def ended_early(self) -> bool:
        """The file ended more than a window's worth before its container's declared duration."""
        return (self.status == "ended" and self.duration_s is not None
                and self.media_s < self.duration_s - 2.0)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "IngestStats":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in names})


@dataclass
class TokenCounts:
    """Tokens in and kept per modality, summed over a stream's windows."""

    audio_in: int = 0
    audio_kept: int = 0
    video_in: int = 0
    video_kept: int = 0

    def add(self, window: Any) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + int(getattr(window, f.name)))


@dataclass
class EncoderStats:
    """One stream in its encoder worker; ``tokens``, ``harder`` and ``drops`` persist with the
    compressor state, so a restarted worker continues them."""

    known: bool = False
    queue: int = 0
    busy: int = 0
    ending: bool = False
    last_pushed: int = -1
    last_stored: int = -1
    durable: int = -1  # newest window index whose effects are in the store (stored, or in the stored state)
    unwritten: int = 0  # windows and states waiting for the store (pipeline.store.writer)
    decoder: int = 0
    harder: int = 0
    duplicates: int = 0  # windows refused as already seen: a producer that renumbered from an old index
    tokens: TokenCounts = field(default_factory=TokenCounts)
    drops: dict[str, int] = field(default_factory=dict)


@dataclass
class DecoderStats:
    """One stream's rolling context in its decoder."""

    known: bool = False
    windows: int = 0
    context_tokens: int = 0
    last: int = -1
    received: int = -1
    handled: int = -1
    queue: int = 0
    max_queue: int = 0
    busy: bool = False
    lag_s: float | None = None
    lag_at_append: float = 0.0
    evicted: int = 0
    drops: dict[str, int] = field(default_factory=dict)


def _drained(enc: EncoderStats, dec: DecoderStats) -> bool:
    """Every window the encoder stored has been appended or dropped by the decoder. A worker
    that does not hold the stream (it restarted, or the engine did, after the source ended)
    has nothing of it in flight: what the store holds is all there is, and a decoder rebuilds
    its context from that, so the durable end in the record stands."""
    if not enc.known:
        return True
    if enc.queue or enc.busy or enc.ending or enc.unwritten:
        return False
    if not dec.known:
        return True  # a decoder away or restarting reads the store when it is back
    if dec.queue or dec.busy:
        return False
    return dec.handled >= enc.last_stored


def missing_windows(span: WindowSpan | None, enc: EncoderStats, skipped: int,
                    retention_windows: int | None = None, retention_by_age: bool = False) -> int | None:
    """Windows the store should hold but does not (evicted by Redis, lost with a flushed
    database): the index range it should hold, less the windows it holds and those the stream
    dropped on purpose (``skipped``, counted in its drops). None when the store did not answer.
    The range starts at 0, or where count retention starts it; with age retention (whose start
    needs media times) only holes after the oldest stored window count. An undercount, never an
    overcount: drops outside the range are subtracted too."""
    if span is None:
        return None
    last = -1 if span.last is None else span.last
    if enc.known and not enc.unwritten:  # every window it emitted has reached the store (or is counted lost)
        last = max(last, enc.last_stored)
    if last < 0:
        return 0
    first = 0
    if retention_windows is not None:
        first = max(0, last - retention_windows + 1)
    if retention_by_age and span.first is not None:
        first = max(first, span.first)
    return max(0, last - first + 1 - span.count - skipped)


def stream_status(rec: StreamRecord, ing: IngestStats | None, enc: EncoderStats | None,
                  dec: DecoderStats | None, now: float | None = None, pending: bool = False,
                  span: WindowSpan | None = None, retention: tuple[int | None, bool] = (None, False)) -> dict[str, Any]:
    """The status of one stream from its record and what its three stages report (any of which
    may be missing: an actor restarting, a finished source whose figures are in the record).
    ``pending``: the ingest actor exists but is not placed yet (waiting for resources);
    ``span``: what the store holds of its windows (None: unknown), judged under ``retention``
    (max windows, whether age retention is on) for ``missing_windows``."""
    ingest_gone = ing is None
    if ing is None:  # no answer from the actor: its final figures, if the record has them
        ing = IngestStats.from_dict(rec.ingest) if rec.ingest is not None else IngestStats(status="")
    enc = enc or EncoderStats()
    dec = dec or DecoderStats()
    status = ing.status or rec.status
    if status == "created":
        status = "starting"
    error = ing.error if ing.error is not None else rec.error
    if pending:
        status = "pending"
    elif ingest_gone and rec.ingest is None and status in ("starting", "live", "reconnecting"):
        status, error = "failed", "the stream's ingest actor is gone"
    if rec.extra.get("context_failed"):  # its decoder gave up rebuilding it (pipeline.engine.rebuild)
        status, error = "failed", str(rec.extra["context_failed"])
    if status == "ended" and not _drained(enc, dec):
        status = "live"  # the source ended; its last windows are still on their way into the context
    lag = 0.0
    if ing.live and ing.t0 is not None:
        if status in ("ended", "failed"):
            lag = dec.lag_at_append
        elif dec.lag_s is not None:
            lag = dec.lag_s
        else:
            lag = (time.time() if now is None else now) - ing.t0
    drops = {**ing.drops, **enc.drops, **{f"decoder_{k}": v for k, v in dec.drops.items()}}
    t = enc.tokens
    return {
        "id": rec.id, "name": rec.name, "source": redact(rec.source), "status": status,
        "error": redact(error) if error else error,
        "created": rec.created, "lag_s": round(float(lag), 3), "media_s": float(ing.media_s),
        "windows": dec.windows, "windows_total": ing.windows_total, "dropped": sum(drops.values()),
        "reconnects": ing.reconnects, "context_tokens": dec.context_tokens,
        "tokens": {"audio": {"in": t.audio_in, "kept": t.audio_kept}, "video": {"in": t.video_in, "kept": t.video_kept}},
        "settings": dataclasses.asdict(rec.settings), "compressed_harder": enc.harder, "drops": drops,
        "missing_windows": missing_windows(span, enc, sum(ing.drops.values()) + sum(enc.drops.values()), *retention),
        "duplicates": enc.duplicates,
        "decode_errors": ing.decode_errors, "duration_s": ing.duration_s, "ended_early": ing.ended_early(),
        **({"ingest": push_ingest(rec, ing)} if "push" in rec.extra else {}),
    }


def push_ingest(rec: StreamRecord, ing: IngestStats) -> dict[str, Any]:
    """Where a push stream's publisher sends (relative to the API's root; the HTTP layer makes it
    absolute) and what it has sent; the publish token is never part of a status."""
    p = rec.extra.get("push") or {}
    url = "/v1/realtime" if p.get("protocol") == "realtime" else f"/v1/whip/{rec.id}"  # a realtime session's socket
    return {"protocol": p.get("protocol", "whip"), "url": url, **(ing.push or {})}

