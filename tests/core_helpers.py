"""Random clips and streams for the core tests, and the loop reference from bench/."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location(
    "loop_reference", Path(__file__).resolve().parents[1] / "bench" / "loop_reference.py"
)
loop_reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(loop_reference)


def random_clip(seed: int, groups: int = 6, d: int = 16, p: int = 8, max_audio: int = 30, max_frames: int = 3):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, max_audio + 1, (groups,), generator=g).tolist()
    frames = torch.randint(0, max_frames + 1, (groups,), generator=g).tolist()
    sizes[0] = max(sizes[0], 1)
    frames[0] = max(frames[0], 1)
    audio = torch.randn(sum(sizes), d, generator=g)
    scores = torch.rand(sum(sizes), generator=g)
    video = torch.randn(sum(frames), p, d, generator=g)
    return audio, scores, video, sizes, frames


def window_stream(seed: int, windows: int, d: int = 32, p: int = 32, na: int = 50, frames: int = 2, skew: bool = True):
    """Windows shaped like the model's (50 audio tokens, 2 LLM frames) with scores whose
    spread varies from window to window, as real audio does (silence vs speech)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(windows):
        sharpness = float(torch.empty(()).uniform_(0.5, 4.0, generator=g)) if skew else 1.0
        scores = torch.rand(na, generator=g) ** sharpness
        scores = scores / scores.sum() * 0.5
        out.append((torch.randn(na, d, generator=g), scores, torch.randn(frames, p, d, generator=g)))
    return out
