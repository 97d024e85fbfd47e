"""Model adapters. `load_model(name_or_path)` builds a preset (random weights) or loads a local checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from .adapter import ModelAdapter, PromptTokens, fold_messages
from .detok import IncrementalDetokenizer
from .errors import InputShapeError, ModelLoadError
from .presets import PRESETS
from .window import CompressedWindow, EncodedWindow, compress_encoded, compress_with

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """torch dtype from a CLI string ('bf16', 'float32', ...); None stays None (the device's default)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


def load_model(name_or_path: str | Path, device: str | torch.device = "cpu",
               dtype: str | torch.dtype | None = None, seed: int = 0) -> ModelAdapter:
    """A model adapter: a preset name (tiny|small|3b|7b, random weights) or a local checkpoint directory.

    Checkpoints are read with local_files_only; a missing path, a non-checkpoint directory or another
    architecture raises ModelLoadError with the reason.
    """
    from .qwen2_5_omni import build_preset, load_checkpoint

    dt = parse_dtype(dtype)
    if isinstance(name_or_path, str) and name_or_path in PRESETS:
        return build_preset(name_or_path, device, dt, seed)
    return load_checkpoint(name_or_path, device, dt)


def __getattr__(name: str):
    """Heavy classes on first use, so `CompressedWindow` users do not import the modeling code."""
    if name == "RollingContext":
        from .rolling import RollingContext

        return RollingContext
    if name == "Qwen25OmniAdapter":
        from .qwen2_5_omni import Qwen25OmniAdapter

        return Qwen25OmniAdapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["load_model", "parse_dtype", "PRESETS", "CompressedWindow", "EncodedWindow", "compress_encoded",
           "compress_with", "ModelLoadError", "InputShapeError", "RollingContext", "Qwen25OmniAdapter",
           "ModelAdapter", "PromptTokens", "fold_messages", "IncrementalDetokenizer"]
