"""A stream as the engine knows it: the client's spec (validated once, here, for the HTTP layer
and the service alike), the settings the actors run it with, and its stored record.

``StreamSpec`` is the one validation of a create-stream request: the HTTP API uses it (or a
subclass) as its request body, so a bad field is a 422 naming it; ``StreamSpec.parse`` gives the
service the same checks as a ``ValueError`` naming the field. OmniZip settings are checked by
``OmniZipConfig`` itself, field by field, so their bounds live in one place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

__all__ = ["OmniZipSettings", "StreamRecord", "StreamSettings", "StreamSpec", "validation_message",
           "DEFAULT_METHOD", "MIN_CONTEXT_TOKENS"]

DEFAULT_METHOD = "omnizip"
MIN_CONTEXT_TOKENS = 128
MAX_CONTEXT_TOKENS = 1 << 20  # a hard ceiling; the engine's own (the model's range) is lower
PATCH_PX = 28  # the vision tower's merged patch: frame sides are multiples of it
MAX_SIDE_PX = 4096
_CONTROL = {chr(c) for c in range(0x20)} | {"\x7f"}


def validation_message(exc: ValidationError) -> str:
    """``field.sub: message; ...`` for a pydantic error, as the service's ValueErrors read."""
    parts = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e.get("loc", ())) or "spec"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)


class _Strict(BaseModel):
    """Unknown fields are refused: a typo in a setting must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")


class OmniZipSettings(_Strict):
    """OmniZipConfig fields, all optional (unset ones keep the defaults); each is checked by
    OmniZipConfig's own rule, so a 422 names ``omnizip.<field>``."""

    rho_audio: float | None = None
    rho_video: float | None = None
    contextual_ratio: float | None = None
    g: int | None = None
    min_ratio: float | None = None
    max_ratio: float | None = None
    knn_k: int | None = None
    stream_history_windows: int | None = None

    @field_validator("*")
    @classmethod
    def _field_rule(cls, v: Any, info: Any) -> Any:
        from omnizip.config import OmniZipConfig

        if v is not None:
            OmniZipConfig.check_field(info.field_name, v)
        return v

    @model_validator(mode="after")
    def _whole(self) -> "OmniZipSettings":
        from omnizip.config import OmniZipConfig

        OmniZipConfig.from_dict(self.to_config())  # what spans fields (min_ratio <= max_ratio)
        return self

    def to_config(self) -> dict[str, Any]:
        """Only the fields that were set."""
        return self.model_dump(exclude_none=True)


