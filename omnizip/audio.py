"""Audio step of OmniZip (SPEC 2.1): keep the dominant tokens, keep evenly spaced contextual
anchors among the rest, and merge the remaining tokens into their anchors, weighted by how
strongly each token relates to the video.

The same function serves the offline method (all tokens of a clip, dominant count from a
global top-k) and the streaming method (one window, dominant count from a causal threshold,
see ``DominanceTracker``)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .ops import inverse_norm, top_k_mask, work_dtype


@dataclass(frozen=True)
class VideoRef:
    """Video tokens as the cross-modal score needs them: raw [N, D] plus their inverse norms.

    Keeping raw tokens and ``1/(||v||+eps)`` avoids writing a normalised copy of the video.
    """

    tokens: torch.Tensor
    inv_norm: torch.Tensor

    @classmethod
    def from_frames(cls, video: torch.Tensor, inv_norm: torch.Tensor | None = None) -> "VideoRef | None":
        """From [F, P, D] frames (in the working dtype); None when there is no video token."""
        if video.shape[0] * video.shape[1] == 0:
            return None
        flat = video.reshape(-1, video.shape[-1])
        inv = inverse_norm(flat) if inv_norm is None else inv_norm.reshape(-1)
        return cls(flat, inv)


@dataclass(frozen=True)
class AudioSelection:
    keep: torch.Tensor  # bool [Na]: dominant OR anchor
    audio: torch.Tensor  # [Na, D], input dtype, merged anchors written in
    anchors: torch.Tensor  # long [C], increasing


def dominant_count(num_tokens: int, rho_audio: float) -> int:
    """``round((1 - rho_audio) * Na)`` (SPEC 2.1.1; Python's round, half to even)."""
    return round((1.0 - rho_audio) * num_tokens)


def anchor_count(num_tokens: int, num_rest: int, contextual_ratio: float) -> int:
    """``C = min(round(contextual_ratio * Na), len(rest))`` (SPEC 2.1.2)."""
    return min(round(contextual_ratio * num_tokens), num_rest)


def kept_fraction(num_tokens: int, n_dominant: int, contextual_ratio: float) -> float:
    """Audio kept fraction (dominant + anchors) that ``n_dominant`` dominant tokens give."""
    return (n_dominant + anchor_count(num_tokens, num_tokens - n_dominant, contextual_ratio)) / num_tokens


def select_audio(
    audio: torch.Tensor,
    scores: torch.Tensor,
    n_dominant: int,
    contextual_ratio: float,
    g: int,
    video: VideoRef | None,
    audio_inv_norm: torch.Tensor | None = None,
) -> AudioSelection:
    """SPEC 2.1 steps 1-5 over the given tokens. Inputs are left untouched.

    ``audio_inv_norm``: ``1/(||a||+eps)`` per token, if the caller has it already."""
    num_tokens = scores.shape[0]
    keep = top_k_mask(scores, n_dominant)
    merged = audio.clone()
    rest = torch.nonzero(~keep).squeeze(1)
    n_anchor = anchor_count(num_tokens, rest.numel(), contextual_ratio)
    if n_anchor == 0:
        return AudioSelection(keep, merged, rest[:0])
    step = max(1, rest.numel() // n_anchor)
    anchor_slots = torch.arange(n_anchor, device=rest.device) * step
    anchors = rest[anchor_slots]
    keep[anchors] = True
    pool_mask = torch.ones(rest.numel(), dtype=torch.bool, device=rest.device)
    pool_mask[anchor_slots] = False
    pool = rest[pool_mask]
    if pool.numel() == 0 or g == 0:
        return AudioSelection(keep, merged, anchors)
    if audio_inv_norm is None:
        audio_inv_norm = inverse_norm(audio.to(work_dtype(audio)))

    work = audio.to(work_dtype(audio))
    pool_unit = work[pool] * audio_inv_norm[pool].unsqueeze(1)
    to_anchor = pool_unit @ (work[anchors] * audio_inv_norm[anchors].unsqueeze(1)).T  # [n_pool, C]
    assigned = to_anchor.argmax(dim=1)  # first maximum = lower anchor index
    if video is None:
        cross = to_anchor.amax(dim=1)
    else:
        cross = ((pool_unit @ video.tokens.T) * video.inv_norm).amax(dim=1)

    # Top-g pool tokens per anchor by cross-modal score (ties: lower index): order by
    # (anchor, score desc, index) with two stable sorts, then rank inside each anchor's run.
    by_score = torch.sort(cross, descending=True, stable=True).indices
    order = by_score[torch.sort(assigned[by_score], stable=True).indices]
    counts = torch.bincount(assigned, minlength=n_anchor)
    run_start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel(), device=order.device) - run_start[assigned[order]]
    chosen = order[rank < g]
    owner, s = assigned[chosen], cross[chosen]

    # Softmax of the chosen scores inside each anchor's group, then the weighted merge as
    # one small matrix product (weights [C, n_pool] @ pool tokens [n_pool, D]).
    peak = torch.full((n_anchor,), float("-inf"), dtype=s.dtype, device=s.device)
    peak = peak.scatter_reduce(0, owner, s, reduce="amax")
    e = torch.exp(s - peak[owner])
    z = torch.zeros(n_anchor, dtype=s.dtype, device=s.device).index_add_(0, owner, e)
    weights = torch.zeros(n_anchor, pool.numel(), dtype=work.dtype, device=work.device)
    weights[owner, chosen] = e / z[owner]
    merged_anchors = (work[anchors] + weights @ work[pool]) / (1.0 + weights.sum(dim=1)).unsqueeze(1)
    merged[anchors] = merged_anchors.to(audio.dtype)
    return AudioSelection(keep, merged, anchors)


class DominanceTracker:
    """Causal replacement for the global dominant top-k (SPEC section 4).

    A window's *salient* tokens are those scoring above the ``rho_audio``-quantile of the
    scores seen in the last ``history`` windows (plus this window and any lookahead), so a
    window of salient audio has more of them than a quiet one; that count is the window's
    audio density, which guides its video budget. The number of dominant tokens actually
    kept adds what the recent windows fell short of their target (dominant + anchors), so
    the kept fraction holds over any stretch of windows even when the scores drift. The
    first window has no history and falls back to its own top-k.
    """

    def __init__(self, rho_audio: float, contextual_ratio: float, history: int) -> None:
        self.rho_audio = rho_audio
        self.target_fraction = 1.0 - rho_audio + min(contextual_ratio, rho_audio)
        self.history = history
        self.scores: list[torch.Tensor] = []  # float64 CPU, one per past window
        self.kept: list[int] = []

    def salient_counts(self, scores: torch.Tensor, lookahead: list[torch.Tensor]) -> list[int]:
        """Salient tokens in this window and in each lookahead window."""
        if not any(s.numel() for s in self.scores):
            return [dominant_count(s.shape[0], self.rho_audio) for s in [scores, *lookahead]]
        windows = [s.detach().to("cpu", torch.float64) for s in [scores, *lookahead]]
        reference = torch.cat([*self.scores, *windows]).numpy()
        threshold = float(np.quantile(reference, self.rho_audio))  # linear, as torch.quantile; 2x faster
        return [int((s > threshold).sum()) for s in windows]

    def dominant_count(self, salient: int, num_tokens: int) -> int:
        """Dominant tokens to keep: the salient ones plus what the recent windows owe."""
        owed = self.target_fraction * sum(s.numel() for s in self.scores) - sum(self.kept)
        return max(0, min(num_tokens, salient + round(owed)))

    def record(self, scores: torch.Tensor, kept: int) -> None:
        self.scores.append(scores.detach().to("cpu", torch.float64))
        self.kept.append(int(kept))
        del self.scores[: -self.history], self.kept[: -self.history]

    def state_dict(self) -> dict:
        return {"scores": [s.clone() for s in self.scores], "kept": list(self.kept)}

    def load_state_dict(self, state: dict) -> None:
        self.scores = [torch.as_tensor(s, dtype=torch.float64).reshape(-1) for s in state["scores"]]
        self.kept = [int(k) for k in state["kept"]]
