"""Generated media with awkward properties for the ingestion tests (made with the ffmpeg CLI).

Video frames are flat grey whose luma encodes the frame number (Y = 16 + 3 * (n % 70)),
coded losslessly, so a test can tell exactly which source frame a window sampled.
Audio is a 440 Hz tone, so silence (filled gaps) and sound can be told apart.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np

LUMA_MOD = 70
SIZE = "64x48"


def _gray(rate: str, dur: float, setpts: str | None = None) -> list[str]:
    g = f"color=c=black:s={SIZE}:r={rate}:d={dur},geq=lum='16+3*mod(N\\,{LUMA_MOD})':cb=128:cr=128"
    if setpts:
        g += f",settb=1/1000,setpts='{setpts}'"
    return ["-f", "lavfi", "-i", g]


def _tone(rate: int, layout: str, dur: float) -> list[str]:
    return ["-f", "lavfi", "-i", f"sine=f=440:sample_rate={rate}:duration={dur},aformat=channel_layouts={layout}"]


X264 = ["-c:v", "libx264", "-qp", "0", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-g", "15"]


def frame_number(rgb: np.ndarray) -> int:
    """Recover n % LUMA_MOD from a grey RGB frame (inverse of the limited-range conversion)."""
    y = float(rgb.mean()) * 219.0 / 255.0 + 16.0
    return int(round((y - 16.0) / 3.0)) % LUMA_MOD


RECIPES: dict[str, list[str]] = {
    # 29.97 fps video, 44.1 kHz stereo AAC, 6 s
    "ntsc_44k_stereo.mp4": _gray("30000/1001", 6) + _tone(44100, "stereo", 6) + X264 + ["-c:a", "aac", "-shortest"],
    # 25 fps video, 48 kHz 5.1 AAC, 6 s
    "pal_51.mkv": _gray("25", 6) + _tone(48000, "5.1", 6) + X264 + ["-c:a", "aac"],
    # variable frame rate: 10 fps for 2 s, then 30 fps for 4 s (n -> t below); 22.05 kHz Vorbis
    "vfr.webm": _gray("25", 6, "if(lt(N,20),N*0.1,2+(N-20)/30)/TB") + _tone(22050, "mono", 6)
    + ["-c:v", "libvpx", "-b:v", "200k", "-fps_mode", "passthrough", "-enc_time_base", "1/1000", "-c:a", "libvorbis", "-t", "6"],
    # audio starts 0.7 s after the video, 6 s of video
    "offset.mkv": _gray("25", 6) + ["-itsoffset", "0.7"] + _tone(48000, "mono", 5.3) + X264 + ["-c:a", "aac"],
    "video_only.mp4": _gray("25", 5) + X264,
    "audio_only.wav": _tone(8000, "mono", 5),
    # MPEG-TS (to be damaged in the middle)
    "clean.ts": _gray("25", 6) + _tone(48000, "mono", 6) + ["-c:v", "libx264", "-preset", "ultrafast", "-g", "25", "-c:a", "aac", "-f", "mpegts"],
    # mp4 with the index in front, so a truncated copy still opens
    "faststart.mp4": _gray("25", 6) + _tone(48000, "mono", 6) + X264 + ["-c:a", "aac", "-movflags", "+faststart"],
    # mp4 with the index at the end: truncated, it is not media any more
    "moov_at_end.mp4": _gray("25", 4) + _tone(48000, "mono", 4) + X264 + ["-c:a", "aac"],
}


def tone_vfr_time(n: int) -> float:
    """Presentation time of frame n in vfr.webm."""
    return n * 0.1 if n < 20 else 2 + (n - 20) / 30


def make(directory: Path, name: str) -> Path:
    """Generate (once) the named file in `directory`; derived files are cut from others."""
    path = directory / name
    if path.exists():
        return path
    if name == "corrupt.ts":
        data = bytearray(make(directory, "clean.ts").read_bytes())
        rng = np.random.default_rng(0)
        mid = len(data) // 2
        data[mid:mid + 16384] = rng.integers(0, 256, 16384, dtype=np.uint8).tobytes()
        path.write_bytes(bytes(data))
    elif name == "truncated.mp4":
        data = make(directory, "faststart.mp4").read_bytes()
        path.write_bytes(data[: int(len(data) * 0.6)])
    elif name == "truncated_moov_at_end.mp4":
        data = make(directory, "moov_at_end.mp4").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif name == "jump.ts":  # two 4 s segments, each starting at t=0: timestamps jump back
        seg = directory / "seg.ts"
        if not seg.exists():
            _ffmpeg(_gray("25", 4) + _tone(48000, "mono", 4)
                    + ["-c:v", "libx264", "-preset", "ultrafast", "-g", "25", "-c:a", "aac", "-f", "mpegts"], seg)
        path.write_bytes(seg.read_bytes() * 2)
    elif name == "not_media.bin":
        path.write_bytes(b"this is a shopping list, not a video\n" * 200)
    else:
        _ffmpeg(RECIPES[name], path)
    return path


def _ffmpeg(args: list[str], out: Path) -> None:
    tmp = out.with_name(out.stem + ".part" + out.suffix)
    cmd = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *args, str(tmp)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"ffmpeg failed for {out.name}: {r.stderr.strip()}")
    os.replace(tmp, out)
