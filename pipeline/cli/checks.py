"""What the command line checks before it starts Ray or imports torch: the source, the model and
the options, so that a mistake costs one line on stderr, exit code 2 and well under a second
(Ray takes ~10 s to start and torch ~2 s to import; a bad URL used to surface after 12-30 s).

Each check raises :class:`SettingsError` with one line. The names the library
knows are mirrored here without importing it (omnizip.models and omnizip.methods import torch);
tests keep them equal to the library's own.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import socket
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from omnizip.spec import METHOD_NAMES


__all__ = ["SettingsError", "PRESET_NAMES", "METHOD_NAMES", "DTYPE_NAMES", "check_source", "check_model", "check_dtype",
           "check_stream_options", "check_port_free", "check_output", "check_store_url", "parse_ray_address",
           "check_ray_address"]


class SettingsError(ValueError):
    """A setting is wrong; the message is one line naming it."""


PRESET_NAMES = ("tiny", "small", "3b", "7b")  # omnizip.models.PRESETS
DTYPE_NAMES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")  # omnizip.models.parse_dtype
CHECKPOINT_TYPES = ("qwen2_5_omni", "qwen2_5_omni_thinker")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def check_source(source: str, policy: Any = None) -> Any:
    """The source's kind (pipeline.sources.source.classify), the policy's verdict (None: the operator's,
    permissive), and for a file or a device that it exists; returns its SourceSpec."""
    from pipeline.sources.policy import SourcePolicy
    from pipeline.sources.spec import classify

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
    """A stream spec as the engine will judge it (pipeline.core.records.StreamSpec: method, omnizip
    settings, context budget, lookahead), without torch; returns it parsed to a plain dict."""
    method = spec.get("method") or "omnizip"
    if method not in METHOD_NAMES:
        raise SettingsError(f"--method {method!r}: use one of {', '.join(METHOD_NAMES)}")
    from pydantic import ValidationError

    from pipeline.core.records import StreamSpec

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
    """The HTTP port can be bound (nothing else listens there). With SO_REUSEADDR, as the real
    server (uvicorn) binds: connections of a stopped server still in TIME_WAIT must not block a
    restart for a minute, while a socket that listens there is still refused (Linux)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise SettingsError(f"--host {host!r}: {e.strerror or e}") from None
    fam, _, _, _, addr = infos[0]
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise SettingsError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror or e})") from None


def check_store_url(url: str | None, timeout_s: float = 2.0) -> None:
    """The store URL's form, and a Redis that answers there must not evict keys (an evicting
    ``maxmemory-policy`` loses stored windows and streams without an error). A Redis that does
    not answer yet is not judged: it may come up after the service, which checks the policy
    again before every create (pipeline.store.redis_store.RedisStore.check_policy)."""
    if not url or url == "memory://":
        return
    if url.split("://", 1)[0] not in ("redis", "rediss", "unix"):
        raise SettingsError("--redis-url: scheme must be redis://, rediss:// or unix:// (or none for the "
                            "in-process store)")
    from pipeline.store.redis_store import RedisStore, evicting, eviction_message

    try:
        store = RedisStore(url, retries=0, socket_timeout_s=timeout_s)
    except Exception:  # a malformed URL: the service reports it where it connects
        return
    try:
        policy = store.eviction_policy()
    except Exception:  # not answering (yet): nothing to judge
        return
    finally:
        store.close()
    if evicting(policy):
        raise SettingsError(f"--redis-url: {eviction_message(str(policy))}")


def check_output(path: str, suffixes: tuple[str, ...]) -> Path:
    """An output file name with a known suffix in an existing directory."""
    p = Path(path)
    if p.suffix.lower() not in suffixes:
        raise SettingsError(f"-o {path!r}: must end in {' or '.join(suffixes)}")
    if not p.parent.resolve().is_dir():
        raise SettingsError(f"-o {path!r}: no directory {str(p.parent)!r}")
    return p


_RAY_ADDRESS = re.compile(r"^(ray://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?):([0-9]{1,5})$")
RAY_ADDRESS_FORM = "must be host:port (the head's GCS port, as `ray start --head` prints it) or ray://host:port"


def parse_ray_address(address: str) -> tuple[bool, str, int]:
    """(Ray Client?, host, port) of a cluster address ``host:port`` or ``ray://host:port``;
    ValueError with the form it must have."""
    m = _RAY_ADDRESS.match(address.strip())
    if m is None or not 1 <= int(m.group(4)) <= 65535:
        raise ValueError(RAY_ADDRESS_FORM)
    return bool(m.group(1)), m.group(2).strip("[]"), int(m.group(4))


# an HTTP/2 client's opening (RFC 9113 3.4): the preface, then an empty SETTINGS frame; a gRPC
# server (Ray's GCS, the Ray Client server) answers with a SETTINGS frame of its own
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def check_ray_address(address: str, where: str = "--ray-address", timeout_s: float = 3.0) -> None:
    """The cluster's address has the right form and a gRPC server answers there (as Ray's GCS
    and the Ray Client server do): ray.init would otherwise wait minutes on a wrong address."""
    try:
        client, host, port = parse_ray_address(address)
    except ValueError as e:
        raise SettingsError(f"{where} {address!r}: {e}") from None
    hint = (f"is the cluster up? (`ray start --head --port {port}` starts a head there)" if not client else
            "is the cluster up and its Ray Client server on that port?")
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(_H2_PREFACE)
            head = b""
            while len(head) < 9:
                chunk = sock.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
    except socket.gaierror as e:
        raise SettingsError(f"{where} {address}: cannot resolve {host!r} ({e.strerror or e})") from None
    except TimeoutError:
        raise SettingsError(f"{where} {address}: nothing answers there within {timeout_s:g} s; {hint}") from None
    except OSError as e:
        raise SettingsError(f"{where} {address}: nothing answers there ({e.strerror or type(e).__name__}); "
                            f"{hint}") from None
    if len(head) < 9 or head[3] != 0x04:  # not an HTTP/2 SETTINGS frame
        raise SettingsError(f"{where} {address}: something listens there but it is not a Ray cluster (no gRPC "
                            "answer); give the head's GCS address (host:port, as `ray start --head` prints it)")
