"""Frame sizing as Qwen's video pipeline (per-frame limits, total budget, checkpoint settings) and the
offline path's whole-clip audio features."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor

from omnizip.models import load_model
from omnizip.models.processor import OmniProcessor, build_preset_tokenizer

VMIN, VMAX = 128 * 28 * 28, 768 * 28 * 28
TOTAL = int(128000 * 28 * 28 * 0.9)  # the reference pipeline's total-video budget


def stock_smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers' Qwen2-VL `smart_resize`, written out here (its module needs torchvision, absent here)."""
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def reference_grid(h: int, w: int, n_frames: int | None = None, total: int | None = None) -> tuple[int, int]:
    """LLM tokens per frame (rows, cols) by the reference arithmetic (transformers' Qwen2-VL video processor)."""
    max_pixels = VMAX
    if total is not None:
        max_pixels = max(min(VMAX, total * 2 // n_frames), int(VMIN * 1.05))
    rh, rw = stock_smart_resize(h, w, factor=28, min_pixels=VMIN, max_pixels=max_pixels)
    return rh // 28, rw // 28


SIZES = [(1080, 1920), (1920, 1080), (720, 1280), (480, 640), (240, 320), (2160, 3840), (1440, 2560),
         (576, 720), (100, 2000), (28, 28), (56, 84), (333, 777), (1080, 1440)]


@pytest.fixture(scope="module")
def proc() -> OmniProcessor:
    return OmniProcessor(build_preset_tokenizer())  # Qwen's video limits are the defaults


@pytest.mark.parametrize("h,w", SIZES)
def test_token_grid_table(proc, h, w) -> None:
    th, tw = proc.target_size(h, w)
    assert th % 28 == 0 and tw % 28 == 0 and VMIN <= th * tw <= VMAX
    assert (th // 28, tw // 28) == reference_grid(h, w)
    assert abs(th / tw - h / w) / (h / w) < 0.25 or min(h, w) < 56  # aspect kept (to 28-px rounding)


@pytest.mark.parametrize("n_frames", [4, 120, 600, 1200, 4000])
@pytest.mark.parametrize("h,w", [(1080, 1920), (480, 640), (2160, 3840)])
def test_total_pixel_budget_option(h, w, n_frames) -> None:
    p = OmniProcessor(build_preset_tokenizer(), total_pixels=TOTAL)
    th, tw = p.target_size(h, w, n_frames)
    assert (th // 28, tw // 28) == reference_grid(h, w, n_frames, TOTAL)


def test_1080p_is_720_tokens_per_llm_frame(proc) -> None:
    frames = np.random.default_rng(0).integers(0, 256, (4, 1080, 1920, 3), dtype=np.uint8)
    vp = proc.video_patches(frames)
    assert vp.grid_thw == (2, 40, 72) and vp.llm_grid_hw[0] * vp.llm_grid_hw[1] == 720


def test_checkpoint_video_settings(tmp_path) -> None:
    src = load_model("tiny", seed=4)
    src.thinker.save_pretrained(tmp_path)
    src.processor.tokenizer.save_pretrained(tmp_path)
    src.processor.feature_extractor.save_pretrained(tmp_path)
    # a real Qwen2.5-Omni preprocessor_config.json carries the IMAGE limits; they must not size video frames
    pre = json.loads((tmp_path / "preprocessor_config.json").read_text())
    pre.update(min_pixels=3136, max_pixels=12845056, patch_size=14, merge_size=2, temporal_patch_size=2)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(pre))
    ckpt = load_model(str(tmp_path)).processor
    assert (ckpt.min_pixels, ckpt.max_pixels) == (VMIN, VMAX)
    assert ckpt.target_size(1080, 1920) == (560, 1008)
    # a video processor config (transformers' spelling) is taken as it is
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 56 * 56, "longest_edge": 256 * 28 * 28}, "cap_pixels_per_frame": True}))
    ckpt = OmniProcessor.from_pretrained(tmp_path)
    assert (ckpt.min_pixels, ckpt.max_pixels, ckpt.total_pixels) == (56 * 56, 256 * 28 * 28, TOTAL)
    # presets keep theirs through save_pretrained (tiny: a small minimum so tests stay small)
    src.processor.save_pretrained(tmp_path)
    assert OmniProcessor.from_pretrained(tmp_path).min_pixels == src.processor.min_pixels


def test_offline_features_are_the_stock_extractor_over_the_whole_clip(tmp_path) -> None:
    tiny = load_model("tiny")
    rng = np.random.default_rng(1)
    t = np.arange(3 * 32000) / 16000
    audio = (0.5 * np.sin(2 * np.pi * 300 * t) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)
    audio[32000:64000] *= 1e-5  # a window 100 dB below the clip's peak
    fe: WhisperFeatureExtractor = tiny.processor.feature_extractor
    stock = fe(audio, sampling_rate=16000, padding="max_length", return_attention_mask=True, return_tensors="np")
    n = int(stock["attention_mask"].sum())
    clip = tiny.processor.mel_clip(audio)
    assert clip.shape == (1, 128, 600) and n == 600
    assert torch.equal(clip, torch.from_numpy(stock["input_features"][..., :n]))
    live = tiny.processor.mel_windows(audio)  # the live path: per 2-s window
    per_window = live.permute(1, 0, 2).reshape(1, 128, -1)
    diff = (per_window - clip).abs()[0]  # [128, frames]
    # loud windows: only the frames at the window edges differ; the quiet window: every frame
    loud = torch.cat([diff[:, 2:198], diff[:, 402:598]], dim=1)
    assert loud.max() < 1e-3 and diff[:, [0, 199, 200, 399, 400, 599]].max() > 1e-2
    assert (diff[:, 200:400].amax(0) > 0.1).all()
    # the offline path feeds the whole-clip features to the encoder
    frames = rng.integers(0, 256, (12, 56, 56, 3), dtype=np.uint8)
    off = tiny.encode_clip(audio, frames)
    win = tiny.encode_clip(audio, frames, features="window")
    assert not torch.allclose(torch.cat([e.audio for e in off]), torch.cat([e.audio for e in win]))
