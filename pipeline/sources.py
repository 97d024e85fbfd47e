"""Media sources on PyAV: classify a URL, open it with bounded timeouts, decode audio and video
with their source timestamps, and reconnect live sources with capped exponential backoff.

A `Source` yields three kinds of events, in arrival order:
  * `AudioChunk` - float32 mono samples already resampled to the target rate (PyAV's
    AudioResampler does rate and layout conversion), with the time of the first sample;
  * `VideoChunk` - one decoded `av.VideoFrame` (converted to RGB only if a window needs it);
  * `Reconnected` - a live source came back after an outage; timestamps restart after it.
Times are source seconds; `pipeline.windows` maps them onto the media timeline.

Security (docs/security.md): a `Source` takes a `SourcePolicy` (None: permissive, the operator's
own use). The policy is checked before opening and before every reconnect; every open passes
the fixed per-scheme `protocol_whitelist`. Under a restricting policy, http(s)/HLS and file
sources do all their I/O through `_GuardedOpener` (PyAV's io_open): every URL FFmpeg wants to
open - the playlist, each segment, each redirect hop - is judged by the policy first and fetched
by a small HTTP client pinned to the addresses just judged, so neither a redirect nor a playlist
can reach a host or file the policy refuses. Messages and logs carry redacted URLs only.
"""
from __future__ import annotations

