"""The two tracks of a window under assembly: audio on an absolute sample grid (`AudioLine`)
and a decoded frame held until a sample instant needs it (`Held`). Split from
`pipeline.sources.windows`, which places the events on the media timeline."""
from __future__ import annotations

from collections import deque

import av
import numpy as np

__all__ = ["AudioLine", "Held"]


class AudioLine:
    """Audio on an absolute sample grid (index 0 = media time 0), consumed window by window."""

    def __init__(self, tolerance: int) -> None:
        self.tol = tolerance
        self.chunks: deque[tuple[np.ndarray, bool]] = deque()  # (samples, flagged fill)
        self.end = 0  # absolute index after the last buffered sample
        self.dropped = 0  # overlapping samples dropped
        self.started = False

    def write(self, idx: int | None, x: np.ndarray) -> None:
        self.started = True
        if idx is None:  # no timestamps: assume contiguous
            idx = self.end
        d = idx - self.end
        if d > 0:
            self._fill(idx, flagged=d > self.tol)
        elif d < 0:
            cut = min(-d, len(x))
            self.dropped += cut
            x = x[cut:]
        if len(x):
            self.chunks.append((x, False))
            self.end += len(x)

    def fill_to(self, idx: int) -> None:
        """Silence up to absolute index `idx` (the track stalled or ended)."""
        if idx > self.end:
            self._fill(idx, flagged=idx - self.end > self.tol)

    def _fill(self, idx: int, flagged: bool) -> None:
        self.chunks.append((np.zeros(idx - self.end, np.float32), flagged))
        self.end = idx

    def take(self, n: int) -> tuple[np.ndarray, int]:
        """The next n samples and how many of them are flagged fill."""
        parts, filled, need = [], 0, n
        while need:
            x, flag = self.chunks.popleft()
            if len(x) > need:
                self.chunks.appendleft((x[need:], flag))
                x = x[:need]
            parts.append(x)
            filled += len(x) if flag else 0
            need -= len(x)
        return (parts[0] if len(parts) == 1 else np.concatenate(parts)), filled


class Held:
    """A decoded frame kept until a sample instant needs it; converted to RGB at most once."""

    __slots__ = ("t", "frame", "rgb")

    def __init__(self, t: float, frame: av.VideoFrame | None) -> None:
        self.t, self.frame, self.rgb = t, frame, None

    def array(self, hw: tuple[int, int]) -> np.ndarray:
        if self.rgb is None:
            h, w = hw
            if self.frame is None:
                self.rgb = np.zeros((h, w, 3), np.uint8)
            else:
                self.rgb = self.frame.to_ndarray(format="rgb24", width=w, height=h)
                self.frame = None  # release the decoder's buffer
        return self.rgb
