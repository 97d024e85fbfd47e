"""Offline tokenizer and pre-processing for Qwen2.5-Omni: text ids, log-mel windows, video patches.

Nothing here downloads anything. For presets the tokenizer is a byte-level BPE trained in code on a
tiny built-in corpus; for a checkpoint its own tokenizer and feature extractor are read from disk.
Frame pre-processing is our own torch code (torchvision is not available) reproducing Qwen2-VL's:
resize to multiples of 28 within pixel limits, rescale to [0, 1], normalise with the CLIP mean/std and
lay patches out as [grid_t * grid_h * grid_w, C * temporal_patch * patch * patch] in merge order.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase, WhisperFeatureExtractor

from .errors import InputShapeError, ModelLoadError

SAMPLE_RATE = 16000
WINDOW_SECONDS = 2
WINDOW_SAMPLES = SAMPLE_RATE * WINDOW_SECONDS
FPS = 2
FRAMES_PER_WINDOW = FPS * WINDOW_SECONDS
MEL_FRAMES_PER_WINDOW = 200
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VIDEO_MIN_PIXELS = 128 * 28 * 28  # Qwen's video pipeline, per frame
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_TOTAL_TOKENS = 128000  # its total-video budget: 90% of this many tokens' worth of pixels, when enabled

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>",
    "<|vision_bos|>", "<|vision_eos|>", "<|vision_pad|>", "<|IMAGE|>", "<|VIDEO|>",
]
_CORPUS = [
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
    "auditory and visual inputs, as well as generating text and speech.",
    "system user assistant What is happening in the video? What did the speaker say? Describe the scene.",
    "A person is talking in front of a camera. Music is playing. A car drives by on the street.",
    "The quick brown fox jumps over the lazy dog. 0123456789 , . ? ! : ; ' \" ( ) - \n",
    "Who is speaking? How many people are there? What colour is the shirt? When did the sound start?",
]
DEFAULT_SYSTEM_PROMPT = _CORPUS[0]


def build_preset_tokenizer(vocab_size: int = 448) -> PreTrainedTokenizerBase:
    """A deterministic byte-level BPE with Qwen's special tokens (ids 0..10), trained in code."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   extra_special_tokens=SPECIAL_TOKENS[3:])


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Ids of the special tokens the model needs; a ModelLoadError names any the tokenizer lacks."""
    ids = {}
    for name in SPECIAL_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(name)
        if tid is None or tid == tokenizer.unk_token_id:
            raise ModelLoadError(f"tokenizer has no special token {name}")
        ids[name] = int(tid)
    return ids


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """Qwen2-VL's target size: multiples of `factor`, pixel count in [min_pixels, max_pixels], aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise InputShapeError(f"frame aspect ratio must be < 200, got {height}x{width}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc


