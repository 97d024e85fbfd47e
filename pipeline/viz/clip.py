"""``omnizip-stream viz SOURCE -o OUT.png|OUT.mp4``: what OmniZip keeps of a clip, drawn over it,
offline and without Ray (for reports and the README).

The clip is cut into the engine's 2-s windows (pipeline.sources.windows.iter_windows), encoded by a
model adapter (omnizip.models.load_model, ``tiny`` by default) and compressed by a method
(omnizip.make_method) window by window, as the engine does with ``lookahead=0``; the pictures
are pipeline.viz.window's: kept video patches outlined over the frames, dropped ones dimmed,
the audio envelope with each token's score and kept mark.

OUT.png: one row per window (at most ``max_windows``), its two LLM frames and its audio.
OUT.mp4: every sampled frame (2 fps) with its LLM frame's patches, the window's audio strip
under it with a play head, and the clip's audio (AAC).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.viz import window as V

__all__ = ["render_clip", "VIZ_SUFFIXES"]

VIZ_SUFFIXES = (".png", ".mp4")
PANEL_W = 320  # pixels per LLM frame in the pictures
CAPTION_H = 16


def _caption(img: np.ndarray, text: str) -> np.ndarray:
    """``img`` under a caption strip (PIL's default font)."""
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (img.shape[1], CAPTION_H), tuple(int(v) for v in V.BG))
    ImageDraw.Draw(strip).text((4, 2), text, fill=(230, 232, 238))
    return np.concatenate([np.asarray(strip), img], axis=0)


def _describe(w: Any, o: Any) -> str:
    a_k, a_n = int(o.audio_keep.sum()), int(o.audio_keep.numel())
    v_k, v_n = int(o.video_keep.sum()), int(o.video_keep.numel())
    return (f"window {w.index} [{w.start:.1f}-{w.end:.1f} s]  video {v_k}/{v_n}  audio {a_k}/{a_n}  "
            f"kept {(a_k + v_k) / max(1, a_n + v_n):.1%}")


def _panels(w: Any, enc: Any, o: Any) -> tuple[np.ndarray | None, np.ndarray]:
    """The window's frames picture (None without video) and its audio strip."""
    keep = V._np(o.video_keep, bool)
    audio = V.render_audio(V._np(o.audio_keep, bool), V._np(enc.audio_scores, np.float32), V.envelope(w.audio))
    if not w.has_video or keep.ndim != 2 or keep.shape[0] == 0:
        return None, audio
    thumb = V.thumbnail(w.frames, keep.shape[0], PANEL_W)
    return V.render_frames(thumb, keep, enc.llm_grid_hw, scale=1), audio


class _Sheet:
    """OUT.png: the windows one under another."""

    def __init__(self, path: Path, max_windows: int) -> None:
        self.path, self.max, self.rows = path, max_windows, []

    def add(self, w: Any, enc: Any, o: Any) -> None:
        frames, audio = _panels(w, enc, o)
        img = V.stack_panels(frames, audio) if frames is not None else audio
        self.rows.append(_caption(img, _describe(w, o)))

    def full(self) -> bool:
        return len(self.rows) >= self.max

    def abort(self) -> None:
        self.rows = []

    def close(self) -> None:
        if not self.rows:
            raise ValueError("the source gave no window to draw")
        width = max(r.shape[1] for r in self.rows)
        pad = [np.concatenate([r, np.broadcast_to(V.BG, (r.shape[0], width - r.shape[1], 3)).astype(np.uint8)], 1)
               for r in self.rows]
        sep = np.broadcast_to(V.BG, (8, width, 3)).astype(np.uint8)
        self.path.write_bytes(V.png_bytes(np.concatenate([x for r in pad for x in (r, sep)][:-1], 0)))


