"""The command line's one settings object: flags over ``OMNIZIP_*`` environment variables over an
optional ``--config FILE`` (TOML, JSON or YAML) over the defaults, validated by pydantic-settings.

Why one object: the engine (``ServiceConfig``), the front door (``pipeline.api.gate``), the source
policy and the CLI each read their own variables; the CLI gathers them here, so a typo in a flag,
a variable or a file is one error naming the setting and where it came from, before Ray starts.
The engine's fields are ``ServiceConfig``'s own (read from the dataclass, so they cannot drift);
docs/configuration.md lists every variable. Importing this module costs no torch and no Ray.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, get_args, get_type_hints

from pydantic import Field, ValidationError, create_model, field_validator
from pydantic_settings import BaseSettings, InitSettingsSource, NoDecode, SettingsConfigDict

from pipeline.cli.checks import SettingsError, parse_ray_address
from pipeline.core.config import ServiceConfig

__all__ = ["Settings", "SettingsError", "load_settings", "LOG_LEVELS", "ENGINE_FIELDS", "GATE_FIELDS",
           "worker_logging", "LOG_LEVEL_ENV"]

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_LEVEL_ENV = "OMNIZIP_LOG_LEVEL"
ENGINE_FIELDS = tuple(f.name for f in dataclasses.fields(ServiceConfig))
GATE_FIELDS = ("api_keys", "insecure", "max_body_bytes", "requests_per_s", "request_burst", "max_open_per_client",
               "body_timeout_s")


class _Base(BaseSettings):
    """Settings beyond the engine's: the front door, the source policy's TLS check, the CLI."""

    model_config = SettingsConfigDict(env_prefix="OMNIZIP_", extra="forbid", validate_default=True)
    config_data: ClassVar[dict[str, Any]] = {}

    # front door (pipeline.api.gate.GateSettings)
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    insecure: bool = False
    max_body_bytes: int = Field(1 << 20, ge=1024)
    requests_per_s: float = Field(20.0, gt=0)
    request_burst: int = Field(40, ge=1)
    max_open_per_client: int = Field(16, ge=1)
    body_timeout_s: float = Field(10.0, gt=0, le=3600)
    # the command line
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    metrics_port: int | None = Field(None, ge=1, le=65535)
    log_level: str = "warning"
    ray_address: str | None = None  # a running cluster to attach to (else a local Ray of the command's own)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: Any) -> Any:
        from pipeline.api.gate import parse_keys

        return list(parse_keys(v)) if isinstance(v, (str, list, tuple)) else v

    @field_validator("ray_address", mode="before")
    @classmethod
    def _ray_address(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip():
            parse_ray_address(v)  # ValueError: the form it must have
            return v.strip()
        return v

    @field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() in LOG_LEVELS:
            return v.strip().lower()
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")

    @field_validator("*", mode="before")
    @classmethod
    def _blank_is_unset(cls, v: Any, info: Any) -> Any:
        """OMNIZIP_DTYPE= (empty) means "no value" for a setting that may have none."""
        field = cls.model_fields.get(info.field_name)
        if v == "" and field is not None and type(None) in get_args(field.annotation):
            return None
        return v

    @classmethod
    def settings_customise_sources(cls, settings_cls: Any, init_settings: Any, env_settings: Any,
                                   dotenv_settings: Any, file_secret_settings: Any) -> tuple:
        """Flags, then the environment, then the --config file."""
        return init_settings, env_settings, InitSettingsSource(settings_cls, dict(cls.config_data))

    # -- what the parts take ---------------------------------------------------------------
    def service_config(self, **overrides: Any) -> ServiceConfig:
        """The engine's settings (ValueError naming a bad field)."""
        return ServiceConfig(**{**{k: getattr(self, k) for k in ENGINE_FIELDS}, **overrides})

    def gate(self) -> dict[str, Any]:
        """pipeline.api.app.build_app's ``gate`` mapping."""
        return {k: getattr(self, k) for k in GATE_FIELDS}

    def level(self) -> int:
        return getattr(logging, self.log_level.upper())


