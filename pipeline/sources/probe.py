"""Test a source before watching it: open it under the engine's source policy, read until one
video frame and one audio chunk arrived (or the time is up), report what it carries, close it.
Nothing is registered or kept.

Why its own deadline: a console's "test connection" must answer in seconds whatever the source
does. The open and each read are bounded by PyAV's interrupt callback (open/read timeouts cut
to what is left of ``timeout_s``), no reconnect is attempted, and the whole probe runs in a
worker thread that is abandoned (its source stopped) at the deadline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

__all__ = ["probe_source", "PROBE_TIMEOUT_S"]

PROBE_TIMEOUT_S = 5.0


def _stream_info(container: Any) -> tuple[dict | None, dict | None]:
    """Codec, size and rate of the first video and audio tracks."""
    v = container.streams.video[0] if container.streams.video else None
    a = container.streams.audio[0] if container.streams.audio else None
    video = audio = None
    if v is not None:
        cc = v.codec_context
        rate = v.average_rate or v.guessed_rate or v.base_rate
        video = {"codec": cc.name, "width": int(cc.width or 0), "height": int(cc.height or 0),
                 "fps": round(float(rate), 3) if rate else None}
    if a is not None:
        cc = a.codec_context
        audio = {"codec": cc.name, "sample_rate": int(cc.sample_rate or 0),
                 "channels": int(getattr(cc, "channels", 0) or getattr(cc.layout, "nb_channels", 0) or 0)}
    return video, audio


def _probe(src: Any, deadline: float) -> dict[str, Any]:
    from pipeline.sources.events import AudioChunk, VideoChunk

    src.open()
    main = src._containers[0][0]  # the opened main input (pipeline.sources.source.Source)
    video, audio = _stream_info(main)
    got_v, got_a = video is None, audio is None  # tracks that are absent need no sample
    frame_size = None
    for ev in src.events():
        if isinstance(ev, VideoChunk) and not got_v:
            got_v, frame_size = True, (int(ev.frame.width), int(ev.frame.height))
        elif isinstance(ev, AudioChunk):
            got_a = True
        if (got_v and got_a) or time.monotonic() > deadline:
            break
    if video is not None and frame_size is not None and not video["width"]:
        video["width"], video["height"] = frame_size
    return {"format": getattr(main.format, "name", None), "live": bool(src.live), "video": video, "audio": audio,
            "decoded": {"video": bool(video and frame_size), "audio": bool(audio and got_a)}}


def probe_source(url: str, options: Mapping[str, Any] | None = None, policy: Any = None,
                 timeout_s: float = PROBE_TIMEOUT_S) -> dict[str, Any]:
    """What ``url`` carries, within ``timeout_s``: {"source" (redacted), "ok", "format", "live",
    "video": {codec, width, height, fps} | None, "audio": {codec, sample_rate, channels} | None,
    "decoded": {video, audio}, "elapsed_s"} or, when it cannot be opened in time, "ok": False and
    "error". A source the policy refuses raises SourceRefused (before anything is opened); a
    malformed one UnsupportedSourceError: both ValueErrors, as for create."""
    from pipeline.errors import SourceError
    from pipeline.errors import SourceRefused
    from pipeline.redact import redact
    from pipeline.sources.source import Source

    t0 = time.monotonic()
    opts = dict(options or {})
    budget = max(0.5, timeout_s - 0.5)  # leave time to close and answer
    opts["open_timeout_s"] = min(float(opts.get("open_timeout_s", budget)), budget)
    opts["read_timeout_s"] = min(float(opts.get("read_timeout_s", budget)), budget)
    opts["reconnect"] = {"max_attempts": 0}
    src = Source(url, opts, policy=policy)  # classify + the policy's scheme check
    src.check()  # SourceRefused names the rule; nothing opened
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["info"] = _probe(src, t0 + budget)
        except BaseException as e:  # reported below, in the caller's thread
            result["error"] = e

    th = threading.Thread(target=work, name="probe", daemon=True)
    th.start()
    th.join(timeout_s - (time.monotonic() - t0))
    src.stop()
    if th.is_alive():
        src.close()  # ends a blocked read; the thread exits on its own
        info: dict[str, Any] = {"ok": False, "error": f"no answer within {timeout_s:g} s"}
    elif "error" in result:
        e = result["error"]
        if isinstance(e, SourceRefused):
            raise e
        if not isinstance(e, (SourceError, OSError, ValueError)):
            raise e
        info = {"ok": False, "error": redact(str(e)) or type(e).__name__}
    else:
        src.close()
        info = {"ok": True, **result["info"]}
    return {"source": redact(str(url)), **info, "elapsed_s": round(time.monotonic() - t0, 3)}
