"""Model shapes built from code: random-weight Qwen2.5-Omni thinkers for tests, CPU timing and GPU timing.

`tiny` and `small` are ours; `3b` and `7b` reproduce the published Qwen2.5-Omni-3B / -7B thinker
dimensions (config.json of the Hugging Face checkpoints), so timings and memory match the real models.
Every preset keeps the real audio chunking (n_window 100: 2-s chunks = 200 mel frames -> 100 encoder
frames -> 50 tokens, 128 mel bins) and the real vision patching (patch 14, temporal 2, merge 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import Qwen2_5OmniThinkerConfig

from .errors import ModelLoadError

# Pixel limits of the video processor (Qwen2.5-Omni uses 128*28*28 .. 768*28*28 per frame).
OMNI_VIDEO_MIN_PIXELS = 128 * 28 * 28
OMNI_VIDEO_MAX_PIXELS = 768 * 28 * 28
SMALL_VIDEO_MIN_PIXELS = 56 * 56


@dataclass(frozen=True)
class Preset:
    """One model shape. `vocab_size` None means: the offline tokenizer's size (rounded up)."""

    name: str
    text: dict[str, Any]
    audio: dict[str, Any]
    vision: dict[str, Any]
    vocab_size: int | None = None
    tie_word_embeddings: bool = False
    min_pixels: int = SMALL_VIDEO_MIN_PIXELS
    max_pixels: int = OMNI_VIDEO_MAX_PIXELS
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _rope(head_dim: int, section: list[int]) -> dict[str, Any]:
    if sum(section) * 2 != head_dim:
        raise ValueError(f"mrope_section {section} must sum to head_dim/2 = {head_dim // 2}")
    return {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": section}


# Shared by 3b and 7b: the Whisper-large-v3-sized audio encoder and the Qwen2.5-VL ViT.
_REAL_AUDIO = dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                   num_mel_bins=128, n_window=100, max_source_positions=1500)
_REAL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                    temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                    fullatt_block_indexes=[7, 15, 23, 31], in_channels=3)

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rope_parameters=_rope(16, [2, 3, 3])),
        audio=dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                   num_mel_bins=128, n_window=100, max_source_positions=1500),
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                    temporal_patch_size=2, spatial_merge_size=2, window_size=112, fullatt_block_indexes=[1]),
        notes="unit tests: a few ms per window on one core",
    ),
    "small": Preset(
        name="small",
        text=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, rope_parameters=_rope(64, [8, 12, 12])),
        audio=dict(d_model=128, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=256,
                   num_mel_bins=128, n_window=100, max_source_positions=1500),
        vision=dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4, patch_size=14,
                    temporal_patch_size=2, spatial_merge_size=2, window_size=112, fullatt_block_indexes=[1]),
        notes="CPU timing: the LLM dominates prefill, encoders are light",
    ),
    "3b": Preset(
        name="3b",
        text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                  num_key_value_heads=2, max_position_embeddings=32768, rope_parameters=_rope(128, [16, 24, 24])),
        audio=dict(_REAL_AUDIO, output_dim=2048),
        vision=dict(_REAL_VISION, out_hidden_size=2048),
        vocab_size=151936,
        min_pixels=OMNI_VIDEO_MIN_PIXELS,
        notes="Qwen2.5-Omni-3B thinker dimensions, random weights",
    ),
    "7b": Preset(
        name="7b",
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, max_position_embeddings=32768, rope_parameters=_rope(128, [16, 24, 24])),
        audio=dict(_REAL_AUDIO, output_dim=3584),
        vision=dict(_REAL_VISION, out_hidden_size=3584),
        vocab_size=152064,
        min_pixels=OMNI_VIDEO_MIN_PIXELS,
        notes="Qwen2.5-Omni-7B thinker dimensions, random weights",
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called `name`, or a ModelLoadError listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ModelLoadError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}") from None


def build_config(preset: Preset, token_ids: dict[str, int], tokenizer_size: int) -> Qwen2_5OmniThinkerConfig:
    """A thinker config for `preset` whose special token ids are the offline tokenizer's."""
    vocab = preset.vocab_size or -(-tokenizer_size // 64) * 64
    if vocab < tokenizer_size:
        raise ModelLoadError(f"preset {preset.name}: vocab_size {vocab} < tokenizer size {tokenizer_size}")
    return Qwen2_5OmniThinkerConfig(
        text_config=dict(preset.text, vocab_size=vocab, tie_word_embeddings=preset.tie_word_embeddings,
                         eos_token_id=token_ids["<|im_end|>"], pad_token_id=token_ids["<|endoftext|>"]),
        audio_config=dict(preset.audio, output_dim=preset.audio.get("output_dim", preset.text["hidden_size"])),
        vision_config=dict(preset.vision, out_hidden_size=preset.vision.get("out_hidden_size",
                                                                              preset.text["hidden_size"])),
        audio_token_index=token_ids["<|AUDIO|>"],
        image_token_index=token_ids["<|IMAGE|>"],
        video_token_index=token_ids["<|VIDEO|>"],
        audio_start_token_id=token_ids["<|audio_bos|>"],
        audio_end_token_id=token_ids["<|audio_eos|>"],
        vision_start_token_id=token_ids["<|vision_bos|>"],
        vision_end_token_id=token_ids["<|vision_eos|>"],
        user_token_id=token_ids.get("user", 0),
        position_id_per_seconds=25,
        seconds_per_chunk=2,
        tie_word_embeddings=preset.tie_word_embeddings,
        **preset.extra,
    )
