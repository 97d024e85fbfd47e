"""A compression method as plain data: its name, its OmniZip settings and its look-ahead, the
way a kvpress "press" is a dataclass of its settings. One spec serves the HTTP API and the CLI
(validation), the store (``to_dict``/``from_dict``) and the engine (``build`` -> the method).
No torch here: the HTTP replicas validate specs without loading it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .config import OmniZipConfig

if TYPE_CHECKING:
    from .methods import CompressionMethod

__all__ = ["METHOD_NAMES", "MethodSpec"]

#: the methods ``omnizip.methods.METHODS`` implements, by name (checked equal there)
METHOD_NAMES = ("omnizip", "keep_all", "random", "fixed_ratio")


@dataclass(frozen=True)
class MethodSpec:
    """Which method, with which settings: ``OmniZipConfig`` drives every method (the baselines
    read its ratios), ``lookahead`` the windows the streaming compressor may wait for."""

    name: str = "omnizip"
    config: OmniZipConfig = field(default_factory=OmniZipConfig)
    lookahead: int = 0

    def __post_init__(self) -> None:
        if self.name not in METHOD_NAMES:
            raise ValueError(f"unknown compression method {self.name!r}; known methods: {', '.join(METHOD_NAMES)}")
        if isinstance(self.lookahead, bool) or not isinstance(self.lookahead, int) or self.lookahead < 0:
            raise ValueError(f"lookahead must be an integer >= 0, got {self.lookahead!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "config": self.config.to_dict(), "lookahead": self.lookahead}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MethodSpec":
        return cls(str(data.get("name", "omnizip")), OmniZipConfig.from_dict(data.get("config") or {}),
                   int(data.get("lookahead", 0)))

    def build(self, seed: int = 0) -> "CompressionMethod":
        """A fresh method of this spec (loads torch)."""
        from .methods import make_method

        return make_method(self.name, self.config, lookahead=self.lookahead, seed=seed)
