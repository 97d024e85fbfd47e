"""Offline (whole-clip) path: stock features of the whole clip -> a compression method's compress_clip
-> compressed prefill.

Kept multimodal tokens keep their original TMRoPE positions (SPEC 2.4: gapped, never renumbered);
text after the block continues from the uncompressed sequence's positions, so with compression off
the sequence, its positions and the greedy tokens are those of the stock `generate`. Audio features
are the stock processor's over the whole clip (the live path computes them per 2-s window; the
difference is measured in docs/omnizip.md). Everything but `stock_inputs` (a Qwen2.5-Omni check)
depends only on the `ModelAdapter` protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from omnizip import CompressionMethod, OmniZipConfig, make_method

from .adapter import Audio, Frames, ModelAdapter
from .window import CompressedWindow, EncodedWindow, compress_with

if TYPE_CHECKING:
    from .qwen2_5_omni import Qwen25OmniAdapter


@dataclass
class ClipPrompt:
    """A full prompt as embeddings [n, D] with positions [3, n], and its multimodal token counts."""

    embeds: torch.Tensor
    position_ids: torch.Tensor
    windows: list[CompressedWindow]

    @property
    def n_tokens(self) -> int:
        return int(self.embeds.shape[0])

    @property
    def multimodal_in(self) -> int:
        return sum(w.audio_in + w.video_in for w in self.windows)

    @property
    def multimodal_kept(self) -> int:
        return sum(w.n_tokens for w in self.windows)


def resolve_method(method: str | CompressionMethod | None = None, cfg: OmniZipConfig | None = None) -> CompressionMethod:
    """A method by name (built with `cfg`) or as given; None: OmniZip with `cfg`, or, when `cfg` is
    None too, `keep_all` (the deprecated meaning of `cfg=None`; say `method="keep_all"`)."""
    if method is None:
        method = "keep_all" if cfg is None else "omnizip"
    return make_method(method, cfg) if isinstance(method, str) else method


def compress_encoded_clip(encoded: list[EncodedWindow],
                          method: str | CompressionMethod | OmniZipConfig | None) -> list[CompressedWindow]:
    """A method over all windows of a clip at once (an OmniZipConfig: OmniZip; None: keep everything)."""
    method = resolve_method(None, method) if isinstance(method, OmniZipConfig) else resolve_method(method)
    ps = {e.video.shape[1] for e in encoded if e.video.shape[0]}
    if len(ps) > 1:
        raise ValueError(f"all LLM frames of a clip must have the same token count, got {sorted(ps)}")
    p = ps.pop() if ps else 0
    d = encoded[0].audio.shape[-1]
    video = torch.cat([e.video.reshape(-1, p, d) for e in encoded])
    sizes_a, sizes_v = [e.n_audio for e in encoded], [e.video.shape[0] for e in encoded]
    out = method.compress_clip(torch.cat([e.audio for e in encoded]), torch.cat([e.audio_scores for e in encoded]),
                               video, sizes_a, sizes_v)
    return [compress_with(e, w) for e, w in zip(encoded, out.windows(sizes_a, sizes_v))]


def assemble_prompt(adapter: ModelAdapter, windows: list[CompressedWindow], question: str,
                    system_prompt: str | None = None) -> ClipPrompt:
    """prefix + windows (their own positions, re-based to this prefix) + question suffix."""
    prefix = adapter.prompt_prefix(system_prompt)
    offset = adapter.mm_offset(system_prompt)
    windows = [w.rebased(offset) for w in windows]
    # Text after the block continues after the UNCOMPRESSED block's largest position.
    suffix = adapter.prompt_suffix(question, max((w.max_position for w in windows), default=offset - 1) + 1)
    dev = adapter.device
    embeds = torch.cat([adapter.embed_ids(prefix.ids)] + [w.embeds.to(dev, adapter.dtype) for w in windows]
                       + [adapter.embed_ids(suffix.ids)])
    positions = torch.cat([prefix.position_ids] + [w.position_ids.cpu() for w in windows] + [suffix.position_ids], 1)
    return ClipPrompt(embeds, positions, windows)


def clip_prompt(adapter: ModelAdapter, audio_16k: Audio, frames: Frames, question: str,
                cfg: OmniZipConfig | None = None, system_prompt: str | None = None, *,
                method: str | CompressionMethod | None = None) -> ClipPrompt:
    """Whole clip -> stock features -> `method` (a name of `omnizip.METHODS` built with `cfg`, or a
    CompressionMethod; None: OmniZip with `cfg`, or keep_all when `cfg` is None too) -> prompt
    embeddings with gapped positions."""
    encoded = adapter.encode_clip(audio_16k, frames, offset=adapter.mm_offset(system_prompt))
    return assemble_prompt(adapter, compress_encoded_clip(encoded, resolve_method(method, cfg)), question,
                           system_prompt)


def generate(adapter: ModelAdapter, prompt: ClipPrompt, max_new_tokens: int = 32,
             stop_ids: frozenset[int] | None = None) -> list[int]:
    """Greedy tokens for `prompt` (a fresh cache; compression already applied)."""
    return list(adapter.greedy(adapter.new_cache(), prompt.embeds, prompt.position_ids, max_new_tokens, stop_ids))


def stock_inputs(adapter: "Qwen25OmniAdapter", audio_16k: Audio, frames: Frames, question: str,
                 system_prompt: str | None = None) -> dict:
    """The inputs the stock thinker's `generate` takes for the same clip and prompt (use_audio_in_video).

    Built like Qwen2.5-Omni's processor lays them out; used to check the adapter against the stock path.
    """
    proc, ids = adapter.processor, adapter.token_ids
    features = proc.mel_clip(audio_16k)  # [1, 128, 200 n]: the stock extractor over the whole clip
    vp = proc.video_patches(frames)
    n = features.shape[-1] // 200
    gh, gw = vp.llm_grid_hw
    block = []
    for _ in range(n):
        block += [ids["<|VIDEO|>"]] * (2 * gh * gw) + [ids["<|AUDIO|>"]] * 50
    prefix = adapter.prompt_prefix(system_prompt).ids
    suffix = adapter.prompt_suffix(question, 0).ids
    input_ids = torch.tensor([prefix + block + suffix])
    dev = adapter.device
    return dict(input_ids=input_ids.to(dev), attention_mask=torch.ones_like(input_ids).to(dev),
                input_features=features.to(dev, adapter.dtype),
                feature_attention_mask=torch.ones(1, features.shape[-1], dtype=torch.long, device=dev),
                pixel_values_videos=vp.pixels.to(dev, adapter.dtype),
                video_grid_thw=torch.tensor([vp.grid_thw], device=dev),
                video_second_per_grid=torch.tensor([1.0], device=dev), use_audio_in_video=True)
