"""A deterministic synthetic audio-video clip for the model benchmarks (no files, no downloads).

Audio: syllable-like voiced bursts (harmonics of a gliding f0 under a 4-Hz envelope) with pauses and
a noise floor, 16 kHz mono float32. Video: a gradient background with a moving square and sensor
noise, uint8 RGB at 2 fps. Content only shapes scores and similarities; token counts depend on the
clip length and frame size.
"""

from __future__ import annotations

import numpy as np


def synthetic_clip(seconds: int, height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    if seconds <= 0 or seconds % 2:
        raise ValueError(f"seconds must be a positive even number (2-s windows), got {seconds}")
    rng = np.random.default_rng(seed)
    t = np.arange(seconds * 16000) / 16000
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / 16000
    voiced = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) * ((t % 5) < 3.5)
    audio = (0.3 * voiced * envelope + 0.01 * rng.standard_normal(t.size)).astype(np.float32)

    n = seconds * 2
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1),
                     np.full_like(xx, 96)], axis=-1).astype(np.int16)
    frames = np.repeat(base[None], n, axis=0)
    side = max(8, min(height, width) // 4)
    for i in range(n):  # one square per frame: O(frames), not per pixel
        y0 = int((height - side) * (0.5 + 0.5 * np.sin(i / 7)))
        x0 = int((width - side) * (i / max(n - 1, 1)))
        frames[i, y0:y0 + side, x0:x0 + side] = (230, 40, 40)
    frames += rng.integers(-6, 7, frames.shape, dtype=np.int16)
    return audio, np.clip(frames, 0, 255).astype(np.uint8)
