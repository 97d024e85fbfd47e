"""Audio token scores (SPEC section 1) captured by a forward pre-hook on the last audio attention.

The audio attention module never returns probabilities, so the hook recomputes q and k from the
layer's (normed) input and evaluates softmax(q k^T * scale) inside each 2-s chunk (cu_seqlens), exactly
where the encoder attends. Frame score = attention received, averaged over heads and the chunk's
queries; token score = mean of the two encoder frames the final pooling merges.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def chunk_attention_received(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor,
                             scale: float) -> torch.Tensor:
    """q, k [H, L, hd]; returns [L]: each frame's attention received within its chunk (sums to 1 per chunk)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    n_chunks, max_len = lengths.numel(), int(lengths.max())
    ar = torch.arange(max_len, device=q.device)
    valid = ar[None, :] < lengths[:, None].to(q.device)  # [C, Lmax]
    idx = (cu_seqlens[:-1, None].long().to(q.device) + ar[None, :]).clamp(max=q.shape[1] - 1)
    qc = q.float()[:, idx]  # [H, C, Lmax, hd]
    kc = k.float()[:, idx]
    logits = torch.einsum("hcqd,hckd->hcqk", qc, kc) * scale
    logits = logits.masked_fill(~valid[None, :, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1) * valid[None, :, :, None]  # zero rows of padded queries
    received = probs.sum(dim=2).mean(dim=0) / lengths[:, None].to(q.device)  # [C, Lmax]
    return received[valid]


def pool_pair_starts(feature_lens: torch.Tensor) -> torch.Tensor:
    """Index of the first encoder frame of each pooled token, for audios of `feature_lens` mel frames."""
    after_conv = (feature_lens.long() - 1) // 2 + 1
    n_pooled = (after_conv - 2) // 2 + 1
    frame_offsets = torch.cumsum(after_conv, 0) - after_conv
    token_offsets = torch.cumsum(n_pooled, 0) - n_pooled
    local = torch.arange(int(n_pooled.sum())) - token_offsets.repeat_interleave(n_pooled)
    return frame_offsets.repeat_interleave(n_pooled) + 2 * local


class AudioScoreRecorder:
    """Captures per-frame scores from the audio tower's last attention while `capture()` is open."""

    def __init__(self, audio_tower: nn.Module) -> None:
        self.attn = audio_tower.layers[-1].self_attn
        self.frame_scores: torch.Tensor | None = None

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cu_seqlens = kwargs["cu_seqlens"] if "cu_seqlens" in kwargs else args[1]
        n = hidden.shape[0]
        with torch.no_grad():
            q = module.q_proj(hidden).view(n, module.num_heads, -1).transpose(0, 1)
            k = module.k_proj(hidden).view(n, module.num_heads, -1).transpose(0, 1)
            self.frame_scores = chunk_attention_received(q, k, cu_seqlens, module.scaling)

    @contextmanager
    def capture(self) -> Iterator["AudioScoreRecorder"]:
        self.frame_scores = None
        handle = self.attn.register_forward_pre_hook(self._hook, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()

    def token_scores(self, feature_lens: torch.Tensor) -> torch.Tensor:
        """[Na] token scores of the last captured forward, for audios of `feature_lens` mel frames."""
        if self.frame_scores is None:
            raise RuntimeError("no audio forward was captured")
        starts = pool_pair_starts(feature_lens.cpu()).to(self.frame_scores.device)
        return (self.frame_scores[starts] + self.frame_scores[starts + 1]) / 2
