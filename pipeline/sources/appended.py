"""Media a client appends as bytes (a /v1/realtime session, pipeline.api.realtime): 16-bit PCM
and still images, checked before anything is decoded and turned into the PyAV frames a
PushSource (pipeline.sources.push) takes, or the 16-kHz float audio the model hears.

Images are judged from their header alone (format by magic bytes, dimensions read without
decoding the pixels), so a small file that claims a huge picture (a decompression bomb) is
refused before it costs memory. Every refusal is a ``ValueError`` that says what is wrong.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

__all__ = ["ImageInfo", "PCM_RATE", "check_image", "check_pcm", "decode_image", "pcm_frame", "pcm_to_16k"]

PCM_RATE = 24000  # audio/pcm as OpenAI's Realtime API sends it: 24 kHz, mono, 16-bit little-endian
_MAGIC = {b"\xff\xd8\xff": "jpeg", b"\x89PNG\r\n\x1a\n": "png"}


@dataclass(frozen=True)
class ImageInfo:
    format: str  # jpeg | png
    width: int
    height: int


def check_pcm(data: bytes) -> int:
    """Samples in ``data`` (mono s16le); ValueError when its length is odd."""
    if len(data) % 2:
        raise ValueError(f"audio/pcm is 16-bit samples: {len(data)} bytes is an odd length")
    return len(data) // 2


def pcm_frame(data: bytes, pts: int | None = None, rate: int = PCM_RATE):
    """An ``av.AudioFrame`` (s16 mono at ``rate``) of ``data``; ``pts`` in samples places it."""
    import av
    from fractions import Fraction

    samples = np.frombuffer(data, dtype="<i2").reshape(1, -1)
    frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
    frame.sample_rate = rate
    if pts is not None:
        frame.pts, frame.time_base = int(pts), Fraction(1, rate)
    return frame


def pcm_to_16k(data: bytes, rate: int = PCM_RATE) -> np.ndarray:
    """Mono float32 samples at 16 kHz (what the audio encoder takes) from s16le PCM at ``rate``."""
    import av

    if not data:
        return np.zeros(0, np.float32)
    resampler = av.AudioResampler(format="flt", layout="mono", rate=16000)
    out = [f.to_ndarray().reshape(-1) for f in resampler.resample(pcm_frame(data, None, rate))]
    out += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(out).astype(np.float32, copy=False) if out else np.zeros(0, np.float32)


def check_image(data: bytes, max_pixels: int) -> ImageInfo:
    """Format and size of a JPEG or PNG from its header (the pixels are not decoded); ValueError
    for another format, a damaged header, or more than ``max_pixels`` pixels."""
    fmt = next((f for magic, f in _MAGIC.items() if data.startswith(magic)), None)
    if fmt is None:
        raise ValueError("the image is not a JPEG or PNG (by its first bytes)")
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=[fmt.upper()]) as img:  # reads the header only
            width, height = img.size
    except Image.DecompressionBombError:
        raise ValueError(f"the {fmt} image is too large to decode (its header claims over "
                         f"{Image.MAX_IMAGE_PIXELS} pixels)") from None
    except Exception as exc:
        raise ValueError(f"the {fmt} image cannot be read: {type(exc).__name__}") from None
    if width < 1 or height < 1 or width * height > max_pixels:
        raise ValueError(f"the {fmt} image is {width}x{height} ({width * height} pixels); at most {max_pixels}")
    return ImageInfo(fmt, int(width), int(height))


def decode_image(data: bytes, max_pixels: int):
    """An RGB ``av.VideoFrame`` of a checked JPEG or PNG (sides made even, as video frames are)."""
    import av
    from PIL import Image

    info = check_image(data, max_pixels)
    try:
        with Image.open(io.BytesIO(data), formats=[info.format.upper()]) as img:
            rgb = np.asarray(img.convert("RGB"))
    except Exception as exc:
        raise ValueError(f"the {info.format} image cannot be decoded: {type(exc).__name__}") from None
    h, w = rgb.shape[0] - rgb.shape[0] % 2, rgb.shape[1] - rgb.shape[1] % 2
    if h < 2 or w < 2:
        raise ValueError(f"the image is {rgb.shape[1]}x{rgb.shape[0]}: at least 2x2 pixels")
    return av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb[:h, :w]), format="rgb24")
