"""Voice activity for a realtime session: silero-vad (a trained model whose weights ship in its
wheel; CPU, ~0.3 ms a 32-ms chunk) turns appended 24-kHz PCM into speech probabilities, and
the pure detector (pipeline.core.turns) turns those into speech_started / speech_stopped.

Runs in the session's ingest actor (pipeline.engine.realtime_ingest), never in the HTTP
replica: it needs torch. One model per session (silero keeps a recurrent state per stream).
"""
from __future__ import annotations

import threading

import numpy as np

from pipeline.core.turns import TurnDetection, TurnDetector, TurnEvent
from pipeline.sources.appended import PCM_RATE

__all__ = ["Vad"]

CHUNK = 512  # samples at 16 kHz: the chunk silero-vad takes (32 ms)
RATE = 16000


class Vad:
    """Speech probabilities and turn events of one session's audio, in arrival order."""

    def __init__(self, settings: TurnDetection) -> None:
        import av
        import torch
        from silero_vad import load_silero_vad

        torch.set_num_threads(1)
        self._torch = torch
        self.model = load_silero_vad()
        self.detector = TurnDetector(settings)
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=RATE)
        self._pending = np.zeros(0, np.float32)
        self._done = 0  # 16-kHz samples already judged
        self._lock = threading.Lock()

    def configure(self, settings: TurnDetection) -> None:
        with self._lock:
            self.detector = TurnDetector(settings, speaking=self.detector.speaking)

    def push(self, pcm: bytes, offset_ms: float) -> list[TurnEvent]:
        """Judge ``pcm`` (s16le at 24 kHz) that starts ``offset_ms`` into the session's audio."""
        from pipeline.sources.appended import pcm_frame

        with self._lock:
            if self._done == 0 and not len(self._pending):
                self._base_ms = offset_ms
            frames = self._resampler.resample(pcm_frame(pcm, None, PCM_RATE))
            got = [f.to_ndarray().reshape(-1) for f in frames]
            self._pending = np.concatenate([self._pending, *got]) if got else self._pending
            events: list[TurnEvent] = []
            while len(self._pending) >= CHUNK:
                chunk, self._pending = self._pending[:CHUNK], self._pending[CHUNK:]
                with self._torch.no_grad():
                    prob = float(self.model(self._torch.from_numpy(chunk.copy()), RATE))
                start = self._base_ms + self._done * 1000.0 / RATE
                self._done += CHUNK
                events += self.detector.push(prob, start, start + CHUNK * 1000.0 / RATE)
            return events

    @property
    def speaking(self) -> bool:
        return self.detector.speaking

    def reset(self) -> None:
        """A new buffer (commit or clear): the detector starts over; silero keeps its state."""
        with self._lock:
            self.detector.reset()
