"""A source whose media a publisher pushes to the service (WebRTC/WHIP today; any push protocol
feeds it the same way), yielding the same events as a pulled source so windows, compression,
context, pictures and faults work as for any live stream.

The publisher side (any thread) calls :meth:`PushSource.attach` when a publisher connects,
:meth:`video` / :meth:`audio` with each decoded frame, :meth:`detach` when it leaves. The reading
side (the ingest's thread) uses it like :class:`pipeline.sources.source.Source`: ``open()``
waits for the first publisher (up to ``wait_s``), ``events()`` yields ``VideoChunk`` /
``AudioChunk`` and, when a publisher comes back within ``grace_s`` of leaving, ``Reconnected``
(the window assembler then continues the timeline with the outage as a flagged gap); after the
grace with nobody back the events end, and with them the stream.

Times: each track's frames are placed by their own timestamps, anchored at the arrival of the
track's first frame in the session (RTP timestamps start at random values per track, so only
arrival relates one track to the other); a track whose timestamps stray more than a second
from arrival is anchored again. Video is thinned to ``max_fps`` before it is queued (a window
keeps 2 fps; the rest would only cost conversions), audio resampled to mono float at the
target rate. The queue is bounded: a reader that falls behind loses the oldest video first,
counted in ``dropped_frames``.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import av

from pipeline.errors import PushRefused, SourceTimeoutError
from pipeline.redact import redact
from pipeline.sources.events import AudioChunk, Event, Reconnected, VideoChunk
from pipeline.sources.spec import SourceOptions, classify

__all__ = ["PushSource", "PushStats"]

log = logging.getLogger(__name__)

QUEUE_EVENTS = 512  # ~10 s of thinned video and 20-ms audio frames
RESYNC_S = 1.0  # a track's timestamps this far from arrival: anchored again


@dataclass
class PushStats:
    """What the publishers sent, for the stream's status and metrics."""

    publishers: int = 0  # sessions attached so far
    connected: bool = False
    frames_in: int = 0  # video frames the publisher's decoder gave
    frames_kept: int = 0  # ... queued after thinning
    frames_dropped: int = 0  # ... lost to a full queue
    audio_frames: int = 0
    tracks: dict[str, bool] = field(default_factory=dict)  # audio/video of the first session

    def to_dict(self) -> dict[str, Any]:
        return {"publishers": self.publishers, "connected": self.connected, "frames_in": self.frames_in,
                "frames_kept": self.frames_kept, "frames_dropped": self.frames_dropped,
                "audio_frames": self.audio_frames}


class _Track:
    """One track's clock in one session: its first timestamp anchored at its arrival."""

    __slots__ = ("anchor", "first")

    def __init__(self) -> None:
        self.anchor: float | None = None  # session seconds at which timestamp ``first`` arrived
        self.first = 0.0

    def place(self, ts: float | None, arrival: float) -> float:
        if ts is None:
            return arrival
        if self.anchor is None or abs(self.anchor + ts - self.first - arrival) > RESYNC_S:
            self.anchor, self.first = arrival, ts
        return self.anchor + ts - self.first