def _engine_field(f: dataclasses.Field, hint: Any) -> tuple[Any, Any]:
    return hint, f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


_hints = get_type_hints(ServiceConfig)
#: every setting: ServiceConfig's fields (OMNIZIP_MODEL, OMNIZIP_REDIS_URL, ...) plus _Base's
Settings = create_model("Settings", __base__=_Base, __doc__=__doc__,
                        **{f.name: _engine_field(f, _hints[f.name]) for f in dataclasses.fields(ServiceConfig)})


def _read_config(path: str | os.PathLike) -> dict[str, Any]:
    """A --config file's settings: TOML (.toml), JSON (.json) or YAML (.yaml/.yml), one table
    of setting names (as in docs/configuration.md, lower case: model = "tiny")."""
    p = Path(path)
    if not p.is_file():
        raise SettingsError(f"--config {str(p)!r}: no such file")
    suffix = p.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(p.read_text())
        elif suffix == ".json":
            data = json.loads(p.read_text())
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(p.read_text()) or {}
        else:
            raise SettingsError(f"--config {p.name!r}: use a .toml, .json or .yaml file")
    except SettingsError:
        raise
    except Exception as e:  # a syntax error: its own words, on one line
        raise SettingsError(f"--config {p.name}: {' '.join(str(e).split())}") from None
    if not isinstance(data, Mapping):
        raise SettingsError(f"--config {p.name}: must hold one table of settings")
    return {str(k).replace("-", "_").lower(): v for k, v in data.items()}


def _where(name: str, flags: Mapping[str, Any], file_data: Mapping[str, Any]) -> str:
    if name in flags:
        return f"--{name.replace('_', '-')}"
    env = f"OMNIZIP_{name.upper()}"
    if env in os.environ:
        return env
    return "--config" if name in file_data else name


def load_settings(flags: Mapping[str, Any] | None = None, config: str | os.PathLike | None = None) -> Any:
    """The settings: ``flags`` (None values are "not given") over the environment over the
    ``config`` file. SettingsError with one line naming the setting and its source."""
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    file_data = _read_config(config) if config else {}
    cls = create_model("Settings", __base__=Settings)
    cls.config_data = file_data
    try:
        s = cls(**given)
    except ValidationError as e:
        parts = []
        for err in e.errors():
            name = str(err["loc"][0]) if err["loc"] else "?"
            msg = str(err["msg"]).removeprefix("Value error, ")
            if err.get("type") == "extra_forbidden":
                parts.append(f"unknown setting {name!r} ({_where(name, given, file_data)})")
            else:
                parts.append(f"{_where(name, given, file_data)}: {msg}")
        raise SettingsError("; ".join(parts)) from None
    try:
        s.service_config()
    except (TypeError, ValueError) as e:
        msg = " ".join(str(e).split())
        head, _, rest = msg.partition(" ")
        if head.startswith("ServiceConfig.") and head[len("ServiceConfig."):] in ENGINE_FIELDS:
            msg = f"{_where(head[len('ServiceConfig.'):], given, file_data)}: {rest}"
        raise SettingsError(msg) from None
    return s


def worker_logging() -> None:
    """Ray's worker_process_setup_hook: the engine's loggers in every actor at the CLI's level
    (OMNIZIP_LOG_LEVEL in the job's runtime_env), written to stderr, which Ray forwards."""
    name = os.environ.get(LOG_LEVEL_ENV, "warning").lower()
    level = getattr(logging, name.upper(), logging.WARNING)
    for logger in ("pipeline", "omnizip"):
        lg = logging.getLogger(logger)
        lg.setLevel(level)
        if not lg.handlers:
            h = logging.StreamHandler()
            h.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            lg.addHandler(h)
            lg.propagate = False
