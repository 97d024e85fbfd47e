"""Damaged files and odd sources (issue 19, items 4 and 5), with real files made by ffmpeg.

* A file with 256 KiB of random bytes written at 40 % of its length (MP4, MPEG-TS, Matroska):
  the reader skips past the damage, the timeline keeps the file's length (~ duration / 2 windows),
  the audio after the damage is in the windows (not flagged silence), the windows read during the
  damage are flagged `damaged` and the skipped errors are counted in the stream's status.
* A file that ends before its container's declared duration says so (`ended_early`).
* Audio-only (.m4a) and video-only sources go end to end through the engine: windows, compression,
  context, answers, with the missing modality empty (0 tokens), 0 drops.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.sources.source import Source
from pipeline.sources.windows import AVWindow, iter_windows

SECONDS = 40
DAMAGE = 256 * 1024


def _ffmpeg(out: Path, *args: str) -> Path:
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *args, str(out)], check=True, timeout=180)
    return out


def clip(directory: Path, name: str, *, video: str = "", audio: bool = True, vbitrate: str | None = None,
         size: str = "160x120", rate: int = 10, audio_rate: int = 16000) -> Path:
    """A 40-s clip: testsrc2 video (unless video is None) and a 440 Hz tone (unless audio is False)."""
    path = directory / name
    if path.exists():
        return path
    args: list[str] = []
    if video is not None:
        args += ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}:duration={SECONDS}"]
    if audio:
        args += ["-f", "lavfi", "-i", f"sine=f=440:sample_rate={audio_rate}:duration={SECONDS}"]
    if video is not None:
        args += ["-c:v", "libx264", "-pix_fmt", "yuv420p"] + (video.split() if video else ["-preset", "ultrafast"])
        args += ["-b:v", vbitrate] if vbitrate else []
    if audio:
        args += ["-c:a", "aac"]
    return _ffmpeg(path, *args, "-shortest")


def damaged(path: Path, seed: int = 0, at: float = 0.4, n: int = DAMAGE) -> Path:
    """A copy of `path` with `n` seeded random bytes written at `at` of its length."""
    out = path.with_name(f"damaged_{seed}_{n}_{path.name}")
    data = bytearray(path.read_bytes())
    p = int(len(data) * at)
    data[p:p + n] = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
    out.write_bytes(bytes(data))
    return out


def read(path: Path) -> tuple[list[AVWindow], Source]:
    src = Source(path)
    return list(iter_windows(src)), src


def tone(w: AVWindow) -> bool:
    return bool(np.abs(w.audio).max() > 0.05)


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("media_faults")


def _after_damage_is_whole(ws: list[AVWindow]) -> None:
    """~ duration / 2 windows, numbered without a hole; the file's last 6 s carry the tone and
    fresh frames, unflagged (the damage costs MKV up to 14 s: its demuxer resyncs at a later
    cluster, as ffmpeg's does); whatever silence there is, is flagged."""
    assert 19 <= len(ws) <= 21, len(ws)
    assert [w.index for w in ws] == list(range(len(ws)))
    tail = ws[-4:-1]  # the last window may be padding
    assert all(tone(w) and not w.audio_gap and not w.video_gap for w in tail), \
        [(w.index, tone(w), w.audio_gap, w.video_gap) for w in tail]
    assert all(w.audio_gap for w in ws if not tone(w) and not w.final)
    assert not any(w.discontinuity for w in ws)  # damage is no clock jump: the timeline is the file's


@pytest.mark.parametrize("ext", ["mp4", "ts", "mkv"])
def test_damaged_file_is_read_past_the_damage(media: Path, ext: str) -> None:
    ws, src = read(damaged(clip(media, f"tone.{ext}")))
    _after_damage_is_whole(ws)
    assert sum(w.decode_errors for w in ws) == src.decode_errors  # every skipped error is in a window
    if src.decode_errors:
        assert any(w.damaged for w in ws[6:12])  # flagged where the damage is (40 % of 20 windows)


def test_ts_damage_that_costs_the_tracks_different_spans(media: Path) -> None:
    """At ~110 kbit/s the damage skips ~10 s: one track may jump beyond the forward-jump limit
    (max_gap_s) and the other not. Before: the one was rebased, the other not, and from there on
    one track was flagged fill to the end (frozen video or silence). Each damage size here must
    keep both tracks whole after the damage."""
    src = clip(media, "ts110.ts", vbitrate="110k")
    for n in (192 * 1024, 224 * 1024, 256 * 1024, 288 * 1024, 320 * 1024):
        ws, _ = read(damaged(src, n=n))
        _after_damage_is_whole(ws)


def test_stray_frame_of_a_damaged_decoder_is_no_clock_jump(media: Path) -> None:
    """x264 with B-frames, decoded with frame threads: after the damage the decoder hands out a
    frame 2.5 s back in time, once. Before: taken as a clock jump, the whole video was rebased
    (22 windows, the audio's last 4 s flagged silence)."""
    ws, _ = read(damaged(clip(media, "bframes.mp4", video="-preset medium", size="640x360", rate=25,
                              audio_rate=44100)))
    _after_damage_is_whole(ws)


def test_audio_only_file_gives_windows_without_video(media: Path) -> None:
    ws, src = read(clip(media, "tone.m4a", video=None))
    assert (src.has_audio, src.has_video) == (True, False)
    assert len(ws) == 20 and all(tone(w) and not w.has_video and w.frames.shape[1:3] == (0, 0) for w in ws)


def test_truncated_file_declares_its_full_duration(media: Path) -> None:
    """A recording cut off (faststart MP4: the index in front still declares 40 s): 24 s come out,
    and the source knows the 40 s it should have held."""
    full = clip(media, "faststart.mp4", video="-preset ultrafast -movflags +faststart")
    cut = media / "cut.mp4"
    cut.write_bytes(full.read_bytes()[: int(full.stat().st_size * 0.6)])
    ws, src = read(cut)
    assert src.duration_s() == pytest.approx(SECONDS, abs=0.2)
    assert ws and ws[-1].end < SECONDS - 8


# -- end to end through the engine (real Ray, real Redis) ---------------------------------------

def _engine_config(redis_url: str) -> dict[str, Any]:
    return {"name": "eng-media", "redis_url": redis_url, "context_tokens": 8192, "allow_sources": "file"}


@pytest.fixture(scope="module")
def svc(ray_session: dict, redis_server: Any) -> Iterator[Any]:
    from pipeline.engine.service import get_or_create_service, shutdown_service
    from tests.test_engine_service import healthy
    handle = get_or_create_service(_engine_config(redis_server.url))
    assert healthy(handle)["ok"]
    yield handle
    shutdown_service(handle)


def _run(svc: Any, path: Path) -> dict:
    import ray

    from tests.test_engine_service import ended, wait
    sid = ray.get(svc.create_stream.remote({"source": str(path)}))["id"]
    wait(svc, sid, ended, 240, "the end")
    return wait(svc, sid, lambda s: s["status"] in ("ended", "failed") and s["windows"] == s["windows_total"]
                - s["dropped"], 60, "all windows in context")


def _answers(svc: Any, sid: str) -> list[str]:
    from tests.test_engine_service import answer
    return answer(svc, sid, 4)


def test_engine_damaged_file_counts_errors_and_keeps_the_length(svc: Any, media: Path) -> None:
    st = _run(svc, damaged(clip(media, "tone.mp4")))
    assert st["status"] == "ended" and st["error"] is None, st
    assert st["windows_total"] == 20 and st["dropped"] == 0 and st["windows"] == 20
    assert st["decode_errors"] > 0 and st["ended_early"] is False
    assert st["duration_s"] == pytest.approx(SECONDS, abs=0.2)


def test_engine_truncated_file_says_it_ended_early(svc: Any, media: Path) -> None:
    full = clip(media, "faststart.mp4", video="-preset ultrafast -movflags +faststart")
    cut = media / "cut_engine.mp4"
    cut.write_bytes(full.read_bytes()[: int(full.stat().st_size * 0.6)])
    st = _run(svc, cut)
    assert st["status"] == "ended" and st["ended_early"] is True, st
    assert st["media_s"] < st["duration_s"] - 8


def test_engine_audio_only_source(svc: Any, media: Path) -> None:
    st = _run(svc, clip(media, "tone.m4a", video=None))
    assert st["status"] == "ended" and st["error"] is None, st
    assert st["windows_total"] == 20 and st["dropped"] == 0 and st["windows"] == 20, (st["drops"], st)
    assert st["tokens"]["video"] == {"in": 0, "kept": 0}
    assert 0 < st["tokens"]["audio"]["kept"] < st["tokens"]["audio"]["in"] == 20 * 50
    assert _answers(svc, st["id"])


def test_engine_video_only_source(svc: Any, media: Path) -> None:
    st = _run(svc, clip(media, "silent.mp4", audio=False))
    assert st["status"] == "ended" and st["error"] is None, st
    assert st["windows_total"] == 20 and st["dropped"] == 0 and st["windows"] == 20, (st["drops"], st)
    assert st["tokens"]["audio"] == {"in": 0, "kept": 0}  # no audio: no silence tokens either
    assert 0 < st["tokens"]["video"]["kept"] < st["tokens"]["video"]["in"]
    assert _answers(svc, st["id"])
