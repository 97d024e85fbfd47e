"""Interleaved spatio-temporal compression, ISTC (SPEC 2.3).

Inside each time group, even LLM frames are pruned spatially (DPC-KNN keeps tokens that are
both dense and far from denser ones: cluster centres) and odd frames temporally (keep what
changed since the previous frame). All frames of a clip are scored in one batched pass.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from .ops import top_k_mask


def frame_plan(
    video_group_frames: Sequence[int], ratios: Sequence[float], tokens_per_frame: int
) -> tuple[list[int], list[int], list[int]]:
    """Per LLM frame, the tokens to keep ``floor(P * (1 - ratio))`` (capped at P); and which
    frames need spatial (even t) or temporal (odd t) scoring, t counted from each group's
    start. Plain Python on the group lists: it decides shapes, so it never waits on a device."""
    n_keep: list[int] = []
    spatial: list[int] = []
    temporal: list[int] = []
    for frames, ratio in zip(video_group_frames, ratios):
        keep = min(math.floor(tokens_per_frame * (1.0 - ratio)), tokens_per_frame)
        if 0 < keep < tokens_per_frame:
            first = len(n_keep)
            spatial.extend(range(first, first + frames, 2))
            temporal.extend(range(first + 1, first + frames, 2))
        n_keep.extend([keep] * frames)
    return n_keep, spatial, temporal


def _even_step(index: list[int]) -> int | None:
    """The step of an evenly stepping index list (1 for a single index), else None."""
    if len(index) == 1:
        return 1
    step = index[1] - index[0]
    return step if step > 0 and all(b - a == step for a, b in zip(index, index[1:])) else None


def _frames(x: torch.Tensor, index: list[int]) -> torch.Tensor:
    """``x[index]``, as a strided view (no copy) when the indices step evenly."""
    step = _even_step(index)
    if step is not None:
        return x[index[0] : index[-1] + 1 : step]
    return x[torch.tensor(index, device=x.device)]


def _assign(x: torch.Tensor, index: list[int], values: torch.Tensor) -> None:
    """``x[index] = values``, through a view when the indices step evenly."""
    step = _even_step(index)
    if step is not None:
        x[index[0] : index[-1] + 1 : step] = values
    else:
        x[torch.tensor(index, device=x.device)] = values


@functools.lru_cache(maxsize=8)
def _self_pairs(num_tokens: int, device: torch.device) -> torch.Tensor:
    return torch.eye(num_tokens, dtype=torch.bool, device=device)


def dpc_knn_scores(frames: torch.Tensor, inv_norm: torch.Tensor, knn_k: int) -> torch.Tensor:
    """``rho * delta`` per token for a batch of frames [E, P, D] (P >= 2)."""
    num_tokens = frames.shape[1]
    cosine = torch.bmm(frames, frames.transpose(1, 2)).mul_(inv_norm.unsqueeze(2)).mul_(inv_norm.unsqueeze(1))
    # Exactly symmetric, so tokens of mathematically equal density (mutual nearest neighbours
    # when k = 1) compare equal and neither counts as "strictly denser" by rounding noise.
    dist = (cosine + cosine.transpose(1, 2)).mul_(-0.5).add_(1.0)
    self_pair = _self_pairs(num_tokens, frames.device)
    k = min(knn_k, num_tokens - 1)
    nearest = torch.topk(dist.masked_fill(self_pair, float("inf")), k, dim=-1, largest=False).values
    density = nearest.mean(dim=-1).neg_().exp_()  # [E, P]
    denser = density.unsqueeze(1) > density.unsqueeze(2)  # [E, i, j]: j strictly denser than i
    delta = torch.where(denser, dist, float("inf")).amin(dim=-1)  # inf: no denser token
    farthest = dist.masked_fill(self_pair, float("-inf")).amax(dim=-1)
    return density * torch.where(torch.isinf(delta), farthest, delta)


def temporal_scores(frames: torch.Tensor, previous: torch.Tensor, inv: torch.Tensor, inv_prev: torch.Tensor) -> torch.Tensor:
    """Negated cosine to the same position in the previous frame: higher = changed more."""
    return -(torch.linalg.vecdot(frames, previous) * inv * inv_prev)


def istc_keep(
    video: torch.Tensor,
    inv_norm: torch.Tensor,
    video_group_frames: Sequence[int],
    ratios: Sequence[float],
    knn_k: int,
) -> torch.Tensor:
    """Keep mask [F, P] for frames ``video`` [F, P, D] (working dtype), one ratio per group."""
    num_frames, num_tokens, _ = video.shape
    n_keep, spatial, temporal = frame_plan(video_group_frames, ratios, num_tokens)
    scores = torch.zeros(num_frames, num_tokens, dtype=video.dtype, device=video.device)
    if spatial:
        _assign(scores, spatial, dpc_knn_scores(_frames(video, spatial), _frames(inv_norm, spatial), knn_k))
    if temporal:
        prev = [f - 1 for f in temporal]
        _assign(scores, temporal, temporal_scores(
            _frames(video, temporal), _frames(video, prev), _frames(inv_norm, temporal), _frames(inv_norm, prev)
        ))
    keep_counts = torch.tensor(n_keep, dtype=torch.long).to(video.device, non_blocking=True)
    return top_k_mask(scores, keep_counts)
