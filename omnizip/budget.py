"""Audio retention decides each time group's video budget (SPEC 2.2), offline and streaming.

Dense audio (a high kept fraction) means an eventful moment, so that group discards less
video. Offline, the ratios are then rescaled so the clip as a whole discards ``rho_video``;
streaming, a causal controller does the same job over the stream's recent past.
"""
from __future__ import annotations

from collections.abc import Sequence

from .config import OmniZipConfig

TOLERANCE_TOKENS = 1e-3


def _clamp(x: float, low: float, high: float) -> float:
    return min(max(x, low), high)


def base_ratio(retention: float, cfg: OmniZipConfig) -> float:
    """``b = clamp(max + (min - max) * r)``: the discard ratio before normalisation."""
    b = cfg.max_ratio + (cfg.min_ratio - cfg.max_ratio) * retention
    return _clamp(b, cfg.min_ratio, cfg.max_ratio)


def offline_video_ratios(
    retention: Sequence[float | None], video_tokens: Sequence[int], cfg: OmniZipConfig
) -> list[float]:
    """One discard ratio per group (SPEC 2.2). ``retention[i]`` is None for a group without audio.

    A loop over groups (tens per clip), in Python floats, exactly as the spec states it.
    """
    ratios = [cfg.rho_video if r is None else base_ratio(r, cfg) for r in retention]
    audio_groups = [i for i, r in enumerate(retention) if r is not None]
    if len(audio_groups) <= 2:
        return ratios
    s = {i: float(video_tokens[i]) for i in audio_groups}
    target = cfg.rho_video * sum(s.values())
    base_total = sum(ratios[i] * s[i] for i in audio_groups)
    if abs(base_total - target) <= TOLERANCE_TOKENS or base_total == 0:
        return ratios
    smallest = min(audio_groups, key=lambda i: ratios[i])  # min/max return the first such index
    largest = max(audio_groups, key=lambda i: ratios[i])
    fixed = {smallest, largest}
    others = [i for i in audio_groups if i not in fixed]
    if not others:
        return ratios
    fixed_total = sum(ratios[i] * s[i] for i in fixed)
    others_total = sum(ratios[i] * s[i] for i in others)
    if others_total > 0:
        scale = (target - fixed_total) / others_total
        for i in others:
            ratios[i] = _clamp(ratios[i] * scale, cfg.min_ratio, cfg.max_ratio)
    diff = target - sum(ratios[i] * s[i] for i in audio_groups)
    others_tokens = sum(s[i] for i in others)
    if abs(diff) > TOLERANCE_TOKENS and others_tokens > 0:
        for i in others:
            ratios[i] = _clamp(ratios[i] + diff / others_tokens, cfg.min_ratio, cfg.max_ratio)
    return ratios


class VideoRatioController:
    """Causal replacement for the offline normalisation (SPEC section 4).

    Window i gets ``clamp(b_i * scale + owed / s_i)``: ``scale`` maps the mean base ratio of
    the recent windows (and any lookahead) onto ``rho_video``, which keeps the guidance (a
    lower b stays lower), and ``owed`` is the discard the recent windows fell short of (the
    floor in ISTC's keep count, the bounds), so the running discard converges on ``rho_video``.
    Memory is bounded by ``history`` windows.
    """

    def __init__(self, cfg: OmniZipConfig, history: int) -> None:
        self.cfg = cfg
        self.history = history
        self.records: list[tuple[float, int, int]] = []  # (base ratio, video tokens, discarded)

    def ratio(self, b: float, tokens: int, lookahead: Sequence[tuple[float, int]] = ()) -> float:
        cfg = self.cfg
        if tokens == 0:
            return b
        known = [(rb, rs) for rb, rs, _ in self.records] + [(b, tokens)] + list(lookahead)
        weighted = sum(rb * rs for rb, rs in known)
        scale = cfg.rho_video * sum(rs for _, rs in known) / weighted if weighted > 0 else 1.0
        owed = sum(cfg.rho_video * rs - rd for _, rs, rd in self.records)
        span = cfg.max_ratio - cfg.min_ratio
        correction = _clamp(owed / tokens, -span, span)
        return _clamp(b * scale + correction, cfg.min_ratio, cfg.max_ratio)

    def record(self, b: float, tokens: int, discarded: int) -> None:
        self.records.append((float(b), int(tokens), int(discarded)))
        del self.records[: -self.history]

    def state_dict(self) -> dict:
        return {"records": [list(r) for r in self.records]}

    def load_state_dict(self, state: dict) -> None:
        self.records = [(float(b), int(s), int(d)) for b, s, d in state["records"]]
