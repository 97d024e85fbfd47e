"""Offline path: whole clip -> stock features -> compress_clip -> compressed prefill with gapped positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnizip import PAPER_SETTINGS, OmniZipConfig
from omnizip.models import load_model
from omnizip.models.offline import clip_prompt, generate, stock_inputs

Q = "What is happening in the video?"


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


@pytest.fixture(scope="module")
def clip():
    rng = np.random.default_rng(11)
    audio = (0.1 * rng.standard_normal(6 * 32000)).astype(np.float32)
    frames = rng.integers(0, 256, (24, 84, 84, 3), dtype=np.uint8)
    return audio, frames


def test_compression_off_generates_like_stock(tiny, clip) -> None:
    si = stock_inputs(tiny, *clip, Q)
    with torch.no_grad():
        stock = tiny.thinker.generate(**si, max_new_tokens=10, do_sample=False, eos_token_id=tiny.token_ids["<|im_end|>"])
    stock = stock[0, si["input_ids"].shape[1]:].tolist()
    ours = generate(tiny, clip_prompt(tiny, *clip, Q, cfg=None), max_new_tokens=10)
    assert ours == stock and len(ours) >= 1


def test_compression_off_prefill_logits_equal_stock_forward(tiny, clip) -> None:
    si = stock_inputs(tiny, *clip, Q)
    with torch.no_grad():
        stock = tiny.thinker(**{k: v for k, v in si.items()}).logits[0, -1]
    p = clip_prompt(tiny, *clip, Q, cfg=None)
    assert p.n_tokens == si["input_ids"].shape[1]
    assert torch.allclose(tiny.forward_embeds(p.embeds, p.position_ids)[0], stock.float(), atol=1e-4)


@pytest.mark.parametrize("setting", ["45%", "35%"])
def test_kept_tokens_keep_their_positions(tiny, clip, setting) -> None:
    full = clip_prompt(tiny, *clip, Q, cfg=None)
    comp = clip_prompt(tiny, *clip, Q, cfg=PAPER_SETTINGS[setting])
    assert comp.n_tokens < full.n_tokens
    n_mm_in = full.multimodal_in
    assert comp.multimodal_in == n_mm_in and comp.multimodal_kept < n_mm_in
    # every kept (t, h, w) is one of the uncompressed sequence's, in the same order: gapped, not renumbered
    full_cols = {tuple(c) for c in full.position_ids.T.tolist()}
    assert all(tuple(c) in full_cols for c in comp.position_ids.T.tolist())
    # text after the block has exactly the uncompressed positions
    n_suffix = len(tiny.prompt_suffix(Q, 0).ids)
    assert torch.equal(comp.position_ids[:, -n_suffix:], full.position_ids[:, -n_suffix:])
    prefix = len(tiny.prompt_prefix().ids)
    assert torch.equal(comp.position_ids[:, :prefix], full.position_ids[:, :prefix])
    t = comp.position_ids[0, prefix:-n_suffix]
    audio_t = [w.position_ids[0, -w.audio_kept:] for w in comp.windows if w.audio_kept]
    assert all((a[1:] > a[:-1]).all() for a in audio_t)
    assert t.numel() == comp.multimodal_kept
    assert len(generate(tiny, comp, max_new_tokens=3)) >= 1


def test_compressed_counts_follow_the_config(tiny, clip) -> None:
    cfg = OmniZipConfig(rho_audio=0.4, rho_video=0.7)
    comp = clip_prompt(tiny, *clip, Q, cfg=cfg)
    audio_in = sum(w.audio_in for w in comp.windows)
    audio_kept = sum(w.audio_kept for w in comp.windows)
    assert audio_in == 300
    assert abs(audio_kept / audio_in - (1 - 0.4 + 0.05)) < 0.02
    for w in comp.windows:
        assert w.video_kept <= w.video_in and w.n_tokens == w.audio_kept + w.video_kept
