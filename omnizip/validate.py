"""Input checks for the public API: every error is a ValueError that names the argument."""
from __future__ import annotations

from collections.abc import Sequence

import torch


def check_tensor(name: str, x: object, ndim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    return x


def check_finite(name: str, x: torch.Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf values")


def check_group_sizes(name: str, sizes: object, total: int, total_name: str) -> list[int]:
    if isinstance(sizes, torch.Tensor):
        sizes = sizes.tolist()
    if not isinstance(sizes, Sequence) or isinstance(sizes, (str, bytes)):
        raise ValueError(f"{name} must be a list of non-negative integers, got {type(sizes).__name__}")
    out: list[int] = []
    for i, n in enumerate(sizes):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{name}[{i}] must be a non-negative integer, got {n!r}")
        out.append(int(n))
    if sum(out) != total:
        raise ValueError(f"{name} must add up to {total_name} = {total}, but adds up to {sum(out)}")
    return out


def check_clip(
    audio: object,
    audio_scores: object,
    video: object,
    audio_group_sizes: object,
    video_group_frames: object,
    *,
    allow_empty: bool = False,
) -> tuple[list[int], list[int]]:
    """Validates a clip (or, with ``allow_empty``, one stream window) and returns the group lists."""
    audio = check_tensor("audio", audio, 2)
    audio_scores = check_tensor("audio_scores", audio_scores, 1)
    video = check_tensor("video", video, 3)
    if audio_scores.shape[0] != audio.shape[0]:
        raise ValueError(
            f"audio_scores has {audio_scores.shape[0]} entries but audio has {audio.shape[0]} tokens"
        )
    if video.shape[2] != audio.shape[1]:
        raise ValueError(f"video has D = {video.shape[2]} but audio has D = {audio.shape[1]}")
    for name, x in (("audio_scores", audio_scores), ("video", video)):
        if x.device != audio.device:
            raise ValueError(f"{name} is on {x.device} but audio is on {audio.device}")
    if not allow_empty:
        if audio.shape[0] == 0:
            raise ValueError("audio is empty: a clip needs at least one audio token")
        if video.shape[0] == 0 or video.shape[1] == 0:
            raise ValueError(f"video is empty (shape {tuple(video.shape)}): a clip needs at least one frame")
    if audio.shape[1] == 0:
        raise ValueError("audio has embedding size D = 0")
    check_finite("audio_scores", audio_scores)  # embeddings: see ops.inverse_norm(name=...)
    groups_a = check_group_sizes("audio_group_sizes", audio_group_sizes, audio.shape[0], "the audio token count")
    groups_v = check_group_sizes("video_group_frames", video_group_frames, video.shape[0], "the video frame count")
    if len(groups_a) != len(groups_v):
        raise ValueError(
            f"audio_group_sizes has {len(groups_a)} groups but video_group_frames has {len(groups_v)}"
        )
    if not groups_a:
        raise ValueError("audio_group_sizes is empty: a clip has at least one time group")
    return groups_a, groups_v