class PushSource:
    """A live source fed by publishers; see the module docstring. Thread-safe publisher side."""

    live = True
    frame_duration = None
    start_time = None

    def __init__(self, url: str = "whip:", options: SourceOptions | Mapping | None = None, *,
                 sample_rate: int = 16000, wait_s: float = 600.0, grace_s: float = 30.0,
                 max_fps: float = 8.0) -> None:
        self.spec = classify(url)
        if self.spec.kind != "push":
            raise ValueError(f"{redact(str(url))!r} is not a push source")
        self.url = self.spec.url
        self.options = SourceOptions.coerce(options)
        self.sample_rate = int(sample_rate)
        self.wait_s, self.grace_s, self.min_gap_s = float(wait_s), float(grace_s), 1.0 / float(max_fps)
        self.has_audio = self.has_video = False
        self.video_size: tuple[int, int] | None = None
        self.reconnects = 0
        self.decode_errors = 0
        self.stats = PushStats()
        self._q: queue.Queue[Event | object] = queue.Queue(QUEUE_EVENTS)
        self._lock = threading.Condition()
        self._session: str | None = None
        self._t0 = 0.0  # monotonic start of the current session
        self._tracks: dict[str, _Track] = {}
        self._last_kept = -1e9
        self._resampler: Any = None
        self._left_at: float | None = None  # monotonic time the last publisher left
        self._stop = threading.Event()
        self._opened = False

    # -- the publisher side ----------------------------------------------------------------
    def attach(self, session: str, *, audio: bool, video: bool) -> None:
        """A publisher connected. PushRefused 409 while another one is connected; the first
        session's tracks decide the stream's (a later publisher's other tracks are ignored)."""
        with self._lock:
            if self._stop.is_set():
                raise PushRefused(409, "the stream has ended; create a new one", "stream_id")
            if self._session is not None and self._session != session:
                raise PushRefused(409, "a publisher is already connected to this stream; stop it "
                                  "(DELETE its session) or wait until it leaves", "stream_id")
            if not (audio or video):
                raise PushRefused(400, "the offer sends neither audio nor video", "sdp")
            first = self.stats.publishers == 0
            if first:
                self.has_audio, self.has_video = bool(audio), bool(video)
                self.stats.tracks = {"audio": bool(audio), "video": bool(video)}
            self._session, self._t0 = session, time.monotonic()
            self._tracks = {"audio": _Track(), "video": _Track()}
            self._resampler, self._last_kept = None, -1e9
            self.stats.publishers += 1
            self.stats.connected = True
            if not first and self._left_at is not None:
                self.reconnects += 1
                self._put(Reconnected(self.reconnects, time.monotonic() - self._left_at, "publisher came back"),
                          force=True)
            self._left_at = None
            self._lock.notify_all()

    def detach(self, session: str) -> bool:
        """The publisher of ``session`` left (hung up, failed, or was stopped)."""
        with self._lock:
            if self._session != session:
                return False
            self._session, self._left_at = None, time.monotonic()
            self.stats.connected = False
            self._lock.notify_all()
            return True

    @property
    def session(self) -> str | None:
        return self._session

    def video(self, session: str, frame: av.VideoFrame) -> None:
        """One decoded frame of ``session``'s video track."""
        now = time.monotonic()
        with self._lock:
            if session != self._session or not self.has_video:
                return
            self.stats.frames_in += 1
            t = self._tracks["video"].place(_seconds(frame), now - self._t0)
            if t - self._last_kept < self.min_gap_s - 1e-3:
                return  # thinned: a window samples 2 fps
            self._last_kept = t
            self.video_size = self.video_size or (frame.height, frame.width)
            if self._put(VideoChunk(t, frame)):
                self.stats.frames_kept += 1

    def audio(self, session: str, frame: av.AudioFrame) -> None:
        """One decoded frame of ``session``'s audio track (any rate and layout)."""
        now = time.monotonic()
        with self._lock:
            if session != self._session or not self.has_audio:
                return
            self.stats.audio_frames += 1
            t = self._tracks["audio"].place(_seconds(frame), now - self._t0)
            if self._resampler is None:
                self._resampler = av.AudioResampler(format="flt", layout="mono", rate=self.sample_rate)
            frame.pts = None  # placed by ``t``: the resampler keeps no clock of its own
            for out in self._resampler.resample(frame):
                samples = out.to_ndarray().reshape(-1)
                self._put(AudioChunk(t, samples), force=True)
                t += len(samples) / self.sample_rate

    def _put(self, ev: Event, force: bool = False) -> bool:
        """Queue an event; when full, a video event is dropped (``force``: make room by dropping
        the oldest event instead: audio and markers are small and keep the timeline whole)."""
        while True:
            try:
                self._q.put_nowait(ev)
                return True
            except queue.Full:
                if not force:
                    self.stats.frames_dropped += 1
                    return False
                try:
                    old = self._q.get_nowait()
                    if isinstance(old, VideoChunk):
                        self.stats.frames_dropped += 1
                except queue.Empty:
                    pass

    # -- the reading side (pipeline.sources.windows.iter_windows) ----------------------------
    def open(self) -> "PushSource":
        """Wait for the first publisher (SourceTimeoutError after ``wait_s``)."""
        deadline = time.monotonic() + self.wait_s
        with self._lock:
            while self.stats.publishers == 0:
                left = deadline - time.monotonic()
                if self._stop.is_set():
                    break
                if left <= 0:
                    raise SourceTimeoutError(f"no publisher connected within {self.wait_s:g} s", self.url)
                self._lock.wait(min(left, 0.5))
        self._opened = True
        return self

    def events(self) -> Iterator[Event]:
        """The publishers' events until none is back within the grace after one left."""
        if not self._opened:
            self.open()
        while not self._stop.is_set():
            try:
                ev = self._q.get(timeout=0.25)
            except queue.Empty:
                with self._lock:
                    gone = self._session is None and self._left_at is not None \
                        and time.monotonic() - self._left_at > self.grace_s
                if gone:
                    log.info("%s: no publisher came back within %g s; the stream ends", self.url, self.grace_s)
                    return
                continue
            yield ev  # type: ignore[misc]

    def declared_end(self) -> None:
        return None

    def duration_s(self) -> None:
        return None

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            self._lock.notify_all()

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> "PushSource":
        return self if self._opened else self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _seconds(frame: av.AudioFrame | av.VideoFrame) -> float | None:
    return float(frame.pts * frame.time_base) if frame.pts is not None and frame.time_base else None
