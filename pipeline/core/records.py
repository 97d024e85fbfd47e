"""A stream as the engine knows it: the client's spec (validated once, here, for the HTTP layer
and the service alike), the settings the actors run it with, and its stored record.

``StreamSpec`` is the one validation of a create-stream request: the HTTP API uses it (or a
subclass) as its request body, so a bad field is a 422 naming it; ``StreamSpec.parse`` gives the
service the same checks as a ``ValueError`` naming the field. OmniZip settings are checked by
``OmniZipConfig`` itself, field by field, so their bounds live in one place.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from pydantic import (BaseModel, ConfigDict, Field, PositiveInt, ValidationError, create_model, field_validator,
                      model_validator)

from omnizip.config import OmniZipConfig
from omnizip.spec import METHOD_NAMES, MethodSpec

from pipeline.redact import has_control_chars

__all__ = ["OmniZipSettings", "Strict", "ended_at", "records_to_forget", "StreamRecord", "StreamSettings", "StreamSpec", "validation_message",
           "DEFAULT_METHOD", "MIN_CONTEXT_TOKENS", "smallest_context_tokens", "window_token_bound"]

DEFAULT_METHOD = "omnizip"
MIN_CONTEXT_TOKENS = 128
MAX_CONTEXT_TOKENS = 1 << 20  # a hard ceiling; the engine's own (the model's range) is lower
PATCH_PX = 28  # the vision tower's merged patch: frame sides are multiples of it
MAX_SIDE_PX = 4096

# One window's tokens before compression, without the model (an upper bound; every preset and a
# Qwen2.5-Omni checkpoint share these): 2 s of audio are 50 tokens; 4 frames (2 s at 2 fps) are 2
# temporal groups of (H/28) x (W/28) tokens, the frame scaled into [128, 768] x 28 x 28 pixels.
AUDIO_TOKENS_PER_WINDOW = 50
FRAME_GROUPS_PER_WINDOW = 2
MAX_TOKENS_PER_GROUP = 768  # Qwen's video max_pixels, 768 x 28 x 28 per frame: any larger frame is scaled down
MIN_TOKENS_PER_GROUP = 128  # the largest min_pixels of the presets: a smaller frame is scaled up
# the system prompt's tokens: a byte-level BPE never makes more tokens than bytes, plus the chat
# markers around it; the default prompt (omnizip.models.processor) is 166 bytes
PROMPT_MARKER_TOKENS = 16
DEFAULT_PROMPT_TOKENS = 192


def window_token_bound(size: tuple[int, int] | None) -> int:
    """At most how many tokens one window of a stream takes in the context, whatever the
    compression keeps: its tokens before compression, for frames of ``size`` ([H, W], multiples
    of 28) or, unset, for the largest frame the model takes."""
    per_group = MAX_TOKENS_PER_GROUP
    if size is not None:
        h, w = (max(PATCH_PX, int(x)) for x in size)
        grid = (h // PATCH_PX) * (w // PATCH_PX)
        if grid < MIN_TOKENS_PER_GROUP:  # scaled up, aspect kept, sides rounded up to 28 px
            beta = math.sqrt(MIN_TOKENS_PER_GROUP / grid)
            grid = math.ceil(h * beta / PATCH_PX) * math.ceil(w * beta / PATCH_PX)
        per_group = min(MAX_TOKENS_PER_GROUP, grid)
    return AUDIO_TOKENS_PER_WINDOW + FRAME_GROUPS_PER_WINDOW * per_group


def smallest_context_tokens(size: tuple[int, int] | None, system_prompt: str | None = None) -> int:
    """The smallest context budget that surely holds one window of a stream of frame ``size``
    after the system prompt (``None``: the model's default prompt). A smaller one accepts the
    stream and then holds none of it (every window is too big for the context)."""
    prompt = DEFAULT_PROMPT_TOKENS if system_prompt is None else \
        len(system_prompt.encode("utf-8")) + PROMPT_MARKER_TOKENS
    return prompt + window_token_bound(size) + 1


def validation_message(exc: ValidationError) -> str:
    """``field.sub: message; ...`` for a pydantic error, as the service's ValueErrors read."""
    parts = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e.get("loc", ())) or "spec"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)


