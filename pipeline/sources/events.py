"""What a `pipeline.sources.source.Source` yields - `AudioChunk`, `VideoChunk`, `Reconnected` - and the
two ways several inputs of one source (video plus a paired audio input) are interleaved: by
media time for finite inputs (`merge_by_time`), by arrival for live ones (`merge_by_arrival`).
Re-exported by pipeline.sources.source.
"""
from __future__ import annotations

import heapq
import itertools
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Union

import av
import numpy as np

__all__ = ["AudioChunk", "Event", "Reconnected", "VideoChunk", "merge_by_arrival", "merge_by_time"]


@dataclass(frozen=True)
class AudioChunk:
    t: float | None  # source time of the first sample, None when the source has no timestamps
    samples: np.ndarray  # float32 mono at the target rate


@dataclass(frozen=True)
class VideoChunk:
    t: float | None
    frame: av.VideoFrame


@dataclass(frozen=True)
class Reconnected:
    count: int  # reconnects so far on this source
    outage_s: float  # wall seconds between losing the source and having it back
    reason: str


Event = Union[AudioChunk, VideoChunk, Reconnected]


def merge_by_time(gens: list[Iterator[Event]]) -> Iterator[Event]:
    """Interleave finite inputs (a file or test graph with a separate audio input) in media-time
    order: one pending event per input, the earliest first. Events without a time go first."""
    heap: list[tuple[float, int, int, Event]] = []
    order = itertools.count()

    def pull(i: int) -> None:
        ev = next(gens[i], None)
        if ev is not None:
            t = getattr(ev, "t", None)
            heapq.heappush(heap, (float("-inf") if t is None else t, next(order), i, ev))

    for i in range(len(gens)):
        pull(i)
    while heap:
        _, _, i, ev = heapq.heappop(heap)
        yield ev
        pull(i)


def merge_by_arrival(gens: list[Iterator[Event]], stop: threading.Event, join_s: float = 10.0) -> Iterator[Event]:
    """Interleave events of several live inputs (webcam video + a sound card) by arrival.

    Ends when every input has ended; an error in any input ends it at once."""
    q: queue.Queue = queue.Queue(maxsize=256)
    done = object()
    halt = threading.Event()

    def pump(g: Iterator[Event]) -> None:
        try:
            for ev in g:
                while not (halt.is_set() or stop.is_set()):
                    try:
                        q.put(ev, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                else:
                    return
            q.put(done)
        except BaseException as e:  # hand the error to the consumer
            q.put(e)

    threads = [threading.Thread(target=pump, args=(g,), daemon=True) for g in gens]
    for t in threads:
        t.start()
    try:
        finished = 0
        while finished < len(gens):
            item = q.get()
            if item is done:
                finished += 1
                continue
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        halt.set()
        while True:  # unblock pumps waiting on a full queue, then let them leave demux
            try:
                q.get_nowait()
            except queue.Empty:
                break
        for t in threads:
            t.join(join_s)
