"""compress_clip: the public API of SPEC section 5, its errors, and its invariants."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omnizip import OmniZipConfig, compress_clip
from omnizip.budget import base_ratio
from core_helpers import loop_reference, random_clip


@pytest.mark.parametrize("seed", range(8))
def test_agrees_with_the_loop_reference(seed):
    audio, scores, video, sizes, frames = random_clip(seed)
    cfg = OmniZipConfig(contextual_ratio=0.1, g=2 + seed % 3, knn_k=1 + seed % 5)
    out = compress_clip(audio, scores, video, sizes, frames, cfg)
    keep_a, merged, keep_v, ratios = loop_reference.reference_compress(audio, scores, video, sizes, frames, cfg)
    assert torch.equal(out.audio_keep, keep_a)
    assert torch.allclose(out.audio, merged, atol=1e-5)
    assert torch.equal(out.video_keep, keep_v)
    assert out.video_ratios == pytest.approx(ratios, abs=1e-12)


def test_inputs_are_not_modified_and_shapes_are_right():
    audio, scores, video, sizes, frames = random_clip(3)
    copies = [t.clone() for t in (audio, scores, video)]
    out = compress_clip(audio, scores, video, sizes, frames)
    for original, copy in zip((audio, scores, video), copies):
        assert torch.equal(original, copy)
    assert out.audio_keep.shape == (audio.shape[0],) and out.audio_keep.dtype == torch.bool
    assert out.audio.shape == audio.shape and out.audio.dtype == audio.dtype
    assert out.video_keep.shape == video.shape[:2] and out.video_keep.dtype == torch.bool
    assert len(out.video_ratios) == len(sizes) and all(isinstance(r, float) for r in out.video_ratios)
    assert 0 < out.retention < 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_any_float_dtype_gives_the_same_decisions_as_float32_of_it(dtype):
    audio, scores, video, sizes, frames = random_clip(5)
    audio, scores, video = audio.to(dtype), scores.to(dtype), video.to(dtype)
    out = compress_clip(audio, scores, video, sizes, frames)
    assert out.audio.dtype == dtype
    if dtype != torch.float64:
        ref = compress_clip(audio.float(), scores.float(), video.float(), sizes, frames)
        assert torch.equal(out.audio_keep, ref.audio_keep)
        assert torch.equal(out.video_keep, ref.video_keep)
        assert torch.equal(out.audio, ref.audio.to(dtype))


BAD_INPUTS = [
    ("audio", lambda a, s, v, ga, gv: (a[:, :3], s, v, ga, gv)),
    ("audio_scores", lambda a, s, v, ga, gv: (a, s[:-1], v, ga, gv)),
    ("audio_scores", lambda a, s, v, ga, gv: (a, torch.where(torch.arange(len(s)) == 2, float("nan"), s), v, ga, gv)),
    ("audio_scores", lambda a, s, v, ga, gv: (a, torch.where(torch.arange(len(s)) == 0, float("inf"), s), v, ga, gv)),
    ("video", lambda a, s, v, ga, gv: (a, s, v[0], ga, gv)),
    ("video", lambda a, s, v, ga, gv: (a, s, v.clone().fill_(float("nan")), ga, gv)),
    ("audio_group_sizes", lambda a, s, v, ga, gv: (a, s, v, [x + 1 for x in ga], gv)),
    ("audio_group_sizes", lambda a, s, v, ga, gv: (a, s, v, [-1, *ga[1:-1], ga[-1] + ga[0] + 1], gv)),
    ("video_group_frames", lambda a, s, v, ga, gv: (a, s, v, ga, gv[:-1] + [gv[-1] + 1])),
    ("video_group_frames", lambda a, s, v, ga, gv: (a, s, v, ga + [0], gv)),
    ("audio", lambda a, s, v, ga, gv: (a[:0], s[:0], v, [0] * len(ga), gv)),
    ("video", lambda a, s, v, ga, gv: (a, s, v[:0], ga, [0] * len(gv))),
]


@pytest.mark.parametrize("name, corrupt", BAD_INPUTS)
def test_bad_input_raises_a_value_error_naming_the_argument(name, corrupt):
    args = corrupt(*random_clip(1))
    with pytest.raises(ValueError, match=name):
        compress_clip(*args)


@pytest.mark.parametrize("field, value", [("rho_audio", 1.5), ("rho_video", -0.1), ("contextual_ratio", float("nan")),
                                          ("min_ratio", 2.0), ("g", -1), ("knn_k", 0), ("max_ratio", "0.5")])
def test_config_rejects_bad_settings_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        OmniZipConfig(**{field: value})


def test_config_rejects_min_above_max():
    with pytest.raises(ValueError, match="min_ratio"):
        OmniZipConfig(min_ratio=0.8, max_ratio=0.5)


clip_settings = st.fixed_dictionaries(
    {
        "rho_audio": st.floats(0.0, 1.0),
        "rho_video": st.floats(0.0, 1.0),
        "contextual_ratio": st.floats(0.0, 0.3),
        "g": st.integers(0, 4),
        "bounds": st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0)).map(sorted),
    }
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), groups=st.integers(1, 9), p=st.integers(1, 12), s=clip_settings)
def test_invariants_hold_for_any_clip(seed, groups, p, s):
    cfg = OmniZipConfig(rho_audio=s["rho_audio"], rho_video=s["rho_video"], contextual_ratio=s["contextual_ratio"],
                        g=s["g"], min_ratio=s["bounds"][0], max_ratio=s["bounds"][1])
    audio, scores, video, sizes, frames = random_clip(seed, groups=groups, p=p)
    out = compress_clip(audio, scores, video, sizes, frames, cfg)
    na = audio.shape[0]

    n_dom = round((1 - cfg.rho_audio) * na)
    n_anchor = min(round(cfg.contextual_ratio * na), na - n_dom)
    assert int(out.audio_keep.sum()) == n_dom + n_anchor
    changed = (out.audio != audio).any(dim=1)
    assert not (changed & ~out.audio_keep).any(), "only kept anchors may change"
    assert int(changed.sum()) <= n_anchor

    with_audio = [i for i, n in enumerate(sizes) if n]
    for i, r in enumerate(out.video_ratios):
        if i in with_audio:
            assert cfg.min_ratio - 1e-12 <= r <= cfg.max_ratio + 1e-12
        else:
            assert r == cfg.rho_video
    start = 0
    for nf, r in zip(frames, out.video_ratios):
        expected = min(math.floor(p * (1 - r)), p)
        assert out.video_keep[start:start + nf].sum(dim=1).tolist() == [expected] * nf
        start += nf

    # The normalised discard meets rho_video unless a bound stops it: the groups of smallest and
    # largest base ratio stay fixed, the others must absorb the difference inside [min, max].
    if len(with_audio) > 2:
        tokens = {i: frames[i] * p for i in with_audio}
        kept = out.audio_keep.split(sizes)
        base = {i: base_ratio(int(kept[i].sum()) / sizes[i], cfg) for i in with_audio}
        fixed = {min(with_audio, key=base.get), max(with_audio, key=base.get)}
        others = [i for i in with_audio if i not in fixed]
        target = cfg.rho_video * sum(tokens.values())
        total = sum(out.video_ratios[i] * tokens[i] for i in with_audio)
        base_total = sum(base[i] * tokens[i] for i in with_audio)
        movable = sum(tokens[i] for i in others) > 0 and base_total > 0
        bound_hit = any(out.video_ratios[i] in (cfg.min_ratio, cfg.max_ratio) for i in others if tokens[i])
        if movable and not bound_hit:
            assert abs(total - target) <= 1e-3 + 1e-9 * target


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), rho_audio=st.floats(0.05, 0.95), rho_video=st.floats(0.3, 0.8))
def test_loop_reference_agrees_on_any_setting(seed, rho_audio, rho_video):
    cfg = OmniZipConfig(rho_audio=rho_audio, rho_video=rho_video, contextual_ratio=0.1)
    audio, scores, video, sizes, frames = random_clip(seed, groups=5, p=6, max_audio=12)
    out = compress_clip(audio, scores, video, sizes, frames, cfg)
    keep_a, merged, keep_v, ratios = loop_reference.reference_compress(audio, scores, video, sizes, frames, cfg)
    assert torch.equal(out.audio_keep, keep_a) and torch.equal(out.video_keep, keep_v)
    assert torch.allclose(out.audio, merged, atol=1e-5)
    assert out.video_ratios == pytest.approx(ratios, abs=1e-12)
