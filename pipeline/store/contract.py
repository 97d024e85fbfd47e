"""Durable per-stream state: the stream registry, each stream's compressed windows and its
compressor state, so a restarted worker or decoder resumes where the last one stopped.

This module is the contract (:class:`StreamStore`, its errors and records); two implementations:
``RedisStore`` (pipeline.store.redis_store: a real Redis, shared by every process of the cluster,
survives restarts) and ``MemoryStore`` (pipeline.store.memory: in-process, the embedded default
when no Redis URL is configured); pipeline.store.open picks one by URL. Payloads are opaque ``bytes``: the window
object belongs to the model adapter; :mod:`omnizip.codec` turns tensors into bytes.

Redis layout (keys share the hash tag ``{<stream id>}`` so a stream's keys live in one slot):
- ``omnizip:streams``             set of stream ids
- ``omnizip:{id}:spec``           JSON spec (source, name, settings, budget, status, created)
- ``omnizip:{id}:windows``        Redis stream, entry id ``<index+1>-0`` (idempotent appends),
                                  fields ``end`` (media end, s), ``meta`` (JSON), ``payload``
- ``omnizip:{id}:state``          hash ``index`` (last window folded in) + ``data`` (bytes)
- ``omnizip:{id}:blobs``          hash ``<index>:<kind>`` -> bytes: side data of a window (its
                                  pictures' data, pipeline.viz.window), + ``blobidx`` (sorted
                                  set, score = index) to drop them with their windows
"""

from __future__ import annotations

import json
import math
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import StoreUnavailable
from pipeline.store.watch_store import WatchStoreContract

__all__ = [
    "Retention", "StoredWindow", "StoredState", "StreamStore", "StoreError", "StreamNotFound",
    "StreamExists", "WindowOrderError", "StoreRefused", "WindowSpan",
]

Scalar = str | int | float | bool | None
_RESERVED = ("id", "created")


class StoreError(Exception):
    """Base class of the store's errors."""


class StreamNotFound(StoreError, KeyError):
    """No stream with this id is registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "stream not found"


class StreamExists(StoreError):
    """A different stream is already registered under this id."""


class WindowOrderError(StoreError, ValueError):
    """A window arrived after a later one without being a retry of an accepted window."""


class StoreRefused(StoreError, StoreUnavailable):
    """The store answers but cannot be used safely: it refuses writes (Redis out of memory, a
    failed disk: OOM, MISCONF, READONLY) or it is set to evict keys. A StoreUnavailable, so the
    API answers 503 naming the cause (never a 500 with the backend's text); the message says
    what to fix."""


@dataclass(frozen=True)
class WindowSpan:
    """What the store holds of a stream's windows: how many, and the oldest and newest index."""

    count: int
    first: int | None
    last: int | None


@dataclass(frozen=True)
class Retention:
    """How much of each stream's window history is kept: at most ``max_windows`` windows and/or
    only windows whose media end lies within ``max_age_s`` media seconds of the newest one."""

    max_windows: int | None = None
    max_age_s: float | None = None
    #: side blobs (put_blob) of at most this many newest windows, and never of a window that
    #: retention dropped: pictures of the recent past are enough, and they must stay small
    max_blob_windows: int | None = 300

    def __post_init__(self) -> None:
        if self.max_windows is not None and (not isinstance(self.max_windows, int)
                                             or self.max_windows < 1):
            raise ValueError(f"Retention.max_windows must be an int >= 1, got {self.max_windows!r}")
        if self.max_age_s is not None and not (self.max_age_s >= 0 and math.isfinite(self.max_age_s)):
            raise ValueError(f"Retention.max_age_s must be a finite number >= 0, got {self.max_age_s!r}")
        if self.max_blob_windows is not None and (not isinstance(self.max_blob_windows, int)
                                                  or self.max_blob_windows < 1):
            raise ValueError(f"Retention.max_blob_windows must be an int >= 1, got {self.max_blob_windows!r}")


@dataclass(frozen=True)
class StoredWindow:
    """One compressed window as stored: ``payload`` is the adapter's serialised window."""

    index: int
    media_start: float
    media_end: float
    payload: bytes
    fields: dict[str, Scalar] = field(default_factory=dict)


@dataclass(frozen=True)
class StoredState:
    """A stream's compressor state after window ``index`` was folded in."""

    index: int
    data: bytes


def _check_id(stream_id: str) -> str:
    if not isinstance(stream_id, str) or not stream_id or len(stream_id) > 128 \
            or any(c in stream_id for c in "{}: \t\n"):
        raise ValueError(f"stream_id must be a non-empty string of at most 128 characters "
                         f"without braces, colons or whitespace, got {stream_id!r}")
    return stream_id


def _check_window(index: int, payload: bytes, media_start: float, media_end: float,
                  fields: Mapping[str, Scalar] | None) -> dict[str, Scalar]:
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ValueError(f"index must be an int >= 0, got {index!r}")
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
    if not (math.isfinite(media_start) and math.isfinite(media_end) and media_end >= media_start):
        raise ValueError(f"media_start/media_end must be finite with end >= start, "
                         f"got {media_start!r}/{media_end!r}")
    out = dict(fields or {})
    for k, v in out.items():
        if not isinstance(k, str) or not (v is None or isinstance(v, (str, int, float, bool))):
            raise TypeError(f"fields[{k!r}] must map a str to a str/int/float/bool/None, got {v!r}")
    json.dumps(out)  # raises early on anything JSON cannot hold
    return out


def _check_blob(index: int, kind: str) -> str:
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ValueError(f"index must be an int >= 0, got {index!r}")
    if not isinstance(kind, str) or not 1 <= len(kind) <= 32 or not all(c.isalnum() or c in "_-" for c in kind) \
            or not kind.isascii():
        raise ValueError(f"blob kind must be 1-32 ASCII letters, digits, '_' or '-', got {kind!r}")
    return f"{index}:{kind}"


def _check_blobs(index: int, blobs: Mapping[str, bytes] | None) -> dict[str, bytes]:
    """A window's side blobs, each named as put_blob names it."""
    out: dict[str, bytes] = {}
    for kind, data in (blobs or {}).items():
        _check_blob(index, kind)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"blob data must be bytes, got {type(data).__name__}")
        out[kind] = bytes(data)
    return out


