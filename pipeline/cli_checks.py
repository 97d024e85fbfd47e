"""What the command line checks before it starts Ray or imports torch: the source, the model and
the options, so that a mistake costs one line on stderr, exit code 2 and well under a second
(Ray takes ~10 s to start and torch ~2 s to import; a bad URL used to surface after 12-30 s).

Each check raises :class:`pipeline.settings.SettingsError` with one line. The names the library
knows are mirrored here without importing it (omnizip.models and omnizip.methods import torch);
tests keep them equal to the library's own.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.settings import SettingsError

__all__ = ["PRESET_NAMES", "METHOD_NAMES", "DTYPE_NAMES", "check_source", "check_model", "check_dtype",
           "check_stream_options", "check_port_free", "check_output", "check_store_url"]

PRESET_NAMES = ("tiny", "small", "3b", "7b")  # omnizip.models.PRESETS
METHOD_NAMES = ("omnizip", "keep_all", "random", "fixed_ratio")  # omnizip.METHODS
DTYPE_NAMES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")  # omnizip.models.parse_dtype
CHECKPOINT_TYPES = ("qwen2_5_omni", "qwen2_5_omni_thinker")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def check_source(source: str, policy: Any = None) -> Any:
    """The source's kind (pipeline.sources.classify), the policy's verdict (None: the operator's,
    permissive), and for a file or a device that it exists; returns its SourceSpec."""
    from pipeline.source_policy import SourcePolicy
    from pipeline.source_spec import classify

    pol = policy or SourcePolicy.permissive()
    try:
        spec = classify(source)  # UnsupportedSourceError names the scheme
        pol.kind(source)  # FFmpeg protocols and the like: refused by name
        pol.check(spec.url)
    except ValueError as e:
        raise SettingsError(f"source {_redacted(source)}: {_one_line(e)}") from None
    if spec.kind == "file":
        p = Path(spec.target)
        if not p.exists():
            raise SettingsError(f"source {_redacted(source)}: no such file")
        if p.is_dir():
            raise SettingsError(f"source {_redacted(source)}: is a directory, not a media file")
        if not os.access(p, os.R_OK):
            raise SettingsError(f"source {_redacted(source)}: not readable")
    elif spec.kind == "v4l2" and not os.path.exists(spec.target):
        raise SettingsError(f"source {_redacted(source)}: no such video device")
    return spec


def _redacted(source: str) -> str:
    from pipeline.redact import redact

    return repr(redact(str(source)))


def check_model(model: str) -> None:
    """A preset name, or a local Hugging Face checkpoint of Qwen2.5-Omni (config.json read, weights
    not loaded): the same verdicts omnizip.models.load_model gives after seconds of imports."""
    if model in PRESET_NAMES:
        return
    p = Path(model).expanduser()
    if not p.exists():
        raise SettingsError(f"model {model!r}: not a preset ({', '.join(PRESET_NAMES)}) and no such directory")
    if not (p / "config.json").is_file():
        raise SettingsError(f"model {model!r}: no config.json, not a Hugging Face checkpoint directory")
    try:
        kind = json.loads((p / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise SettingsError(f"model {model!r}: config.json is not readable JSON ({_one_line(e)})") from None
    if kind not in CHECKPOINT_TYPES:
        raise SettingsError(f"model {model!r}: holds a {kind!r} model; a Qwen2.5-Omni checkpoint "
                            f"(model_type {' or '.join(CHECKPOINT_TYPES)}) is needed")


def check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype.lower() not in DTYPE_NAMES:
        raise SettingsError(f"--dtype {dtype!r}: use one of {', '.join(DTYPE_NAMES)}")


@contextlib.contextmanager
def _omnizip_config_only() -> Iterator[None]:
    """``omnizip.config`` importable without running ``omnizip/__init__`` (which imports torch):
    a bare package stands in while the options are judged, and is gone afterwards, so a later
    ``import omnizip`` loads the real one."""
    if "omnizip" in sys.modules:
        yield
        return
    spec = importlib.util.find_spec("omnizip")
    assert spec is not None and spec.submodule_search_locations is not None
    stub = importlib.util.module_from_spec(importlib.util.spec_from_loader("omnizip", loader=None, is_package=True))
    stub.__path__ = list(spec.submodule_search_locations)
    sys.modules["omnizip"] = stub
    try:
        yield
    finally:
        for name in [n for n in sys.modules if n == "omnizip" or n.startswith("omnizip.")]:
            del sys.modules[name]


def check_stream_options(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A stream spec as the engine will judge it (pipeline.records.StreamSpec: method, omnizip
    settings, context budget, lookahead), without torch; returns it parsed to a plain dict."""
    method = spec.get("method") or "omnizip"
    if method not in METHOD_NAMES:
        raise SettingsError(f"--method {method!r}: use one of {', '.join(METHOD_NAMES)}")
    from pydantic import ValidationError

    from pipeline.records import StreamSpec

    with _omnizip_config_only():
        try:
            # the method is known (above); StreamSpec's own check of it would import torch
            parsed = StreamSpec.model_validate({k: v for k, v in spec.items() if k != "method"})
        except ValidationError as e:
            parts = []
            for err in e.errors():
                field = ".".join(str(x) for x in err["loc"])
                flag = "--" + field.split(".")[-1].replace("_", "-")
                parts.append(f"{flag}: {str(err['msg']).removeprefix('Value error, ')}")
            raise SettingsError("; ".join(parts)) from None
    return {**parsed.model_dump(exclude_none=True), "method": method}


def check_port_free(host: str, port: int) -> None:
    """The HTTP port can be bound (nothing else listens there)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise SettingsError(f"--host {host!r}: {e.strerror or e}") from None
    fam, _, _, _, addr = infos[0]
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        try:
            s.bind(addr)
        except OSError as e:
            raise SettingsError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror or e})") from None


def check_store_url(url: str | None) -> None:
    """The store URL's form (no connection is made: Redis may come up after the service)."""
    if url and url != "memory://" and url.split("://", 1)[0] not in ("redis", "rediss", "unix"):
        raise SettingsError(f"--redis-url: scheme must be redis://, rediss:// or unix:// (or none for the "
                            "in-process store)")


def check_output(path: str, suffixes: tuple[str, ...]) -> Path:
    """An output file name with a known suffix in an existing directory."""
    p = Path(path)
    if p.suffix.lower() not in suffixes:
        raise SettingsError(f"-o {path!r}: must end in {' or '.join(suffixes)}")
    if not p.parent.resolve().is_dir():
        raise SettingsError(f"-o {path!r}: no directory {str(p.parent)!r}")
    return p
