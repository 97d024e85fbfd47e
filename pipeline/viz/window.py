"""What a window kept, as pictures: the record the encoder stores per window (kept masks, audio
scores, a small thumbnail of the frames, the audio envelope) and the PNGs drawn from it (the
frames with their kept video patches outlined and the dropped ones dimmed; the audio envelope
with each token's score and whether it was kept).

Why a record of its own (a store blob of kind ``viz``) and not more window fields: the fields
stay a few scalars that every listing reads; the picture data (a few KB, mostly the JPEG
thumbnail) is read only when someone looks, and only the newest windows keep it
(``Retention.max_blob_windows``). The thumbnail is cut when the raw window is at hand (the
encoder's ``_compress``) and the record is finished when the method's masks are final (``_emit``,
after any lookahead). Drawing is numpy over whole pixel grids: no loop over patches or frames.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["VIZ_KIND", "RawSide", "raw_side", "build_record", "encode_record", "decode_record",
           "window_record", "overlay", "side_by_side", "render_frames", "render_audio", "frames_png", "audio_png",
           "png_bytes", "stack_panels", "thumbnail", "envelope"]

log = logging.getLogger(__name__)

VIZ_KIND = "viz"  # the store blob kind
VIZ_FORMAT = "omnizip.viz/1"
THUMB_W = 160  # thumbnail width, pixels (each LLM frame)
ENVELOPE_BINS = 250  # audio envelope columns per window (8 ms each)
FLAGS = ("audio_gap", "video_gap", "discontinuity", "final")
ACCENT = np.array([40, 220, 130], np.float32)  # kept video patch outline
AUDIO_KEPT = np.array([255, 170, 40], np.float32)
AUDIO_DROPPED = np.array([90, 96, 110], np.float32)
BG = np.array([22, 24, 30], np.float32)


@dataclass(frozen=True)
class RawSide:
    """What the picture needs from the raw window, kept while the method holds it back."""

    thumb: np.ndarray | None  # uint8 [F, th, tw, 3]: one frame per LLM frame; None without video
    envelope: np.ndarray  # float32 [2, bins]: min and max of the audio in each bin
    flags: dict[str, bool] = field(default_factory=dict)


def thumbnail(frames: np.ndarray, n_llm_frames: int, width: int = THUMB_W) -> np.ndarray | None:
    """One raw frame per LLM frame (the first of each temporal pair), area-averaged down to
    ``width`` pixels (never up); None when there is no picture."""
    import torch

    if frames.ndim != 4 or n_llm_frames < 1 or 0 in frames.shape:
        return None
    step = max(1, frames.shape[0] // n_llm_frames)
    k = max(1, frames.shape[2] // (2 * width))  # decimate first: area-averaging 1080p costs 70 ms
    picked = frames[::step][:n_llm_frames, ::k, ::k]
    h, w = picked.shape[1:3]
    tw = min(width, w)
    th = max(1, round(h * tw / w))
    x = torch.from_numpy(np.ascontiguousarray(picked)).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(th, tw), mode="area")
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def envelope(audio: np.ndarray, bins: int = ENVELOPE_BINS) -> np.ndarray:
    """[2, bins] min/max of the samples in each bin (zeros for silence or no audio)."""
    a = np.asarray(audio, np.float32).reshape(-1)
    if a.size == 0:
        return np.zeros((2, bins), np.float32)
    per = -(-a.size // bins)
    a = np.pad(a, (0, per * bins - a.size)).reshape(bins, per)
    return np.stack([a.min(1), a.max(1)]).astype(np.float32)


def raw_side(window: Any, n_llm_frames: int) -> RawSide | None:
    """From a pipeline.sources.windows.AVWindow and its encoded LLM frame count; None (no picture, the
    window goes on) if anything about it is unexpected."""
    try:
        thumb = thumbnail(window.frames, n_llm_frames) if window.has_video else None
        return RawSide(thumb, envelope(window.audio), {k: bool(getattr(window, k, False)) for k in FLAGS})
    except Exception as e:
        log.warning("window %s: no picture data: %r", getattr(window, "index", "?"), e)
        return None


def _np(x: Any, dtype: Any) -> np.ndarray:
    return np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype)


def build_record(enc: Any, out: Any, raw: RawSide | None, start: float, end: float) -> dict[str, Any]:
    """The stored record of one window: ``enc`` an omnizip.models.EncodedWindow, ``out`` the
    method's WindowOutput (audio_keep [Na], video_keep [F, P]), ``raw`` the raw side (or None)."""
    import torch
    from PIL import Image

    thumb = None
    if raw is not None and raw.thumb is not None:
        buf = io.BytesIO()
        f, th, tw, _ = raw.thumb.shape
        Image.fromarray(raw.thumb.reshape(f * th, tw, 3)).save(buf, "JPEG", quality=80)
        thumb = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    return {"format": VIZ_FORMAT, "index": int(enc.index), "start": float(start), "end": float(end),
            "grid": tuple(int(v) for v in enc.llm_grid_hw),
            "audio_keep": torch.as_tensor(_np(out.audio_keep, bool)),
            "audio_scores": torch.as_tensor(_np(enc.audio_scores, np.float32)),
            "video_keep": torch.as_tensor(_np(out.video_keep, bool)),
            "video_ratio": float(out.video_ratio), "harder": bool(getattr(out, "harder", False)),
            "thumb_jpeg": thumb, "thumb_frames": 0 if raw is None or raw.thumb is None else int(raw.thumb.shape[0]),
            "envelope": None if raw is None else torch.as_tensor(raw.envelope, dtype=torch.float16),
            "flags": dict(raw.flags) if raw is not None else {}}


