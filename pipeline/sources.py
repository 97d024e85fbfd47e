"""Media sources on PyAV: classify a URL, open it with bounded timeouts, decode audio and video
with their source timestamps, and reconnect live sources with capped exponential backoff.

A `Source` yields three kinds of events, in arrival order:
  * `AudioChunk` - float32 mono samples already resampled to the target rate (PyAV's
    AudioResampler does rate and layout conversion), with the time of the first sample;
  * `VideoChunk` - one decoded `av.VideoFrame` (converted to RGB only if a window needs it);
  * `Reconnected` - a live source came back after an outage; timestamps restart after it.
Times are source seconds; `pipeline.windows` maps them onto the media timeline.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import heapq
import itertools
import queue
import re
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import av
import numpy as np

from pipeline.errors import (
    NotMediaError,
    SourceError,
    SourceTimeoutError,
    SourceUnavailableError,
    UnsupportedSourceError,
)

log = logging.getLogger(__name__)

SUPPORTED = "rtsp://, rtsps://, http(s):// (media or HLS .m3u8), file paths or file://, /dev/videoN or v4l2:/dev/videoN, lavfi:GRAPH"


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff between reconnect attempts of a live source."""

    initial_s: float = 0.5
    factor: float = 2.0
    cap_s: float = 10.0
    max_attempts: int | None = None  # None: retry forever; 0: never reconnect (end quietly)

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt number `attempt` (0-based)."""
        return min(self.cap_s, self.initial_s * self.factor ** attempt)


@dataclass
class SourceOptions:
    """How to open a source and how strict the window timing is (all times in seconds)."""

    open_timeout_s: float = 8.0  # connect + probe; also the listen wait in RTSP listen mode
    read_timeout_s: float = 8.0  # a live source silent this long (RTSP: up to twice) is lost
    rtsp_transport: str = "tcp"  # or "udp"
    listen: bool = False  # rtsp:// only: be the server a pusher (ffmpeg -f rtsp) sends to
    audio_device: str | None = None  # paired audio input, "alsa:hw:1", "pulse:default", "lavfi:..."
    input_options: dict[str, str] = field(default_factory=dict)  # demuxer options, e.g. video_size
    reconnect: Backoff = field(default_factory=Backoff)
    live: bool | None = None  # None: rtsp/v4l2 live, files/lavfi not, http live if no duration
    audio: bool = True  # decode the audio track if there is one
    video: bool = True  # decode the video track if there is one
    audio_tolerance_s: float = 0.04  # timestamp jitter absorbed without filling or dropping
    video_gap_s: float = 0.5  # frames further apart than this leave a (flagged) gap between them
    max_skew_s: float = 5.0  # a track this far behind the other is filled up to it (flagged)
    max_gap_s: float = 10.0  # files: a forward jump above this is a clock jump, not missing media
    jump_back_s: float = 0.5  # a backward step above this is a clock jump, not jitter
    min_tail_s: float = 0.1  # the last, partial window is emitted if it holds this much media

    @classmethod
    def coerce(cls, options: "SourceOptions | Mapping[str, Any] | None") -> "SourceOptions":
        """Accept None, a SourceOptions, or a dict of its fields (`reconnect` may be a dict)."""
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        if not isinstance(options, Mapping):
            raise TypeError(f"options must be SourceOptions or a mapping, not {type(options).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(f"unknown source option(s) {unknown}; known: {sorted(names)}")
        kw = dict(options)
        if isinstance(kw.get("reconnect"), Mapping):
            kw["reconnect"] = Backoff(**kw["reconnect"])
        return cls(**kw)


@dataclass(frozen=True)
class SourceSpec:
    """What a URL names: its kind, what to hand av.open, the demuxer format, and liveness."""

    url: str
    kind: str  # rtsp | http | hls | file | lavfi | v4l2
    target: str
    format: str | None
    live: bool | None


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

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


def classify(url: str | os.PathLike) -> SourceSpec:
    """Tell what kind of source a URL is, or raise UnsupportedSourceError."""
    if not isinstance(url, (str, os.PathLike)):
        raise UnsupportedSourceError(f"a source must be a URL or path string, not {type(url).__name__}")
    s = os.fspath(url).strip()
    if not s:
        raise UnsupportedSourceError("empty source URL")
    if s.startswith("lavfi:"):
        graph = s[len("lavfi:"):]
        if not graph:
            raise UnsupportedSourceError("lavfi: needs a filter graph, e.g. lavfi:testsrc2=size=640x480:rate=25", s)
        return SourceSpec(s, "lavfi", graph, "lavfi", False)
    if s.startswith("v4l2:"):
        return SourceSpec(s, "v4l2", s[len("v4l2:"):], "v4l2", True)
    m = _SCHEME.match(s)
    if m:
        scheme = m.group(1).lower()
        if scheme in ("rtsp", "rtsps"):
            return SourceSpec(s, "rtsp", s, "rtsp", True)
        if scheme in ("http", "https"):
            path = urllib.parse.urlparse(s).path.lower()
            kind = "hls" if path.endswith(".m3u8") else "http"
            return SourceSpec(s, kind, s, "hls" if kind == "hls" else None, None)
        if scheme == "file":
            return SourceSpec(s, "file", urllib.parse.unquote(urllib.parse.urlparse(s).path), None, False)
        raise UnsupportedSourceError(f"unsupported source scheme {scheme!r} in {s!r}; supported: {SUPPORTED}", s)
    if re.match(r"^/dev/video\d+$", s):
        return SourceSpec(s, "v4l2", s, "v4l2", True)
    return SourceSpec(s, "file", s, None, False)


def _device_spec(dev: str) -> tuple[str, str]:
    """Split 'alsa:hw:1' / 'pulse:default' / 'lavfi:GRAPH' into (format, target)."""
    fmt, sep, target = dev.partition(":")
    if not sep or fmt not in ("alsa", "pulse", "lavfi") or not target:
        raise UnsupportedSourceError(f"audio_device must be 'alsa:DEVICE', 'pulse:DEVICE' or 'lavfi:GRAPH', not {dev!r}")
    return fmt, target


class Source:
    """One opened media source. Use as a context manager; iterate `events()`."""

    def __init__(self, url: str | os.PathLike, options: SourceOptions | Mapping | None = None,
                 *, sample_rate: int = 16000) -> None:
        self.spec = classify(url)
        self.options = SourceOptions.coerce(options)
        if self.options.rtsp_transport not in ("tcp", "udp"):
            raise ValueError(f"rtsp_transport must be 'tcp' or 'udp', not {self.options.rtsp_transport!r}")
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        self.url = self.spec.url
        self.sample_rate = int(sample_rate)
        self.reconnects = 0  # counted for metrics
        self.decode_errors = 0  # packets the decoder rejected (corrupt data), skipped
        self.has_audio = False
        self.has_video = False
        self.video_size: tuple[int, int] | None = None  # (H, W) as the stream declares it
        self.frame_duration: float | None = None  # nominal seconds per video frame
        self.start_time: float | None = None  # earliest declared stream start, source seconds
        self.live = bool(self.spec.live) if self.options.live is None else self.options.live
        self._containers: list[tuple[Any, list[Any]]] = []
        self._resampler: av.AudioResampler | None = None
        self._resampler_key: tuple | None = None
        self._stop = threading.Event()
        self._opened = False

    # -- opening -------------------------------------------------------------------------
    def open(self) -> "Source":
        """Open the source (bounded by open_timeout_s) or raise a typed SourceError."""
        if self.spec.kind == "v4l2" and not os.path.exists(self.spec.target):
            raise SourceUnavailableError(f"{self.url}: no such video device", self.url)
        if self.spec.kind == "file" and not os.path.exists(self.spec.target):
            raise SourceUnavailableError(f"{self.url}: no such file", self.url)
        self._open_containers()
        if self.spec.live is None and self.options.live is None:  # http(s)/HLS: live if unbounded
            self.live = self._containers[0][0].duration is None
        self._opened = True
        return self

    def _demuxer_options(self) -> dict[str, str]:
        o = self.options
        opts: dict[str, str] = {}
        if self.spec.kind == "rtsp":
            opts["rtsp_transport"] = o.rtsp_transport
            if o.listen:
                opts["rtsp_flags"] = "listen"  # wait for a pusher, in whole seconds
                opts["listen_timeout"] = str(max(1, math.ceil(o.open_timeout_s)))
        elif self.spec.kind in ("http", "hls"):
            opts["rw_timeout"] = str(int(o.read_timeout_s * 1e6))
        elif self.spec.kind == "v4l2":
            opts["timestamps"] = "mono2abs"  # wall-clock stamps, comparable with ALSA's
        opts.update({str(k): str(v) for k, v in o.input_options.items()})
        return opts

    def _open_one(self, target: str, fmt: str | None, opts: dict[str, str]) -> Any:
        o = self.options
        t0 = time.monotonic()
        try:
            c = av.open(target, mode="r", format=fmt, options=opts,
                        timeout=(o.open_timeout_s, o.read_timeout_s))
        except Exception as e:
            # When PyAV's interrupt callback cuts a blocking open, the demuxer reports whatever
            # its half-read state gives (EIO, invalid data, ...): the clock tells what happened.
            if (isinstance(e, (av.error.ExitError, av.error.TimeoutError, TimeoutError))
                    or time.monotonic() - t0 >= 0.95 * o.open_timeout_s):
                raise SourceTimeoutError(
                    f"{self.url}: no answer within {o.open_timeout_s:g} s ({type(e).__name__})", self.url) from e
            self._raise_open_error(e)
        if c.format.name == "tty":  # ffmpeg's ANSI-art demuxer happily "opens" text files
            c.close()
            raise NotMediaError(f"{self.url}: a text file, not media", self.url)
        return c

    def _raise_open_error(self, e: Exception) -> None:
        if isinstance(e, (av.error.FileNotFoundError, FileNotFoundError)):
            raise SourceUnavailableError(f"{self.url}: not found ({e})", self.url) from e
        if isinstance(e, av.error.InvalidDataError):
            raise NotMediaError(f"{self.url}: not a media file or stream ({e})", self.url) from e
        if isinstance(e, (av.FFmpegError, OSError)):
            raise SourceUnavailableError(f"{self.url}: cannot open ({type(e).__name__}: {e})", self.url) from e
        raise e

    def _open_containers(self) -> None:
        o = self.options
        main = self._open_one(self.spec.target, self.spec.format, self._demuxer_options())
        containers = [main]
        try:
            if o.audio_device:
                fmt, target = _device_spec(o.audio_device)
                containers.append(self._open_one(target, fmt, {}))
            v = main.streams.video[0] if (o.video and main.streams.video) else None
            a_owner = containers[-1]
            a = a_owner.streams.audio[0] if (o.audio and a_owner.streams.audio) else None
            if v is None and a is None:
                raise NotMediaError(f"{self.url}: no audio or video track", self.url)
        except BaseException:
            for c in containers:
                c.close()
            raise
        self._containers = []
        starts = []
        for c in containers:
            streams = [s for s in (v, a) if s is not None and s.container is c]
            for s in streams:
                s.thread_type = "AUTO"  # frame+slice threads: decoding is the ingest bottleneck
                if s.start_time is not None and s.time_base is not None:
                    starts.append(float(s.start_time * s.time_base))
            self._containers.append((c, streams))
        self.has_video, self.has_audio = v is not None, a is not None
        if v is not None:
            cc = v.codec_context
            self.video_size = (cc.height, cc.width) if cc.width and cc.height else None
            rate = v.average_rate or v.guessed_rate or v.base_rate
            self.frame_duration = float(1 / rate) if rate else None
        self.start_time = min(starts) if starts else None
        self._resampler = None

    # -- reading -------------------------------------------------------------------------
    def events(self) -> Iterator[Event]:
        """Decoded events until the source ends; live sources reconnect per the backoff policy.

        Raises SourceUnavailableError when a live source cannot be brought back."""
        if not self._opened:
            self.open()
        while True:
            reason = "end of stream"
            try:
                yield from self._read_all()
            except (av.FFmpegError, OSError) as e:
                if not self.live:  # a damaged file: keep what decoded, end there
                    self.decode_errors += 1
                    log.warning("%s: reading stopped: %s", self.url, e)
                    return
                reason = f"{type(e).__name__}: {e}"
            if not self.live or self._stop.is_set():
                return
            lost = time.monotonic()
            self._close_containers()
            if self.options.reconnect.max_attempts == 0:
                return
            log.warning("%s: lost (%s); reconnecting", self.url, reason)
            self._reconnect()
            self.reconnects += 1
            yield Reconnected(self.reconnects, time.monotonic() - lost, reason)

    def _reconnect(self) -> None:
        policy = self.options.reconnect
        attempt = 0
        while True:
            if self._stop.wait(policy.delay(attempt)):
                raise SourceUnavailableError(f"{self.url}: stopped while reconnecting", self.url)
            try:
                self._open_containers()
                return
            except SourceError as e:
                attempt += 1
                log.info("%s: reconnect attempt %d failed: %s", self.url, attempt, e)
                if policy.max_attempts is not None and attempt >= policy.max_attempts:
                    raise SourceUnavailableError(
                        f"{self.url}: gave up after {attempt} reconnect attempts ({e})", self.url) from e

    def _read_all(self) -> Iterator[Event]:
        if len(self._containers) == 1:
            yield from self._decode(*self._containers[0])
        elif not self.live:  # finite inputs: by arrival, one would run ahead of the other
            yield from _merge_by_time([self._decode(c, s) for c, s in self._containers])
        else:
            yield from _merge([self._decode(c, s) for c, s in self._containers], self._stop,
                              self.options.read_timeout_s)

    def _decode(self, container: Any, streams: list[Any]) -> Iterator[Event]:
        for packet in container.demux(streams):
            try:
                frames = packet.decode()
            except av.FFmpegError as e:  # corrupt packet: skip it, the timeline will show the hole
                self.decode_errors += 1
                log.debug("%s: decode error: %s", self.url, e)
                continue
            for fr in frames:
                if isinstance(fr, av.AudioFrame):
                    yield from self._resample(fr)
                else:
                    yield VideoChunk(fr.time, fr)
        if self._resampler is not None:  # the resampler holds a few samples back: flush them
            rs, self._resampler = self._resampler, None
            for out in rs.resample(None):
                yield self._audio_chunk(out)

    def _resample(self, fr: av.AudioFrame) -> Iterator[AudioChunk]:
        key = (fr.format.name, fr.layout.name, fr.sample_rate)
        if self._resampler is None or key != self._resampler_key:
            self._resampler = av.AudioResampler(format="flt", layout="mono", rate=self.sample_rate)
            self._resampler_key = key
        for out in self._resampler.resample(fr):
            yield self._audio_chunk(out)

    @staticmethod
    def _audio_chunk(out: av.AudioFrame) -> AudioChunk:
        t = float(out.pts * out.time_base) if out.pts is not None and out.time_base else None
        return AudioChunk(t, out.to_ndarray().reshape(-1))

    # -- closing -------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask a reading or reconnecting source to stop (safe from another thread)."""
        self._stop.set()

    def _close_containers(self) -> None:
        for c, _ in self._containers:
            try:
                c.close()
            except Exception:  # closing a broken connection must not mask the real error
                log.debug("%s: error on close", self.url, exc_info=True)
        self._containers = []

    def close(self) -> None:
        self._stop.set()
        self._close_containers()

    def __enter__(self) -> "Source":
        return self if self._opened else self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _merge_by_time(gens: list[Iterator[Event]]) -> Iterator[Event]:
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


def _merge(gens: list[Iterator[Event]], stop: threading.Event, join_s: float = 10.0) -> Iterator[Event]:
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


def open_source(url: str | os.PathLike, options: SourceOptions | Mapping | None = None,
                *, sample_rate: int = 16000) -> Source:
    """Classify and open a source; raises UnsupportedSourceError, SourceUnavailableError,
    SourceTimeoutError or NotMediaError within the configured open timeout."""
    return Source(url, options, sample_rate=sample_rate).open()
