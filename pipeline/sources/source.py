"""Media sources on PyAV: classify a URL, open it with bounded timeouts, decode audio and video
with their source timestamps, and reconnect live sources with capped exponential backoff.

A `Source` yields three kinds of events, in arrival order:
  * `AudioChunk` - float32 mono samples already resampled to the target rate (PyAV's
    AudioResampler does rate and layout conversion), with the time of the first sample;
  * `VideoChunk` - one decoded `av.VideoFrame` (converted to RGB only if a window needs it);
  * `Reconnected` - a live source came back after an outage; timestamps restart after it.
Times are source seconds; `pipeline.sources.windows` maps them onto the media timeline.

Security (docs/security.md): a `Source` takes a `SourcePolicy` (None: permissive, the operator's
own use). The policy is checked before opening and before every reconnect; every open passes
the fixed per-scheme `protocol_whitelist`. Under a restricting policy, http(s)/HLS and file
sources do all their I/O through `pipeline.sources.guarded_io.GuardedOpener` (PyAV's io_open): every URL FFmpeg wants to
open - the playlist, each segment, each redirect hop - is judged by the policy first and fetched
by a small HTTP client pinned to the addresses just judged, so neither a redirect nor a playlist
can reach a host or file the policy refuses. Messages and logs carry redacted URLs only.

Parts live beside it and are re-exported here: `pipeline.sources.spec` (`classify`, `SourceOptions`,
`Backoff`, `SourceSpec`), `pipeline.sources.events` (the events and how inputs are interleaved)
and `pipeline.sources.guarded_io` (the policy-checking opener and HTTP reader).
"""
from __future__ import annotations

import http.client
import logging
import math
import os
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import av

from pipeline.errors import (
    NotMediaError,
    SourceError,
    SourceTimeoutError,
    SourceUnavailableError,
)
from pipeline.sources.guarded_io import GuardedOpener, HttpReader
from pipeline.sources.events import (
    AudioChunk,
    Event,
    Reconnected,
    VideoChunk,
    merge_by_arrival,
    merge_by_time,
)
from pipeline.sources.policy import MEDIA_FORMATS, SourcePolicy
from pipeline.errors import SourceRefused
from pipeline.redact import has_control_chars, redact
from pipeline.sources.spec import SourceOptions, classify, device_spec

__all__ = ["SAFE_INPUT_OPTIONS", "Source", "open_source"]

log = logging.getLogger(__name__)

# Raw demuxer options a caller may still pass under a restricting policy: sizes, rates, probing
# and timing. Nothing that names a file, a graph, a header or a listening socket.
SAFE_INPUT_OPTIONS = frozenset({
    "video_size", "framerate", "pixel_format", "input_format", "sample_rate", "channels",
    "probesize", "analyzeduration", "fpsprobesize", "fflags", "max_delay", "reorder_queue_size",
    "buffer_size", "timeout", "rw_timeout", "allowed_media_types", "min_port", "max_port",
})


def _cause(e: BaseException) -> BaseException | None:
    """`e` as the cause of a typed error, unless its text holds credentials (a traceback would
    print them): then no cause at all."""
    return e if redact(str(e)) == str(e) else None


class Source:
    """One opened media source. Use as a context manager; iterate `events()`."""

    MAX_DEMUX_RETRIES = 32  # a file's demuxer failing this often in a row, decoding nothing: the end

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
        self._events_out = 0  # events decoded so far: tells a demuxer stuck on damage from one reading on
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
        self._opener = GuardedOpener(self) if self.guarded else None

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
        return isinstance(main, HttpReader) and main.size is not None

    def check(self) -> None:
        """The policy's verdict on this source, its paired audio input and its raw options."""
        self.policy.check(self.spec.url)
        if self.options.audio_device:
            self.policy.check_audio_device(self.options.audio_device)
        if self.spec.kind == "rtsp":
            self.policy.check_rtsp_transport(self.options.rtsp_transport, self.spec.url)
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
            opts["enable_drefs"] = "0"  # mov: no external data references
            opts["safe"] = "1"  # concat (never reached: not on the list below): plain relative names
            # only demuxers that open no URL named inside the media (concat, dash, sdp, ...: no)
            opts["format_whitelist"] = ",".join(MEDIA_FORMATS)
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
            if "format_whitelist" in opts and isinstance(e, av.error.ArgumentError):
                raise self._opener.format_refused() from None  # EINVAL: a format not on the list
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
                fmt, target = device_spec(o.audio_device)
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
        stuck = 0  # demux errors in a row with nothing decoded between them
        while True:
            reason = "end of stream"
            mark = self._events_out
            try:
                yield from self._read_all()
            except (av.FFmpegError, OSError) as e:
                if not self.live:  # a damaged file: demux on past the damage, as ffmpeg does
                    self.decode_errors += 1
                    stuck = 0 if self._events_out > mark else stuck + 1
                    if stuck < self.MAX_DEMUX_RETRIES and not self._stop.is_set():
                        log.info("%s: demux error, reading on: %s", self.url, redact(e))
                        continue
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
            yield from merge_by_time([self._decode(c, s) for c, s in self._containers])
        else:
            yield from merge_by_arrival([self._decode(c, s) for c, s in self._containers], self._stop,
                              self.options.read_timeout_s)

    def _decode(self, container: Any, streams: list[Any]) -> Iterator[Event]:
        for packet in container.demux(streams):
            if self._opener is not None and self._opener.refused is not None:
                raise self._opener.refused  # a playlist or redirect pointed somewhere refused
            try:
                frames = packet.decode()
                events = [ch for fr in frames for ch in self._events_of(fr)]
            except (av.FFmpegError, ValueError) as e:  # corrupt packet: skip it, the timeline shows the hole
                self.decode_errors += 1
                log.debug("%s: decode error: %s", self.url, redact(e))
                continue
            self._events_out += len(events)
            yield from events
        if self._resampler is not None:  # the resampler holds a few samples back: flush them
            rs, self._resampler = self._resampler, None
            for out in rs.resample(None):
                yield self._audio_chunk(out)
        if self._opener is not None and self._opener.refused is not None:
            raise self._opener.refused  # FFmpeg skipped a refused segment: the source ends refused

    def _events_of(self, fr: av.AudioFrame | av.VideoFrame) -> list[Event]:
        if isinstance(fr, av.AudioFrame):
            return list(self._resample(fr))
        return [VideoChunk(fr.time, fr)]

    def declared_end(self) -> float | None:
        """Source time at which a file's container says it ends (its start plus its duration);
        None for a live source or when the container declares no duration."""
        d = self.duration_s()
        if d is None:
            return None
        start = self._containers[0][0].start_time
        return (start or 0) / 1e6 + d

    def duration_s(self) -> float | None:
        """The container's declared duration in seconds (files only; None when unknown)."""
        if self.live or not self._containers or not self._containers[0][0].duration:
            return None
        return self._containers[0][0].duration / 1e6

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


def open_source(url: str | os.PathLike, options: SourceOptions | Mapping | None = None,
                *, sample_rate: int = 16000, policy: SourcePolicy | None = None) -> Source:
    """Classify, check and open a source; raises UnsupportedSourceError (SourceRefused under a
    policy), SourceUnavailableError, SourceTimeoutError or NotMediaError within the configured
    open timeout."""
    return Source(url, options, sample_rate=sample_rate, policy=policy).open()
