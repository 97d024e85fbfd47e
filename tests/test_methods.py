"""Compression methods behind one interface (omnizip.methods) and the one codec (omnizip.codec)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core_helpers import random_clip, window_stream
from omnizip import METHODS, CompressionMethod, OmniZipConfig, StreamCompressor, codec, compress_clip, make_method
from omnizip.audio import dominant_count
from omnizip.models.window import CompressedWindow

CFG = OmniZipConfig()


def run(method, windows, harder_at=()):
    out = []
    for i, w in enumerate(windows):
        out += method.push(*w, harder=i in harder_at)
    return out + method.flush()


def same_window(a, b, index_shift: int = 0) -> bool:
    return (a.index + index_shift == b.index and a.harder == b.harder and a.video_ratio == b.video_ratio
            and torch.equal(a.audio_keep, b.audio_keep) and torch.equal(a.video_keep, b.video_keep)
            and torch.equal(a.audio, b.audio))


def counts(out):
    return [(w.audio_kept, w.video_keep.sum(dim=1).tolist()) for w in out]


def test_every_method_has_the_interface():
    assert set(METHODS) == {"omnizip", "keep_all", "random", "fixed_ratio"}
    for name in METHODS:
        m = make_method(name, CFG, lookahead=1)
        assert isinstance(m, CompressionMethod) and m.name == name and m.cfg == CFG and m.lookahead == 1
    assert isinstance(make_method("omnizip"), StreamCompressor)


def test_make_method_errors():
    with pytest.raises(ValueError, match=r"'lossy'.*omnizip, keep_all, random, fixed_ratio"):
        make_method("lossy")
    with pytest.raises(ValueError, match="unknown compression method"):
        make_method(None)
    for name in METHODS:
        with pytest.raises(ValueError, match="lookahead"):
            make_method(name, lookahead=-1)
        with pytest.raises(ValueError, match="cfg"):
            make_method(name, {"rho_audio": 0.5})
    with pytest.raises(ValueError, match="seed"):
        make_method("random", seed="x")


# ---- random: OmniZip's budget, random tokens ---------------------------------------------------
def test_random_keeps_omnizips_counts_with_other_tokens():
    windows = window_stream(3, 12)
    ref = run(make_method("omnizip", CFG), windows)
    rnd = run(make_method("random", CFG, seed=7), windows)
    assert counts(rnd) == counts(ref)  # audio per window, video per frame
    assert [w.video_ratio for w in rnd] == [w.video_ratio for w in ref]
    assert any(not torch.equal(a.audio_keep, b.audio_keep) for a, b in zip(rnd, ref))
    assert any(not torch.equal(a.video_keep, b.video_keep) for a, b in zip(rnd, ref))
    for w, (audio, _, _) in zip(rnd, windows):
        assert torch.equal(w.audio, audio)  # original audio: no merging


def test_random_is_deterministic_per_seed():
    windows = window_stream(4, 6)
    a, b = (run(make_method("random", CFG, seed=1), windows) for _ in range(2))
    c = run(make_method("random", CFG, seed=2), windows)
    assert all(same_window(x, y) for x, y in zip(a, b))
    assert counts(a) == counts(c)
    assert any(not torch.equal(x.audio_keep, z.audio_keep) or not torch.equal(x.video_keep, z.video_keep)
               for x, z in zip(a, c))


# ---- keep_all: no compression -----------------------------------------------------------------
def test_keep_all_keeps_everything():
    windows = window_stream(5, 4)
    for w, (audio, _, video) in zip(run(make_method("keep_all"), windows, harder_at={2}), windows):
        assert bool(w.audio_keep.all()) and bool(w.video_keep.all()) and w.video_keep.shape == video.shape[:2]
        assert torch.equal(w.audio, audio) and w.video_ratio == 0.0 and not w.harder
    audio, scores, video, sizes, frames = random_clip(2)
    out = make_method("keep_all").compress_clip(audio, scores, video, sizes, frames)
    assert out.retention == 1.0 and torch.equal(out.audio, audio) and out.video_ratios == [0.0] * len(sizes)


def test_clip_prompt_keep_all_equals_the_uncompressed_prompt():
    from omnizip.models import load_model
    from omnizip.models.offline import clip_prompt

    tiny = load_model("tiny")
    rng = np.random.default_rng(11)
    clip = ((0.1 * rng.standard_normal(4 * 16000)).astype(np.float32), rng.integers(0, 256, (8, 56, 56, 3), dtype=np.uint8))
    old = clip_prompt(tiny, *clip, "Q?", cfg=None)
    for method in ("keep_all", make_method("keep_all")):
        new = clip_prompt(tiny, *clip, "Q?", method=method)
        assert torch.equal(new.embeds, old.embeds) and torch.equal(new.position_ids, old.position_ids)
        assert new.multimodal_kept == new.multimodal_in
    omni = clip_prompt(tiny, *clip, "Q?", cfg=CFG)
    assert torch.equal(clip_prompt(tiny, *clip, "Q?", CFG, method="omnizip").embeds, omni.embeds)
    assert clip_prompt(tiny, *clip, "Q?", CFG, method="fixed_ratio").n_tokens < old.n_tokens


# ---- fixed_ratio: no audio guidance -----------------------------------------------------------
def test_fixed_ratio_counts_follow_the_formula():
    cfg = OmniZipConfig(rho_audio=0.3, rho_video=0.6)
    windows = window_stream(6, 8, p=32)
    out = run(make_method("fixed_ratio", cfg), windows)
    assert {w.video_ratio for w in out} == {0.6}
    for w, (audio, _, _) in zip(out, windows):
        assert w.audio_kept == dominant_count(50, 0.3) == 35
        assert w.video_keep.sum(dim=1).tolist() == [int(32 * (1 - 0.6))] * 2
        assert torch.equal(w.audio, audio)
    # Audio: the top scores (no anchors); video: ISTC at the fixed ratio.
    audio, scores, _ = windows[0]
    top = torch.topk(scores, 35).indices
    assert bool(out[0].audio_keep[top].all())
    a, s, v, sizes, frames = random_clip(8)
    clip = make_method("fixed_ratio", cfg).compress_clip(a, s, v, sizes, frames)
    assert int(clip.audio_keep.sum()) == dominant_count(a.shape[0], 0.3) and clip.video_ratios == [0.6] * len(sizes)


# ---- harder ------------------------------------------------------------------------------------
def test_harder_keeps_fewer_tokens_and_leaves_the_histories_alone():
    windows = window_stream(9, 10)
    sc, never = StreamCompressor(CFG), StreamCompressor(CFG)
    for w in windows[:4]:
        sc.push(*w), never.push(*w)
    before = sc.state_dict()
    normal_sc = StreamCompressor(CFG)
    normal_sc.load_state_dict(before)
    (normal,) = normal_sc.push(*windows[4])  # the same window pushed normally, same history
    (hard,) = sc.push(*windows[4], harder=True)
    expected = compress_clip(*windows[4], [50], [2], CFG.stricter())  # the offline method on the window alone
    assert hard.harder and not normal.harder and hard.index == normal.index == 4
    assert torch.equal(hard.audio_keep, expected.audio_keep) and torch.equal(hard.audio, expected.audio)
    assert torch.equal(hard.video_keep, expected.video_keep) and hard.video_ratio == expected.video_ratios[0]
    # Fewer tokens in all. (Not necessarily fewer video tokens: on a single group the offline
    # video ratio is the audio-guided base ratio, never normalised to rho_video, SPEC 2.2.)
    assert hard.audio_kept < normal.audio_kept
    assert hard.audio_kept + hard.video_kept < normal.audio_kept + normal.video_kept
    after = sc.state_dict()
    assert after.pop("next_index") == 5 and before.pop("next_index") == 4
    assert codec.encode(after) == codec.encode(before)
    for w in windows[5:]:
        (a,), (b,) = sc.push(*w), never.push(*w)
        assert same_window(b, a, index_shift=1)


def test_harder_applies_only_when_nothing_is_held_back():
    windows = window_stream(10, 4)
    held = run(make_method("omnizip", lookahead=1), windows, harder_at={0, 2})
    assert not any(w.harder for w in held)
    assert all(same_window(a, b) for a, b in zip(held, run(make_method("omnizip", lookahead=1), windows)))


def test_harder_for_the_baselines():
    windows = window_stream(11, 3)
    fixed = run(make_method("fixed_ratio"), windows, harder_at={1})
    strict = CFG.stricter()
    assert [w.harder for w in fixed] == [False, True, False]
    assert fixed[1].audio_kept == dominant_count(50, strict.rho_audio) < fixed[0].audio_kept
    assert fixed[1].video_ratio == strict.rho_video
    rnd = run(make_method("random", seed=3), windows, harder_at={1})
    assert counts(rnd) == counts(run(make_method("omnizip"), windows, harder_at={1})) and rnd[1].harder


def test_stricter_discards_more():
    s = CFG.stricter()
    assert (s.rho_audio, s.rho_video) == (pytest.approx(0.7), pytest.approx(0.9))
    assert s.max_ratio >= s.rho_video >= s.min_ratio and s.contextual_ratio <= s.rho_audio
    assert OmniZipConfig(rho_audio=0.8, rho_video=0.9).stricter().rho_audio == 0.9


# ---- offline and streaming agree; state round trip --------------------------------------------
@pytest.mark.parametrize("name", sorted(METHODS))
def test_flush_of_a_whole_stream_equals_compress_clip(name):
    windows = window_stream(12, 5)
    streamed = run(make_method(name, CFG, lookahead=None, seed=5), windows)
    audio, scores, video = (torch.cat(x) for x in zip(*windows))
    clip = make_method(name, CFG, seed=5).compress_clip(audio, scores, video, [50] * 5, [2] * 5)
    assert all(same_window(a, b) for a, b in zip(streamed, clip.windows([50] * 5, [2] * 5)))


@pytest.mark.parametrize("lookahead", [0, 2])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_state_round_trips_through_the_codec(name, lookahead):
    windows = window_stream(13, 9)
    whole = run(make_method(name, CFG, lookahead=lookahead, seed=4), windows, harder_at={3})
    first = make_method(name, CFG, lookahead=lookahead, seed=4)
    out = []
    for i, w in enumerate(windows[:5]):
        out += first.push(*w, harder=i == 3)
    data = codec.encode(first.state_dict())
    assert codec.encode(first.state_dict()) == data  # deterministic bytes
    second = make_method(name, CFG, lookahead=lookahead, seed=0)  # the seed comes from the state
    second.load_state_dict(codec.decode(data))
    out += run(second, windows[5:])
    assert len(out) == len(whole) == 9
    assert all(same_window(a, b) for a, b in zip(out, whole))


def test_load_state_dict_refuses_another_methods_state():
    state = make_method("keep_all").state_dict()
    for name in ("fixed_ratio", "random", "omnizip"):
        with pytest.raises(ValueError, match="state"):
            make_method(name).load_state_dict(state)
    with pytest.raises(ValueError, match="OmniZipConfig"):
        make_method("fixed_ratio", OmniZipConfig(rho_audio=0.5)).load_state_dict(make_method("fixed_ratio").state_dict())


# ---- the codec ---------------------------------------------------------------------------------
def window() -> CompressedWindow:
    g = torch.Generator().manual_seed(0)
    return CompressedWindow(index=3, embeds=torch.randn(5, 8, generator=g).bfloat16(),
                            position_ids=torch.arange(15).reshape(3, 5), offset=7, audio_in=50, audio_kept=2,
                            video_in=64, video_kept=3, video_ratio=0.625)


def test_compressed_window_bytes_round_trip_and_are_deterministic():
    w = window()
    data = w.to_bytes()
    assert data == window().to_bytes()
    back = CompressedWindow.from_bytes(data)
    assert back.to_dict().keys() == w.to_dict().keys()
    for k, v in w.to_dict().items():
        got = back.to_dict()[k]
        assert torch.equal(got, v) and got.dtype == v.dtype if isinstance(v, torch.Tensor) else got == v
    assert back.to_bytes() == data


@pytest.mark.parametrize("junk", [b"", b"\x00" * 4, b"not safetensors at all", b"\x10" + b"\x00" * 7 + b"{}" * 8,
                                  b"\x02" + b"\x00" * 7 + b"[]", "a string"])
def test_garbage_bytes_give_a_clear_error(junk):
    with pytest.raises(codec.CodecError, match="not an encoded object"):
        CompressedWindow.from_bytes(junk)
    with pytest.raises(ValueError):
        codec.decode(junk)


def test_other_encoded_objects_are_not_windows():
    with pytest.raises(codec.CodecError, match="not a CompressedWindow"):
        CompressedWindow.from_bytes(codec.encode({"embeds": torch.zeros(1, 2)}))
    d = {"format": "omnizip.window/1", **window().to_dict()}
    del d["offset"]
    with pytest.raises(codec.CodecError, match="not a CompressedWindow"):
        CompressedWindow.from_bytes(codec.encode(d))
    data = window().to_bytes()
    with pytest.raises(codec.CodecError):
        CompressedWindow.from_bytes(data[:-3])  # truncated tensor data
