"""StreamCompressor: SPEC section 4's four required properties, its state, and its errors."""
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnizip import OmniZipConfig, StreamCompressor, compress_clip
from core_helpers import window_stream


def run(sc, windows):
    out = []
    for w in windows:
        out += sc.push(*w)
    return out + sc.flush()


def assert_same_window(a, b):
    assert a.index == b.index
    assert torch.equal(a.audio_keep, b.audio_keep) and torch.equal(a.video_keep, b.video_keep)
    assert torch.equal(a.audio, b.audio) and a.video_ratio == b.video_ratio


def test_lookahead_zero_returns_each_window_at_once():
    sc = StreamCompressor()
    for i, w in enumerate(window_stream(0, 4)):
        (done,) = sc.push(*w)
        assert done.index == i and done.audio_keep.shape == (50,) and done.video_keep.shape == (2, 32)
    assert sc.flush() == []


def test_lookahead_holds_windows_back_and_keeps_order():
    sc = StreamCompressor(lookahead=2)
    windows = window_stream(1, 6)
    returned = [[o.index for o in sc.push(*w)] for w in windows]
    assert returned == [[], [], [0], [1], [2], [3]]
    assert [o.index for o in sc.flush()] == [4, 5]


@pytest.mark.parametrize("lookahead", [None, 12, 40])
def test_property_3_lookahead_over_the_whole_clip_equals_offline(lookahead):
    windows = window_stream(2, 12)
    cfg = OmniZipConfig(rho_audio=0.3, rho_video=0.6)
    streamed = run(StreamCompressor(cfg, lookahead=lookahead), windows)
    audio, scores, video = (torch.cat(parts) for parts in zip(*windows))
    clip = compress_clip(audio, scores, video, [50] * 12, [2] * 12, cfg)
    assert [w.index for w in streamed] == list(range(12))
    assert torch.equal(torch.cat([w.audio_keep for w in streamed]), clip.audio_keep)
    assert torch.equal(torch.cat([w.audio for w in streamed]), clip.audio)
    assert torch.equal(torch.cat([w.video_keep for w in streamed]), clip.video_keep)
    assert [w.video_ratio for w in streamed] == clip.video_ratios


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 1000), setting=st.sampled_from([(0.3, 0.6), (0.4, 0.7), (0.5, 0.5)]),
       lookahead=st.sampled_from([0, 1, 3]))
def test_property_1_running_budgets_track_their_targets(seed, setting, lookahead):
    cfg = OmniZipConfig(rho_audio=setting[0], rho_video=setting[1])
    out = run(StreamCompressor(cfg, lookahead=lookahead), window_stream(seed, 100))
    audio_kept = torch.tensor([w.audio_kept for w in out], dtype=torch.float64)
    video_kept = torch.tensor([w.video_kept for w in out], dtype=torch.float64)
    for start in range(5, len(out) - 30 + 1):
        span = slice(start, start + 30)
        assert abs(audio_kept[span].sum() / (30 * 50) - cfg.expected_audio_kept) <= 0.03
        assert abs(1 - video_kept[span].sum() / (30 * 64) - cfg.rho_video) <= 0.03


def test_property_2_denser_audio_keeps_more_video():
    g = torch.Generator().manual_seed(7)
    windows, dense = [], []
    for i in range(60):
        is_dense = bool(i % 3 == 0)
        high = 45 if is_dense else 8  # tokens with salient scores
        scores = torch.cat([torch.rand(high, generator=g) + 1.0, torch.rand(50 - high, generator=g) * 0.1])
        scores = scores[torch.randperm(50, generator=g)]
        windows.append((torch.randn(50, 32, generator=g), scores, torch.randn(2, 32, 32, generator=g)))
        dense.append(is_dense)
    out = run(StreamCompressor(), windows)
    ratio = torch.tensor([w.video_ratio for w in out])
    kept = torch.tensor([w.video_kept for w in out], dtype=torch.float64)
    audio = torch.tensor([w.audio_kept for w in out], dtype=torch.float64)
    is_dense = torch.tensor(dense)
    assert audio[is_dense].mean() > audio[~is_dense].mean() + 10
    assert kept[is_dense].mean() > kept[~is_dense].mean() + 5
    # Window by window: each dense window discards less video than the sparse ones around it.
    for i in range(3, 57, 3):
        assert ratio[i] < ratio[i - 1] and ratio[i] < ratio[i + 1]


def state_bytes(sc):
    buf = io.BytesIO()
    torch.save(sc.state_dict(), buf)
    return buf.getvalue()


def test_property_4_state_and_work_per_window_stop_growing():
    cfg = OmniZipConfig(stream_history_windows=20)
    sc = StreamCompressor(cfg)
    sizes = []
    for i, w in enumerate(window_stream(3, 80)):
        sc.push(*w)
        sizes.append(len(state_bytes(sc)))
        state = sc.state_dict()
        assert len(state["audio_history"]["scores"]) == min(i + 1, 20)
        assert len(state["video_history"]["records"]) == min(i + 1, 20)
    assert max(sizes[20:]) - min(sizes[20:]) <= 64  # only integer widths in pickling may vary
    assert sizes[5] < sizes[20]


@pytest.mark.parametrize("lookahead", [0, 2])
def test_restored_state_continues_exactly(lookahead):
    windows = window_stream(4, 50)
    original = StreamCompressor(lookahead=lookahead)
    for w in windows[:30]:
        original.push(*w)
    restored = StreamCompressor(lookahead=lookahead)
    restored.load_state_dict(torch.load(io.BytesIO(state_bytes(original))))
    a = run(original, windows[30:])
    b = run(restored, windows[30:])
    assert len(a) == len(b) == 20 + lookahead
    for x, y in zip(a, b):
        assert_same_window(x, y)


def test_windows_without_audio_or_video_are_accepted():
    sc = StreamCompressor()
    (w0,) = sc.push(*window_stream(5, 1)[0])
    (silent,) = sc.push(torch.zeros(0, 32), torch.zeros(0), torch.randn(2, 32, 32))
    (blind,) = sc.push(torch.randn(50, 32), torch.rand(50), torch.zeros(0, 32, 32))
    assert silent.audio_keep.numel() == 0 and silent.video_ratio == sc.cfg.rho_video
    assert blind.video_keep.shape == (0, 32) and blind.audio_kept > 0


def test_bad_windows_raise_naming_the_argument():
    sc = StreamCompressor(lookahead=1)
    audio, scores, video = window_stream(6, 1)[0]
    with pytest.raises(ValueError, match="audio_scores"):
        sc.push(audio, scores.clone().fill_(float("nan")), video)
    with pytest.raises(ValueError, match="audio_scores"):
        sc.push(audio, scores[:10], video)
    sc.push(audio, scores, video)
    with pytest.raises(ValueError, match="video"):
        sc.push(torch.randn(50, 16), scores, torch.randn(2, 32, 16))
    with pytest.raises(ValueError, match="video"):
        sc.push(audio, scores, torch.randn(2, 16, 32))
    assert [w.index for w in sc.flush()] == [0], "a rejected window must not disturb accepted ones"
    with pytest.raises(ValueError, match="lookahead"):
        StreamCompressor(lookahead=-1)


def test_state_from_another_config_is_refused():
    sc = StreamCompressor(OmniZipConfig(rho_video=0.6))
    with pytest.raises(ValueError, match="OmniZipConfig"):
        StreamCompressor().load_state_dict(sc.state_dict())
    with pytest.raises(ValueError, match="state"):
        StreamCompressor().load_state_dict({"format": "something else"})