class Strict(BaseModel):
    """Unknown fields are refused: a typo in a setting must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")

    @classmethod
    def parse(cls, spec: Any) -> Any:
        """An instance from plain data (the engine's entry, past the HTTP layer); ValueError
        naming the field, as the HTTP layer's 422 does."""
        if isinstance(spec, cls):
            return spec
        if isinstance(spec, BaseModel):
            spec = spec.model_dump(exclude_unset=True)
        if not isinstance(spec, Mapping):
            raise ValueError(f"{cls.__name__} must be a mapping, got {type(spec).__name__}")
        try:
            return cls.model_validate(dict(spec))
        except ValidationError as e:
            raise ValueError(validation_message(e)) from None


class _OmniZipSettingsRules(Strict):
    """OmniZipConfig's own rules over the fields that were set (the fields come from it below)."""

    @field_validator("*")
    @classmethod
    def _field_rule(cls, v: Any, info: Any) -> Any:
        if v is not None:
            OmniZipConfig.check_field(info.field_name, v)
        return v

    @model_validator(mode="after")
    def _whole(self) -> "_OmniZipSettingsRules":
        OmniZipConfig.from_dict(self.to_config())  # what spans fields (min_ratio <= max_ratio)
        return self

    def to_config(self) -> dict[str, Any]:
        """Only the fields that were set."""
        return self.model_dump(exclude_none=True)


#: OmniZipConfig's fields, all optional (unset ones keep the defaults), made from the dataclass
#: itself (never a hand-written copy); each is checked by OmniZipConfig's own rule, so a 422
#: names ``omnizip.<field>``.
OmniZipSettings = create_model(
    "OmniZipSettings", __base__=_OmniZipSettingsRules, __module__=__name__,
    **{f.name: (get_type_hints(OmniZipConfig)[f.name] | None, None) for f in dataclasses.fields(OmniZipConfig)})


class StreamSpec(Strict):
    """What a client asks for when it starts a stream."""

    source: str = Field(min_length=1, max_length=4096,
                        description="rtsp://..., http(s)://..., file path, v4l2:/dev/videoN, lavfi:GRAPH, or whip: (pushed)")
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
        if has_control_chars(v):
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
        if v not in METHOD_NAMES:
            raise ValueError(f"unknown method {v!r}; known: {sorted(METHOD_NAMES)}")
        return v



@dataclass(frozen=True)
class StreamSettings:
    """How the actors run a stream: the compression method and its config, the context budget."""

    omnizip: dict[str, Any]  # OmniZipConfig.to_dict(): every field, defaults filled in
    context_tokens: int
    method: str = DEFAULT_METHOD
    lookahead: int = 0

    def config(self) -> OmniZipConfig:
        """The stream's OmniZipConfig."""
        return OmniZipConfig.from_dict(self.omnizip)

    def method_spec(self) -> MethodSpec:
        """The stream's compression method as data (``.build()`` makes it)."""
        return MethodSpec(self.method, self.config(), self.lookahead)


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


def records_to_forget(records: list[StreamRecord], max_per_owner: int, max_age_s: float, now: float) -> list[str]:
    """The ended and failed streams to forget, oldest first: those ended longer than
    ``max_age_s`` ago, and beyond the newest ``max_per_owner`` of each owner. Pure: the engine
    deletes them (record, windows, state, pictures) in its rounds and before a create."""
    over: dict[str, list[StreamRecord]] = {}
    for r in records:
        if r.status in ("ended", "failed"):
            over.setdefault(r.owner, []).append(r)
    out: list[tuple[float, str]] = []
    for recs in over.values():
        recs.sort(key=ended_at, reverse=True)  # newest first
        for k, r in enumerate(recs):
            if k >= max_per_owner or now - ended_at(r) > max_age_s:
                out.append((ended_at(r), r.id))
    return [sid for _, sid in sorted(out)]


def ended_at(rec: StreamRecord) -> float:
    """When the stream ended (the ingest writes it), else when it was created (older records)."""
    value = rec.extra.get("ended_at")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float(rec.created)
