"""A WebRTC publisher for tests (aiortc, the same stack a Python client would use): a synthetic
camera whose frames carry their number as 8 black/white stripes, and a tone. Its ICE agent
gathers on 127.0.0.1 only and sends checks to loopback only (pipeline.sources.ice), and it
names no STUN server: every packet stays on this machine."""

from __future__ import annotations

import asyncio
import fractions
import math
import threading
import time
from typing import Any

import av
import numpy as np

from pipeline.sources.ice import IceRules, ice_rules, install
from pipeline.sources.policy import SourcePolicy

LOOPBACK_ONLY = IceRules(SourcePolicy(allow=frozenset({"loopback"})), ("127.0.0.1",))
STRIPES = 8


def stripes(n: int, h: int = 240, w: int = 320) -> np.ndarray:
    """An RGB frame showing ``n % 256`` as 8 stripes (white = 1), most significant first."""
    img = np.zeros((h, w, 3), np.uint8)
    for b in range(STRIPES):
        if (n >> (STRIPES - 1 - b)) & 1:
            img[:, b * w // STRIPES:(b + 1) * w // STRIPES] = 255
    return img


def read_stripes(img: np.ndarray) -> int:
    """The number a (scaled, compressed) stripes frame shows."""
    h, w = img.shape[:2]
    gray = img.astype(np.float32).mean(axis=2)
    n = 0
    for b in range(STRIPES):
        x0, x1 = b * w // STRIPES, (b + 1) * w // STRIPES
        cell = gray[h // 4: 3 * h // 4, x0 + (x1 - x0) // 4: x1 - (x1 - x0) // 4]
        n = (n << 1) | int(cell.mean() > 127)
    return n


def tracks(fps: float = 15.0, tone_hz: float = 440.0, size: tuple[int, int] = (240, 320),
           bursts: bool = False) -> tuple[Any, Any]:
    """A camera whose frame shows ``floor(t * fps)`` (t: the publisher's clock, shared by both
    tracks) and a tone; with ``bursts`` the tone sounds only in the first half of each second of
    that clock, so a receiver can tell how audio and video line up."""
    from aiortc import MediaStreamTrack

    clock: dict[str, float] = {}

    def now() -> float:
        return time.monotonic() - clock.setdefault("t0", time.monotonic())

    class Camera(MediaStreamTrack):
        kind = "video"

        def __init__(self) -> None:
            super().__init__()
            self.last = -1

        async def recv(self) -> av.VideoFrame:
            n = int(now() * fps)
            if n <= self.last:
                await asyncio.sleep((self.last + 1) / fps - now())
                n = max(self.last + 1, int(now() * fps))
            self.last = n
            frame = av.VideoFrame.from_ndarray(stripes(n, *size), format="rgb24")
            frame.pts, frame.time_base = int(round(n * 90000 / fps)), fractions.Fraction(1, 90000)
            return frame

    class Tone(MediaStreamTrack):
        kind = "audio"
        RATE, SAMPLES = 48000, 960

        def __init__(self) -> None:
            super().__init__()
            self.k, self.start = 0, None

        async def recv(self) -> av.AudioFrame:
            if self.start is None:
                self.start = now()
            due = self.start + self.k * self.SAMPLES / self.RATE
            await asyncio.sleep(max(0.0, due - now()))
            t = self.start + (self.k * self.SAMPLES + np.arange(self.SAMPLES)) / self.RATE
            amp = 0.5 * ((t % 1.0) < 0.5) if bursts else 0.5
            pcm = (amp * 32767 * np.sin(2 * math.pi * tone_hz * t)).astype(np.int16).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
            frame.sample_rate, frame.pts = self.RATE, self.k * self.SAMPLES
            frame.time_base = fractions.Fraction(1, self.RATE)
            self.k += 1
            return frame

    return Camera(), Tone()


class Publisher:
    """One aiortc peer connection on a loop thread of its own: ``offer()`` -> SDP text,
    ``answer(sdp)``, ``close()``. Sends ``video``/``audio`` as asked."""

    def __init__(self, video: bool = True, audio: bool = True, fps: float = 15.0, tone_hz: float = 440.0,
                 bursts: bool = False) -> None:
        install()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.video, self.audio, self.fps, self.tone_hz, self.bursts = video, audio, fps, tone_hz, bursts
        self.pc: Any = None

    def _run(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def offer(self) -> str:
        async def make() -> str:
            from aiortc import RTCConfiguration, RTCPeerConnection

            with ice_rules(LOOPBACK_ONLY):
                self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
                cam, tone = tracks(self.fps, self.tone_hz, bursts=self.bursts)
                if self.video:
                    self.pc.addTrack(cam)
                if self.audio:
                    self.pc.addTrack(tone)
                await self.pc.setLocalDescription(await self.pc.createOffer())
            return self.pc.localDescription.sdp
        return self._run(make())

    def answer(self, sdp: str) -> None:
        from aiortc import RTCSessionDescription

        self._run(self.pc.setRemoteDescription(RTCSessionDescription(sdp, "answer")))

    def state(self) -> str:
        return self.pc.connectionState if self.pc is not None else "new"

    def close(self) -> None:
        """Hang up (once; later calls do nothing)."""
        if self.loop.is_running():
            if self.pc is not None:
                self._run(self.pc.close())
            self.loop.call_soon_threadsafe(self.loop.stop)
