"""Interleaved spatio-temporal compression, ISTC (SPEC 2.3).

Inside each time group, even LLM frames are pruned spatially (DPC-KNN keeps tokens that are
both dense and far from denser ones: cluster centres) and odd frames temporally (keep what
changed since the previous frame). All frames of a clip are scored in one batched pass.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .ops import top_k_mask


def frames_keep_counts(
    video_group_frames: Sequence[int], ratios: Sequence[float], tokens_per_frame: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per LLM frame: tokens to keep ``floor(P * (1 - ratio))`` (capped at P) and the frame's
    position t inside its group (0 at the group's start)."""
    per_group = [min(math.floor(tokens_per_frame * (1.0 - r)), tokens_per_frame) for r in ratios]
    counts = torch.tensor(per_group, dtype=torch.long)
    frames = torch.tensor(list(video_group_frames), dtype=torch.long)
    n_keep = torch.repeat_interleave(counts, frames)
    group_start = torch.repeat_interleave(torch.cumsum(frames, 0) - frames, frames)
    t = torch.arange(int(frames.sum())) - group_start
    return n_keep.to(device), t.to(device)


def dpc_knn_scores(frames: torch.Tensor, inv_norm: torch.Tensor, knn_k: int) -> torch.Tensor:
    """``rho * delta`` per token for a batch of frames [E, P, D] (P >= 2)."""
    num_tokens = frames.shape[1]
    cosine = torch.bmm(frames, frames.transpose(1, 2)) * inv_norm.unsqueeze(2) * inv_norm.unsqueeze(1)
    # Exactly symmetric, so tokens of mathematically equal density (mutual nearest neighbours
    # when k = 1) compare equal and neither counts as "strictly denser" by rounding noise.
    dist = 1.0 - (cosine + cosine.transpose(1, 2)) * 0.5
    self_pair = torch.eye(num_tokens, dtype=torch.bool, device=frames.device)
    k = min(knn_k, num_tokens - 1)
    nearest = torch.topk(dist.masked_fill(self_pair, float("inf")), k, dim=-1, largest=False).values
    density = torch.exp(-nearest.mean(dim=-1))  # [E, P]
    denser = density.unsqueeze(1) > density.unsqueeze(2)  # [E, i, j]: j strictly denser than i
    delta = dist.masked_fill(~denser, float("inf")).amin(dim=-1)
    farthest = dist.masked_fill(self_pair, float("-inf")).amax(dim=-1)
    delta = torch.where(denser.any(dim=-1), delta, farthest)
    return density * delta


def temporal_scores(frames: torch.Tensor, previous: torch.Tensor, inv: torch.Tensor, inv_prev: torch.Tensor) -> torch.Tensor:
    """Negated cosine to the same position in the previous frame: higher = changed more."""
    return -(torch.einsum("fpd,fpd->fp", frames, previous) * inv * inv_prev)


def istc_keep(
    video: torch.Tensor,
    inv_norm: torch.Tensor,
    video_group_frames: Sequence[int],
    ratios: Sequence[float],
    knn_k: int,
) -> torch.Tensor:
    """Keep mask [F, P] for frames ``video`` [F, P, D] (working dtype), one ratio per group."""
    num_frames, num_tokens, _ = video.shape
    n_keep, t = frames_keep_counts(video_group_frames, ratios, num_tokens, video.device)
    scores = torch.zeros(num_frames, num_tokens, dtype=video.dtype, device=video.device)
    partial = (n_keep > 0) & (n_keep < num_tokens)
    spatial = torch.nonzero(partial & (t % 2 == 0)).squeeze(1)
    temporal = torch.nonzero(partial & (t % 2 == 1)).squeeze(1)
    if spatial.numel():
        scores[spatial] = dpc_knn_scores(video[spatial], inv_norm[spatial], knn_k)
    if temporal.numel():
        prev = temporal - 1
        scores[temporal] = temporal_scores(video[temporal], video[prev], inv_norm[temporal], inv_norm[prev])
    return top_k_mask(scores, n_keep)
