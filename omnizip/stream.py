"""OmniZip window by window, for live streams (SPEC section 4).

Each 2-s window is compressed when it closes (or, with a lookahead of L windows, when L more
have arrived), from that window and the recent past only. The two global steps of the offline
method get causal stand-ins (``DominanceTracker``, ``VideoRatioController``); anchors, merging
and ISTC run inside the window exactly as offline. A compressor that is flushed before it has
emitted anything holds the whole stream, so it applies the offline method to it.

``StreamCompressor`` is the ``"omnizip"`` method of ``omnizip.methods``."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .audio import DominanceTracker, VideoRef, kept_fraction, select_audio
from .budget import VideoRatioController, base_ratio
from . import compress as _offline
from .compress import CompressedClip, WindowOutput, compress_groups, compress_windows
from .config import OmniZipConfig
from .ops import inverse_norm, work_dtype
from .validate import check_clip
from .video import istc_keep

STATE_FORMAT = "omnizip.stream/1"


def check_lookahead(lookahead: object) -> int | None:
    """``lookahead`` as given, or ValueError: windows held back must be None or an integer >= 0."""
    if lookahead is not None and (isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 0):
        raise ValueError(f"lookahead must be None or an integer >= 0, got {lookahead!r}")
    return lookahead


def check_same_stream(held_audio: torch.Tensor, held_video: torch.Tensor, video: torch.Tensor) -> None:
    """A new window's ``video`` must match a held window's D and tokens per frame: held windows
    may be compressed together as one clip."""
    if held_audio.shape[1] != video.shape[2]:
        raise ValueError(f"video has D = {video.shape[2]} but this stream's windows have D = {held_audio.shape[1]}")
    if held_video.shape[0] and video.shape[0] and held_video.shape[1] != video.shape[1]:
        raise ValueError(f"video has {video.shape[1]} tokens per frame but this stream's frames have {held_video.shape[1]}")


@dataclass(frozen=True)
class _Window:
    """A pushed window awaiting finalisation, with the norms computed when it was checked."""

    index: int
    audio: torch.Tensor
    scores: torch.Tensor
    video: torch.Tensor
    audio_inv_norm: torch.Tensor
    video_inv_norm: torch.Tensor

    @classmethod
    def checked(cls, index: int, audio: torch.Tensor, scores: torch.Tensor, video: torch.Tensor) -> "_Window":
        audio_inv = inverse_norm(audio.detach().to(work_dtype(audio)), "audio")
        video_inv = inverse_norm(video.detach().to(work_dtype(video)), "video")
        return cls(index, audio.detach(), scores.detach(), video.detach(), audio_inv, video_inv)


class StreamCompressor:
    """Push windows, get compressed windows back; ``state_dict`` persists the stream's state.

    ``lookahead``: windows held back before a window is final (0: each window is final at
    once; None: nothing is final until ``flush``, which then equals ``compress_clip``).
    """

    name = "omnizip"

    def __init__(self, cfg: OmniZipConfig | None = None, lookahead: int | None = 0) -> None:
        self.cfg = OmniZipConfig() if cfg is None else cfg
        if not isinstance(self.cfg, OmniZipConfig):
            raise ValueError(f"cfg must be an OmniZipConfig, got {type(self.cfg).__name__}")
        self.lookahead = check_lookahead(lookahead)
        self._next_index = 0
        self._pending: list[_Window] = []
        self._dominance = DominanceTracker(
            self.cfg.rho_audio, self.cfg.contextual_ratio, self.cfg.stream_history_windows
        )
        self._controller = VideoRatioController(self.cfg, self.cfg.stream_history_windows)

    @property
    def windows_pushed(self) -> int:
        return self._next_index

    def push(self, audio: torch.Tensor, audio_scores: torch.Tensor, video: torch.Tensor, *,
             harder: bool = False) -> list[WindowOutput]:
        """Add one window (``[Na_i, D]``, ``[Na_i]``, ``[F_i, P, D]``); return the windows that became final.

        ``harder`` (the stream fell behind live): when nothing is held back (lookahead 0), the
        window is compressed at once by the offline method on itself with ``cfg.stricter()``
        and flagged ``harder``; it counts as a window (its index) but leaves the audio and video
        histories untouched, so the stream's targets are not skewed by it. Otherwise ignored.
        """
        check_clip(audio, audio_scores, video, [audio.shape[0]], [video.shape[0]], allow_empty=True)
        self._check_matches_stream(video)
        if harder and self.lookahead == 0 and not self._pending:
            return [self._harder(audio, audio_scores, video)]
        self._pending.append(_Window.checked(self._next_index, audio, audio_scores, video))
        self._next_index += 1
        done: list[WindowOutput] = []
        with torch.no_grad():
            while self.lookahead is not None and len(self._pending) > self.lookahead:
                done.append(self._finalise_next())
        return done

    def _harder(self, audio: torch.Tensor, audio_scores: torch.Tensor, video: torch.Tensor) -> WindowOutput:
        index, self._next_index = self._next_index, self._next_index + 1
        with torch.no_grad():
            (out,) = compress_windows([(audio.detach(), audio_scores.detach(), video.detach())],
                                      lambda *clip: compress_groups(*clip, self.cfg.stricter()))
        return dataclasses.replace(out, index=index, harder=True)

    def compress_clip(self, audio: torch.Tensor, audio_scores: torch.Tensor, video: torch.Tensor,
                      audio_group_sizes: Sequence[int], video_group_frames: Sequence[int]) -> CompressedClip:
        """The offline method (``omnizip.compress_clip``) with this compressor's config; no state."""
        return _offline.compress_clip(audio, audio_scores, video, audio_group_sizes, video_group_frames, self.cfg)

    def flush(self) -> list[WindowOutput]:
        """Finalise every held-back window (end of stream)."""
        if not self._pending:
            return []
        with torch.no_grad():
            if self._next_index == len(self._pending):  # nothing emitted yet: the whole stream is here
                return self._finalise_all_offline()
            done = []
            while self._pending:
                done.append(self._finalise_next())
            return done

    def _check_matches_stream(self, video: torch.Tensor) -> None:
        for w in self._pending[:1]:
            check_same_stream(w.audio, w.video, video)

    def _finalise_next(self) -> WindowOutput:
        cfg = self.cfg
        window = self._pending.pop(0)
        ahead = self._pending if self.lookahead is None else self._pending[: self.lookahead]
        frames = window.video.to(work_dtype(window.video))
        inv = window.video_inv_norm
        salient, *ahead_salient = self._dominance.salient_counts(window.scores, [w.scores for w in ahead])
        num_audio = window.scores.shape[0]
        n_dom = self._dominance.dominant_count(salient, num_audio)
        sel = select_audio(
            window.audio, window.scores, n_dom, cfg.contextual_ratio, cfg.g,
            VideoRef.from_frames(frames, inv), window.audio_inv_norm,
        )
        num_video = frames.shape[0] * frames.shape[1]
        ratio = cfg.rho_video
        if num_audio:
            # The video budget follows this window's own audio density (its salient tokens),
            # not the catch-up that keeps the audio total on target.
            b = base_ratio(kept_fraction(num_audio, salient, cfg.contextual_ratio), cfg)
            estimates = [
                (base_ratio(kept_fraction(na, n, cfg.contextual_ratio), cfg), w.video.shape[0] * w.video.shape[1])
                for w, n in zip(ahead, ahead_salient)
                if (na := w.scores.shape[0])
            ]
            ratio = self._controller.ratio(b, num_video, estimates)
        video_keep = istc_keep(frames, inv, [frames.shape[0]], [ratio], cfg.knn_k)
        self._dominance.record(window.scores, int(sel.keep.sum()))
        if num_audio:
            self._controller.record(b, num_video, num_video - int(video_keep.sum()))
        return WindowOutput(window.index, sel.keep, sel.audio, video_keep, ratio)

    def _finalise_all_offline(self) -> list[WindowOutput]:
        windows, self._pending = self._pending, []
        parts = compress_windows([(w.audio, w.scores, w.video) for w in windows],
                                 lambda *clip: compress_groups(*clip, self.cfg))
        out = []
        for w, part in zip(windows, parts):
            num_audio = w.scores.shape[0]
            self._dominance.record(w.scores, part.audio_kept)
            if num_audio:
                num_video = part.video_keep.numel()
                self._controller.record(base_ratio(part.audio_kept / num_audio, self.cfg), num_video,
                                        num_video - part.video_kept)
            out.append(dataclasses.replace(part, index=w.index))
        return out

    def state_dict(self) -> dict:
        """Plain data; its size stops growing once the history is full (plus held-back windows)."""
        return {
            "format": STATE_FORMAT,
            "config": self.cfg.to_dict(),
            "lookahead": self.lookahead,
            "next_index": self._next_index,
            "audio_history": self._dominance.state_dict(),
            "video_history": self._controller.state_dict(),
            "pending": [
                {"index": w.index, "audio": w.audio, "scores": w.scores, "video": w.video} for w in self._pending
            ],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue a stream from ``state_dict()`` output (same config required)."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"state is not a StreamCompressor state ({STATE_FORMAT})")
        if OmniZipConfig.from_dict(state["config"]) != self.cfg:
            raise ValueError("state was saved with a different OmniZipConfig than this compressor's")
        try:
            self._dominance.load_state_dict(state["audio_history"])
            self._controller.load_state_dict(state["video_history"])
            self._pending = [_Window.checked(int(w["index"]), w["audio"], w["scores"], w["video"]) for w in state["pending"]]
            self._next_index = int(state["next_index"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"state is incomplete or malformed: {exc!r}") from exc
