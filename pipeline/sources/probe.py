"""Test a source before watching it: open it under the engine's source policy, read until one
video frame and one audio chunk arrived (or the time is up), report what it carries, close it.
Nothing is registered or kept.

Why its own deadline: a console's "test connection" must answer in seconds whatever the source
does. The open and each read are bounded by PyAV's interrupt callback (open/read timeouts cut
to what is left of ``timeout_s``), no reconnect is attempted, and the whole probe runs in a
worker thread that is abandoned (its source stopped) at the deadline.

Why its answers say so little: a probe is a connection the service makes for a client, so it
must not serve as a port scanner or banner grabber. Whatever went wrong after the policy let
the source through (closed port, HTTP 404, a non-HTTP service's greeting, silence, a redirect
or playlist to a refused target, a refused container format), the answer is the same
`NOT_MEDIA` text, given at the deadline (`min_fail_s`), never earlier: the reason goes to the
service's log only. `ProbeLimiter` bounds how many probes run (per key and in all) on threads
of their own, apart from the threads the engine serves its other calls with.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["NOT_MEDIA", "PROBE_TIMEOUT_S", "ProbeLimiter", "probe_source"]

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0
NOT_MEDIA = "no media source could be read there"  # the one answer for every failure after opening


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
                 timeout_s: float = PROBE_TIMEOUT_S, min_fail_s: float | None = None) -> dict[str, Any]:
    """What ``url`` carries, within ``timeout_s``: {"source" (redacted), "ok", "format", "live",
    "video": {codec, width, height, fps} | None, "audio": {codec, sample_rate, channels} | None,
    "decoded": {video, audio}, "elapsed_s"} or, when no media could be read, "ok": False and
    "error": NOT_MEDIA, answered no sooner than ``min_fail_s`` (default: ``timeout_s``) after
    the start. A source the policy refuses before opening raises SourceRefused; a malformed one
    UnsupportedSourceError: both ValueErrors, as for create."""
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
    if th.is_alive() or "error" in result:
        src.close()  # ends a blocked read; the thread exits on its own
        why = result.get("error", f"no answer within {timeout_s:g} s")
        log.info("probe of %s: %s", redact(str(url)), redact(f"{type(why).__name__}: {why}"))
        time.sleep(max(0.0, t0 + (timeout_s if min_fail_s is None else min_fail_s) - time.monotonic()))
        info: dict[str, Any] = {"ok": False, "error": NOT_MEDIA}
    else:
        src.close()
        info = {"ok": True, **result["info"]}
    return {"source": redact(str(url)), **info, "elapsed_s": round(time.monotonic() - t0, 3)}


class ProbeLimiter:
    """Runs probes on a pool of their own threads (so that a flood of probes never holds the
    threads the engine answers other calls with), at most `per_key` at once for one API key and
    `total` in all; one more is refused at once with LimitExceeded (429), never queued."""

    def __init__(self, total: int, per_key: int, timeout_s: float = PROBE_TIMEOUT_S) -> None:
        self.total, self.per_key, self.timeout_s = int(total), int(per_key), float(timeout_s)
        self.running: dict[str, int] = {}
        self._pool = ThreadPoolExecutor(max_workers=self.total, thread_name_prefix="probe")

    def _take(self, key: str) -> None:
        from pipeline.errors import LimitExceeded

        retry = max(1, round(self.timeout_s))
        if self.running.get(key, 0) >= self.per_key:
            raise LimitExceeded(f"{self.per_key} source probe(s) of this API key are running; retry when "
                                "they have answered", "source", retry)
        if sum(self.running.values()) >= self.total:
            raise LimitExceeded(f"{self.total} source probes are running on this service; retry shortly",
                                "source", retry)
        self.running[key] = self.running.get(key, 0) + 1

    def _give(self, key: str) -> None:
        left = self.running.get(key, 1) - 1
        if left > 0:
            self.running[key] = left
        else:
            self.running.pop(key, None)

    async def run(self, key: str, url: str, options: Mapping[str, Any] | None, policy: Any) -> dict[str, Any]:
        """probe_source(url, options, policy) for `key`, within the bounds and the deadline. Call
        from one event loop (the counts are not locked)."""
        from pipeline.redact import redact

        self._take(key)
        try:
            fut = asyncio.get_running_loop().run_in_executor(
                self._pool, probe_source, url, options, policy, self.timeout_s)
            try:  # probe_source keeps its own deadline; this one holds if a close hangs
                return await asyncio.wait_for(fut, self.timeout_s + 5.0)
            except asyncio.TimeoutError:
                return {"source": redact(str(url)), "ok": False, "error": NOT_MEDIA,
                        "elapsed_s": round(self.timeout_s + 5.0, 3)}
        finally:
            self._give(key)
