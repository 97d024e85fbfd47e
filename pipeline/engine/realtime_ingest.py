"""A realtime session's media in its stream's ingest actor (a mixin of IngestActor): the socket
(pipeline.api.realtime) appends 24-kHz PCM and camera images, which go into the stream's
PushSource (pipeline.sources.push) exactly as a WebRTC publisher's frames do, so windows,
compression, context, pictures and metrics are a push stream's. Turn detection (silero-vad,
pipeline.engine.vad) runs here too, on the same audio, and its events go back in the reply.

Audio is placed on a clock that follows arrival: an append starts where the previous one ended,
or now if that is past (the client paused), and may run at most ``AHEAD_S`` ahead of the wall
clock; faster appends are refused (a push source's tracks are anchored at arrival: audio far
ahead would be re-anchored and overlap). Images are placed at their arrival. The session is one
publisher; when the socket closes the stream ends at once (a new socket is a new session).
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any

from pipeline.sources.appended import PCM_RATE, check_pcm, decode_image, pcm_frame
from pipeline.sources.push_settings import PushSettings

__all__ = ["AHEAD_S", "RealtimeIngest"]

log = logging.getLogger(__name__)

AHEAD_S = 0.9  # appended audio may run this far ahead of real time (below PushSource's 1-s resync)
SKEW_S = 1.0  # a track this far behind the other is filled (an audio-only client's video, at once)


class _Clock:
    """The session's audio on the wall clock, and its total length (the events' ms)."""

    def __init__(self) -> None:
        self.t0: float | None = None  # monotonic time of the first sample
        self.end = 0.0  # monotonic time the appended audio reaches
        self.samples = 0


class RealtimeIngest:
    """IngestActor's realtime side; expects ``rec``, ``push``, ``sid`` and ``_stop``."""

    rec: Any
    push: Any
    sid: str

    def _start_realtime(self, settings: PushSettings) -> None:
        from pipeline.sources.push import PushSource
        from pipeline.sources.spec import SourceOptions

        options = dataclasses.replace(SourceOptions.coerce(self.rec.options), max_skew_s=SKEW_S)
        self.push = PushSource(self.rec.source, options, wait_s=settings.wait_s, grace_s=0.0)
        self._clock = _Clock()
        self._rt_lock = threading.Lock()
        self._vad: Any = None
        self._vad_ready = threading.Event()
        threading.Thread(target=self._load_vad, name=f"vad-{self.sid}", daemon=True).start()

    def _load_vad(self) -> None:
        """silero-vad loaded off the actor's start (torch's import takes seconds)."""
        try:
            from pipeline.core.turns import TurnDetection
            from pipeline.engine.vad import Vad

            self._vad = Vad(TurnDetection())
        except Exception:
            log.exception("stream %s: silero-vad could not be loaded", self.sid)
        finally:
            self._vad_ready.set()

    def realtime_attach(self, session: str) -> bool:
        """The socket opened: the session is this stream's publisher (audio and video tracks)."""
        self.push.attach(session, audio=True, video=True)
        return self._vad_ready.wait(60) and self._vad is not None

    def realtime_detach(self, session: str) -> bool:
        """The socket closed: the stream ends once what was appended is windowed."""
        return bool(self.push.detach(session))

    def realtime_vad(self, settings: dict[str, Any] | None) -> bool:
        """New ``server_vad`` settings (None: turn detection off); the detector starts over."""
        from pipeline.core.turns import TurnDetection

        if settings is not None and self._vad is not None:
            self._vad.configure(TurnDetection(**settings))
        return True

    def realtime_audio(self, session: str, pcm: bytes, vad: bool = True) -> dict[str, Any]:
        """Append s16le 24-kHz PCM; the reply: ``ms`` (where it starts in the session's audio),
        ``events`` [(kind, ms)] of turn detection, or ``error`` (nothing appended)."""
        n = check_pcm(pcm)
        now = time.monotonic()
        with self._rt_lock:
            c = self._clock
            if c.t0 is None:
                c.t0 = c.end = now
            start = max(c.end, now)
            ahead = start + n / PCM_RATE - now
            if ahead > AHEAD_S:
                return {"error": f"audio is arriving faster than real time: this append would end {ahead:.2f} s "
                                 f"ahead of the clock; at most {AHEAD_S} s (append as it is recorded)"}
            ms = c.samples * 1000.0 / PCM_RATE
            pts = int(round((start - c.t0) * PCM_RATE))
            c.end, c.samples = start + n / PCM_RATE, c.samples + n
            if n:
                self.push.audio(session, pcm_frame(pcm, pts))
            events = self._vad.push(pcm, ms) if (vad and self._vad is not None and n) else []
        return {"ms": ms, "events": [(e.kind, e.ms) for e in events], "speaking": bool(vad and self._vad
                                                                                       and self._vad.speaking)}

    def realtime_turn_reset(self) -> bool:
        """The buffer was committed or cleared: turn detection starts over."""
        if self._vad is not None:
            self._vad.reset()
        return True

    def realtime_image(self, session: str, data: bytes, max_pixels: int) -> dict[str, Any]:
        """A camera image (JPEG/PNG, checked before decoding) placed at its arrival."""
        try:
            frame = decode_image(data, max_pixels)
        except ValueError as exc:
            return {"error": str(exc)}
        self.push.video(session, frame)
        return {"width": frame.width, "height": frame.height}
