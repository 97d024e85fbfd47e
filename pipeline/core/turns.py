"""Turn detection as pure decisions: a voice-activity probability per audio chunk in, the
speech_started / speech_stopped moments of OpenAI's ``server_vad`` out (the model that gives
the probabilities, silero-vad, runs in pipeline.engine.vad). No torch, no I/O: testable alone.

A turn starts at the first chunk whose probability reaches ``threshold``; its start is moved
back by ``prefix_padding_ms`` (the audio sent to the model begins a little before the speech,
as OpenAI's does). It stops once the probability has stayed below ``threshold - 0.15`` (silero's
own hysteresis) for ``silence_duration_ms``; the stop time includes that silence.
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["TurnDetection", "TurnDetector", "TurnEvent"]


@dataclass(frozen=True)
class TurnDetection:
    """OpenAI's ``audio.input.turn_detection`` of type ``server_vad``, checked."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    create_response: bool = True
    interrupt_response: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not 0.0 < float(self.threshold) < 1.0:
            raise ValueError(f"threshold: a number in (0, 1), got {self.threshold!r}")
        for name, top in (("prefix_padding_ms", 5000), ("silence_duration_ms", 10000)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= top:
                raise ValueError(f"{name}: an integer in [0, {top}], got {v!r}")
        for name in ("create_response", "interrupt_response"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: a boolean, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class TurnEvent:
    kind: str  # speech_started | speech_stopped
    ms: int  # audio milliseconds since the session's first appended sample


@dataclass
class TurnDetector:
    """Feed it (probability, chunk start ms, chunk end ms) in order; it answers the events."""

    settings: TurnDetection
    speaking: bool = False
    _silent_since: float | None = field(default=None, repr=False)

    def push(self, prob: float, start_ms: float, end_ms: float) -> list[TurnEvent]:
        s = self.settings
        if not self.speaking:
            if prob >= s.threshold:
                self.speaking, self._silent_since = True, None
                return [TurnEvent("speech_started", int(max(0.0, start_ms - s.prefix_padding_ms)))]
            return []
        if prob >= s.threshold:
            self._silent_since = None
        elif prob < max(0.01, s.threshold - 0.15):
            if self._silent_since is None:
                self._silent_since = start_ms
            if end_ms - self._silent_since >= s.silence_duration_ms:
                self.speaking, self._silent_since = False, None
                return [TurnEvent("speech_stopped", int(end_ms))]
        return []

    def reset(self) -> None:
        self.speaking, self._silent_since = False, None
