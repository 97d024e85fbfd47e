"""OmniZip: audio-guided dynamic token compression for omnimodal LLMs (arXiv 2511.14582),
offline (``compress_clip``) and streaming (``StreamCompressor``).

Read in the paper's order: ``config`` -> ``audio`` (scores to dominant tokens, anchors and
merging) -> ``budget`` (audio retention to video ratios) -> ``video`` (ISTC) -> ``compress``
(the whole clip) -> ``stream`` (window by window). ``methods``: OmniZip and the baselines behind
one interface (``make_method``); ``spec``: a method as plain data (its name and settings, no
torch); ``codec``: the safe bytes of states and windows.

The names below load their modules on first use, so ``omnizip.config`` and ``omnizip.spec``
(plain settings) can be imported where torch must not be (the HTTP replicas)."""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "OmniZipConfig": "config", "PAPER_SETTINGS": "config", "MethodSpec": "spec", "METHOD_NAMES": "spec",
    "compress_clip": "compress", "CompressedClip": "compress", "WindowOutput": "compress",
    "StreamCompressor": "stream", "CompressionMethod": "methods", "METHODS": "methods", "make_method": "methods",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'omnizip' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
