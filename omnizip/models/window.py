"""What one 2-s window becomes: `EncodedWindow` (encoder output) and `CompressedWindow` (what the decoder gets).

`CompressedWindow` is the hand-over from encoder workers to the decoder and to Redis: plain tensors
and ints, picklable, with `to_dict`/`from_dict` (plain data) and `to_bytes`/`from_bytes` (the
`omnizip.codec` blob, safetensors: loading never runs code).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from omnizip.codec import CodecError, decode, encode


WINDOW_FORMAT = "omnizip.window/1"


@dataclass
class EncodedWindow:
    """One window through the stock encoders, before compression.

    audio [Na, D] (Na = 50), audio_scores [Na] (SPEC section 1), video [F, P, D] (F = 2 LLM frames),
    position_ids [3, F*P + Na] for the sequence order video-then-audio, including `offset`.
    """

    index: int
    audio: torch.Tensor
    audio_scores: torch.Tensor
    video: torch.Tensor
    position_ids: torch.Tensor
    offset: int
    llm_grid_hw: tuple[int, int]

    @property
    def n_video(self) -> int:
        return self.video.shape[0] * self.video.shape[1]

    @property
    def n_audio(self) -> int:
        return self.audio.shape[0]


@dataclass
class CompressedWindow:
    """The kept tokens of one window in sequence order, with their original TMRoPE positions.

    embeds [n, D]; position_ids [3, n] (long) including `offset`, the position where the stream's
    multimodal block starts in the prompt it was encoded for (a decoder with another prompt re-bases).
    `max_position` is the largest position of the UNCOMPRESSED window: text after it continues from
    there + 1, as in the uncompressed sequence (SPEC 2.4).
    """

    index: int
    embeds: torch.Tensor
    position_ids: torch.Tensor
    offset: int
    audio_in: int
    audio_kept: int
    video_in: int
    video_kept: int
    video_ratio: float = 0.0
    max_position: int = -1

    def __post_init__(self) -> None:
        if self.max_position < 0 and self.position_ids.numel():
            self.max_position = int(self.position_ids.max())
        if self.embeds.ndim != 2 or self.position_ids.shape != (3, self.embeds.shape[0]):
            raise ValueError(f"CompressedWindow: embeds {tuple(self.embeds.shape)} and position_ids "
                             f"{tuple(self.position_ids.shape)} must be [n, D] and [3, n]")
        if self.audio_kept + self.video_kept != self.embeds.shape[0]:
            raise ValueError("CompressedWindow: audio_kept + video_kept must equal the number of embeddings")

    @property
    def n_tokens(self) -> int:
        return int(self.embeds.shape[0])

    def rebased(self, offset: int) -> "CompressedWindow":
        """The same window for a prompt whose multimodal block starts at `offset`."""
        if offset == self.offset:
            return self
        shift = offset - self.offset
        return CompressedWindow(**{**self._fields(), "position_ids": self.position_ids + shift, "offset": offset,
                                   "max_position": self.max_position + shift})

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "CompressedWindow":
        return CompressedWindow(**{**self._fields(), "embeds": self.embeds.to(device, dtype),
                                   "position_ids": self.position_ids.to(device)})

    def to_dict(self) -> dict:
        """Plain data (two CPU tensors, ints, a float)."""
        return {**self._fields(), "embeds": self.embeds.detach().cpu(), "position_ids": self.position_ids.detach().cpu()}

    @classmethod
    def from_dict(cls, data: dict) -> "CompressedWindow":
        return cls(**data)

    def to_bytes(self) -> bytes:
        """`omnizip.codec` bytes; the same window always gives the same bytes (idempotent store writes)."""
        return encode({"format": WINDOW_FORMAT, **self.to_dict()})

    @classmethod
    def from_bytes(cls, data: bytes) -> "CompressedWindow":
        """Inverse of `to_bytes`; CodecError (a ValueError) on bytes that are not a window."""
        d = decode(data)
        if not isinstance(d, dict) or d.pop("format", None) != WINDOW_FORMAT:
            raise CodecError(f"not a CompressedWindow ({WINDOW_FORMAT})")
        names = {f.name for f in fields(cls)}
        if set(d) != names or not all(isinstance(d[k], torch.Tensor) for k in ("embeds", "position_ids")):
            raise CodecError(f"not a CompressedWindow: fields {sorted(d)}, expected {sorted(names)}")
        return cls(**d)

    def _fields(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def compress_encoded(enc: EncodedWindow, audio_keep: torch.Tensor | None = None, audio: torch.Tensor | None = None,
                     video_keep: torch.Tensor | None = None, video_ratio: float = 0.0) -> CompressedWindow:
    """Keep the selected tokens of `enc` (all when masks are None), in order, with their positions.

    `audio` is the compressor's audio with merged anchors written in ([Na, D]); masks are bool
    [Na] and [F, P] as `compress_clip` / `StreamCompressor` return them.
    """
    n_video = enc.n_video
    a_keep = torch.ones(enc.n_audio, dtype=torch.bool) if audio_keep is None else audio_keep.bool().cpu()
    v_keep = torch.ones(n_video, dtype=torch.bool) if video_keep is None else video_keep.bool().reshape(-1).cpu()
    if a_keep.shape != (enc.n_audio,) or v_keep.shape != (n_video,):
        raise ValueError(f"keep masks must be [{enc.n_audio}] and {tuple(enc.video.shape[:2])}")
    audio_src = enc.audio if audio is None else audio.to(enc.audio.device, enc.audio.dtype)
    keep = torch.cat([v_keep, a_keep]).to(enc.audio.device)
    embeds = torch.cat([enc.video.reshape(n_video, enc.video.shape[-1]), audio_src])[keep]  # [0, D] without video
    return CompressedWindow(index=enc.index, embeds=embeds, position_ids=enc.position_ids[:, keep.to(
        enc.position_ids.device)], offset=enc.offset, audio_in=enc.n_audio, audio_kept=int(a_keep.sum()),
        video_in=n_video, video_kept=int(v_keep.sum()), video_ratio=float(video_ratio),
        max_position=int(enc.position_ids.max()))


def compress_with(enc: EncodedWindow, out) -> CompressedWindow:
    """`compress_encoded` with a `StreamCompressor` WindowOutput (audio_keep, audio, video_keep, video_ratio).

    The stream index stays `enc.index` (the ingestion's), whatever the compressor counted.
    """
    return compress_encoded(enc, out.audio_keep, out.audio, out.video_keep, out.video_ratio)


__all__ = ["EncodedWindow", "CompressedWindow", "compress_encoded", "compress_with"]
