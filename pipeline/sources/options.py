"""`HttpSourceOptions`: the typed, bounded subset of pipeline.sources.source.SourceOptions an HTTP client
may set (no raw FFmpeg options, no paired device, no RTSP listen mode), validated by pydantic and
turned into a plain dict SourceOptions.coerce accepts. Apart from the policy's checks because it
is the API's input model (pipeline.api.models); re-exported by pipeline.sources.policy.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.redact import has_control_chars

__all__ = ["HttpSourceOptions"]


def _reject_control(value: Any, where: str = "options") -> None:
    if isinstance(value, str):
        if has_control_chars(value):
            raise ValueError(f"control characters are not allowed in {where}")
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _reject_control(k, where)
            _reject_control(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for v in value:
            _reject_control(v, where)


class HttpSourceOptions(BaseModel):
    """Source options an HTTP client may set: explicit, typed and bounded. No raw FFmpeg
    options, no paired audio device, no RTSP listen mode (those stay with the operator)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    rtsp_transport: Literal["tcp", "udp"] = "tcp"
    open_timeout_s: float = Field(8.0, gt=0, le=300, allow_inf_nan=False)
    read_timeout_s: float = Field(8.0, gt=0, le=300, allow_inf_nan=False)
    reconnect: bool = True
    max_reconnects: Optional[int] = Field(None, ge=0, le=10_000)  # None: keep trying (live)
    reconnect_delay_s: float = Field(0.5, ge=0.05, le=60, allow_inf_nan=False)
    reconnect_max_delay_s: float = Field(10.0, ge=0.05, le=300, allow_inf_nan=False)
    live: Optional[bool] = None  # None: decided from the source
    audio: bool = True
    video: bool = True

    @model_validator(mode="before")
    @classmethod
    def _no_control_chars(cls, data: Any) -> Any:
        _reject_control(data)
        return data

    @model_validator(mode="after")
    def _delays(self) -> "HttpSourceOptions":
        if self.reconnect_max_delay_s < self.reconnect_delay_s:
            raise ValueError("reconnect_max_delay_s must be >= reconnect_delay_s")
        return self

    def to_source_options(self) -> dict[str, Any]:
        """A plain dict that pipeline.sources.source.SourceOptions.coerce accepts (JSON-serialisable)."""
        out: dict[str, Any] = {
            "rtsp_transport": self.rtsp_transport,
            "open_timeout_s": float(self.open_timeout_s),
            "read_timeout_s": float(self.read_timeout_s),
            "reconnect": {
                "initial_s": float(self.reconnect_delay_s),
                "cap_s": float(self.reconnect_max_delay_s),
                "max_attempts": (self.max_reconnects if self.reconnect else 0),
            },
            "audio": self.audio,
            "video": self.video,
        }
        if self.live is not None:
            out["live"] = self.live
        assert all(math.isfinite(out[k]) for k in ("open_timeout_s", "read_timeout_s"))
        return out
