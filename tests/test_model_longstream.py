"""Long streams: exact key re-rotation (TMRoPE), bounded positions with eviction, rebuild, refresh, an hour."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniTextConfig
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniRotaryEmbedding, rotate_half

from omnizip import OmniZipConfig, StreamCompressor
from omnizip.models import CompressedWindow, load_model
from omnizip.models.positions import RopeShift, renumber_delta, window_position_ids
from omnizip.models.presets import get_preset
from omnizip.models.rolling import RollingContext
from omnizip.models.window import EncodedWindow, compress_with

Q = "What happened?"
P = 50  # positions per window


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


@pytest.fixture(scope="module")
def base(tiny) -> list[EncodedWindow]:
    """A few distinct encoded windows; longer streams recycle them at later indices."""
    rng = np.random.default_rng(5)
    out = []
    for k in range(4):
        audio = (0.1 * rng.standard_normal(32000)).astype(np.float32)
        frames = rng.integers(0, 256, (4, 56, 56, 3), dtype=np.uint8)
        out.append(tiny.encode_window(audio, frames, k))
    return out


def stream(base: list[EncodedWindow], n: int, start: int = 0) -> list[CompressedWindow]:
    """Windows start..n-1 of a simulated stream (content recycled, positions of their own index)."""
    sc = StreamCompressor(OmniZipConfig(rho_audio=0.4, rho_video=0.5), lookahead=0)
    out = []
    for k in range(start, n):
        b = base[k % len(base)]
        pos = window_position_ids(k, b.llm_grid_hw, b.video.shape[0], b.n_audio, b.offset)
        enc = EncodedWindow(k, b.audio, b.audio_scores, b.video, pos, b.offset, b.llm_grid_hw)
        (done,) = sc.push(enc.audio, enc.audio_scores, enc.video)
        out.append(compress_with(enc, done))
    return out


def next_logits(tiny, cache, question_start: int, shift: int = 0) -> torch.Tensor:
    """Next-token logits of the question on a copy of `cache` (question positions moved by `shift`)."""
    s = tiny.prompt_suffix(Q, question_start)
    return tiny.forward_embeds(tiny.embed_ids(s.ids), s.position_ids + shift, copy.deepcopy(cache), "last")[0]


def fresh(tiny, ctx: RollingContext):
    """A fresh prefill of the system prefix and the held windows at the context's current positions."""
    c = tiny.new_cache()
    pre = tiny.prompt_prefix()
    emb = torch.cat([tiny.embed_ids(pre.ids)] + [w.embeds for w in ctx._windows])
    tiny.forward_embeds(emb, ctx.position_ids(), c, "none")
    return c


def test_rotation_layout_is_checked_on_mrope_section() -> None:
    """Each rotated pair takes one axis as mrope_section says: a per-axis shift is one rotation per pair."""
    for name, hd in (("tiny", 16), ("7b", 128)):
        text = get_preset(name).text
        rot = Qwen2_5OmniRotaryEmbedding(Qwen2_5OmniTextConfig(**text))
        shift = RopeShift(rot, rotate_half, hd)
        section = text["rope_parameters"]["mrope_section"]
        expect = torch.cat([torch.full((s,), i % 3) for i, s in enumerate(section)])
        assert torch.equal(shift.axis_of_dim, expect.repeat(2))
        # a shift of all three axes by one delta: every frequency rotates by delta * freq, whatever its axis
        d = torch.full((3, 1), 37)
        k = torch.randn(1, hd, dtype=torch.float64)
        ang = 37 * shift.freq
        assert torch.allclose(shift(d)(k), k * ang.cos() + rotate_half(k) * ang.sin())


@pytest.mark.parametrize("delta", [-30000, -1234, -1, 1, 999, 25000])
def test_shifted_context_gives_the_same_next_token_logits(tiny, base, delta) -> None:
    """Re-rotating every cached key by delta on all three axes and asking at positions + delta changes nothing."""
    ctx = RollingContext(tiny, budget_tokens=100_000)
    for w in stream(base, 6):
        ctx.append(w)
    ref = next_logits(tiny, ctx.cache, ctx.next_position)
    shifted = copy.deepcopy(ctx.cache)
    rotate = tiny.key_rotation(torch.full((3, ctx.n_tokens), delta))
    for layer in shifted.layers:
        layer.keys = rotate(layer.keys)
    got = next_logits(tiny, shifted, ctx.next_position, shift=delta)
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()


def test_renumbered_keys_equal_keys_computed_at_the_new_positions(tiny, base) -> None:
    """Layer-0 keys (which see only their own embedding) re-rotated by the TMRoPE renumbering delta
    (video: time axis only; audio: all three) equal keys computed at the renumbered positions."""
    ws = stream(base, 9, start=5)
    pre = tiny.prompt_prefix()
    emb = torch.cat([tiny.embed_ids(pre.ids)] + [w.embeds for w in ws])
    old = torch.cat([pre.position_ids] + [w.position_ids for w in ws], dim=1)
    delta = torch.cat([torch.zeros(3, len(pre.ids), dtype=torch.long)]
                      + [renumber_delta(w.video_kept, w.audio_kept, 5 * P) for w in ws], dim=1)
    a, b = tiny.new_cache(), tiny.new_cache()
    tiny.forward_embeds(emb, old, a, "none")
    tiny.forward_embeds(emb, old + delta, b, "none")
    assert torch.equal((old + delta)[:, len(pre.ids):].min(dim=1).values.new_tensor([tiny.mm_offset()] * 3),
                       (old + delta)[:, len(pre.ids):].min(dim=1).values)  # the renumbered stream starts at offset
    assert torch.allclose(tiny.key_rotation(delta)(a.layers[0].keys), b.layers[0].keys, atol=1e-5)


