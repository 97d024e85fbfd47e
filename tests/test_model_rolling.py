"""Rolling KV context: incremental prefill == one prefill, answer restores the cache, eviction, rebuild."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from omnizip import OmniZipConfig, StreamCompressor
from omnizip.models import CompressedWindow, load_model
from omnizip.models.offline import assemble_prompt, generate
from omnizip.models.rolling import RollingContext
from omnizip.models.window import compress_with

N = 8


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


@pytest.fixture(scope="module")
def windows(tiny) -> list[CompressedWindow]:
    """N windows encoded one by one and compressed by the streaming compressor, as the service does."""
    rng = np.random.default_rng(3)
    sc = StreamCompressor(OmniZipConfig(rho_audio=0.4, rho_video=0.7), lookahead=0)
    out = []
    for k in range(N):
        audio = (0.1 * rng.standard_normal(32000)).astype(np.float32)
        frames = rng.integers(0, 256, (4, 56, 84, 3), dtype=np.uint8)
        enc = tiny.encode_window(audio, frames, k)
        (done,) = sc.push(enc.audio, enc.audio_scores, enc.video)
        out.append(compress_with(enc, done))
    return out


def one_prefill(tiny, ctx: RollingContext, ws: list[CompressedWindow]) -> torch.Tensor:
    pre = tiny.prompt_prefix()
    emb = torch.cat([tiny.embed_ids(pre.ids)] + [w.embeds for w in ws])
    pos = torch.cat([pre.position_ids] + [w.position_ids for w in ws], dim=1)
    return tiny.forward_embeds(emb, pos, None, "all")[len(pre.ids):]


def snapshot(ctx: RollingContext) -> list[torch.Tensor]:
    return [t.clone() for layer in ctx.cache.layers for t in (layer.keys, layer.values)]


def test_windows_are_compressed(windows) -> None:
    assert all(w.n_tokens < w.audio_in + w.video_in for w in windows)
    assert all(w.audio_in == 50 and w.video_in == 12 for w in windows)


def test_incremental_prefill_equals_one_prefill(tiny, windows) -> None:
    ctx = RollingContext(tiny, budget_tokens=100_000)
    inc = torch.cat([ctx.append(w, return_logits=True) for w in windows])
    assert ctx.n_tokens == ctx.prefix_tokens + sum(w.n_tokens for w in windows)
    assert torch.allclose(inc, one_prefill(tiny, ctx, windows), atol=1e-4)


def test_answer_streams_and_restores_the_cache(tiny, windows) -> None:
    ctx = RollingContext(tiny, budget_tokens=100_000)
    for w in windows[:4]:
        ctx.append(w)
    before, n = snapshot(ctx), ctx.n_tokens
    gen = ctx.answer("What happened?", max_new_tokens=6)
    first = next(gen)
    assert isinstance(first, int) and ctx.n_tokens > n  # question is in the cache while answering
    rest = list(gen)
    assert 1 + len(rest) <= 6
    assert ctx.n_tokens == n and all(torch.equal(a, b) for a, b in zip(before, snapshot(ctx)))
    # the answer equals the offline compressed prompt's greedy answer (same tokens, same positions)
    assert [first] + rest == generate(tiny, assemble_prompt(tiny, windows[:4], "What happened?"), 6)
    # a consumer that stops early also leaves the context as it was
    g2 = ctx.answer("And now?", max_new_tokens=5)
    next(g2)
    g2.close()
    assert ctx.n_tokens == n
    # the next window appends after the context, not after the Q&A
    ctx.append(windows[4])
    ref = RollingContext(tiny, budget_tokens=100_000)
    for w in windows[:5]:
        ref.append(w)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(snapshot(ctx), snapshot(ref)))


def test_eviction_keeps_system_prompt_and_budget(tiny, windows) -> None:
    per = max(w.n_tokens for w in windows)
    budget = 60 + 3 * per  # room for about three windows after the prefix
    ctx = RollingContext(tiny, budget_tokens=budget)
    prefix_keys = [layer.keys[..., :ctx.prefix_tokens, :].clone() for layer in ctx.cache.layers]
    for w in windows:
        ctx.append(w)
        assert ctx.n_tokens <= budget
    assert ctx.evicted_windows > 0 and ctx.window_indices == list(range(N - len(ctx.window_indices), N))
    assert ctx.n_tokens == ctx.prefix_tokens + sum(windows[i].n_tokens for i in ctx.window_indices)
    for layer, ref in zip(ctx.cache.layers, prefix_keys):
        assert torch.equal(layer.keys[..., :ctx.prefix_tokens, :], ref)
    # the kept windows' keys are those they were computed with (RoPE positions unchanged)
    assert len(list(ctx.answer("q?", max_new_tokens=2))) >= 1
    assert ctx.n_tokens <= budget


def test_rebuild_gives_same_token_count(tiny, windows) -> None:
    per = max(w.n_tokens for w in windows)
    budget = 60 + 3 * per
    live = RollingContext(tiny, budget_tokens=budget)
    for w in windows:
        live.append(w)
    rebuilt = RollingContext(tiny, budget_tokens=budget)
    rebuilt.rebuild(windows)
    assert rebuilt.window_indices == live.window_indices and rebuilt.n_tokens == live.n_tokens
    assert rebuilt.next_position == live.next_position
    # without eviction, a rebuild is the same cache as incremental appends
    a = RollingContext(tiny, budget_tokens=100_000)
    b = RollingContext(tiny, budget_tokens=100_000)
    for w in windows[:3]:
        a.append(w)
    b.rebuild(windows[:3])
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(snapshot(a), snapshot(b)))


def test_bad_use_is_refused(tiny, windows) -> None:
    ctx = RollingContext(tiny, budget_tokens=100_000)
    ctx.append(windows[2])
    with pytest.raises(ValueError, match="in order"):
        ctx.append(windows[1])
    with pytest.raises(ValueError, match="must exceed"):
        RollingContext(tiny, budget_tokens=10)
    small = RollingContext(tiny, budget_tokens=ctx.prefix_tokens + 5)
    with pytest.raises(ValueError, match="more than the budget"):
        small.append(windows[3])
    with pytest.raises(ValueError, match="non-empty"):
        list(ctx.answer("  "))


def test_compressed_window_serialises(tiny, windows) -> None:
    w = windows[5]
    for back in (CompressedWindow.from_bytes(w.to_bytes()), pickle.loads(pickle.dumps(w)),
                 CompressedWindow.from_dict(w.to_dict())):
        assert back.index == w.index and back.max_position == w.max_position
        assert torch.equal(back.embeds, w.embeds) and torch.equal(back.position_ids, w.position_ids)
        assert (back.audio_kept, back.video_kept, back.audio_in, back.video_in) == (
            w.audio_kept, w.video_kept, w.audio_in, w.video_in)
    r = w.rebased(w.offset + 7)
    assert torch.equal(r.position_ids - 7, w.position_ids) and r.max_position == w.max_position + 7
    with pytest.raises(ValueError, match="position_ids"):
        CompressedWindow(0, torch.zeros(3, 4), torch.zeros(3, 2, dtype=torch.long), 0, 0, 0, 0, 3)


def test_context_with_another_system_prompt_rebases(tiny, windows) -> None:
    ctx = RollingContext(tiny, budget_tokens=100_000, system_prompt="Watch the stream.")
    assert ctx.offset != windows[0].offset
    ctx.append(windows[0])
    assert ctx.next_position == windows[0].max_position + 1 + (ctx.offset - windows[0].offset)
