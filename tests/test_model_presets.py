"""Presets, the offline tokenizer, and loading: published 3b/7b dimensions (on meta), clear load errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import Qwen2_5OmniThinkerForConditionalGeneration

from omnizip.models import ModelLoadError, load_model, parse_dtype
from omnizip.models.presets import PRESETS, build_config, get_preset
from omnizip.models.processor import SPECIAL_TOKENS, build_preset_tokenizer, special_token_ids


def meta_thinker(name: str) -> Qwen2_5OmniThinkerForConditionalGeneration:
    tok = build_preset_tokenizer()
    cfg = build_config(get_preset(name), special_token_ids(tok), len(tok))
    with torch.device("meta"):
        return Qwen2_5OmniThinkerForConditionalGeneration._from_config(cfg)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# Published sizes: Qwen2.5-7B 7.61B params / 6.53B non-embedding; Qwen2.5-3B 3.09B / 2.77B
# non-embedding (Qwen2.5 model cards); audio encoder = Whisper-large-v3 encoder (~0.64B with the
# Omni projection), vision = Qwen2.5-VL ViT (~0.67B). Checkpoints: Omni-7B 10.7B, Omni-3B 5.54B
# in total including talker and token2wav, so the thinker must be well below those.
@pytest.mark.parametrize("name,llm_non_embedding,total_checkpoint", [("7b", 6.53e9, 10.7e9), ("3b", 2.77e9, 5.54e9)])
def test_real_presets_match_published_sizes(name: str, llm_non_embedding: float, total_checkpoint: float) -> None:
    m = meta_thinker(name)
    assert next(m.parameters()).device.type == "meta"
    lm = m.model.language_model
    non_emb = count(lm) - lm.embed_tokens.weight.numel()
    assert abs(non_emb - llm_non_embedding) / llm_non_embedding < 0.01
    audio, vision = count(m.model.audio_tower), count(m.model.visual)
    assert 0.60e9 < audio < 0.68e9
    assert 0.63e9 < vision < 0.70e9
    total = count(m)
    assert llm_non_embedding + audio + vision < total < total_checkpoint


def test_7b_dimensions() -> None:
    cfg = meta_thinker("7b").config
    t, a, v = cfg.text_config, cfg.audio_config, cfg.vision_config
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads,
            t.num_key_value_heads, t.vocab_size) == (3584, 18944, 28, 28, 4, 152064)
    assert (a.d_model, a.encoder_layers, a.encoder_attention_heads, a.output_dim) == (1280, 32, 20, 3584)
    assert (v.depth, v.hidden_size, v.num_heads, v.out_hidden_size) == (32, 1280, 16, 3584)
    assert meta_thinker("7b").model.language_model.rotary_emb.mrope_section == [16, 24, 24]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_keeps_real_chunking(name: str) -> None:
    a = get_preset(name).audio
    v = get_preset(name).vision
    assert a["n_window"] * 2 == 200 and a["num_mel_bins"] == 128
    assert (v["patch_size"], v["temporal_patch_size"], v["spatial_merge_size"]) == (14, 2, 2)


def test_tiny_is_tiny_and_small_is_llm_heavy() -> None:
    tiny, small = meta_thinker("tiny"), meta_thinker("small")
    assert count(tiny) < 1_000_000
    lm = count(small.model.language_model)
    assert count(small) < 100_000_000
    assert lm > 5 * (count(small.model.audio_tower) + count(small.model.visual))


def test_tokenizer_is_deterministic_and_has_model_ids() -> None:
    a, b = build_preset_tokenizer(), build_preset_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    ids = special_token_ids(a)
    assert sorted(ids) == sorted(SPECIAL_TOKENS)
    text = "<|im_start|>user\n<|vision_bos|><|audio_bos|>hello<|im_end|>"
    enc = a.encode(text, add_special_tokens=False)
    assert enc[0] == ids["<|im_start|>"] and ids["<|vision_bos|>"] in enc and enc[-1] == ids["<|im_end|>"]
    assert a.decode(enc) == text
    cfg = load_model("tiny").thinker.config
    assert cfg.audio_token_id == ids["<|AUDIO|>"] and cfg.video_token_id == ids["<|VIDEO|>"]
    assert cfg.vision_start_token_id == ids["<|vision_bos|>"] and cfg.audio_start_token_id == ids["<|audio_bos|>"]


def test_presets_are_seeded() -> None:
    a, b, c = load_model("tiny", seed=1), load_model("tiny", seed=1), load_model("tiny", seed=2)
    wa, wb, wc = (m.thinker.lm_head.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_dtype_and_device_arguments() -> None:
    m = load_model("tiny", device="cpu", dtype="bf16")
    assert m.dtype == torch.bfloat16 and m.device.type == "cpu"
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("int7")


def test_unknown_preset_and_bad_paths(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ModelLoadError, match="'llama' model"):
        load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="unknown model preset"):
        get_preset("13b")


def test_local_checkpoint_round_trip(tmp_path) -> None:
    """A thinker checkpoint on disk (weights + tokenizer + preprocessor) loads offline and matches."""
    src = load_model("tiny", seed=3)
    src.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.token_ids == src.token_ids
    for name, p in src.thinker.state_dict().items():
        assert torch.equal(p, loaded.thinker.state_dict()[name]), name
    rng = np.random.default_rng(0)
    audio = (rng.standard_normal(32000) * 0.1).astype(np.float32)
    frames = rng.integers(0, 256, (4, 56, 56, 3), dtype=np.uint8)
    e1, e2 = src.encode_window(audio, frames), loaded.encode_window(audio, frames)
    assert torch.allclose(e1.audio, e2.audio) and torch.allclose(e1.video, e2.video)
