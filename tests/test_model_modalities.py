"""Audio-only and video-only windows through the tiny model: a missing modality is empty (no
tokens), never an error; the window encodes, compresses, joins a rolling context and a question
is answered. Normal windows keep their shapes (50 audio tokens, 2 frames)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnizip import OmniZipConfig, StreamCompressor
from omnizip.models import load_model
from omnizip.models.rolling import RollingContext
from omnizip.models.window import CompressedWindow, compress_with

CFG = OmniZipConfig(rho_audio=0.4, rho_video=0.7)
NO_VIDEO = np.zeros((4, 0, 0, 3), np.uint8)  # what ingestion sends for a source without video


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def _audio(rng: np.random.Generator) -> np.ndarray:
    return (0.1 * rng.standard_normal(32000)).astype(np.float32)


def _frames(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, (4, 56, 84, 3), dtype=np.uint8)


def _stream(tiny, wins: list[tuple[np.ndarray | None, np.ndarray | None]]) -> list[CompressedWindow]:
    """Encode in one batch (as the encoder actor does) and compress window by window."""
    sc = StreamCompressor(CFG, lookahead=0)
    out = []
    for enc in tiny.encode_windows(wins, list(range(len(wins)))):
        (done,) = sc.push(enc.audio, enc.audio_scores, enc.video)
        out.append(compress_with(enc, done))
    return out


def _answers(tiny, ws: list[CompressedWindow]) -> list[int]:
    ctx = RollingContext(tiny, budget_tokens=100_000)
    for w in ws:
        ctx.append(w)
    assert ctx.n_tokens == ctx.prefix_tokens + sum(w.n_tokens for w in ws)
    return list(ctx.answer("What is happening?", max_new_tokens=4))


def test_audio_only_windows_encode_compress_and_answer(tiny) -> None:
    rng = np.random.default_rng(0)
    ws = _stream(tiny, [(_audio(rng), NO_VIDEO) for _ in range(3)])
    assert all(w.video_in == 0 and w.video_kept == 0 and w.audio_in == 50 for w in ws)
    assert all(0 < w.audio_kept < 50 for w in ws)  # audio is compressed as usual
    assert len(_answers(tiny, ws)) > 0


def test_video_only_windows_have_no_audio_tokens_and_rho_video(tiny) -> None:
    rng = np.random.default_rng(1)
    ws = _stream(tiny, [(None, _frames(rng)) for _ in range(3)])
    assert all(w.audio_in == 0 and w.audio_kept == 0 and w.video_in == 12 for w in ws)
    # SPEC 2.2: a group without audio discards rho_video of its video
    assert all(w.video_ratio == pytest.approx(CFG.rho_video) for w in ws)
    assert all(w.video_kept == int(6 * (1 - CFG.rho_video)) * 2 for w in ws)
    assert len(_answers(tiny, ws)) > 0


def test_mixed_batch_keeps_normal_windows_unchanged(tiny) -> None:
    """A batch of streams with audio-only, video-only and normal windows: the normal window's
    encoding equals the one it gets alone."""
    rng = np.random.default_rng(2)
    a, f = _audio(rng), _frames(rng)
    alone = tiny.encode_windows([(a, f)], [0])[0]
    mixed = tiny.encode_windows([(_audio(rng), NO_VIDEO), (a, f), (None, _frames(rng))], [0, 0, 0])
    assert (mixed[0].n_audio, mixed[0].n_video, mixed[2].n_audio, mixed[2].n_video) == (50, 0, 0, 12)
    assert torch.allclose(mixed[1].audio, alone.audio, atol=1e-4)
    assert torch.allclose(mixed[1].video, alone.video, atol=1e-4)
    assert torch.equal(mixed[1].position_ids, alone.position_ids)


def test_window_with_neither_track_is_refused(tiny) -> None:
    with pytest.raises(ValueError, match="neither audio nor video"):
        tiny.encode_windows([(None, NO_VIDEO)], [0])