def video_settings(cfg: dict) -> dict:
    """OmniProcessor keyword arguments from a checkpoint's video processor config (either spelling)."""
    size = cfg.get("size") or {}
    out = {"min_pixels": cfg.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels"),
           "max_pixels": cfg.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels")}
    out.update({k: cfg[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std",
                                    "total_pixels") if k in cfg})
    if "total_pixels" not in out and cfg.get("cap_pixels_per_frame"):
        factor = cfg.get("patch_size", 14) * cfg.get("merge_size", 2)
        out["total_pixels"] = int(cfg.get("max_video_tokens", VIDEO_TOTAL_TOKENS) * factor * factor * 0.9)
    return {k: v for k, v in out.items() if v is not None}


def checkpoint_chat_template(path: Path, tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The checkpoint's multimodal (processor) chat template if it has one, else its tokenizer's."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "processor_config.json"):
        tpl = (_read_json(path / name) or {}).get("chat_template")
        if isinstance(tpl, str):
            return tpl
    tpl = getattr(tokenizer, "chat_template", None)
    return tpl if isinstance(tpl, str) else None


@dataclass(frozen=True)
class VideoPatches:
    """Flattened patches of one video segment and its grid (in 14-px patches, before the 2x2 merge)."""

    pixels: torch.Tensor  # [grid_t * grid_h * grid_w, C * tp * p * p] float32
    grid_thw: tuple[int, int, int]

    @property
    def llm_grid_hw(self) -> tuple[int, int]:
        return self.grid_thw[1] // 2, self.grid_thw[2] // 2


class OmniProcessor:
    """Text, audio and frame pre-processing for one model; the same for presets and checkpoints.

    Frames are sized as Qwen's video pipeline sizes them (not its image limits): per-frame pixels in
    [min_pixels, max_pixels] (128*28*28 .. 768*28*28 by default) and, with `total_pixels`, each frame of
    an n-frame call also limited to total_pixels * 2 / n (floored at 1.05 * min_pixels).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, feature_extractor: WhisperFeatureExtractor | None = None,
                 *, patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2,
                 min_pixels: int = VIDEO_MIN_PIXELS, max_pixels: int = VIDEO_MAX_PIXELS,
                 total_pixels: int | None = None, image_mean: tuple[float, ...] = CLIP_MEAN,
                 image_std: tuple[float, ...] = CLIP_STD, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor or WhisperFeatureExtractor(
            feature_size=128, sampling_rate=SAMPLE_RATE, hop_length=160, n_fft=400)
        if self.feature_extractor.feature_size != 128:
            raise ModelLoadError(f"feature extractor must give 128 mel bins, has {self.feature_extractor.feature_size}")
        self.patch_size, self.temporal_patch_size, self.merge_size = patch_size, temporal_patch_size, merge_size
        if not 0 < min_pixels <= max_pixels:
            raise ModelLoadError(f"video pixel limits must satisfy 0 < min_pixels <= max_pixels, got "
                                 f"{min_pixels}, {max_pixels}")
        self.min_pixels, self.max_pixels, self.total_pixels = int(min_pixels), int(max_pixels), total_pixels
        self.image_mean = torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.image_std = torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1)
        self.token_ids = special_token_ids(tokenizer)
        self.chat_template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "OmniProcessor":
        """The checkpoint's own tokenizer, feature extractor, video sizing and chat template (local_files_only).

        Video sizing comes from video_preprocessor_config.json when the checkpoint has one, else Qwen's
        video defaults; never from the image processor's limits (12.8 M pixels, 3.7x the video tokens).
        """
        from transformers import AutoTokenizer

        path = Path(path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - re-raised typed, with the cause attached
            raise ModelLoadError(f"cannot load a tokenizer from {path}: {exc}") from exc
        fe = None
        image = _read_json(path / "preprocessor_config.json")
        if image is not None:
            fe = WhisperFeatureExtractor.from_pretrained(path, local_files_only=True)
        kwargs = {k: image[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean",
                                        "image_std") if k in (image or {})}
        kwargs.update(video_settings(_read_json(path / "video_preprocessor_config.json") or {}))
        return cls(tokenizer, fe, chat_template=checkpoint_chat_template(path, tokenizer), **kwargs)

    def save_pretrained(self, path: str | Path) -> None:
        """Tokenizer, feature extractor, video sizing and chat template, as `from_pretrained` reads them."""
        path = Path(path)
        self.tokenizer.save_pretrained(path)
        self.feature_extractor.save_pretrained(path)
        video = {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels, "patch_size": self.patch_size,
                 "temporal_patch_size": self.temporal_patch_size, "merge_size": self.merge_size,
                 "image_mean": self.image_mean.flatten().tolist(), "image_std": self.image_std.flatten().tolist()}
        if self.total_pixels is not None:
            video["total_pixels"] = self.total_pixels
        (path / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
        if self.chat_template:
            (path / "chat_template.jinja").write_text(self.chat_template)

    # ---- audio --------------------------------------------------------------------------------
    def check_audio(self, audio: np.ndarray | torch.Tensor, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
        """Mono float audio at 16 kHz whose length is a whole number of 2-s windows, as float32 numpy."""
        if sample_rate != SAMPLE_RATE:
            raise InputShapeError(f"audio must be sampled at {SAMPLE_RATE} Hz, got {sample_rate} Hz")
        arr = audio.detach().cpu().numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio)
        if arr.ndim != 1:
            raise InputShapeError(f"audio must be mono 1-D [samples], got shape {tuple(arr.shape)}")
        if not np.issubdtype(arr.dtype, np.floating):
            raise InputShapeError(f"audio must be float samples in [-1, 1], got dtype {arr.dtype}")
        if arr.size == 0 or arr.size % WINDOW_SAMPLES:
            raise InputShapeError(f"audio length must be a positive multiple of {WINDOW_SAMPLES} samples "
                                  f"(2 s at {SAMPLE_RATE} Hz), got {arr.size}")
        if not np.isfinite(arr).all():
            raise InputShapeError("audio contains NaN or infinite samples")
        return arr.astype(np.float32, copy=False)

    def mel_windows(self, audio: np.ndarray | torch.Tensor, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
        """Log-mel features [W, 128, 200] computed per 2-s window (the same offline and streaming)."""
        arr = self.check_audio(audio, sample_rate)
        chunks = list(arr.reshape(-1, WINDOW_SAMPLES))
        feats = self.feature_extractor(chunks, sampling_rate=SAMPLE_RATE, padding="longest",
                                       return_tensors="np")["input_features"]
        if feats.shape[-1] != MEL_FRAMES_PER_WINDOW:
            raise ModelLoadError(f"feature extractor gave {feats.shape[-1]} frames per 2 s, expected 200 "
                                 "(hop length must be 160 at 16 kHz)")
        return torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))

    def mel_clip(self, audio: np.ndarray | torch.Tensor, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
        """Log-mel [1, 128, 200 W] of the whole clip, as the stock processor computes it (offline path).

        One STFT and one dynamic-range floor (max - 8 in log10) over the clip, zero-padded to the
        extractor's max length like the stock call; a clip longer than that is not truncated.
        """
        arr = self.check_audio(audio, sample_rate)
        fe = self.feature_extractor
        feats = fe(arr, sampling_rate=SAMPLE_RATE, padding="max_length", max_length=max(fe.n_samples, arr.size),
                   truncation=False, return_tensors="np")["input_features"]
        n = arr.size // fe.hop_length
        return torch.from_numpy(np.ascontiguousarray(feats[..., :n], dtype=np.float32))

    # ---- video --------------------------------------------------------------------------------
    def check_frames(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 RGB frames [T, H, W, 3] with T a multiple of 4 (2 fps, 2-s windows), as a torch tensor."""
        if not isinstance(frames, torch.Tensor):
            arr = np.asarray(frames)
            # frames from Ray's object store are read-only views: copy those (a few MB a window)
            frames = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
        t = frames
        if t.ndim != 4 or t.shape[-1] != 3:
            raise InputShapeError(f"frames must be [T, H, W, 3] RGB, got shape {tuple(t.shape)}")
        if t.dtype != torch.uint8:
            raise InputShapeError(f"frames must be uint8, got {t.dtype}")
        if t.shape[0] == 0 or t.shape[0] % FRAMES_PER_WINDOW:
            raise InputShapeError(f"frame count must be a positive multiple of {FRAMES_PER_WINDOW} "
                                  f"({FPS} fps x {WINDOW_SECONDS} s), got {t.shape[0]}")
        return t

    def frame_max_pixels(self, n_frames: int | None = None) -> int:
        """Per-frame pixel cap; with a total budget, each of `n_frames` frames gets its share of it."""
        if self.total_pixels is None or not n_frames:
            return self.max_pixels
        share = int(self.total_pixels) * self.temporal_patch_size // int(n_frames)
        return max(min(self.max_pixels, share), int(self.min_pixels * 1.05))

    def target_size(self, height: int, width: int, n_frames: int | None = None) -> tuple[int, int]:
        """Frame size fed to the vision encoder (aspect kept, multiples of 28) for a call of `n_frames` frames."""
        return smart_resize(height, width, self.patch_size * self.merge_size, self.min_pixels,
                            self.frame_max_pixels(n_frames))

    def video_patches(self, frames: np.ndarray | torch.Tensor, n_frames: int | None = None) -> VideoPatches:
        """Resize, normalise and patchify frames [T, H, W, 3] exactly in Qwen2-VL's layout.

        `n_frames` is the frame count of the whole video the total-pixel budget is shared by (default T).
        """
        t = self.check_frames(frames)
        x = t.permute(0, 3, 1, 2).float()  # [T, 3, H, W]
        h, w = self.target_size(x.shape[2], x.shape[3], n_frames or x.shape[0])
        if (h, w) != tuple(x.shape[2:]):
            x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False).clamp_(0, 255)
        x = (x / 255.0 - self.image_mean) / self.image_std
        tp, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        gt, gh, gw = x.shape[0] // tp, h // p, w // p
        x = x.view(gt, tp, 3, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return VideoPatches(x.reshape(gt * gh * gw, 3 * tp * p * p).contiguous(), (gt, gh, gw))

    # ---- text ---------------------------------------------------------------------------------
    def encode_text(self, text: str, plain: bool = False) -> list[int]:
        """Token ids of `text`; `plain` reads control-token strings in it as ordinary text (user input)."""
        if not text:
            return []
        return list(self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=plain))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