class _Movie:
    """OUT.mp4: each sampled frame with its LLM frame's patches and the audio strip under it."""

    def __init__(self, path: Path, max_windows: int) -> None:
        import av

        self.path, self.max, self.n = path, max_windows, 0
        self.box = av.open(str(path), "w")
        self.video = None
        self.audio = self.box.add_stream("aac", rate=16000)
        self.audio.layout = "mono"
        self.resampler = av.AudioResampler(format="fltp", layout="mono", rate=16000, frame_size=1024)
        self.audio_pts = 0

    def full(self) -> bool:
        return self.n >= self.max

    def abort(self) -> None:
        """No half-written file is left behind."""
        try:
            self.box.close()
        finally:
            self.path.unlink(missing_ok=True)

    def add(self, w: Any, enc: Any, o: Any) -> None:
        import av

        self.n += 1
        keep = V._np(o.video_keep, bool)
        audio = V.render_audio(V._np(o.audio_keep, bool), V._np(enc.audio_scores, np.float32), V.envelope(w.audio))
        if w.has_video and keep.ndim == 2 and keep.shape[0]:
            k = len(w.frames)
            thumbs = V.thumbnail(w.frames, k, PANEL_W * 2)  # every sampled frame
            per = keep[np.minimum(np.arange(k) * keep.shape[0] // k, keep.shape[0] - 1)]
            pics = V.overlay(thumbs, per, enc.llm_grid_hw).astype(np.uint8)  # [k, H, W, 3]
        else:
            k = max(1, int(round((w.end - w.start) * w.fps)))
            pics = np.broadcast_to(V.BG, (k, 90, PANEL_W, 3)).astype(np.uint8)
        W = pics.shape[2]
        strip = audio[:, np.arange(W) * audio.shape[1] // W]  # [h, W, 3]
        head = (np.arange(W)[None, :] == (np.arange(k) * W // k)[:, None])  # [k, W]: the play head
        strips = np.where(head[:, None, :, None], np.uint8(255), strip[None])
        frames = np.concatenate([pics, np.broadcast_to(V.BG, (k, 6, W, 3)).astype(np.uint8), strips], axis=1)
        frames = frames[:, : frames.shape[1] // 2 * 2, : W // 2 * 2]  # yuv420p wants even sides
        if self.video is None:
            self.video = self.box.add_stream("libx264", rate=int(round(w.fps)))
            self.video.height, self.video.width = frames.shape[1:3]
            self.video.pix_fmt = "yuv420p"
            self.video.options = {"crf": "23", "preset": "veryfast"}
        for f in frames:
            for p in self.video.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                self.box.mux(p)
        af = av.AudioFrame.from_ndarray(np.asarray(w.audio, np.float32)[None, :], format="fltp", layout="mono")
        af.sample_rate, af.pts = 16000, None
        for r in self.resampler.resample(af):
            r.pts, self.audio_pts = self.audio_pts, self.audio_pts + r.samples
            for p in self.audio.encode(r):
                self.box.mux(p)

    def close(self) -> None:
        if self.video is None:
            self.abort()
            raise ValueError("the source gave no window to draw")
        for s in (self.video, self.audio):
            for p in s.encode(None):
                self.box.mux(p)
        self.box.close()


def _batches(it: Iterator[Any], n: int) -> Iterator[list[Any]]:
    while batch := list(itertools.islice(it, n)):
        yield batch


def render_clip(source: str, out: str | Path, *, model: str = "tiny", method: str = "omnizip",
                omnizip: dict[str, Any] | None = None, max_windows: int | None = None, device: str = "cpu",
                batch: int = 4) -> dict[str, Any]:
    """Draw what ``method`` keeps of ``source`` into ``out`` (.png or .mp4); returns a summary:
    windows drawn and tokens in/kept per modality."""
    from omnizip import OmniZipConfig, make_method
    from omnizip.models import load_model
    from pipeline.sources.windows import iter_windows

    path = Path(out)
    if path.suffix.lower() not in VIZ_SUFFIXES:
        raise ValueError(f"output must end in .png or .mp4, got {path.name!r}")
    limit = max_windows if max_windows is not None else (8 if path.suffix.lower() == ".png" else 10**9)
    adapter = load_model(model, device)
    meth = make_method(method, OmniZipConfig(**(omnizip or {})), lookahead=0)
    sink: Any = _Sheet(path, limit) if path.suffix.lower() == ".png" else _Movie(path, limit)
    tokens = {"audio": {"in": 0, "kept": 0}, "video": {"in": 0, "kept": 0}}
    try:
        for group in _batches(iter(iter_windows(source)), batch):
            encs = adapter.encode_windows([(w.audio, w.frames if w.has_video else None) for w in group],
                                          [w.index for w in group])
            for w, enc in zip(group, encs):
                for o in meth.push(enc.audio, enc.audio_scores, enc.video):
                    if sink.full():
                        break
                    sink.add(w, enc, o)
                    for kind, mask in (("audio", o.audio_keep), ("video", o.video_keep)):
                        tokens[kind]["in"] += int(mask.numel())
                        tokens[kind]["kept"] += int(mask.sum())
            if sink.full():
                break
    except BaseException:
        sink.abort()
        raise
    sink.close()
    n = len(sink.rows) if isinstance(sink, _Sheet) else sink.n
    return {"output": str(path), "windows": n, "tokens": tokens}
