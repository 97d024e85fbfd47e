"""What a source is before anything is opened: `classify(url)` tells its kind (rtsp, http, hls,
file, lavfi, v4l2), what to hand av.open and whether it is live (`SourceSpec`); `SourceOptions`
says how to open and window it (with its reconnect `Backoff`); `device_spec` reads a paired
audio input. Plain data and parsing, no PyAV: re-exported by pipeline.sources.source, where the
opening and decoding live.
"""
from __future__ import annotations

import dataclasses
import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import UnsupportedSourceError
from pipeline.sources.policy import file_url_path
from pipeline.redact import redact

__all__ = ["PUSH_PROTOCOLS", "SUPPORTED", "Backoff", "SourceOptions", "SourceSpec", "classify", "device_spec"]

SUPPORTED = ("rtsp://, rtsps://, http(s):// (media or HLS .m3u8), file paths or file://, /dev/videoN or "
             "v4l2:/dev/videoN, lavfi:GRAPH, whip: (pushed by a WebRTC publisher), realtime: (a /v1/realtime session)")
PUSH_PROTOCOLS = ("whip", "realtime")  # push sources: the publisher connects to the service


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
    kind: str  # rtsp | http | hls | file | lavfi | v4l2 | push
    target: str
    format: str | None
    live: bool | None

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
    protocol, colon, rest = s.partition(":")
    if colon and protocol.lower() in PUSH_PROTOCOLS and not rest.startswith("//"):
        if rest:
            raise UnsupportedSourceError(f"a push source is just {protocol.lower()}: (the publisher "
                                         f"connects to the stream's ingest URL), not {redact(s)!r}", s)
        return SourceSpec(s.lower(), "push", protocol.lower(), None, True)
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


def device_spec(dev: str) -> tuple[str, str]:
    """Split 'alsa:hw:1' / 'pulse:default' / 'lavfi:GRAPH' into (format, target)."""
    fmt, sep, target = dev.partition(":")
    if not sep or fmt not in ("alsa", "pulse", "lavfi") or not target:
        raise UnsupportedSourceError(f"audio_device must be 'alsa:DEVICE', 'pulse:DEVICE' or 'lavfi:GRAPH', not {redact(dev)!r}")
    return fmt, target