def test_eviction_renumbers_from_the_oldest_held_window(tiny, base) -> None:
    ws = stream(base, 30)
    budget = 66 + 4 * max(w.n_tokens for w in ws)
    ctx = RollingContext(tiny, budget_tokens=budget)
    for w in ws[:3]:
        ctx.append(w)
    assert ctx.base_index == 0 and torch.equal(ctx.position_ids()[:, ctx.prefix_tokens:],
                                               torch.cat([w.position_ids for w in ws[:3]], dim=1))  # no eviction
    for w in ws[3:]:
        ctx.append(w)
        held = [ws[i] for i in ctx.window_indices]
        first = held[0].index
        assert ctx.base_index == first and ctx.n_tokens <= budget
        want = torch.cat([w.position_ids + renumber_delta(w.video_kept, w.audio_kept, first * P) for w in held], 1)
        assert torch.equal(ctx.position_ids()[:, ctx.prefix_tokens:], want)
        assert int(want[0].min()) == ctx.offset and ctx.next_position == held[-1].max_position - first * P + 1
    assert ctx.evicted_windows > 20
    rebuilt = RollingContext(tiny, budget_tokens=budget)
    rebuilt.rebuild(ws)
    assert rebuilt.window_indices == ctx.window_indices and rebuilt.base_index == ctx.base_index
    assert torch.equal(rebuilt.position_ids(), ctx.position_ids()) and rebuilt.next_position == ctx.next_position
    # the next window continues from the shifted positions in both
    nxt = stream(base, 31)[-1]
    ctx.append(nxt)
    rebuilt.append(nxt)
    assert torch.equal(rebuilt.position_ids(), ctx.position_ids())


def test_position_range_evicts_even_within_the_token_budget(tiny, base) -> None:
    ctx = RollingContext(tiny, budget_tokens=100_000, max_positions=1200, position_reserve=200)
    seen = []
    for w in stream(base, 80):
        ctx.append(w)
        seen.append(int(ctx.position_ids().max()))
    assert ctx.evicted_windows > 50 and max(seen) < 1000
    assert len(ctx.window_indices) == (1000 - ctx.offset) // P
    assert len(list(ctx.answer(Q, max_new_tokens=4))) >= 1 and ctx.max_position_used < 1200
    with pytest.raises(ValueError, match="do not fit"):
        list(ctx.answer(Q, max_new_tokens=400))


def test_refresh_removes_the_residue(tiny, base) -> None:
    ws = stream(base, 24)
    budget = 66 + 4 * max(w.n_tokens for w in ws)
    live = RollingContext(tiny, budget_tokens=budget, refresh_every=10_000)  # keeps windows, never refreshes
    for w in ws:
        live.append(w)
    residue = (next_logits(tiny, live.cache, live.next_position)
               - next_logits(tiny, fresh(tiny, live), live.next_position)).abs().max()
    assert live.evicted_windows > 0 and live.refreshes == 0 and residue > 1e-5
    live.refresh()
    assert live.refreshes == 1 and live.window_indices == [w.index for w in live._windows]
    assert torch.allclose(next_logits(tiny, live.cache, live.next_position),
                          next_logits(tiny, fresh(tiny, live), live.next_position), atol=1e-5)
    periodic = RollingContext(tiny, budget_tokens=budget, refresh_every=5)
    for w in ws:
        periodic.append(w)
    assert periodic.refreshes >= 3
    with pytest.raises(RuntimeError, match="refresh_every"):
        RollingContext(tiny, budget_tokens=budget).refresh()


def test_an_hour_of_stream_keeps_positions_in_range_and_answers(tiny, base) -> None:
    """1800 windows (60 min) on tiny with a small budget: every position fed to the LM stays in range."""
    seen: list[int] = []
    lm = tiny.thinker.model.language_model

    def hook(module, args, kwargs) -> None:
        seen.append(int(kwargs["position_ids"].max()))

    handle = lm.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        ctx = RollingContext(tiny, budget_tokens=400)
        limit = tiny.max_positions
        answers = 0
        for w in stream(base, 1800):
            ctx.append(w)
            if w.index % 300 == 299:
                answers += len(list(ctx.answer(Q, max_new_tokens=3))) >= 1
    finally:
        handle.remove()
    assert answers == 6 and ctx.evicted_windows > 1700
    assert max(seen) < limit and ctx.max_position_used < limit
    assert max(seen) < ctx.offset + P * (len(ctx.window_indices) + 2) + 64  # bounded by the held windows, not time
