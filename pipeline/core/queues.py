"""The engine's scheduler: per-stream bounded queues and the policies that keep them bounded.

Pure bookkeeping, like vLLM's scheduler: no Ray, no torch, no I/O, no clock of its own (callers
pass ``now``), so every policy is unit-tested in milliseconds. The encoder worker and the decoder
each own one :class:`StreamQueues` and run ``take -> run -> finish`` around it; the owner holds
the lock (this class is not thread-safe on its own).

Policies, per stream:
- bounded: a queue never holds more than ``capacity`` windows. When full, a window that can wait
  (``backpressure``, a file) is refused with ``FULL`` so its producer waits; otherwise the oldest
  queued window is dropped (reason ``queue_full``).
- behind live: a taken window is *behind* when newer ones wait behind it and either its lag
  exceeds ``max_lag_s`` or (``backlog_is_behind``) the queue is half full. A behind window is
  dropped (``drop_oldest``, reason ``behind_live``) or handed out flagged ``harder``
  (``compress_harder``, where the stage can compress). Backpressure windows are never behind.
- fairness: ``take(n)`` hands out up to ``n`` windows round-robin over streams, oldest first
  within a stream, starting after the stream served first last time.
- retries: a window whose index was already taken, dropped or queued is a duplicate (Ray
  retries a call whose reply was lost); it is acknowledged and not queued again.
- forgetting: a forgotten stream's windows are refused as ``UNKNOWN`` from then on.
"""

from __future__ import annotations

import bisect
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Generic, Protocol, TypeVar

__all__ = ["BEHIND_POLICIES", "Added", "QueuedWindow", "QueuePolicy", "StreamQueues", "Taken"]

BEHIND_POLICIES = ("drop_oldest", "compress_harder")


class QueuedWindow(Protocol):
    """What the scheduler needs of a window (pipeline.core.messages' window messages have it)."""

    stream_id: str
    index: int
    backpressure: bool

    def lag(self, now: float) -> float | None: ...


W = TypeVar("W", bound=QueuedWindow)


class Added(str, Enum):
    """The answer to :meth:`StreamQueues.add` (a str, so it crosses Ray as plain data)."""

    OK = "ok"  # queued
    DUPLICATE = "duplicate"  # already taken, dropped or queued: nothing to do
    FULL = "full"  # a backpressure window and the queue is full: try again later
    UNKNOWN = "unknown"  # the stream is not open here


@dataclass(frozen=True)
class QueuePolicy:
    """How one stage keeps its queues bounded."""

    capacity: int = 8
    behind_policy: str = "drop_oldest"
    max_lag_s: float = 4.0
    backlog_is_behind: bool = False  # half a queue waiting also means behind (the encoder's view)
    can_compress_harder: bool = False  # the stage can compress harder (the encoder)
    wait_when_full: bool = True  # FULL for backpressure windows; False: queue them past capacity

    def __post_init__(self) -> None:
        if isinstance(self.capacity, bool) or not isinstance(self.capacity, int) or self.capacity < 1:
            raise ValueError(f"QueuePolicy.capacity must be an integer >= 1, got {self.capacity!r}")
        if self.behind_policy not in BEHIND_POLICIES:
            raise ValueError(f"QueuePolicy.behind_policy must be one of {list(BEHIND_POLICIES)}, "
                             f"got {self.behind_policy!r}")
        if not self.max_lag_s >= 0:
            raise ValueError(f"QueuePolicy.max_lag_s must be >= 0, got {self.max_lag_s!r}")


@dataclass(frozen=True)
class Taken(Generic[W]):
    """A window handed out by :meth:`StreamQueues.take`; ``harder``: compress it harder."""

    window: W
    harder: bool = False


@dataclass
class _Stream(Generic[W]):
    queue: deque = field(default_factory=deque)
    high_water: int = -1  # newest index taken or dropped: older arrivals are retries
    in_flight: int = 0
    peak: int = 0  # the longest the queue has been
    drops: Counter = field(default_factory=Counter)


OnDrop = Callable[[str, int, str], None]


