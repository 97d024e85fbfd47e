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

from .ops import inverse_norm, work_dtype


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

    Index bookkeeping (which tokens are dominant, anchors, pool; the top-g ranking and the
    softmax weights) runs in numpy on small index arrays; the products over embeddings run
    on the tensors' device. ``audio_inv_norm``: ``1/(||a||+eps)`` per token, if known."""
    device = audio.device
    num_tokens = scores.shape[0]
    by_score = torch.sort(scores, descending=True, stable=True).indices.cpu().numpy()
    keep = np.zeros(num_tokens, dtype=bool)
    keep[by_score[:n_dominant]] = True
    rest = np.flatnonzero(~keep)
    n_anchor = anchor_count(num_tokens, rest.size, contextual_ratio)
    merged = audio.clone()
    if n_anchor == 0:
        return AudioSelection(torch.from_numpy(keep).to(device), merged, torch.from_numpy(rest[:0]).to(device))
    anchor_slots = np.arange(n_anchor) * max(1, rest.size // n_anchor)
    anchors_np = rest[anchor_slots]
    keep[anchors_np] = True
    pool_np = np.delete(rest, anchor_slots)
    anchors = torch.from_numpy(anchors_np).to(device)
    keep_t = torch.from_numpy(keep).to(device)
    if pool_np.size == 0 or g == 0:
        return AudioSelection(keep_t, merged, anchors)

    work = audio.to(work_dtype(audio))
    if audio_inv_norm is None:
        audio_inv_norm = inverse_norm(work)
    pool = torch.from_numpy(pool_np).to(device)
    pool_tokens = work[pool]
    pool_unit = pool_tokens * audio_inv_norm[pool].unsqueeze(1)
    to_anchor = pool_unit @ (work[anchors] * audio_inv_norm[anchors].unsqueeze(1)).T  # [n_pool, C]
    assigned_t = to_anchor.argmax(dim=1)  # first maximum = lower anchor index
    if video is None:
        cross_t = to_anchor.amax(dim=1)
    else:
        cross_t = ((pool_unit @ video.tokens.T) * video.inv_norm).amax(dim=1)
    assigned = assigned_t.cpu().numpy()
    cross = cross_t.to(torch.float64).cpu().numpy()

    # Top-g pool tokens per anchor by cross-modal score, ties to the lower index: sort by
    # (anchor, score desc, position), then rank inside each anchor's run.
    order = np.lexsort((np.arange(pool_np.size), -cross, assigned))
    counts = np.bincount(assigned, minlength=n_anchor)
    rank = np.arange(order.size) - (np.cumsum(counts) - counts)[assigned[order]]
    chosen = order[rank < g]
    owner, chosen_scores = assigned[chosen], cross[chosen]
    # Softmax of the chosen scores inside each anchor's group (float64), then the merge as one
    # small matrix product: weights [C, n_pool] @ pool tokens [n_pool, D].
    peak = np.full(n_anchor, -np.inf)
    np.maximum.at(peak, owner, chosen_scores)
    e = np.exp(chosen_scores - peak[owner])
    weights = np.zeros((n_anchor, pool_np.size))
    weights[owner, chosen] = e / np.bincount(owner, weights=e, minlength=n_anchor)[owner]
    w = torch.from_numpy(weights).to(device, work.dtype)
    merged_anchors = (work[anchors] + w @ pool_tokens) / (1.0 + w.sum(dim=1)).unsqueeze(1)
    merged[anchors] = merged_anchors.to(audio.dtype)
    return AudioSelection(keep_t, merged, anchors)


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
        self.scores: list[np.ndarray] = []  # float64, one per past window
        self.kept: list[int] = []

    def salient_counts(self, scores: torch.Tensor, lookahead: list[torch.Tensor]) -> list[int]:
        """Salient tokens in this window and in each lookahead window."""
        if not any(s.size for s in self.scores):
            return [dominant_count(s.shape[0], self.rho_audio) for s in [scores, *lookahead]]
        windows = [_as_numpy(s) for s in [scores, *lookahead]]
        threshold = _quantile(np.concatenate([*self.scores, *windows]), self.rho_audio)
        return [int(np.count_nonzero(s > threshold)) for s in windows]

    def dominant_count(self, salient: int, num_tokens: int) -> int:
        """Dominant tokens to keep: the salient ones plus what the recent windows owe."""
        owed = self.target_fraction * sum(s.size for s in self.scores) - sum(self.kept)
        return max(0, min(num_tokens, salient + round(owed)))

    def record(self, scores: torch.Tensor, kept: int) -> None:
        self.scores.append(_as_numpy(scores))
        self.kept.append(int(kept))
        del self.scores[: -self.history], self.kept[: -self.history]

    def state_dict(self) -> dict:
        return {"scores": [torch.from_numpy(s.copy()) for s in self.scores], "kept": list(self.kept)}

    def load_state_dict(self, state: dict) -> None:
        self.scores = [_as_numpy(torch.as_tensor(s)) for s in state["scores"]]
        self.kept = [int(k) for k in state["kept"]]


def _as_numpy(scores: torch.Tensor) -> np.ndarray:
    return scores.detach().to("cpu", torch.float64).reshape(-1).numpy()


def _quantile(values: np.ndarray, q: float) -> float:
    """Linear-interpolation quantile (numpy's default rule) by partition: no full sort."""
    position = q * (values.size - 1)
    low = int(position)
    high = min(low + 1, values.size - 1)
    part = np.partition(values, [low, high])
    return float(part[low] + (part[high] - part[low]) * (position - low))