def _check_spec(spec: Mapping[str, Any], what: str) -> dict[str, Any]:
    if not isinstance(spec, Mapping):
        raise TypeError(f"{what} must be a mapping, got {type(spec).__name__}")
    try:
        return json.loads(json.dumps(dict(spec)))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be JSON-serialisable: {e}") from None


class StreamStore(WatchStoreContract, ABC):
    """The contract both stores keep (watches, events and their outbox: pipeline.store.watch_store). Every write is idempotent where a retry can repeat it."""

    retention: Retention

    # --- registry -------------------------------------------------------------------------
    @abstractmethod
    def create_stream(self, spec: Mapping[str, Any], stream_id: str | None = None) -> dict[str, Any]:
        """Register a stream; returns its record (``spec`` plus ``id``, ``created`` and a default
        ``status`` of "created"). Repeating the same create is a no-op; a different spec under an
        existing id raises :class:`StreamExists`."""

    @abstractmethod
    def get_stream(self, stream_id: str) -> dict[str, Any]:
        """The stream's record; :class:`StreamNotFound` if there is none."""

    @abstractmethod
    def list_streams(self) -> list[dict[str, Any]]:
        """All records, oldest first."""

    @abstractmethod
    def update_stream(self, stream_id: str, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Merge ``changes`` into the record (not ``id``/``created``); returns the new record."""

    @abstractmethod
    def delete_stream(self, stream_id: str) -> bool:
        """Remove the record, its windows and its state; False if it did not exist."""

    # --- windows --------------------------------------------------------------------------
    @abstractmethod
    def append_window(self, stream_id: str, index: int, payload: bytes, *, media_start: float,
                      media_end: float, fields: Mapping[str, Scalar] | None = None,
                      state: bytes | None = None, blobs: Mapping[str, bytes] | None = None) -> bool:
        """Append window ``index`` (0-based, increasing; gaps allowed for dropped windows) and,
        atomically with it, the compressor ``state`` after it and the window's side ``blobs``
        (kind -> bytes, as :meth:`put_blob`): one round trip per window. Returns False when the
        window is a retry of one already accepted (nothing changes), True when it was added.
        Retention is applied in the same step. :class:`WindowOrderError` if it comes after a
        later window."""

    @abstractmethod
    def note_progress(self, stream_id: str, progress: Mapping[str, Any]) -> None:
        """The ingest's progress (a small JSON-able mapping), read back as the record's
        ``progress``: one blind write per window, no read-modify-write of the record (last
        write wins; :meth:`update_stream` with a ``progress`` replaces it too).
        :class:`StreamNotFound` when the stream is not registered."""

    @abstractmethod
    def iter_windows(self, stream_id: str, start: int = 0, batch: int = 32) -> Iterator[StoredWindow]:
        """Retained windows with index >= ``start``, in index order, read ``batch`` at a time."""

    def windows(self, stream_id: str, start: int = 0) -> list[StoredWindow]:
        """All retained windows with index >= ``start``, in order (context rebuild)."""
        return list(self.iter_windows(stream_id, start))

    def window_page(self, stream_id: str, start: int = 0, limit: int = 100) -> list[StoredWindow]:
        """At most ``limit`` retained windows with index >= ``start``, in order, WITHOUT their
        payloads (``b""``): a listing must not copy every window's embeddings to its caller."""
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValueError(f"limit must be an int >= 1, got {limit!r}")
        out = []
        for w in self.iter_windows(stream_id, start, batch=min(limit, 32)):
            out.append(StoredWindow(w.index, w.media_start, w.media_end, b"", dict(w.fields)))
            if len(out) >= limit:
                break
        return out

    @abstractmethod
    def window_count(self, stream_id: str) -> int:
        """How many windows are retained."""

    @abstractmethod
    def last_window_index(self, stream_id: str) -> int | None:
        """Index of the newest retained window, None if none."""

    # --- compressor state -----------------------------------------------------------------
    @abstractmethod
    def save_state(self, stream_id: str, index: int, data: bytes) -> None:
        """Store the compressor state after window ``index`` (replaces the previous one)."""

    @abstractmethod
    def load_state(self, stream_id: str) -> StoredState | None:
        """The last saved compressor state, None if none was saved."""

    # --- side blobs -----------------------------------------------------------------------
    @abstractmethod
    def put_blob(self, stream_id: str, index: int, kind: str, data: bytes) -> None:
        """Store side data of window ``index`` under ``kind`` (replacing one of the same kind),
        e.g. what its pictures are drawn from. Kept only for the windows retention keeps, and
        for at most ``retention.max_blob_windows`` newest indices; removed with the stream.
        It may come before its window is appended."""

    @abstractmethod
    def get_blob(self, stream_id: str, index: int, kind: str) -> bytes | None:
        """The blob, None when there is none (never stored, or dropped with its window)."""

    def _blob_floor(self, first_window: int | None, top_blob: int) -> int | None:
        """The lowest index whose blobs are kept: the oldest retained window's, raised to keep
        at most ``max_blob_windows`` indices below the newest blob."""
        lows = [first_window] if first_window is not None else []
        if self.retention.max_blob_windows is not None:
            lows.append(top_blob - self.retention.max_blob_windows + 1)
        return max(lows) if lows else None

    def window_span(self, stream_id: str) -> WindowSpan:
        """How many windows are retained and their oldest/newest index (a hole check: the
        service compares it with the index range the stream should hold)."""
        first = next(iter(self.window_page(stream_id, 0, 1)), None)
        return WindowSpan(self.window_count(stream_id), None if first is None else first.index,
                          self.last_window_index(stream_id))

    # --- lifecycle ------------------------------------------------------------------------
    def ping(self) -> bool:
        """True when the backing store answers."""
        return True

    def problems(self) -> list[str]:
        """What makes the store unsafe right now (an evicting policy, refused writes), one
        sentence each naming the fix; empty when healthy or unknown."""
        return []

    def close(self) -> None:
        """Release connections."""

    def __enter__(self) -> "StreamStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- shared helpers -------------------------------------------------------------------
    @staticmethod
    def _new_record(spec: Mapping[str, Any], stream_id: str | None) -> dict[str, Any]:
        rec = _check_spec(spec, "spec")
        for k in _RESERVED:
            rec.pop(k, None)
        rec.setdefault("status", "created")
        rec["id"] = _check_id(stream_id) if stream_id is not None else uuid.uuid4().hex[:16]
        rec["created"] = time.time()
        return rec

    @staticmethod
    def _same_spec(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
        drop = ("created",)
        return {k: v for k, v in a.items() if k not in drop} == \
            {k: v for k, v in b.items() if k not in drop}

    @staticmethod
    def _merged(rec: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
        ch = _check_spec(changes, "changes")
        bad = [k for k in _RESERVED if k in ch]
        if bad:
            raise ValueError(f"changes may not modify {bad}")
        return {**rec, **ch}