class StreamQueues(Generic[W]):
    """Per-stream bounded queues under one :class:`QueuePolicy`. ``on_drop(stream_id, index,
    reason)`` is told of every dropped window (metrics); drops are also counted per stream."""

    def __init__(self, policy: QueuePolicy, on_drop: OnDrop | None = None, forget_memory: int = 1024) -> None:
        self.policy = policy
        self._on_drop = on_drop
        self._streams: dict[str, _Stream[W]] = {}
        self._forgotten: deque[str] = deque(maxlen=forget_memory)
        self._next_first = 0  # round-robin start position

    # -- streams --
    def open(self, stream_id: str, done_through: int = -1) -> None:
        """Accept windows of ``stream_id``; indices up to ``done_through`` count as done (a
        restarted stage resuming from the store). Opening an open stream changes nothing."""
        if stream_id not in self._streams:
            self._streams[stream_id] = _Stream(high_water=done_through)
            if stream_id in self._forgotten:
                self._forgotten.remove(stream_id)

    def is_open(self, stream_id: str) -> bool:
        return stream_id in self._streams

    def was_forgotten(self, stream_id: str) -> bool:
        return stream_id in self._forgotten

    def clear(self, stream_id: str) -> int:
        """Empty the stream's queue without counting drops (the stream is being handed to another
        stage instance, which gets the windows again); how many were queued."""
        st = self._streams.get(stream_id)
        if st is None:
            return 0
        n = len(st.queue)
        st.queue.clear()
        return n

    def close(self, stream_id: str) -> bool:
        """Stop holding a stream that moved elsewhere; unlike ``forget`` it may be opened again."""
        return self._streams.pop(stream_id, None) is not None

    def forget(self, stream_id: str) -> bool:
        """Drop a stream and everything queued for it (not counted: the stream is gone)."""
        self._forgotten.append(stream_id)
        return self._streams.pop(stream_id, None) is not None

    # -- intake --
    def add(self, window: W) -> Added:
        """Queue one window under the policy (see the module's docstring)."""
        st = self._streams.get(window.stream_id)
        if st is None:
            return Added.UNKNOWN
        if window.index <= st.high_water or any(q.index == window.index for q in st.queue):
            return Added.DUPLICATE
        if len(st.queue) >= self.policy.capacity:
            if window.backpressure:
                if self.policy.wait_when_full:
                    return Added.FULL
            else:
                self._drop(window.stream_id, st, st.queue.popleft(), "queue_full")
        if st.queue and st.queue[-1].index > window.index:  # arrived out of order: keep index order
            keys = [q.index for q in st.queue]
            st.queue.insert(bisect.bisect(keys, window.index), window)
        else:
            st.queue.append(window)
        st.peak = max(st.peak, len(st.queue))
        return Added.OK

    def drop(self, stream_id: str, index: int, reason: str) -> None:
        """Count a window lost outside the queues (a failed run, a dead producer)."""
        st = self._streams.get(stream_id)
        if st is not None:
            self._drop(stream_id, st, None, reason, index)

    def _drop(self, sid: str, st: _Stream[W], window: W | None, reason: str, index: int | None = None) -> None:
        idx = window.index if window is not None else int(index if index is not None else -1)
        st.high_water = max(st.high_water, idx)
        st.drops[reason] += 1
        if self._on_drop is not None:
            self._on_drop(sid, idx, reason)

    # -- the schedule --
    def take(self, n: int, now: float) -> list[Taken[W]]:
        """Up to ``n`` windows, round-robin over streams; behind-live windows are dropped or
        flagged ``harder`` on the way. Each taken window is in flight until :meth:`finish`."""
        out: list[Taken[W]] = []
        order = list(self._streams.items())
        if not order:
            return out
        start = self._next_first % len(order)
        order = order[start:] + order[:start]
        first_served: int | None = None
        progress = True
        while len(out) < n and progress:
            progress = False
            for pos, (sid, st) in enumerate(order):
                if len(out) >= n:
                    break
                taken = self._take_one(sid, st, now)
                if taken is None:
                    continue
                progress = True
                out.append(taken)
                if first_served is None:
                    first_served = pos
        if first_served is not None:
            self._next_first = start + first_served + 1
        return out

    def _take_one(self, sid: str, st: _Stream[W], now: float) -> Taken[W] | None:
        p = self.policy
        while st.queue:
            w = st.queue.popleft()
            if self._behind(w, st, now):
                if p.behind_policy == "drop_oldest":
                    self._drop(sid, st, w, "behind_live")
                    continue
                harder = p.can_compress_harder
            else:
                harder = False
            st.high_water = max(st.high_water, w.index)
            st.in_flight += 1
            return Taken(w, harder)
        return None

    def _behind(self, w: W, st: _Stream[W], now: float) -> bool:
        if w.backpressure or not st.queue:
            return False  # a window that can wait, or the newest one: never behind
        lag = w.lag(now)
        if lag is not None and lag > self.policy.max_lag_s:
            return True
        return self.policy.backlog_is_behind and len(st.queue) >= max(1, self.policy.capacity // 2)

    def finish(self, stream_id: str, n: int = 1) -> None:
        """``n`` taken windows of the stream are done (run, or failed and counted)."""
        st = self._streams.get(stream_id)
        if st is not None:
            st.in_flight = max(0, st.in_flight - n)

    # -- what the stage reports --
    def has_work(self) -> bool:
        return any(st.queue for st in self._streams.values())

    def depth(self, stream_id: str | None = None) -> int:
        """Windows waiting (one stream, or all)."""
        if stream_id is None:
            return sum(len(st.queue) for st in self._streams.values())
        st = self._streams.get(stream_id)
        return len(st.queue) if st is not None else 0

    def live_load(self, now: float) -> tuple[int, float]:
        """(windows waiting that cannot wait, the worst lag behind live among them): the load an
        elastic pool scales on. Backpressure windows are left out: a file read as fast as the
        model allows always has a full queue, which is not a reason for another worker."""
        waiting = [w for st in self._streams.values() for w in st.queue if not w.backpressure]
        lags = [lag for lag in (w.lag(now) for w in waiting) if lag is not None]
        return len(waiting), max(lags, default=0.0)

    def backlog(self, stream_id: str) -> int:
        """Waiting plus in flight: what a producer checks before sending more."""
        st = self._streams.get(stream_id)
        return len(st.queue) + st.in_flight if st is not None else 0

    def in_flight(self, stream_id: str) -> int:
        st = self._streams.get(stream_id)
        return st.in_flight if st is not None else 0

    def peak(self, stream_id: str) -> int:
        st = self._streams.get(stream_id)
        return st.peak if st is not None else 0

    def drops(self, stream_id: str) -> dict[str, int]:
        st = self._streams.get(stream_id)
        return dict(st.drops) if st is not None else {}

    def restore_drops(self, stream_id: str, drops: dict[str, int]) -> None:
        """Continue the drop counts of a restarted stage (from the store)."""
        st = self._streams.get(stream_id)
        if st is not None:
            st.drops.update({k: int(v) for k, v in drops.items()})

    def high_water(self, stream_id: str) -> int:
        st = self._streams.get(stream_id)
        return st.high_water if st is not None else -1
