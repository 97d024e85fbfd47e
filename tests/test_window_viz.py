"""The per-window picture record and its drawing (pipeline.viz.window), without Ray: what is
stored, that it decodes to what was built, and that the pictures show what was kept."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.viz import window as V


def window(video: bool = True, h: int = 240, w: int = 320) -> SimpleNamespace:
    rng = np.random.default_rng(0)
    frames = rng.integers(60, 200, (4, h, w, 3), dtype=np.uint8) if video else np.zeros((4, 0, 0, 3), np.uint8)
    audio = np.sin(np.linspace(0, 400, 32000)).astype(np.float32) * np.linspace(0, 1, 32000, dtype=np.float32)
    return SimpleNamespace(index=5, frames=frames, audio=audio, has_video=video, audio_gap=True, video_gap=False,
                           discontinuity=False, final=False)


def encoded(grid: tuple[int, int] = (9, 11), frames: int = 2) -> SimpleNamespace:
    p = grid[0] * grid[1]
    return SimpleNamespace(index=5, audio_scores=torch.linspace(0.1, 1.0, 50), llm_grid_hw=grid,
                           video=torch.zeros(frames, p, 8))


def output(grid: tuple[int, int] = (9, 11), frames: int = 2) -> SimpleNamespace:
    p = grid[0] * grid[1]
    video_keep = torch.zeros(frames, p, dtype=torch.bool)
    video_keep[:, ::3] = True
    audio_keep = torch.arange(50) % 2 == 0
    return SimpleNamespace(audio_keep=audio_keep, video_keep=video_keep, video_ratio=1 / 3, harder=False)


def test_thumbnail_and_envelope_are_small_and_right() -> None:
    w = window(h=1080, w=1920)
    t = V.thumbnail(w.frames, 2)
    assert t.shape == (2, 90, 160, 3) and t.dtype == np.uint8
    # the first frame of each temporal pair, averaged: close to the frame's own mean
    assert abs(float(t[1].mean()) - float(w.frames[2].mean())) < 2
    assert V.thumbnail(np.zeros((4, 60, 80, 3), np.uint8), 2).shape == (2, 60, 80, 3)  # never upscaled
    assert V.thumbnail(np.zeros((4, 0, 0, 3), np.uint8), 2) is None
    e = V.envelope(w.audio)
    assert e.shape == (2, V.ENVELOPE_BINS) and (e[0] <= e[1]).all() and e[1, -1] > e[1, 0]
    assert V.envelope(np.zeros(0, np.float32)).shape == (2, V.ENVELOPE_BINS)


def test_record_round_trips_and_stays_small() -> None:
    raw = V.raw_side(window(), 2)
    assert raw.flags == {"audio_gap": True, "video_gap": False, "discontinuity": False, "final": False}
    data = V.encode_record(V.build_record(encoded(), output(), raw, 10.0, 12.0))
    assert len(data) < 20_000
    rec = V.decode_record(data)
    assert rec["index"] == 5 and rec["start"] == 10.0 and rec["grid"] == (9, 11)
    assert rec["video_keep"].shape == (2, 99) and rec["video_keep"].dtype == bool
    assert rec["audio_keep"].sum() == 25 and rec["audio_scores"].shape == (50,)
    assert rec["thumb"].shape == (2, 120, 160, 3) and rec["envelope"].shape == (2, V.ENVELOPE_BINS)
    with pytest.raises(ValueError):
        V.decode_record(V.encode_record({"format": "other"}))


def test_frames_picture_outlines_kept_patches_and_dims_dropped_ones() -> None:
    frames = np.full((2, 90, 110, 3), 200, np.uint8)
    keep = np.zeros((2, 99), bool)
    keep[0, 0] = True  # frame 0: the top-left patch only
    img = V.render_frames(frames, keep, (9, 11), scale=1, gap=4)
    assert img.shape == (90, 2 * 110 + 4, 3)
    assert (img[5, 5] == 200).all()  # inside the kept patch: untouched
    assert (img[0, 0] == V.ACCENT).all() and (img[9, 5] == V.ACCENT).all()  # its outline
    assert img[50, 50].max() < 80 and img[50, 150].max() < 80  # dropped patches dimmed, both frames
    assert (img[:, 110:114] == V.BG).all()  # the gap between the frames
    assert V.render_frames(frames, keep[:, :10], (9, 11)).shape == (90, 160, 3)  # a bad grid: placeholder


def test_audio_picture_marks_kept_tokens() -> None:
    keep = np.arange(50) % 2 == 0
    img = V.render_audio(keep, np.linspace(0.1, 1, 50), V.envelope(window().audio))
    assert img.shape[1] == 500 and img.dtype == np.uint8
    marks = img[-1]  # the bottom row: a mark under each kept token's bar
    assert (marks[5] == V.AUDIO_KEPT).all() and (marks[15] == V.BG).all()
    bars = img[48 + 3: 48 + 3 + 64]
    assert (bars[:, 495] == V.AUDIO_DROPPED).sum() > (bars[:, 15] == V.AUDIO_DROPPED).sum()  # higher score, taller


def test_pngs_of_a_record_and_of_a_window_without_video() -> None:
    rec = V.decode_record(V.encode_record(V.build_record(encoded(), output(), V.raw_side(window(), 2), 0, 2)))
    frames = Image.open(io.BytesIO(V.frames_png(rec)))
    assert frames.size == (2 * 320 + 4, 240)
    audio = Image.open(io.BytesIO(V.audio_png(rec)))
    assert audio.size[0] == 500
    bare = V.decode_record(V.encode_record(V.build_record(encoded(frames=0), output(frames=0),
                                                          V.raw_side(window(video=False), 0), 0, 2)))
    assert bare["thumb"] is None and Image.open(io.BytesIO(V.frames_png(bare))).size == (160, 90)
    assert V.raw_side(SimpleNamespace(index=1), 2) is None  # anything unexpected: no picture, no error


def test_window_record_gives_the_fields_and_the_picture_stored_with_the_window() -> None:
    from pipeline.store.memory import MemoryStore

    s = MemoryStore()
    sid = s.create_stream({"source": "x"})["id"]
    extra, picture = V.window_record(encoded(), output(), V.raw_side(window(), 2), SimpleNamespace(start=10.0, end=12.0))
    assert extra == {"video_ratio": 0.3333, "audio_gap": True, "video_gap": False, "discontinuity": False,
                     "final": False}
    s.append_window(sid, 5, b"w", media_start=10.0, media_end=12.0, blobs={V.VIZ_KIND: picture})
    assert V.decode_record(s.get_blob(sid, 5, V.VIZ_KIND))["end"] == 12.0
    extra, picture = V.window_record(encoded(), output(), None, None)  # no timing: no picture, no error
    assert extra == {"video_ratio": 0.3333} and picture is None

