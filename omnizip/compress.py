"""OmniZip on a whole clip (SPEC sections 2 and 5): audio selection, audio-guided video
ratios, then ISTC, in the order of the paper."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .audio import VideoRef, dominant_count, select_audio
from .budget import offline_video_ratios
from .config import OmniZipConfig
from .ops import inverse_norm, work_dtype
from .validate import check_clip
from .video import istc_keep


@dataclass(frozen=True)
class WindowOutput:
    """One compressed window; tensors on the input's device. ``harder``: compressed with
    ``cfg.stricter()`` because its stream fell behind live (``push(..., harder=True)``)."""

    index: int
    audio_keep: torch.Tensor  # bool [Na_i]
    audio: torch.Tensor  # [Na_i, D], merged anchors written in
    video_keep: torch.Tensor  # bool [F_i, P]
    video_ratio: float
    harder: bool = False

    @property
    def audio_kept(self) -> int:
        return int(self.audio_keep.sum())

    @property
    def video_kept(self) -> int:
        return int(self.video_keep.sum())


@dataclass(frozen=True)
class CompressedClip:
    """What ``compress_clip`` returns; tensors are on the input's device."""

    audio_keep: torch.Tensor  # bool [Na]
    audio: torch.Tensor  # [Na, D], merged anchors written in
    video_keep: torch.Tensor  # bool [F, P]
    video_ratios: list[float]  # one discard ratio per time group

    @property
    def retention(self) -> float:
        """Kept multimodal tokens / all multimodal tokens (SPEC section 3)."""
        total = self.audio_keep.numel() + self.video_keep.numel()
        kept = int(self.audio_keep.sum()) + int(self.video_keep.sum())
        return kept / total if total else 1.0

    def windows(self, audio_group_sizes: Sequence[int], video_group_frames: Sequence[int]) -> list[WindowOutput]:
        """The result cut into one ``WindowOutput`` per time group (index = group position)."""
        parts = zip(
            self.audio_keep.split(list(audio_group_sizes)),
            self.audio.split(list(audio_group_sizes)),
            self.video_keep.split(list(video_group_frames)),
            self.video_ratios,
        )
        return [WindowOutput(i, keep_a, audio, keep_v, ratio) for i, (keep_a, audio, keep_v, ratio) in enumerate(parts)]


Window = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # audio [Na_i, D], scores [Na_i], video [F_i, P, D]
ClipFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, list[int], list[int]], CompressedClip]


def compress_windows(windows: Sequence[Window], compress: ClipFn) -> list[WindowOutput]:
    """Consecutive windows compressed as one clip by ``compress(audio, scores, video, sizes_a,
    sizes_v)``, cut back into windows (index = position): how a stream that held every window
    until its flush matches the offline method. A window without frames adds none to the clip
    and gets an empty mask of its own shape (its P may differ from the clip's)."""
    ref = windows[0][0]
    with_video = [v for _, _, v in windows if v.shape[0]]
    video = torch.cat(with_video) if with_video else ref.new_zeros(0, 1, ref.shape[1])
    sizes_a = [s.shape[0] for _, s, _ in windows]
    sizes_v = [v.shape[0] for _, _, v in windows]
    clip = compress(torch.cat([a for a, _, _ in windows]), torch.cat([s for _, s, _ in windows]), video, sizes_a, sizes_v)
    return [
        part if v.shape[0] else dataclasses.replace(
            part, video_keep=torch.zeros(v.shape[:2], dtype=torch.bool, device=part.video_keep.device))
        for part, (_, _, v) in zip(clip.windows(sizes_a, sizes_v), windows)
    ]


def group_retention(audio_keep: torch.Tensor, audio_group_sizes: Sequence[int]) -> list[float | None]:
    """Kept fraction of each group's audio tokens; None for a group without audio."""
    sizes = torch.tensor(list(audio_group_sizes), dtype=torch.long)
    group_of = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
    kept = torch.zeros(len(sizes), dtype=torch.long).index_add_(0, group_of, audio_keep.cpu().long())
    return [k / n if n else None for k, n in zip(kept.tolist(), sizes.tolist())]


def compress_groups(
    audio: torch.Tensor,
    audio_scores: torch.Tensor,
    video: torch.Tensor,
    audio_group_sizes: Sequence[int],
    video_group_frames: Sequence[int],
    cfg: OmniZipConfig,
) -> CompressedClip:
    """The offline method on validated inputs (no emptiness requirement)."""
    frames = video.to(work_dtype(video))
    inv = inverse_norm(frames, "video")
    audio_inv = inverse_norm(audio.to(work_dtype(audio)), "audio")
    selection = select_audio(
        audio,
        audio_scores,
        dominant_count(audio.shape[0], cfg.rho_audio),
        cfg.contextual_ratio,
        cfg.g,
        VideoRef.from_frames(frames, inv),
        audio_inv,
    )
    retention = group_retention(selection.keep, audio_group_sizes)
    tokens = [f * video.shape[1] for f in video_group_frames]
    ratios = offline_video_ratios(retention, tokens, cfg)
    video_keep = istc_keep(frames, inv, video_group_frames, ratios, cfg.knn_k)
    return CompressedClip(selection.keep, selection.audio, video_keep, ratios)


def compress_clip(
    audio: torch.Tensor,
    audio_scores: torch.Tensor,
    video: torch.Tensor,
    audio_group_sizes: Sequence[int],
    video_group_frames: Sequence[int],
    cfg: OmniZipConfig | None = None,
) -> CompressedClip:
    """Compress one clip: ``audio`` [Na, D], ``audio_scores`` [Na], ``video`` [F, P, D] (LLM
    frames), grouped into 2-s time groups by ``audio_group_sizes`` / ``video_group_frames``.

    Raises ValueError naming the argument on bad input. Inputs are never modified.
    """
    cfg = OmniZipConfig() if cfg is None else cfg
    if not isinstance(cfg, OmniZipConfig):
        raise ValueError(f"cfg must be an OmniZipConfig, got {type(cfg).__name__}")
    groups_a, groups_v = check_clip(audio, audio_scores, video, audio_group_sizes, video_group_frames)
    with torch.no_grad():
        return compress_groups(audio, audio_scores, video, groups_a, groups_v, cfg)
