"""Small tensor helpers shared by the audio and video steps: cosine with the spec's epsilon,
and top-k by rank with the spec's tie rule (lower index first)."""
from __future__ import annotations

import torch

COSINE_EPS = 1e-6


def work_dtype(x: torch.Tensor) -> torch.dtype:
    """Similarities are computed in float32 (float64 kept), whatever the storage dtype."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def inverse_norm(x: torch.Tensor) -> torch.Tensor:
    """``1 / (||x|| + 1e-6)`` over the last dim: cosine(x, y) = x.y * inv(x) * inv(y)."""
    return 1.0 / (torch.linalg.vector_norm(x, dim=-1) + COSINE_EPS)


def unit(x: torch.Tensor) -> torch.Tensor:
    """``x / (||x|| + 1e-6)``, the spec's normalisation for cosine similarity."""
    return x * inverse_norm(x).unsqueeze(-1)


def descending_rank(scores: torch.Tensor) -> torch.Tensor:
    """Rank of each entry along the last dim, highest first, ties to the lower index."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    return ranks.scatter_(-1, order, positions)


def top_k_mask(scores: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """Boolean mask of the ``k`` highest entries along the last dim (ties: lower index).

    ``k`` may be a tensor broadcasting against ``scores.shape[:-1]`` (one k per row).
    """
    if isinstance(k, torch.Tensor):
        k = k.unsqueeze(-1)
    return descending_rank(scores) < k
