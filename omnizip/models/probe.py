"""Yes/no probes on warm KV caches: one forward of a question's tokens per cache, reading the
next-token logits of "yes" against "no", with the caches left exactly as they were.

Why a forward of its own instead of the stock ``forward_embeds`` on each cache: a standing
question (pipeline watches) is asked of many streams at once, each over its own cache of its own
length. Here the question tokens of every cache are packed into ONE sequence, so the projections
and MLPs of every layer run once for all of them (the weights are read once, not once per stream),
while attention runs per cache against that cache's keys and values plus its own question (a
lower-right causal mask). Nothing is written into any cache (no crop needed, no window of
a concurrent append), and only the rows of the LM head that are asked for are computed.

The layer math is the stock Qwen2 decoder layer's, through the model's own modules (norms,
projections, rotary embedding, ``apply_rotary_pos_emb``, MLP); ``tests/test_watch_probe.py``
checks it against the stock forward on the same caches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .adapter import PromptPiece

__all__ = ["answer_token_ids", "probe_last_logits", "yes_probability"]

YES_WORDS = ("yes", "Yes", "YES", " yes", " Yes")
NO_WORDS = ("no", "No", "NO", " no", " No")


def answer_token_ids(processor: Any, words: Sequence[str]) -> list[int]:
    """The first token of each spelling of a word (de-duplicated): what the next-token logits
    of an answer that starts with that word put their mass on."""
    out: list[int] = []
    for w in words:
        ids = processor.encode_text(w, plain=True)
        if ids and ids[0] not in out:
            out.append(ids[0])
    return out


def _layers(adapter: Any) -> tuple[Any, Any]:
    lm = adapter.thinker.model.language_model
    return lm, lm.layers


@torch.no_grad()
def probe_last_logits(adapter: Any, caches: Sequence[Any], pieces: Sequence[PromptPiece],
                      rows: torch.Tensor) -> torch.Tensor:
    """Logits [B, len(rows)] of the LM head rows ``rows`` at the last token of each ``pieces[i]``
    appended (virtually) to ``caches[i]``. The caches are read, never changed."""
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import apply_rotary_pos_emb

    if len(caches) != len(pieces) or not pieces:
        raise ValueError(f"need one piece per cache, got {len(pieces)} pieces for {len(caches)} caches")
    lm, layers = _layers(adapter)
    dev, dt = adapter.device, adapter.dtype
    sizes = [len(p.ids) for p in pieces]
    if min(sizes) < 1:
        raise ValueError("every piece needs at least one token")
    ids = torch.as_tensor([i for p in pieces for i in p.ids], dtype=torch.long, device=dev)
    x = adapter.thinker.get_input_embeddings()(ids)[None].to(dt)  # [1, N, D]
    pos = torch.cat([p.position_ids for p in pieces], dim=1)[:, None].to(dev)  # [3, 1, N]
    cos, sin = lm.rotary_emb(x, pos)
    bounds = torch.tensor([0] + sizes).cumsum(0).tolist()
    masks = []  # lower-right causal: question token j sees the cache and question tokens <= j
    for cache, n in zip(caches, sizes):
        past = cache.get_seq_length()
        masks.append(torch.arange(past + n, device=dev)[None] <= (past + torch.arange(n, device=dev))[:, None])
    for li, layer in enumerate(layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(1, -1, attn.config.num_attention_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(1, -1, attn.config.num_key_value_heads, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(1, -1, attn.config.num_key_value_heads, attn.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        outs = []
        for b, cache in enumerate(caches):
            a, e = bounds[b], bounds[b + 1]
            layer_cache = cache.layers[li] if li < len(cache.layers) else None
            if layer_cache is not None and layer_cache.keys is not None and layer_cache.keys.numel():
                kk = torch.cat([layer_cache.keys, k[:, :, a:e]], dim=2)
                vv = torch.cat([layer_cache.values, v[:, :, a:e]], dim=2)
            else:
                kk, vv = k[:, :, a:e], v[:, :, a:e]
            outs.append(F.scaled_dot_product_attention(q[:, :, a:e], kk, vv, attn_mask=masks[b],
                                                       scale=attn.scaling, enable_gqa=True))
        o = torch.cat(outs, dim=2).transpose(1, 2).reshape(1, x.shape[1], -1)
        x = x + attn.o_proj(o)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    last = torch.tensor([e - 1 for e in bounds[1:]], device=dev)
    hidden = lm.norm(x[0, last])  # [B, D]
    head = adapter.thinker.lm_head
    w = head.weight[rows.to(dev)]
    out = hidden @ w.T
    if getattr(head, "bias", None) is not None:
        out = out + head.bias[rows.to(dev)]
    return out.float()


def yes_probability(logits: torch.Tensor, n_yes: int) -> torch.Tensor:
    """p(yes) against p(no) [B] from logits [B, n_yes + n_no] (the yes spellings first): the
    softmax of the two words' log-sum-exp, so the rest of the vocabulary does not dilute it."""
    yes = torch.logsumexp(logits[:, :n_yes], dim=1)
    no = torch.logsumexp(logits[:, n_yes:], dim=1)
    return torch.sigmoid(yes - no)