import base64
import dataclasses
import errno
import http.client
import logging
import math
import os
import heapq
import itertools
import queue
import re
import socket
import ssl
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
from pipeline.source_policy import (
    NetworkTarget,
    SourcePolicy,
    SourceRefused,
    file_url_path,
    has_control_chars,
    redact,
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
            return SourceSpec(s, "file", file_url_path(s), None, False)
        raise UnsupportedSourceError(f"unsupported source scheme {scheme!r} in {redact(s)!r}; supported: {SUPPORTED}", s)
    if re.match(r"^/dev/video\d+$", s):
        return SourceSpec(s, "v4l2", s, "v4l2", True)
    return SourceSpec(s, "file", s, None, False)


def _device_spec(dev: str) -> tuple[str, str]:
    """Split 'alsa:hw:1' / 'pulse:default' / 'lavfi:GRAPH' into (format, target)."""
    fmt, sep, target = dev.partition(":")
    if not sep or fmt not in ("alsa", "pulse", "lavfi") or not target:
        raise UnsupportedSourceError(f"audio_device must be 'alsa:DEVICE', 'pulse:DEVICE' or 'lavfi:GRAPH', not {redact(dev)!r}")
    return fmt, target


class Source:
    """One opened media source. Use as a context manager; iterate `events()`."""

    def __init__(self, url: str | os.PathLike, options: SourceOptions | Mapping | None = None,
                 *, sample_rate: int = 16000, policy: SourcePolicy | None = None) -> None:
        self.policy = SourcePolicy.permissive() if policy is None else policy
        if isinstance(url, (str, os.PathLike)):
            self.policy.kind(url)  # other schemes and FFmpeg protocols: SourceRefused("scheme")
        self.spec = classify(url)
        # restricting policy: http(s)/HLS/file I/O goes through the policy-checking opener
        self.guarded = not self.policy.unrestricted and self.spec.kind in ("http", "hls", "file")
        self.options = SourceOptions.coerce(options)
        if self.options.rtsp_transport not in ("tcp", "udp"):
            raise ValueError(f"rtsp_transport must be 'tcp' or 'udp', not {self.options.rtsp_transport!r}")
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        self.url = redact(self.spec.url)  # for messages and logs; the real URL is self.spec.url
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
        self._opener = _GuardedOpener(self) if self.guarded else None

    # -- opening -------------------------------------------------------------------------
    def open(self) -> "Source":
        """Check the policy, then open the source (bounded by open_timeout_s); raises
        SourceRefused (nothing opened) or another typed SourceError."""
        self.check()
        if self.spec.kind == "v4l2" and not os.path.exists(self.spec.target):
            raise SourceUnavailableError(f"{self.url}: no such video device", self.url)
        if self.spec.kind == "file" and not os.path.exists(self.spec.target):
            raise SourceUnavailableError(f"{self.url}: no such file", self.url)
        self._open_containers()
        if self.spec.live is None and self.options.live is None:  # http(s)/HLS: live if unbounded
            self.live = self._containers[0][0].duration is None and not self._sized_http()
        self._opened = True
        return self

    def _sized_http(self) -> bool:
        """A guarded plain-http source with a Content-Length is a file, not a live stream (PyAV's
        custom I/O cannot tell FFmpeg the size, so a TS file would show no duration)."""
        if self._opener is None or self.spec.kind != "http":
            return False
        main = self._opener.first
        return isinstance(main, _HttpReader) and main.size is not None

    def check(self) -> None:
        """The policy's verdict on this source, its paired audio input and its raw options."""
        self.policy.check(self.spec.url)
        if self.options.audio_device:
            self.policy.check_audio_device(self.options.audio_device)
        if not self.policy.unrestricted:
            for k, v in self.options.input_options.items():
                if has_control_chars(str(k)) or has_control_chars(str(v)):
                    raise SourceRefused("control-char", f"control characters in input option {str(k)!r}")
                if str(k) not in SAFE_INPUT_OPTIONS:
                    raise SourceRefused("option:not-allowed", f"input option {str(k)!r} is not allowed "
                                        f"under a source policy; allowed: {sorted(SAFE_INPUT_OPTIONS)}")

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
        # forced over anything the caller passed: a whitelist can only be ours
        opts["protocol_whitelist"] = self.policy.protocol_whitelist(self.spec.url)
        if self.guarded:
            # hls' keep-alive reuses FFmpeg's own http context, which custom I/O does not have:
            # with it on, a live playlist reload aborts the process (av_assert0); off, every
            # request goes through the opener
            opts["http_persistent"] = "0"
            opts["http_multiple"] = "0"
            if self.spec.kind == "file":
                opts["safe"] = "1"  # concat lists: relative, plain names only
                opts["enable_drefs"] = "0"  # mov: no external data references
        return opts

    def _open_one(self, target: str, fmt: str | None, opts: dict[str, str], io_open: Any = None) -> Any:
        o = self.options
        t0 = time.monotonic()
        try:
            c = av.open(target, mode="r", format=fmt, options=opts,
                        timeout=(o.open_timeout_s, o.read_timeout_s), io_open=io_open)
        except SourceError:  # the opener's verdict (SourceRefused) or its typed failure
            raise
        except Exception as e:
            # When PyAV's interrupt callback cuts a blocking open, the demuxer reports whatever
            # its half-read state gives (EIO, invalid data, ...): the clock tells what happened.
            if (isinstance(e, (av.error.ExitError, av.error.TimeoutError, TimeoutError))
                    or time.monotonic() - t0 >= 0.95 * o.open_timeout_s):
                raise SourceTimeoutError(
                    f"{self.url}: no answer within {o.open_timeout_s:g} s ({type(e).__name__})", self.url) from _cause(e)
            self._raise_open_error(e)
        if c.format.name == "tty":  # ffmpeg's ANSI-art demuxer happily "opens" text files
            c.close()
            raise NotMediaError(f"{self.url}: a text file, not media", self.url)
        return c

    def _raise_open_error(self, e: Exception) -> None:
        if isinstance(e, (av.error.FileNotFoundError, FileNotFoundError)):
            raise SourceUnavailableError(f"{self.url}: not found ({e})", self.url) from _cause(e)
        if isinstance(e, av.error.InvalidDataError):
            raise NotMediaError(f"{self.url}: not a media file or stream ({e})", self.url) from _cause(e)
        if isinstance(e, (av.FFmpegError, OSError, http.client.HTTPException)):
            raise SourceUnavailableError(f"{self.url}: cannot open ({type(e).__name__}: {e})", self.url) from _cause(e)
        raise e

    def _open_containers(self) -> None:
        o = self.options
        main = self._open_one(self.spec.target, self.spec.format, self._demuxer_options(), self._opener)
        containers = [main]
        try:
            if o.audio_device:
                fmt, target = _device_spec(o.audio_device)
                containers.append(self._open_one(target, fmt, {"protocol_whitelist": ""}))
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
        if self._opener is not None and self._opener.refused is not None:
            self._close_containers()  # the playlist referred to something refused
            raise self._opener.refused

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
                    log.warning("%s: reading stopped: %s", self.url, redact(e))
                    return
                reason = redact(f"{type(e).__name__}: {e}")
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
                self.check()  # the policy again: a name may resolve elsewhere now
                self._open_containers()
                return
            except SourceError as e:
                if isinstance(e, SourceRefused) and e.rule != "resolve":
                    raise  # refused is final; only a failed lookup may be transient
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
            if self._opener is not None and self._opener.refused is not None:
                raise self._opener.refused  # a playlist or redirect pointed somewhere refused
            try:
                frames = packet.decode()
            except av.FFmpegError as e:  # corrupt packet: skip it, the timeline will show the hole
                self.decode_errors += 1
                log.debug("%s: decode error: %s", self.url, redact(e))
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
        if self._opener is not None and self._opener.refused is not None:
            raise self._opener.refused  # FFmpeg skipped a refused segment: the source ends refused

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
            except Exception as e:  # closing a broken connection must not mask the real error
                log.debug("%s: error on close: %s", self.url, redact(e))
        self._containers = []
        if self._opener is not None:
            self._opener.close_all()

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
                *, sample_rate: int = 16000, policy: SourcePolicy | None = None) -> Source:
    """Classify, check and open a source; raises UnsupportedSourceError (SourceRefused under a
    policy), SourceUnavailableError, SourceTimeoutError or NotMediaError within the configured
    open timeout."""
    return Source(url, options, sample_rate=sample_rate, policy=policy).open()


