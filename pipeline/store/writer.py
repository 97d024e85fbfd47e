"""Store writes off the model's path: an encoder hands each finished window (and the method
state that goes with it) to a ``StoreWriter`` and carries on; a background thread writes them in
order, per stream. While the store is unreachable, or has lost the stream's registry (Redis
restarted empty, until the service writes it back), the writes wait in a bounded per-stream
buffer and go out in order when it returns, so an outage shorter than the buffer loses nothing.
Past the bound the oldest waiting write is dropped and counted (the window still reached the
decoder's context; only its durable copy is lost)."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.store.contract import StreamNotFound, StreamStore, WindowOrderError

__all__ = ["PendingWrite", "StoreWriter"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PendingWrite:
    """One window (``payload`` None: only the state) and the state after it, for one stream."""

    stream_id: str
    index: int
    payload: bytes | None
    media_start: float = 0.0
    media_end: float = 0.0
    fields: dict | None = None
    state: bytes | None = None
    covers: int | None = None  # with a state: the newest window index it holds the effects of
    blobs: dict[str, bytes] | None = None  # the window's side data (its picture), in the same write


class StoreWriter:
    """Ordered, buffered writes of windows and states. ``on_durable(stream_id, covers)`` after a
    write with a state lands; ``on_lost(stream_id, index)`` when the buffer bound drops a window;
    ``on_recovered(stream_id)`` when writes land again after failing."""

    def __init__(self, store: StreamStore, capacity: int, on_durable: Callable[[str, int], None],
                 on_lost: Callable[[str, int], None], on_recovered: Callable[[str], None],
                 retry_s: float = 0.5) -> None:
        self.store, self.capacity, self.retry_s = store, max(1, int(capacity)), retry_s
        self._on_durable, self._on_lost, self._on_recovered = on_durable, on_lost, on_recovered
        self._queues: dict[str, deque[PendingWrite]] = {}
        self._failing: set[str] = set()
        self._gone: set[str] = set()
        self._cond = threading.Condition()
        threading.Thread(target=self._loop, name="store-writer", daemon=True).start()

    def write(self, w: PendingWrite) -> None:
        """Queue a write (never blocks on the store). The windows it pushes out of a full buffer
        are reported after the buffer's lock is released: the callback takes the caller's own
        locks, and a caller holding one of them while it asks ``waiting`` would otherwise deadlock
        with this thread (the encoder's status call did, during a store outage)."""
        lost: list[PendingWrite] = []
        with self._cond:
            if w.stream_id in self._gone:
                return
            q = self._queues.setdefault(w.stream_id, deque())
            q.append(w)
            while len(q) > self.capacity:
                lost.append(q.popleft())
            self._cond.notify()
        for x in lost:
            if x.payload is not None:
                self._on_lost(x.stream_id, x.index)

    def forget(self, stream_id: str) -> None:
        """A deleted stream: its waiting writes go, later ones are ignored."""
        with self._cond:
            self._queues.pop(stream_id, None)
            self._gone.add(stream_id)

    def waiting(self, stream_id: str | None = None) -> int:
        with self._cond:
            if stream_id is not None:
                return len(self._queues.get(stream_id, ()))
            return sum(len(q) for q in self._queues.values())

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not any(self._queues.values()):
                    self._cond.wait(1.0)
                heads = [(sid, q[0]) for sid, q in self._queues.items() if q]
            wrote_any = False
            for sid, w in heads:
                if self._write(w):
                    wrote_any = True
                    with self._cond:
                        q = self._queues.get(sid)
                        if q and q[0] is w:
                            q.popleft()
            if not wrote_any:
                time.sleep(self.retry_s)  # the store is away: try again shortly

    def _write(self, w: PendingWrite) -> bool:
        """One attempt; True when the write is done with (landed, or can never land)."""
        try:
            if w.payload is None:
                self.store.save_state(w.stream_id, w.index, w.state or b"")
            else:
                self.store.append_window(w.stream_id, w.index, w.payload, media_start=w.media_start,
                                         media_end=w.media_end, fields=w.fields, state=w.state, blobs=w.blobs)
        except (WindowOrderError, ValueError, TypeError) as exc:  # can never land: say so, move on
            log.error("stream %s window %d not stored: %s", w.stream_id, w.index, exc)
            return True
        except StreamNotFound:  # the registry is gone (Redis restarted empty) until it is written back
            self._failed(w.stream_id, "the store does not know the stream")
            return False
        except Exception as exc:  # unreachable: wait in the buffer
            self._failed(w.stream_id, exc)
            return False
        if w.payload is not None:
            log.debug("stream %s window %d stored (%d bytes, side data: %s)", w.stream_id, w.index, len(w.payload),
                      ", ".join(sorted(w.blobs or ())) or "none")
        if w.stream_id in self._failing:
            self._failing.discard(w.stream_id)
            self._on_recovered(w.stream_id)
        if w.covers is not None:
            self._on_durable(w.stream_id, w.covers)
        return True

    def _failed(self, sid: str, why: object) -> None:
        if sid not in self._failing:
            self._failing.add(sid)
            log.warning("stream %s: store writes wait (%s)", sid, why)
