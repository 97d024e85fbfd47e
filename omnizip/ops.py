"""Small tensor helpers shared by the audio and video steps: cosine with the spec's epsilon,
and top-k by rank with the spec's tie rule (lower index first)."""
from __future__ import annotations

import torch

COSINE_EPS = 1e-6


def work_dtype(x: torch.Tensor) -> torch.dtype:
    """Similarities are computed in float32 (float64 kept), whatever the storage dtype."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def inverse_norm(x: torch.Tensor, name: str | None = None) -> torch.Tensor:
    """``1 / (||x|| + 1e-6)`` over the last dim: cosine(x, y) = x.y * inv(x) * inv(y).

    With ``name``, raises ValueError if a token holds NaN or inf (its norm is then not finite):
    the check rides on a reduction the method needs anyway, unlike a full isfinite pass."""
    norm = torch.linalg.vector_norm(x, dim=-1)
    if name is not None and norm.numel() and not bool(torch.isfinite(norm).all()):
        raise ValueError(f"{name} contains NaN or inf values")
    return (norm + COSINE_EPS).reciprocal_()


def top_k_mask(scores: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """Boolean mask of the ``k`` highest entries along the last dim (ties: lower index).

    ``k`` may be a tensor broadcasting against ``scores.shape[:-1]`` (one k per row).
    """
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    if isinstance(k, torch.Tensor):
        k = k.unsqueeze(-1)
    in_top = torch.arange(scores.shape[-1], device=scores.device) < k  # by position in `order`
    return torch.zeros_like(order, dtype=torch.bool).scatter_(-1, order, in_top.expand_as(order))
