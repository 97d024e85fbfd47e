"""Plain data with tensors <-> bytes: one codec for everything OmniZip and the service persist
(compressor and method state, compressed windows).

Format: one safetensors blob. The tensors go in as named tensors; the structure around them
(dicts, lists, tuples, numbers, strings, None) goes in the safetensors metadata as JSON with
``{"__tensor__": name}`` placeholders. Why safetensors and not ``torch.save``: the bytes come
back from a shared network store, and loading them must never run code (pickle can); the
format is a documented standard any safetensors reader can open, and the same object gives the
same bytes, so a retried write is byte-identical.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

__all__ = ["CodecError", "encode", "decode"]

_SKELETON = "omnizip.skeleton"
_TENSOR, _TUPLE, _DICT = "__tensor__", "__tuple__", "__dict__"


class CodecError(ValueError):
    """The object cannot be encoded, or the bytes are not an encoded object."""


def encode(obj: Any) -> bytes:
    """Serialise nested plain data holding tensors (any device; stored on CPU)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            name = str(len(tensors))
            tensors[name] = x.detach().to("cpu").contiguous().clone()
            return {_TENSOR: name}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, tuple):
            return {_TUPLE: [walk(v, f"{path}[{i}]") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(x)]
        if isinstance(x, Mapping):
            if all(isinstance(k, str) for k in x) and not ({_TENSOR, _TUPLE, _DICT} & set(x)):
                return {k: walk(v, f"{path}.{k}") for k, v in x.items()}
            for k in x:
                if not isinstance(k, (str, int, bool)) and k is not None:
                    raise CodecError(f"{path}: dict key {k!r} of type {type(k).__name__} "
                                     "is not str/int/bool/None")
            return {_DICT: [[k, walk(v, f"{path}[{k!r}]")] for k, v in x.items()]}
        raise CodecError(f"{path}: cannot encode a value of type {type(x).__name__}")

    skeleton = walk(obj, "obj")
    return _st_save(tensors, metadata={_SKELETON: json.dumps(skeleton)})


def _skeleton(data: bytes) -> Any:
    """The JSON structure stored in the header, or CodecError saying why there is none."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"not an encoded object: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < 8:
        raise CodecError(f"not an encoded object: {len(data)} bytes")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        raise CodecError("not an encoded object: header longer than the data")
    try:
        header = json.loads(data[8 : 8 + n])
        meta = header.get("__metadata__") or {}
        return json.loads(meta[_SKELETON])
    except (ValueError, AttributeError, TypeError) as e:
        raise CodecError(f"not an encoded object: bad header ({e})") from None
    except KeyError:
        raise CodecError("not an encoded object: no omnizip skeleton in the metadata") from None


def decode(data: bytes) -> Any:
    """Inverse of :func:`encode`; tensors come back on CPU with their dtype and shape.

    Raises CodecError (a ValueError) on bytes that are not an encoded object."""
    skeleton = _skeleton(data)
    try:
        tensors = _st_load(bytes(data))
    except Exception as e:  # safetensors raises its own error types
        raise CodecError(f"not an encoded object: {e}") from None

    def build(x: Any) -> Any:
        if isinstance(x, list):
            return [build(v) for v in x]
        if isinstance(x, dict):
            if _TENSOR in x:
                try:
                    return tensors[x[_TENSOR]]
                except (KeyError, TypeError):
                    raise CodecError(f"not an encoded object: no tensor named {x[_TENSOR]!r}") from None
            if _TUPLE in x:
                return tuple(build(v) for v in x[_TUPLE])
            if _DICT in x:
                return {k: build(v) for k, v in x[_DICT]}
            return {k: build(v) for k, v in x.items()}
        return x

    try:
        return build(skeleton)
    except (TypeError, ValueError) as e:
        if isinstance(e, CodecError):
            raise
        raise CodecError(f"not an encoded object: malformed skeleton ({e})") from None
