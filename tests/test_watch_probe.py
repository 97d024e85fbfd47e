"""The yes/no probe on warm caches (omnizip.models.probe) against the stock forward: the same
logits for each stream whether batched or one by one, and every cache left exactly as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnizip import OmniZipConfig, StreamCompressor
from omnizip.models import load_model
from omnizip.models.probe import NO_WORDS, YES_WORDS, answer_token_ids, probe_last_logits, yes_probability
from omnizip.models.rolling import RollingContext
from omnizip.models.window import compress_with


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def context(model, n: int, seed: int) -> RollingContext:
    rng = np.random.default_rng(seed)
    sc = StreamCompressor(OmniZipConfig(rho_audio=0.4, rho_video=0.7), lookahead=0)
    ctx = RollingContext(model, 4096)
    for k in range(n):
        enc = model.encode_window((0.1 * rng.standard_normal(32000)).astype(np.float32),
                                  rng.integers(0, 256, (4, 56, 84, 3), dtype=np.uint8), k)
        (done,) = sc.push(enc.audio, enc.audio_scores, enc.video)
        ctx.append(compress_with(enc, done))
    return ctx


def snapshot(ctx: RollingContext) -> list[torch.Tensor]:
    return [t.clone() for layer in ctx.cache.layers for t in (layer.keys, layer.values)]


def test_batched_probe_equals_the_stock_forward_and_leaves_caches_alone(tiny) -> None:
    ctxs = [context(tiny, n, seed) for n, seed in ((2, 1), (4, 2), (3, 3))]
    rows = torch.tensor(answer_token_ids(tiny.processor, YES_WORDS) + answer_token_ids(tiny.processor, NO_WORDS))
    questions = ["Is someone at the door?", "Is a price mentioned? Answer yes or no.", "Is it dark?"]
    pieces = [tiny.prompt_suffix(q, c.next_position) for q, c in zip(questions, ctxs)]
    before = [snapshot(c) for c in ctxs]
    lengths = [c.n_tokens for c in ctxs]
    batched = probe_last_logits(tiny, [c.cache for c in ctxs], pieces, rows)
    alone = torch.cat([probe_last_logits(tiny, [c.cache], [p], rows) for c, p in zip(ctxs, pieces)])
    stock = []
    for c, p in zip(ctxs, pieces):  # the stock path: prefill the question into the cache, crop it off
        n = c.n_tokens
        stock.append(tiny.forward_embeds(tiny.embed_ids(p.ids), p.position_ids, c.cache, "last")[0, rows])
        c.cache.crop(n - c.cache.get_seq_length())
    stock_t = torch.stack(stock)
    assert batched.shape == (3, len(rows))
    torch.testing.assert_close(batched, stock_t, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(alone, batched, rtol=1e-4, atol=1e-5)
    assert [c.n_tokens for c in ctxs] == lengths
    for c, snap in zip(ctxs, before):
        assert all(torch.equal(a, b) for a, b in zip(snapshot(c), snap))
    p = yes_probability(batched, len(answer_token_ids(tiny.processor, YES_WORDS)))
    assert p.shape == (3,) and bool(((p > 0) & (p < 1)).all())
    assert len({round(float(x), 6) for x in p}) == 3  # each stream its own answer


def test_probe_refuses_mismatched_input(tiny) -> None:
    ctx = context(tiny, 1, 4)
    rows = torch.tensor([1, 2])
    with pytest.raises(ValueError):
        probe_last_logits(tiny, [ctx.cache, ctx.cache], [tiny.prompt_suffix("q", ctx.next_position)], rows)