class StreamSpec(_Strict):
    """What a client asks for when it starts a stream."""

    source: str = Field(min_length=1, max_length=4096,
                        description="rtsp://..., http(s)://..., file path, v4l2:/dev/videoN, lavfi:GRAPH")
    name: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$",
                             description="a friendly name; also usable as the OpenAI `model`")
    method: str = Field(DEFAULT_METHOD, description="compression method (omnizip.METHODS): omnizip, "
                        "keep_all, random, fixed_ratio")
    omnizip: OmniZipSettings | None = None
    context_tokens: int | None = Field(None, ge=MIN_CONTEXT_TOKENS, le=MAX_CONTEXT_TOKENS,
                                       description="rolling context budget in tokens (engine default when unset)")
    lookahead: int = Field(0, ge=0, le=64, description="windows of look-ahead for the compressor")
    realtime: bool | None = Field(None, description="pace files at media speed (live sources always are)")
    backpressure: bool | None = Field(None, description="never drop a window: ingestion waits instead")
    options: dict[str, Any] | None = Field(None, description="source options (pipeline.sources.source.SourceOptions)")
    size: tuple[PositiveInt, PositiveInt] | None = Field(None, description="[height, width] frames are resized "
                                                         f"to: multiples of {PATCH_PX}, at most {MAX_SIDE_PX} a side")

    @field_validator("source")
    @classmethod
    def _clean_source(cls, v: str) -> str:
        if any(c in _CONTROL for c in v):
            raise ValueError("must not contain control characters")
        if not v.strip():
            raise ValueError("must not be blank")
        return v.strip()

    @field_validator("size")
    @classmethod
    def _model_grid(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and any(x % PATCH_PX or x > MAX_SIDE_PX for x in v):
            raise ValueError(f"each side must be a multiple of {PATCH_PX} pixels and at most {MAX_SIDE_PX}, got {list(v)}")
        return v

    @field_validator("options")
    @classmethod
    def _known_options(cls, v: Any) -> Any:
        if isinstance(v, Mapping):  # raw options (the operator's); typed ones are checked by their model
            from pipeline.sources.spec import SourceOptions

            SourceOptions.coerce(v)  # ValueError / TypeError naming the option
        return v

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        from omnizip.methods import METHODS

        if v not in METHODS:
            raise ValueError(f"unknown method {v!r}; known: {sorted(METHODS)}")
        return v

    @classmethod
    def parse(cls, spec: Any) -> "StreamSpec":
        """A spec from plain data (the service's entry); ValueError naming the field."""
        if isinstance(spec, cls):
            return spec
        if isinstance(spec, BaseModel):
            spec = spec.model_dump(exclude_unset=True)
        if not isinstance(spec, Mapping):
            raise ValueError(f"spec must be a mapping, got {type(spec).__name__}")
        try:
            return cls.model_validate(dict(spec))
        except ValidationError as e:
            raise ValueError(validation_message(e)) from None


@dataclass(frozen=True)
class StreamSettings:
    """How the actors run a stream: the compression method and its config, the context budget."""

    omnizip: dict[str, Any]  # OmniZipConfig.to_dict(): every field, defaults filled in
    context_tokens: int
    method: str = DEFAULT_METHOD
    lookahead: int = 0

    def config(self) -> Any:
        """The stream's OmniZipConfig."""
        from omnizip.config import OmniZipConfig

        return OmniZipConfig.from_dict(self.omnizip)


@dataclass
class StreamRecord:
    """A registered stream, as the store keeps it (``to_dict`` / ``from_dict``)."""

    id: str
    source: str
    settings: StreamSettings
    name: str | None = None
    realtime: bool | None = None
    backpressure: bool = False
    options: dict[str, Any] | None = None
    size: tuple[int, int] | None = None
    worker: int = 0
    decoder: int = 0
    status: str = "starting"
    error: str | None = None
    created: float = 0.0
    ingest: dict[str, Any] | None = None  # the ingest actor's final figures, once it is done
    owner: str = ""  # the tenant (pipeline.api.gate.tenant_of the API key) the stream belongs to
    extra: dict[str, Any] = field(default_factory=dict)  # fields a newer engine wrote: kept as they are

    @classmethod
    def from_spec(cls, spec: StreamSpec, default_context_tokens: int, *, worker: int = 0, decoder: int = 0,
                  stream_id: str = "", owner: str = "") -> "StreamRecord":
        from omnizip.config import OmniZipConfig

        oz = OmniZipConfig.from_dict(spec.omnizip.to_config() if spec.omnizip else {})
        settings = StreamSettings(oz.to_dict(), spec.context_tokens or default_context_tokens, spec.method,
                                  spec.lookahead)
        return cls(stream_id, spec.source, settings, spec.name, spec.realtime, bool(spec.backpressure),
                   spec.options, tuple(spec.size) if spec.size else None, worker, decoder, owner=owner)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d["settings"] = dataclasses.asdict(self.settings)
        d["size"] = list(self.size) if self.size else None
        if not d["id"]:
            del d["id"]  # the store assigns it
        return {**self.extra, **d}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StreamRecord":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        s = dict(d.get("settings") or {})
        settings = StreamSettings(dict(s.get("omnizip") or {}), int(s.get("context_tokens", 8192)),
                                  str(s.get("method") or DEFAULT_METHOD), int(s.get("lookahead") or 0))
        kw = {k: d[k] for k in names if k in d and k != "settings"}
        kw["size"] = tuple(kw["size"]) if kw.get("size") else None
        kw["backpressure"] = bool(kw.get("backpressure"))
        return cls(settings=settings, extra={k: v for k, v in d.items() if k not in names}, **kw)