# -- guarded I/O ---------------------------------------------------------------------------
# Raw demuxer options a caller may still pass under a restricting policy: sizes, rates, probing
# and timing. Nothing that names a file, a graph, a header or a listening socket.
SAFE_INPUT_OPTIONS = frozenset({
    "video_size", "framerate", "pixel_format", "input_format", "sample_rate", "channels",
    "probesize", "analyzeduration", "fpsprobesize", "fflags", "max_delay", "reorder_queue_size",
    "buffer_size", "timeout", "rw_timeout", "allowed_media_types", "min_port", "max_port",
})
_AVIO_FLAG_WRITE = 2
_MAX_REDIRECTS = 5
_SKIP_FORWARD = 512 * 1024  # bytes a forward seek reads through instead of a new request
_USER_AGENT = "OmniZip-Stream"


def _cause(e: BaseException) -> BaseException | None:
    """`e` as the cause of a typed error, unless its text holds credentials (a traceback would
    print them): then no cause at all."""
    return e if redact(str(e)) == str(e) else None


class _GuardedOpener:
    """PyAV io_open for a source under a restricting policy: every URL FFmpeg opens (the source
    itself, HLS playlists, segments and keys) comes here, is judged, and is opened by us."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.refused: SourceRefused | None = None  # the first refusal; the source stops on it
        self.first: Any = None  # what the latest open of the source itself returned
        self._files: list[Any] = []
        self._lock = threading.Lock()

    def __call__(self, url: str, flags: int, options: dict) -> Any:
        try:
            f = self._open(url, flags)
        except SourceRefused as e:
            if self.refused is None:  # FFmpeg may skip a failed segment: remember, stop later
                self.refused = e
            log.warning("%s: refused to open %s: %s", self.source.url, redact(url), e)
            raise
        with self._lock:
            if not self._files:
                self.first = f
            self._files.append(f)
        return f

    def _open(self, url: str, flags: int) -> Any:
        src = self.source
        if flags & _AVIO_FLAG_WRITE:
            raise SourceRefused("scheme", "a source is never written to", url)
        if has_control_chars(url):
            raise SourceRefused("control-char", "control characters in a URL the source refers to")
        o = src.options
        if src.spec.kind in ("http", "hls"):
            scheme = urllib.parse.urlsplit(url).scheme.lower() if "://" in url else ""
            if scheme not in ("http", "https"):
                raise SourceRefused("scheme", f"an http(s) source may only reach http(s), not "
                                    f"{(scheme or url.split(':', 1)[0] if ':' in url else 'file')!r}", url)
            return _HttpReader(url, src.policy, o.open_timeout_s, o.read_timeout_s)
        # a file source: plain paths (or file: URLs) inside what the policy allows, nothing else
        if url.startswith("file://"):
            path = file_url_path(url)
        elif url.startswith("file:"):
            path = url[len("file:"):]
        elif re.match(r"^[A-Za-z0-9+.\-]+:", url) or url.startswith("subfile,"):
            raise SourceRefused("scheme", "a file source may only refer to local files", url)
        else:
            path = url
        real = src.policy.check_file(path, url)
        return open(real, "rb")

    def close_all(self) -> None:
        with self._lock:
            files, self._files = self._files, []
        for f in files:
            try:
                f.close()
            except Exception:
                pass


def _connect_any(addresses: tuple[str, ...], port: int, timeout: float | None) -> socket.socket:
    err: OSError | None = None
    for a in addresses:
        try:
            return socket.create_connection((a, port), timeout)
        except OSError as e:
            err = e
    raise err if err is not None else OSError(errno.EHOSTUNREACH, "no address to connect to")


class _PinnedHTTP(http.client.HTTPConnection):
    """HTTP to the addresses the policy judged, never to a fresh lookup (no DNS rebinding)."""

    def __init__(self, target: NetworkTarget, timeout: float) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self.addresses = target.addresses

    def connect(self) -> None:
        self.sock = _connect_any(self.addresses, self.port, self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, target: NetworkTarget, timeout: float, context: ssl.SSLContext) -> None:
        super().__init__(target.host, target.port, timeout=timeout, context=context)
        self.addresses = target.addresses

    def connect(self) -> None:
        sock = _connect_any(self.addresses, self.port, self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _tls_context(verify: bool) -> ssl.SSLContext:
    if verify:
        return ssl.create_default_context()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _origin(url: str) -> tuple[str, str, int | None]:
    p = urllib.parse.urlsplit(url)
    return p.scheme.lower(), (p.hostname or ""), p.port


class _HttpReader:
    """A read-only file over HTTP(S) for PyAV: GET with redirects followed by hand (each hop
    judged by the policy), connections pinned to the judged addresses, Range requests for seeks
    when the server offers them, Basic credentials from the URL sent to its own origin only."""

    def __init__(self, url: str, policy: SourcePolicy, open_timeout: float, read_timeout: float) -> None:
        self.url, self.policy = url, policy
        self.open_timeout, self.read_timeout = open_timeout, read_timeout
        self.pos = 0
        self.size: int | None = None
        self._ranges = False
        self._conn: http.client.HTTPConnection | None = None
        self._resp: http.client.HTTPResponse | None = None
        self._get(0)

    def _get(self, offset: int) -> None:
        url, origin = self.url, _origin(self.url)
        p = urllib.parse.urlsplit(self.url)
        auth = None
        if p.username is not None:
            cred = f"{urllib.parse.unquote(p.username)}:{urllib.parse.unquote(p.password or '')}"
            auth = "Basic " + base64.b64encode(cred.encode()).decode()
        for _ in range(_MAX_REDIRECTS + 1):
            target = self.policy.check_network(url)  # SourceRefused: nothing is sent there
            conn: http.client.HTTPConnection = (
                _PinnedHTTPS(target, self.open_timeout, _tls_context(self.policy.tls_verify))
                if target.scheme == "https" else _PinnedHTTP(target, self.open_timeout))
            q = urllib.parse.urlsplit(url)
            path = (q.path or "/") + (f"?{q.query}" if q.query else "")
            # like FFmpeg: always ask for a range, so a 206 tells the server can seek
            headers = {"User-Agent": _USER_AGENT, "Accept": "*/*", "Connection": "close",
                       "Range": f"bytes={offset}-"}
            if auth and _origin(url) == origin:
                headers["Authorization"] = auth
            try:
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
            except BaseException:
                conn.close()
                raise
            if resp.status in (301, 302, 303, 307, 308):
                loc = resp.getheader("Location", "").strip()
                conn.close()
                if not loc:
                    raise OSError(errno.EIO, f"HTTP {resp.status} without a Location")
                url = urllib.parse.urljoin(url, loc)
                continue
            if resp.status == 404:
                conn.close()
                raise FileNotFoundError(errno.ENOENT, "HTTP 404 Not Found")
            if resp.status not in (200, 206) or (offset and resp.status != 206):
                conn.close()
                raise OSError(errno.EIO, f"HTTP {resp.status} {resp.reason}")
            if conn.sock is not None:
                conn.sock.settimeout(self.read_timeout)
            self._conn, self._resp, self.pos = conn, resp, offset
            length = resp.getheader("Content-Length")
            crange = resp.getheader("Content-Range", "")
            if "/" in crange and crange.rsplit("/", 1)[1].strip().isdigit():
                self.size = int(crange.rsplit("/", 1)[1])
            elif length and length.isdigit():
                self.size = offset + int(length)
            if offset == 0:
                self._ranges = (resp.status == 206
                                or resp.getheader("Accept-Ranges", "").strip().lower() == "bytes")
            return
        raise OSError(errno.EIO, f"more than {_MAX_REDIRECTS} redirects")

    # -- the file interface PyAV uses ------------------------------------------------------
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._ranges and self.size is not None

    def read(self, n: int = -1) -> bytes:
        if self._resp is None:
            return b""
        try:
            data = self._resp.read1(n if n and n > 0 else 65536)
        except http.client.HTTPException as e:
            raise OSError(errno.EIO, f"HTTP read failed ({type(e).__name__})") from None
        self.pos += len(data)
        return data

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 1:
            offset += self.pos
        elif whence == 2:
            if self.size is None:
                raise OSError(errno.ESPIPE, "size unknown")
            offset += self.size
        if offset == self.pos:
            return self.pos
        if not self.seekable() or offset < 0:
            raise OSError(errno.ESPIPE, "not seekable")
        if self._resp is not None and 0 < offset - self.pos <= _SKIP_FORWARD:
            while self.pos < offset:  # a short hop forward: read through, no new request
                if not self.read(min(65536, offset - self.pos)):
                    break
            if self.pos == offset:
                return self.pos
        self._close()
        if self.size is not None and offset >= self.size:
            self.pos = offset  # at or past the end: reads give EOF
            return self.pos
        self._get(offset)
        return self.pos

    def _close(self) -> None:
        conn, self._conn, self._resp = self._conn, None, None
        if conn is not None:
            conn.close()

    def close(self) -> None:
        self._close()
