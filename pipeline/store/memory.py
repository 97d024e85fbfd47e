"""The in-process store (the embedded default when no Redis URL is configured): the contract of
pipeline.store.contract kept in dicts under one lock, with the same semantics as Redis's."""

from __future__ import annotations

import json
import threading

from collections.abc import Iterator, Mapping
from typing import Any

from pipeline.store.contract import (Retention, Scalar, StoredState, StoredWindow, StreamExists, StreamNotFound,
                                     StreamStore, WindowOrderError, _check_blob, _check_blobs, _check_id, _check_window)
from pipeline.store.watch_store import MemoryWatches

__all__ = ["MemoryStore"]


class MemoryStore(MemoryWatches, StreamStore):
    """In-process store with the same semantics as :class:`RedisStore` (thread-safe). Data
    lives as long as the process: the embedded default for single-process use and tests."""

    def __init__(self, retention: Retention = Retention()) -> None:
        self.retention = retention
        self._lock = threading.RLock()
        self._specs: dict[str, dict[str, Any]] = {}
        self._windows: dict[str, list[StoredWindow]] = {}
        self._last_id: dict[str, int] = {}  # like a Redis stream's last-generated-id
        self._states: dict[str, StoredState] = {}
        self._blobs: dict[str, dict[tuple[int, str], bytes]] = {}

    def create_stream(self, spec: Mapping[str, Any], stream_id: str | None = None) -> dict[str, Any]:
        rec = self._new_record(spec, stream_id)
        with self._lock:
            old = self._specs.get(rec["id"])
            if old is not None:
                if self._same_spec(old, rec):
                    return dict(old)
                raise StreamExists(f"stream {rec['id']!r} already exists with a different spec")
            self._specs[rec["id"]] = rec
            self._windows[rec["id"]] = []
            return dict(rec)

    def _rec(self, stream_id: str) -> dict[str, Any]:
        rec = self._specs.get(_check_id(stream_id))
        if rec is None:
            raise StreamNotFound(f"no stream {stream_id!r}")
        return rec

    def get_stream(self, stream_id: str) -> dict[str, Any]:
        with self._lock:
            return json.loads(json.dumps(self._rec(stream_id)))

    def list_streams(self) -> list[dict[str, Any]]:
        with self._lock:
            recs = json.loads(json.dumps(list(self._specs.values())))
        return sorted(recs, key=lambda r: (r["created"], r["id"]))

    def update_stream(self, stream_id: str, changes: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            rec = self._merged(self._rec(stream_id), changes)
            self._specs[stream_id] = rec
            return json.loads(json.dumps(rec))

    def delete_stream(self, stream_id: str) -> bool:
        with self._lock:
            _check_id(stream_id)
            self._windows.pop(stream_id, None)
            self._last_id.pop(stream_id, None)
            self._states.pop(stream_id, None)
            self._blobs.pop(stream_id, None)
            self._forget_watches(stream_id)
            return self._specs.pop(stream_id, None) is not None

    def append_window(self, stream_id: str, index: int, payload: bytes, *, media_start: float,
                      media_end: float, fields: Mapping[str, Scalar] | None = None,
                      state: bytes | None = None, blobs: Mapping[str, bytes] | None = None) -> bool:
        f = _check_window(index, payload, media_start, media_end, fields)
        side = _check_blobs(index, blobs)
        with self._lock:
            self._rec(stream_id)
            wins = self._windows[stream_id]
            last = self._last_id.get(stream_id, -1)
            if index <= last:
                if any(w.index == index for w in wins) or not wins or index < wins[0].index:
                    return False
                raise WindowOrderError(f"stream {stream_id!r}: window {index} arrives after "
                                       f"window {last}")
            wins.append(StoredWindow(index, float(media_start), float(media_end),
                                     bytes(payload), f))
            self._last_id[stream_id] = index
            if state is not None:
                self._states[stream_id] = StoredState(index, bytes(state))
            r = self.retention
            if r.max_windows is not None and len(wins) > r.max_windows:
                del wins[: len(wins) - r.max_windows]
            if r.max_age_s is not None:
                cutoff = float(media_end) - r.max_age_s
                keep = next((i for i, w in enumerate(wins) if w.media_end >= cutoff), len(wins))
                del wins[:keep]
            if side:
                held = self._blobs.setdefault(stream_id, {})
                held.update({(index, kind): data for kind, data in side.items()})
                floor = self._blob_floor(wins[0].index if wins else None, max(i for i, _ in held))
                if floor is not None:
                    self._blobs[stream_id] = {k: v for k, v in held.items() if k[0] >= floor}
            return True

    def note_progress(self, stream_id: str, progress: Mapping[str, Any]) -> None:
        with self._lock:
            self._rec(stream_id)["progress"] = json.loads(json.dumps(dict(progress)))

    def iter_windows(self, stream_id: str, start: int = 0, batch: int = 32) -> Iterator[StoredWindow]:
        with self._lock:
            self._rec(stream_id)
            wins = [w for w in self._windows[stream_id] if w.index >= start]
        for w in wins:
            yield StoredWindow(w.index, w.media_start, w.media_end, w.payload, dict(w.fields))

    def window_count(self, stream_id: str) -> int:
        with self._lock:
            self._rec(stream_id)
            return len(self._windows[stream_id])

    def last_window_index(self, stream_id: str) -> int | None:
        with self._lock:
            self._rec(stream_id)
            wins = self._windows[stream_id]
            return wins[-1].index if wins else None

    def save_state(self, stream_id: str, index: int, data: bytes) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"state data must be bytes, got {type(data).__name__}")
        with self._lock:
            self._rec(stream_id)
            self._states[stream_id] = StoredState(int(index), bytes(data))

    def load_state(self, stream_id: str) -> StoredState | None:
        with self._lock:
            self._rec(stream_id)
            return self._states.get(stream_id)

    def put_blob(self, stream_id: str, index: int, kind: str, data: bytes) -> None:
        _check_blob(index, kind)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"blob data must be bytes, got {type(data).__name__}")
        with self._lock:
            self._rec(stream_id)
            blobs = self._blobs.setdefault(stream_id, {})
            blobs[(index, kind)] = bytes(data)
            wins = self._windows[stream_id]
            floor = self._blob_floor(wins[0].index if wins else None, max(i for i, _ in blobs))
            if floor is not None:
                self._blobs[stream_id] = {k: v for k, v in blobs.items() if k[0] >= floor}

    def get_blob(self, stream_id: str, index: int, kind: str) -> bytes | None:
        _check_blob(index, kind)
        with self._lock:
            self._rec(stream_id)
            return self._blobs.get(stream_id, {}).get((index, kind))
