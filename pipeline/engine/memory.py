"""How much memory a stream's context takes and how much a decoder gives its contexts, so the
engine admits, places or refuses streams by it (issue 19: nothing limited what one decoder took
on, and a decoder OOM-killed while rebuilding came back into the same death).

A context of ``context_tokens`` holds at most that many tokens of keys and values in every
layer: layers x kv heads x head dim x 2 x dtype bytes per token (pipeline.core.pool). The sizes
come from the model's text config: the loaded model's in a decoder, a checkpoint's config.json
or a preset's shape in the service (no weights loaded).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.core.pool import kv_bytes_per_token

__all__ = ["CPU_SHARE", "GPU_SHARE", "default_memory_bytes", "dtype_bytes", "model_kv_bytes_per_token",
           "text_kv_bytes_per_token"]

CPU_SHARE = 0.25  # of the node's memory, for one decoder's contexts on CPU
GPU_SHARE = 0.6  # of the GPU memory left once the model is loaded

_TWO_BYTES = ("bfloat16", "bf16", "float16", "fp16", "half")


def dtype_bytes(dtype: Any, device: str) -> int:
    """Bytes of one cached value: the dtype's, else the device's default (bf16 on CUDA, fp32 on CPU)."""
    if dtype is None:
        return 2 if str(device).startswith("cuda") else 4
    size = getattr(dtype, "itemsize", None)  # a torch.dtype
    if isinstance(size, int):
        return size
    return 2 if str(dtype).lower().removeprefix("torch.") in _TWO_BYTES else 4


def text_kv_bytes_per_token(text: Mapping[str, Any] | Any, nbytes: int) -> int:
    """KV bytes per token of a text config (a mapping or a transformers config object)."""
    get = text.get if isinstance(text, Mapping) else (lambda k: getattr(text, k, None))
    heads = int(get("num_attention_heads"))
    head_dim = get("head_dim") or int(get("hidden_size")) // heads
    return kv_bytes_per_token(int(get("num_hidden_layers")), int(get("num_key_value_heads") or heads),
                              int(head_dim), nbytes)


def _checkpoint_text(path: Path) -> Mapping[str, Any]:
    raw = json.loads((path / "config.json").read_text())
    if "thinker_config" in raw:
        raw = raw["thinker_config"]
    return raw.get("text_config") or raw


def model_kv_bytes_per_token(model: str, dtype: Any, device: str) -> int:
    """KV bytes per token of ``model`` (a preset name or a checkpoint directory) without loading it."""
    path = Path(model)
    if (path / "config.json").is_file():
        text = _checkpoint_text(path)
    else:
        from omnizip.models.presets import get_preset  # the preset's shape only

        text = get_preset(model).text
    return text_kv_bytes_per_token(text, dtype_bytes(dtype, device))


def default_memory_bytes(device: str) -> int:
    """A decoder's context memory when none is configured: ``GPU_SHARE`` of its GPU's free
    memory (after the model), or ``CPU_SHARE`` of its node's memory."""
    if str(device).startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free * GPU_SHARE)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = _cgroup_limit()
    return int(min(total, limit or total) * CPU_SHARE)


def _cgroup_limit() -> int | None:
    """The memory limit of this process's cgroup (v2), None when it has none or it is unknown:
    a container's limit, not the host's memory, is what the kernel kills at."""
    try:
        rel = next(line.split("::", 1)[1].strip() for line in Path("/proc/self/cgroup").read_text().splitlines()
                   if line.startswith("0::"))
        raw = (Path("/sys/fs/cgroup") / rel.lstrip("/") / "memory.max").read_text().strip()
    except (OSError, StopIteration):
        return None
    return None if raw == "max" else int(raw)
