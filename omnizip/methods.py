"""Token compression methods behind one interface, chosen by name (``make_method``).

Every method compresses a stream window by window (``push`` / ``flush``, with the same
lookahead and state contract as ``StreamCompressor``) and a whole clip at once
(``compress_clip``), so the engine, the offline prompt and the benchmarks can swap OmniZip for a
baseline without knowing which one runs:

- ``omnizip``: the method itself (``StreamCompressor``, SPEC sections 2 and 4).
- ``keep_all``: no compression; the reference every saving is measured against.
- ``random``: OmniZip's per-window token counts, tokens chosen at random: isolates *which*
  tokens OmniZip keeps from *how many*.
- ``fixed_ratio``: OmniZip without audio guidance: audio top-k by score (no anchors, no
  merging), video ISTC at ``rho_video`` in every window.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np
import torch

from . import compress as _offline
from .audio import dominant_count
from .compress import CompressedClip, WindowOutput, compress_windows
from .config import OmniZipConfig
from .spec import METHOD_NAMES
from .ops import inverse_norm, top_k_mask, work_dtype
from .stream import StreamCompressor, check_lookahead, check_same_stream
from .validate import check_clip
from .video import istc_keep

__all__ = ["CompressionMethod", "METHODS", "make_method", "KeepAll", "RandomKeep", "FixedRatio"]


@runtime_checkable
class CompressionMethod(Protocol):
    """What the engine needs of a compression method (``StreamCompressor`` is one)."""

    name: str
    cfg: OmniZipConfig
    lookahead: int | None

    def push(self, audio: torch.Tensor, audio_scores: torch.Tensor, video: torch.Tensor, *,
             harder: bool = False) -> list[WindowOutput]: ...

    def flush(self) -> list[WindowOutput]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def compress_clip(self, audio: torch.Tensor, audio_scores: torch.Tensor, video: torch.Tensor,
                      audio_group_sizes: Sequence[int], video_group_frames: Sequence[int]) -> CompressedClip: ...


def _config(cfg: OmniZipConfig | None) -> OmniZipConfig:
    cfg = OmniZipConfig() if cfg is None else cfg
    if not isinstance(cfg, OmniZipConfig):
        raise ValueError(f"cfg must be an OmniZipConfig, got {type(cfg).__name__}")
    return cfg


class WindowMethod:
    """A method whose windows are compressed independently of the stream's past.

    Subclasses define ``_clip`` (the method on a clip of validated groups); this class adds the
    stream mechanics they share with ``StreamCompressor``: input checks, the lookahead queue,
    window indices, ``harder`` (``cfg.stricter()`` on a lone window, for methods with
    ``honours_harder``), the offline flush of a stream held whole, and the state."""

    name: ClassVar[str]
    honours_harder: ClassVar[bool] = True

    def __init__(self, cfg: OmniZipConfig | None = None, lookahead: int | None = 0) -> None:
        self.cfg = _config(cfg)
        self.lookahead = check_lookahead(lookahead)
        self._next_index = 0
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # index, audio, scores, video

    def _clip(self, audio: torch.Tensor, audio_scores: torch.Tensor, video: torch.Tensor,
              sizes_a: list[int], sizes_v: list[int], cfg: OmniZipConfig) -> CompressedClip:
        raise NotImplementedError

    def compress_clip(self, audio: torch.Tensor, audio_scores: torch.Tensor, video: torch.Tensor,
                      audio_group_sizes: Sequence[int], video_group_frames: Sequence[int]) -> CompressedClip:
        """The method on a whole clip (same arguments, checks and result as ``omnizip.compress_clip``)."""
        sizes_a, sizes_v = check_clip(audio, audio_scores, video, audio_group_sizes, video_group_frames)
        with torch.no_grad():
            return self._clip(audio, audio_scores, video, sizes_a, sizes_v, self.cfg)

    def push(self, audio: torch.Tensor, audio_scores: torch.Tensor, video: torch.Tensor, *,
             harder: bool = False) -> list[WindowOutput]:
        """Add one window; return the windows that became final (see ``StreamCompressor.push``)."""
        check_clip(audio, audio_scores, video, [audio.shape[0]], [video.shape[0]], allow_empty=True)
        for _, held_audio, _, held_video in self._pending[:1]:
            check_same_stream(held_audio, held_video, video)
        index, self._next_index = self._next_index, self._next_index + 1
        window = (index, audio.detach(), audio_scores.detach(), video.detach())
        if harder and self.honours_harder and self.lookahead == 0 and not self._pending:
            return [self._one(window, self.cfg.stricter(), harder=True)]
        self._pending.append(window)
        done = []
        while self.lookahead is not None and len(self._pending) > self.lookahead:
            done.append(self._one(self._pending.pop(0), self.cfg))
        return done

    def flush(self) -> list[WindowOutput]:
        """Finalise every held-back window; a stream held whole gets the offline method."""
        pending, self._pending = self._pending, []
        if not pending:
            return []
        if self._next_index > len(pending):  # some windows were emitted already: one at a time
            return [self._one(w, self.cfg) for w in pending]
        with torch.no_grad():
            parts = compress_windows([w[1:] for w in pending], lambda *clip: self._clip(*clip, self.cfg))
        return [dataclasses.replace(part, index=w[0]) for w, part in zip(pending, parts)]

    def _one(self, window: tuple, cfg: OmniZipConfig, harder: bool = False) -> WindowOutput:
        index, *tensors = window
        with torch.no_grad():
            (out,) = compress_windows([tuple(tensors)], lambda *clip: self._clip(*clip, cfg))
        return dataclasses.replace(out, index=index, harder=harder)

    def state_dict(self) -> dict:
        """Plain data: config, next index and the held-back windows (none with lookahead 0)."""
        return {
            "format": f"omnizip.method.{self.name}/1",
            "config": self.cfg.to_dict(),
            "lookahead": self.lookahead,
            "next_index": self._next_index,
            "pending": [{"index": i, "audio": a, "scores": s, "video": v} for i, a, s, v in self._pending],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue a stream from ``state_dict()`` output (same method and config required)."""
        _check_state(state, f"omnizip.method.{self.name}/1", self.cfg)
        try:
            pending = [(int(w["index"]), w["audio"], w["scores"], w["video"]) for w in state["pending"]]
            self._next_index = int(state["next_index"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"state is incomplete or malformed: {exc!r}") from exc
        self._pending = pending


def _check_state(state: object, fmt: str, cfg: OmniZipConfig) -> None:
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise ValueError(f"state is not a {fmt} state")
    if not isinstance(state.get("config"), dict) or OmniZipConfig.from_dict(state["config"]) != cfg:
        raise ValueError("state was saved with a different OmniZipConfig than this method's")


class KeepAll(WindowMethod):
    """Every token kept, audio unchanged: the uncompressed prompt, as a method."""

    name = "keep_all"
    honours_harder = False  # "no compression" stays no compression when the stream is behind

    def _clip(self, audio, audio_scores, video, sizes_a, sizes_v, cfg):
        keep_a = torch.ones(audio.shape[0], dtype=torch.bool, device=audio.device)
        keep_v = torch.ones(video.shape[:2], dtype=torch.bool, device=video.device)
        return CompressedClip(keep_a, audio.clone(), keep_v, [0.0] * len(sizes_a))


class FixedRatio(WindowMethod):
    """OmniZip without audio guidance (the ablation): the top ``round((1 - rho_audio) * Na)``
    audio tokens by score, no anchors or merging; ISTC at ``rho_video`` in every group."""

    name = "fixed_ratio"

    def _clip(self, audio, audio_scores, video, sizes_a, sizes_v, cfg):
        keep_a = top_k_mask(audio_scores, dominant_count(audio_scores.shape[0], cfg.rho_audio))
        frames = video.to(work_dtype(video))
        ratios = [cfg.rho_video] * len(sizes_v)
        keep_v = istc_keep(frames, inverse_norm(frames, "video"), sizes_v, ratios, cfg.knn_k)
        return CompressedClip(keep_a, audio.clone(), keep_v, ratios)


def randomised(out: WindowOutput, audio: torch.Tensor, seed: int) -> WindowOutput:
    """``out`` with the same number of kept audio tokens and of kept video tokens per frame,
    chosen uniformly at random; original (unmerged) ``audio``.

    One generator per (seed, window index), so a window's choice depends neither on the windows
    before it nor on how the stream was cut into calls. numpy's, because its seed takes both
    numbers whole (torch's CPU generator keeps only 32 bits of its seed)."""
    rng = np.random.default_rng([seed % 2**64, out.index])
    keep_a = top_k_mask(torch.from_numpy(rng.random(tuple(out.audio_keep.shape))), out.audio_kept)
    keep_v = top_k_mask(torch.from_numpy(rng.random(tuple(out.video_keep.shape))), out.video_keep.sum(dim=-1).cpu())
    return dataclasses.replace(out, audio_keep=keep_a.to(out.audio_keep.device), audio=audio.clone(),
                               video_keep=keep_v.to(out.video_keep.device))


class RandomKeep:
    """Random tokens at OmniZip's budget: an inner ``StreamCompressor`` decides how many audio
    and video tokens each window keeps, a generator seeded by (seed, window index) which."""

    name = "random"
    seeded: ClassVar[bool] = True

    def __init__(self, cfg: OmniZipConfig | None = None, lookahead: int | None = 0, *, seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self._inner = StreamCompressor(cfg, lookahead)
        self.cfg, self.lookahead, self.seed = self._inner.cfg, self._inner.lookahead, seed
        self._held: list[tuple[int, torch.Tensor]] = []  # original audio of windows the inner holds back

    def push(self, audio: torch.Tensor, audio_scores: torch.Tensor, video: torch.Tensor, *,
             harder: bool = False) -> list[WindowOutput]:
        index = self._inner.windows_pushed
        outs = self._inner.push(audio, audio_scores, video, harder=harder)  # checks the input
        self._held.append((index, audio.detach()))
        return self._randomised(outs)

    def flush(self) -> list[WindowOutput]:
        return self._randomised(self._inner.flush())

    def _randomised(self, outs: list[WindowOutput]) -> list[WindowOutput]:
        done = []
        for out in outs:
            index, audio = self._held.pop(0)
            assert index == out.index, (index, out.index)
            done.append(randomised(out, audio, self.seed))
        return done

    def compress_clip(self, audio: torch.Tensor, audio_scores: torch.Tensor, video: torch.Tensor,
                      audio_group_sizes: Sequence[int], video_group_frames: Sequence[int]) -> CompressedClip:
        """OmniZip's offline counts per group, random tokens (group i drawn as window i)."""
        sizes_a, sizes_v = check_clip(audio, audio_scores, video, audio_group_sizes, video_group_frames)
        clip = _offline.compress_clip(audio, audio_scores, video, sizes_a, sizes_v, self.cfg)
        parts = [randomised(w, a, self.seed) for w, a in zip(clip.windows(sizes_a, sizes_v), audio.split(sizes_a))]
        return CompressedClip(torch.cat([w.audio_keep for w in parts]), audio.clone(),
                              torch.cat([w.video_keep for w in parts]), clip.video_ratios)

    def state_dict(self) -> dict:
        return {"format": "omnizip.method.random/1", "config": self.cfg.to_dict(), "seed": self.seed,
                "inner": self._inner.state_dict(), "held": [{"index": i, "audio": a} for i, a in self._held]}

    def load_state_dict(self, state: dict) -> None:
        _check_state(state, "omnizip.method.random/1", self.cfg)
        try:
            self._inner.load_state_dict(state["inner"])
            self.seed = int(state["seed"])
            self._held = [(int(h["index"]), h["audio"]) for h in state["held"]]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"state is incomplete or malformed: {exc!r}") from exc


#: Every method by name; ``make_method`` builds one.
METHODS: dict[str, type] = {
    "omnizip": StreamCompressor,
    "keep_all": KeepAll,
    "random": RandomKeep,
    "fixed_ratio": FixedRatio,
}
assert tuple(METHODS) == METHOD_NAMES, "omnizip.spec.METHOD_NAMES names the methods implemented here"


def make_method(name: str, cfg: OmniZipConfig | None = None, *, lookahead: int | None = 0,
                seed: int = 0) -> CompressionMethod:
    """A fresh method by name (``seed`` is used by ``random`` only)."""
    cls = METHODS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown compression method {name!r}; known methods: {', '.join(METHODS)}")
    if getattr(cls, "seeded", False):
        return cls(cfg, lookahead, seed=seed)
    return cls(cfg, lookahead)
