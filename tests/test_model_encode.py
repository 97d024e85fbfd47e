"""encode_window: stock-equal features window by window, hooked audio scores, TMRoPE positions, input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AttentionInterface
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import eager_attention_forward

from omnizip.models import InputShapeError, load_model
from omnizip.models.offline import stock_inputs
from omnizip.models.processor import smart_resize

W = 4  # windows in the test clip (8 s)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


@pytest.fixture(scope="module")
def clip():
    rng = np.random.default_rng(7)
    t = np.arange(W * 32000) / 16000
    audio = (0.3 * np.sin(2 * np.pi * 440 * t) * (t % 2 < 1) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    frames = rng.integers(0, 256, (W * 4, 56, 84, 3), dtype=np.uint8)
    return audio, frames


def windows_of(clip):
    audio, frames = clip
    return [(audio[k * 32000:(k + 1) * 32000], frames[k * 4:(k + 1) * 4]) for k in range(W)]


def test_window_by_window_equals_whole_clip_stock(tiny, clip) -> None:
    # one stock get_audio_features / get_video_features call on the live (per-window) log-mel
    whole = tiny.encode_clip(*clip, features="window")
    single = [tiny.encode_window(a, f, k) for k, (a, f) in enumerate(windows_of(clip))]
    batched = tiny.encode_windows(windows_of(clip), list(range(W)))
    assert len(whole) == W
    for w, s, b in zip(whole, single, batched):
        assert s.audio.shape == (50, tiny.hidden_size) and s.video.shape == (2, 6, tiny.hidden_size)
        for x in (s, b):
            assert torch.allclose(x.audio, w.audio, atol=1e-5)
            assert torch.allclose(x.video, w.video, atol=1e-5)
            assert torch.allclose(x.audio_scores, w.audio_scores, atol=1e-6)
            assert torch.equal(x.position_ids, w.position_ids)


def test_whole_clip_matches_plain_stock_calls(tiny, clip) -> None:
    """encode_clip is nothing but the stock feature calls on the stock processor layout."""
    si = stock_inputs(tiny, *clip, "q")
    with torch.no_grad():
        audio = tiny.thinker.get_audio_features(si["input_features"], si["feature_attention_mask"]).last_hidden_state
        video = torch.cat(tiny.thinker.get_video_features(si["pixel_values_videos"], si["video_grid_thw"]).pooler_output)
    enc = tiny.encode_clip(*clip)
    assert torch.equal(torch.cat([e.audio for e in enc]), audio)
    assert torch.equal(torch.cat([e.video.reshape(-1, tiny.hidden_size) for e in enc]), video)


def test_scores_are_per_chunk_distributions(tiny, clip) -> None:
    enc = tiny.encode_clip(*clip)
    for e in enc:
        assert e.audio_scores.shape == (50,) and (e.audio_scores > 0).all()
        # frame scores sum to 1 per chunk; a token is the mean of its two frames -> 0.5 per chunk
        assert e.audio_scores.sum().item() == pytest.approx(0.5, abs=1e-5)


def test_scores_equal_explicit_eager_softmax(tiny, clip) -> None:
    """Record the eager attention probabilities of the last audio layer and average them by hand."""
    last = tiny.thinker.model.audio_tower.layers[-1].self_attn
    recorded: list[torch.Tensor] = []

    def recording_eager(module, query, key, value, attention_mask, **kwargs):
        out, weights = eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
        if module is last:
            recorded.append(weights.detach())
        return out, weights

    AttentionInterface.register("omnizip_test_recording", recording_eager)
    cfg = tiny.thinker.model.audio_tower.config
    old = cfg._attn_implementation
    cfg._attn_implementation = "omnizip_test_recording"
    try:
        enc = tiny.encode_clip(*clip)
    finally:
        cfg._attn_implementation = old
    assert len(recorded) == W  # one softmax per 2-s chunk: attention never crosses a chunk
    frame = torch.cat([w[0].mean(dim=0).mean(dim=0) for w in recorded])  # heads, then queries
    assert frame.shape == (W * 100,)
    expected = (frame[0::2] + frame[1::2]) / 2
    got = torch.cat([e.audio_scores for e in enc])
    assert torch.allclose(got, expected, atol=1e-6)


def test_positions_equal_stock_rope_index(tiny, clip) -> None:
    si = stock_inputs(tiny, *clip, "what?")
    pos, _ = tiny.thinker.model.get_rope_index(si["input_ids"], None, si["video_grid_thw"], si["attention_mask"],
                                               True, si["feature_attention_mask"].sum(-1), si["video_second_per_grid"])
    pos = pos[:, 0]
    prefix = len(tiny.prompt_prefix().ids)
    enc = tiny.encode_clip(*clip)
    ours = torch.cat([e.position_ids for e in enc], dim=1)
    assert torch.equal(pos[:, prefix:prefix + ours.shape[1]], ours)
    off = tiny.mm_offset()
    assert enc[3].position_ids[0, 0] == off + 50 * 3  # window k starts at temporal id 50k
    assert torch.equal(enc[3].position_ids[:, -50:], (off + 150 + torch.arange(50)).expand(3, -1))


def test_offset_argument_shifts_positions(tiny, clip) -> None:
    a, f = windows_of(clip)[1]
    e0, e5 = tiny.encode_window(a, f, 1, offset=0), tiny.encode_window(a, f, 1, offset=5)
    assert torch.equal(e5.position_ids - 5, e0.position_ids)
    assert e0.position_ids[0].min() == 50


def test_window_without_video(tiny, clip) -> None:
    a, _ = windows_of(clip)[0]
    e = tiny.encode_window(a, np.zeros((4, 0, 0, 3), np.uint8), 2)
    assert e.video.shape == (0, 0, tiny.hidden_size) and e.position_ids.shape == (3, 50)
    assert e.position_ids[0, 0] == tiny.mm_offset() + 100


def test_frames_are_resized_to_multiples_of_28(tiny) -> None:
    frames = np.random.default_rng(0).integers(0, 256, (4, 70, 100, 3), dtype=np.uint8)
    vp = tiny.processor.video_patches(frames)
    h, w = smart_resize(70, 100, 28, 56 * 56, 768 * 28 * 28)  # round() as Qwen2-VL: 2.5 -> 2
    assert (h, w) == (56, 112) and vp.grid_thw == (2, h // 14, w // 14)


def test_patch_layout_is_qwen2_vl(tiny) -> None:
    """Each flattened patch holds (channel, time, 14, 14) of one 14x14 cell, cells in 2x2 merge order."""
    proc = tiny.processor
    frames = np.zeros((4, 56, 56, 3), np.uint8)
    rows = np.arange(56)[:, None] // 14
    cols = np.arange(56)[None, :] // 14
    for t in range(4):
        frames[t, :, :, 0] = rows * 40 + 10  # R encodes the 14-px row, G the column, B the frame
        frames[t, :, :, 1] = cols * 40 + 10
        frames[t, :, :, 2] = t * 50
    vp = proc.video_patches(frames)
    px = vp.pixels.view(-1, 3, 2, 14, 14)
    mean, std = proc.image_mean.flatten(), proc.image_std.flatten()
    vals = (px[:, :, :, 0, 0] * std[None, :, None] + mean[None, :, None]) * 255  # [N, 3, 2]
    vals = vals.round().long()
    r, c, b = vals[:, 0, 0], vals[:, 1, 0], vals[:, 2]
    order = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3),
             (2, 0), (2, 1), (3, 0), (3, 1), (2, 2), (2, 3), (3, 2), (3, 3)]
    expected_rc = torch.tensor([[rr * 40 + 10, cc * 40 + 10] for rr, cc in order])
    assert torch.equal(torch.stack([r[:16], c[:16]], 1), expected_rc)
    assert torch.equal(b[:16], torch.tensor([[0, 50]] * 16)) and torch.equal(b[16:], torch.tensor([[100, 150]] * 16))


@pytest.mark.parametrize("audio,frames,kwargs,match", [
    (np.zeros(16000, np.float32), None, {}, "multiple of 32000"),
    (np.zeros(32000, np.float32), None, {"sample_rate": 44100}, "16000 Hz"),
    (np.zeros((32000, 2), np.float32), None, {}, "mono"),
    (np.zeros(32000, np.int16), None, {}, "float"),
    (np.zeros(64000, np.float32), None, {}, "expected 2 s"),
    (np.zeros(32000, np.float32), np.zeros((3, 56, 56, 3), np.uint8), {}, "multiple of 4"),
    (np.zeros(32000, np.float32), np.zeros((4, 56, 56, 3), np.float32), {}, "uint8"),
    (np.zeros(32000, np.float32), np.zeros((4, 56, 56), np.uint8), {}, r"\[T, H, W, 3\]"),
    (np.zeros(32000, np.float32), np.zeros((8, 56, 56, 3), np.uint8), {}, "expected 4 frames"),
    (np.full(32000, np.nan, np.float32), None, {}, "NaN"),
])
def test_bad_input_is_named(tiny, audio, frames, kwargs, match) -> None:
    with pytest.raises(InputShapeError, match=match):
        tiny.encode_window(audio, frames, 0, **kwargs)