def encode_record(rec: dict[str, Any]) -> bytes:
    from omnizip.codec import encode

    return encode(rec)


def decode_record(data: bytes) -> dict[str, Any]:
    """The record with numpy arrays (``thumb`` decoded to [F, th, tw, 3]); ValueError if the
    bytes are not one."""
    from omnizip.codec import decode

    rec = decode(data)
    if not isinstance(rec, dict) or rec.get("format") != VIZ_FORMAT:
        raise ValueError(f"not a window picture record ({VIZ_FORMAT})")
    out = dict(rec)
    for k, dt in (("audio_keep", bool), ("audio_scores", np.float32), ("video_keep", bool), ("envelope", np.float32)):
        out[k] = None if rec.get(k) is None else _np(rec[k].float() if k == "envelope" else rec[k], dt)
    out["thumb"] = None
    if rec.get("thumb_jpeg") is not None and rec.get("thumb_frames"):
        from PIL import Image

        img = np.asarray(Image.open(io.BytesIO(rec["thumb_jpeg"].numpy().tobytes())).convert("RGB"))
        f = int(rec["thumb_frames"])
        out["thumb"] = img.reshape(f, img.shape[0] // f, img.shape[1], 3)
    return out


def window_record(enc: Any, out: Any, raw: RawSide | None, timing: Any) -> tuple[dict[str, Any], bytes | None]:
    """The scalars a window's picture adds to its stored fields (video ratio, gap flags) and its
    picture record's bytes, which the encoder stores with the window in the same write (kind
    ``VIZ_KIND``). Best effort: a failure costs the picture (None), never the window."""
    extra: dict[str, Any] = {"video_ratio": round(float(out.video_ratio), 4)}
    if raw is not None:
        extra.update(raw.flags)
    try:
        return extra, encode_record(build_record(enc, out, raw, timing.start, timing.end))
    except Exception as e:
        log.warning("window %s: no picture: %r", getattr(enc, "index", "?"), e)
        return extra, None


# --- drawing -----------------------------------------------------------------------------
def _edges(n: int, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Cell index of each of ``n`` pixels, and whether the pixel is a cell's first or last."""
    idx = np.arange(n) * max(cells, 1) // max(n, 1)
    return idx, (idx != np.roll(idx, 1)) | (idx != np.roll(idx, -1))


def overlay(frames: np.ndarray, video_keep: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Frames [N, H, W, 3] with the kept patches of ``video_keep`` [N, h*w] (one mask row per
    frame, on the h x w grid) outlined and the dropped ones dimmed; float32."""
    h, w = int(grid[0]), int(grid[1])
    img = np.asarray(frames, np.float32)
    H, W = img.shape[1:3]
    rows, row_edge = _edges(H, h)
    cols, col_edge = _edges(W, w)
    kept = np.asarray(video_keep, bool).reshape(-1, h, w)[:, rows[:, None], cols[None, :]]  # [N, H, W]
    edge = row_edge[:, None] | col_edge[None, :]
    gray = img.mean(-1, keepdims=True)
    out = np.where(kept[..., None], img, 0.22 * img + 0.12 * gray)
    return np.where((kept & edge[None])[..., None], ACCENT, out)


def side_by_side(imgs: np.ndarray, gap: int = 4) -> np.ndarray:
    """[N, H, W, 3] -> [H, N*W + (N-1)*gap, 3] uint8, ``gap`` background columns between."""
    n, H, W = imgs.shape[:3]
    out = np.concatenate([imgs, np.broadcast_to(BG, (n, H, gap, 3))], axis=2)
    return out.transpose(1, 0, 2, 3).reshape(H, n * (W + gap), 3)[:, : n * (W + gap) - gap].astype(np.uint8)


def render_frames(frames: np.ndarray, video_keep: np.ndarray, grid: tuple[int, int], scale: int = 2,
                  gap: int = 4) -> np.ndarray:
    """Frames [F, H, W, 3] (one per LLM frame) side by side, each with the kept patches of its
    LLM frame (``video_keep`` [F, h*w]) outlined and the dropped ones dimmed."""
    n = min(frames.shape[0], video_keep.shape[0])
    if n == 0 or int(grid[0]) * int(grid[1]) != video_keep.shape[-1]:
        return np.full((90, 160, 3), BG, np.uint8)
    img = frames[:n]
    if scale > 1:
        img = img.repeat(scale, axis=1).repeat(scale, axis=2)
    return side_by_side(overlay(img, video_keep[:n], grid), gap)


def render_audio(audio_keep: np.ndarray, scores: np.ndarray, env: np.ndarray | None, cell: int = 10,
                 wave_h: int = 48, bar_h: int = 64, mark_h: int = 8, width: int | None = None) -> np.ndarray:
    """The window's audio, top to bottom: the waveform envelope (coloured where its token was
    kept), each token's score as a bar (kept: orange, dropped: grey), a mark under each kept one."""
    keep = np.asarray(audio_keep, bool).reshape(-1)
    n = max(keep.size, 1)
    W = int(width) if width else n * cell
    tok = np.minimum(np.arange(W) * n // W, keep.size - 1) if keep.size else np.zeros(W, int)
    k_col = keep[tok] if keep.size else np.zeros(W, bool)
    colour = np.where(k_col[:, None], AUDIO_KEPT, AUDIO_DROPPED)  # [W, 3]
    e = np.zeros((2, 1), np.float32) if env is None else np.asarray(env, np.float32)
    b = np.arange(W) * e.shape[1] // W
    peak = max(float(np.abs(e).max()), 1e-6)
    mid = (wave_h - 1) / 2
    top, bot = mid - e[1, b] / peak * mid, mid - e[0, b] / peak * mid
    y = np.arange(wave_h)[:, None]
    wave = (y >= np.floor(top)) & (y <= np.ceil(bot))
    s = np.asarray(scores, np.float32).reshape(-1)
    s = s / max(float(s.max()), 1e-12) if s.size else np.zeros(1, np.float32)
    height = np.round(s[np.minimum(tok, s.size - 1)] * (bar_h - 4)) + 1
    pos = np.arange(W) * n % W  # where in its token's cell a column lies: < n first, >= W - n last
    body = (pos >= n) & (pos < W - n) if W >= 3 * n else np.ones(W, bool)  # a gap between bars
    yb = np.arange(bar_h)[:, None]
    bars = (yb >= bar_h - height[None, :]) & body[None, :]
    marks = np.broadcast_to(k_col & body, (mark_h, W))
    parts = [np.where(wave[..., None], colour, BG), np.broadcast_to(BG, (3, W, 3)),
             np.where(bars[..., None], colour, BG), np.broadcast_to(BG, (3, W, 3)),
             np.where(marks[..., None], AUDIO_KEPT, BG)]
    return np.concatenate(parts, axis=0).astype(np.uint8)


def stack_panels(top: np.ndarray, bottom: np.ndarray, gap: int = 6) -> np.ndarray:
    """``bottom`` stretched (nearest) to ``top``'s width, under it."""
    W = top.shape[1]
    cols = np.arange(W) * bottom.shape[1] // W
    sep = np.broadcast_to(BG, (gap, W, 3)).astype(np.uint8)
    return np.concatenate([top, sep, bottom[:, cols]], axis=0)


def png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def frames_png(rec: dict[str, Any]) -> bytes:
    """frames.png of a decoded record (a placeholder when the window had no picture)."""
    thumb, keep = rec.get("thumb"), rec.get("video_keep")
    if thumb is None or keep is None or keep.ndim != 2:
        return png_bytes(np.full((90, 160, 3), BG, np.uint8))
    return png_bytes(render_frames(thumb, keep, rec["grid"]))


def audio_png(rec: dict[str, Any]) -> bytes:
    """audio.png of a decoded record."""
    return png_bytes(render_audio(rec["audio_keep"], rec["audio_scores"], rec.get("envelope")))
