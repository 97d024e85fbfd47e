"""Helpers for the realtime tests and bench: the official openai SDK pointed at the service,
spoken audio made offline by espeak-ng, silence and camera images, all as a realtime client
sends them (24-kHz s16le PCM in base64, data URLs), appended at the pace of a microphone."""

from __future__ import annotations

import asyncio
import base64
import io
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RATE = 24000
CHUNK_S = 0.1  # a microphone's append: 100 ms


def client(url: str, key: str) -> Any:
    from openai import AsyncOpenAI

    ws = url.replace("http://", "ws://", 1)
    return AsyncOpenAI(api_key=key, base_url=url + "/v1", websocket_base_url=ws + "/v1")


def speech(text: str, rate: int = RATE) -> bytes:
    """``text`` spoken by espeak-ng, as s16le mono PCM at ``rate``."""
    import av

    with tempfile.TemporaryDirectory() as d:
        wav = Path(d) / "s.wav"
        subprocess.run(["espeak-ng", "-w", str(wav), text], check=True, timeout=60, capture_output=True)
        out = []
        with av.open(str(wav)) as c:
            res = av.AudioResampler(format="s16", layout="mono", rate=rate)
            for frame in c.decode(audio=0):
                out += [f.to_ndarray().reshape(-1) for f in res.resample(frame)]
            out += [f.to_ndarray().reshape(-1) for f in res.resample(None)]
    return np.concatenate(out).astype("<i2").tobytes()


def silence(seconds: float, rate: int = RATE) -> bytes:
    return bytes(2 * int(seconds * rate))


def tone(seconds: float, hz: float = 440.0, rate: int = RATE) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return (np.sin(2 * np.pi * hz * t) * 3000).astype("<i2").tobytes()


def image(i: int, fmt: str = "JPEG", size: tuple[int, int] = (160, 120)) -> str:
    """A camera image as a data URL: a colour that changes with ``i``."""
    from PIL import Image

    img = Image.new("RGB", size, ((37 * i) % 256, (91 * i) % 256, 128))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def b64(pcm: bytes) -> str:
    return base64.b64encode(pcm).decode()


async def append_realtime(conn: Any, pcm: bytes, images_every_s: float | None = None,
                          sent: list[float] | None = None) -> None:
    """Append ``pcm`` in 100-ms chunks at real time (and an image every ``images_every_s``)."""
    step = int(CHUNK_S * RATE) * 2
    t0 = time.monotonic()
    k = 0
    next_image = 0.0
    for a in range(0, len(pcm), step):
        await conn.input_audio_buffer.append(audio=b64(pcm[a:a + step]))
        if sent is not None:
            sent.append(time.monotonic())
        k += 1
        if images_every_s is not None and k * CHUNK_S >= next_image:
            await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
                {"type": "input_image", "image_url": image(k)}]})
            next_image += images_every_s
        delay = t0 + k * CHUNK_S - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


async def until(conn: Any, kind: str, timeout: float = 120.0, seen: list[Any] | None = None) -> Any:
    """The next event of type ``kind`` (every event on the way appended to ``seen``)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no {kind} within {timeout} s; saw {[e.type for e in (seen or [])][-20:]}")
        ev = await asyncio.wait_for(conn.recv(), left)
        if seen is not None:
            seen.append(ev)
        if ev.type == kind:
            return ev
