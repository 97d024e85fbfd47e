"""OmniZip settings, validated once so every later step can trust them (SPEC sections 2 and 4)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

_FRACTIONS = ("rho_audio", "rho_video", "contextual_ratio", "min_ratio", "max_ratio")
_COUNTS = {"g": 0, "knn_k": 1, "stream_history_windows": 1}  # integer fields and their minimum


@dataclass(frozen=True)
class OmniZipConfig:
    """Compression settings. ``rho_*`` are the fractions of tokens *discarded*.

    The defaults are the paper's "35%" setting. ``stream_history_windows`` bounds the
    streaming compressor's memory (SPEC section 4): 60 windows = the last 120 s of scores.
    """

    rho_audio: float = 0.4
    rho_video: float = 0.7
    contextual_ratio: float = 0.05
    g: int = 3
    min_ratio: float = 0.35
    max_ratio: float = 0.75
    knn_k: int = 5
    stream_history_windows: int = 60

    def __post_init__(self) -> None:
        for name in (*_FRACTIONS, *_COUNTS):
            object.__setattr__(self, name, self.check_field(name, getattr(self, name)))
        if self.min_ratio > self.max_ratio:
            raise ValueError(
                f"OmniZipConfig.min_ratio ({self.min_ratio}) must not exceed max_ratio ({self.max_ratio})"
            )

    @classmethod
    def check_field(cls, name: str, value: Any) -> Any:
        """One field's own rule (the value, normalised), or ValueError naming the field: the one
        place the bounds live, so an API can report each bad field where it is."""
        if name in _FRACTIONS:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"OmniZipConfig.{name} must be a number in [0, 1], got {value!r}")
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"OmniZipConfig.{name} must be in [0, 1], got {value!r}")
            return float(value)
        if name in _COUNTS:
            low = _COUNTS[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"OmniZipConfig.{name} must be an integer >= {low}, got {value!r}")
            return value
        raise ValueError(f"OmniZipConfig: unknown setting {name!r}")

    @property
    def expected_audio_kept(self) -> float:
        """Kept audio fraction the method aims for: dominant tokens plus contextual anchors."""
        return 1.0 - self.rho_audio + min(self.contextual_ratio, self.rho_audio)

    def stricter(self) -> "OmniZipConfig":
        """A harder setting for a window of a stream that fell behind live: discard more of both
        modalities (audio +0.3 up to 0.9, video +0.2 up to 0.95), with the video bounds widened to
        admit the new ratio and no more anchors than discarded tokens."""
        rho_a = min(0.9, self.rho_audio + 0.3)
        rho_v = min(0.95, self.rho_video + 0.2)
        return replace(self, rho_audio=rho_a, rho_video=rho_v, contextual_ratio=min(self.contextual_ratio, rho_a),
                       max_ratio=max(self.max_ratio, rho_v), min_ratio=min(self.min_ratio, rho_v))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "OmniZipConfig":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"OmniZipConfig: unknown settings {sorted(unknown)}")
        return cls(**data)


#: The paper's two headline settings (SPEC section 3), by the retention they aim for.
PAPER_SETTINGS: dict[str, OmniZipConfig] = {
    "45%": OmniZipConfig(rho_audio=0.3, rho_video=0.6),
    "35%": OmniZipConfig(rho_audio=0.4, rho_video=0.7),
}
