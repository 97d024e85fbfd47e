"""Qwen2.5-Omni adapter: wraps transformers' Qwen2_5OmniThinkerForConditionalGeneration (never a fork).

What it adds around the stock thinker:
- `encode_window(s)` / `encode_clip`: stock `get_audio_features` / `get_video_features`, plus audio
  scores from a pre-hook (scores.py) and TMRoPE positions (positions.py);
- prompt pieces (system prefix, question suffix) with their positions, laid out by the checkpoint's
  own chat template when it has one (its default system prompt included);
- position bookkeeping for long streams: `window_position_delta` (TMRoPE renumbering) and
  `key_rotation` (exact re-rotation of cached keys, checked on the model's rotary module);
- `forward_embeds`: the language model on arbitrary embeddings with explicit (gapped) positions and a
  KV cache, computing the LM head only where asked; `greedy`: streaming greedy decoding on a cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from transformers import (DynamicCache, Qwen2_5OmniConfig, Qwen2_5OmniThinkerConfig,
                          Qwen2_5OmniThinkerForConditionalGeneration)

from .adapter import PromptPiece
from .errors import InputShapeError, ModelLoadError
from .positions import (POSITIONS_PER_WINDOW, RopeShift, renumber_delta, text_position_ids,
                        window_position_ids)
from .presets import build_config, get_preset
from .processor import (DEFAULT_SYSTEM_PROMPT, FRAMES_PER_WINDOW, MEL_FRAMES_PER_WINDOW, SAMPLE_RATE,
                        OmniProcessor, build_preset_tokenizer)
from .scores import AudioScoreRecorder
from .window import CompressedWindow, EncodedWindow

Frames = np.ndarray | torch.Tensor
Audio = np.ndarray | torch.Tensor
_QUESTION = "\x00QUESTION\x00"  # stands in for the question when a chat template is rendered
_SYSTEM = "\x00SYSTEM\x00"


@dataclass(frozen=True)
class ChatLayout:
    """A chat template cut around one user turn [stream, question]: prefix(system) + stream + between + q + after."""

    template: str | None
    default_system: str | None
    between: str = ""
    after: str = "<|im_end|>\n<|im_start|>assistant\n"


def chat_layout(tokenizer, template: str | None, fallback_system: str | None) -> ChatLayout:
    """Where the stream and the question go in `template` (None or unusable: Qwen's ChatML layout).

    The template must render a user turn [video, text] with the video as <|vision_bos|><|VIDEO|><|vision_eos|>
    (as Qwen2.5-Omni's processor template does); its default system prompt is what it renders without one.
    """
    if not template:
        return ChatLayout(None, fallback_system)
    try:
        with_sys = _render(tokenizer, template, _SYSTEM)
        no_sys = _render(tokenizer, template, None)
    except Exception:  # noqa: BLE001 - a text-only or broken template: the built-in layout
        return ChatLayout(None, fallback_system)
    marker = "<|vision_bos|><|VIDEO|><|vision_eos|>"
    if with_sys.count(marker) != 1 or with_sys.count(_QUESTION) != 1 or with_sys.count(_SYSTEM) != 1:
        return ChatLayout(None, fallback_system)
    rest = with_sys.split(marker)[1]
    between, after = rest.split(_QUESTION)
    a, b = with_sys.split(marker)[0].split(_SYSTEM)
    head = no_sys.split(marker)[0]
    default = head[len(a):len(head) - len(b)] if head.startswith(a) and head.endswith(b) and len(head) >= len(
        a) + len(b) else None
    return ChatLayout(template, default, between, after)


def _render(tokenizer, template: str, system: str | None) -> str:
    msgs = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": _QUESTION}]}]
    return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=True)


class Qwen25OmniAdapter:
    """One loaded thinker plus its processor; stateless per stream (streams keep their own caches)."""

    family = "qwen2_5_omni"

    def __init__(self, thinker: Qwen2_5OmniThinkerForConditionalGeneration, processor: OmniProcessor,
                 name: str) -> None:
        self.thinker = thinker.eval()
        self.processor = processor
        self.name = name
        self.token_ids = processor.token_ids
        self.scores = AudioScoreRecorder(thinker.model.audio_tower)
        self.chat = chat_layout(processor.tokenizer, processor.chat_template, DEFAULT_SYSTEM_PROMPT)
        self.default_system_prompt = self.chat.default_system
        self.stop_ids = frozenset({self.token_ids["<|im_end|>"], self.token_ids["<|endoftext|>"]})
        self._prefix_cache: dict[str | None, PromptPiece] = {}
        self._rope_shift: RopeShift | None = None

    # ---- properties -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.thinker.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.thinker.lm_head.weight.dtype

    @property
    def hidden_size(self) -> int:
        return self.thinker.config.text_config.hidden_size

    @property
    def text_config(self):
        return self.thinker.config.text_config

    @property
    def max_positions(self) -> int:
        return int(self.text_config.max_position_embeddings)

    @property
    def positions_per_window(self) -> int:
        return POSITIONS_PER_WINDOW

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.text_config)

    def save_pretrained(self, path: str | Path) -> None:
        """A thinker checkpoint directory (weights, tokenizer, extractor, video sizing, template) `load_model` reads."""
        self.thinker.save_pretrained(path)
        self.processor.save_pretrained(path)

    # ---- long streams -----------------------------------------------------------------------------
    def window_position_delta(self, window: CompressedWindow, windows_back: int) -> torch.Tensor:
        """[3, n] TMRoPE change of `window`'s kept tokens when the stream is renumbered `windows_back` earlier."""
        return renumber_delta(window.video_kept, window.audio_kept, windows_back * POSITIONS_PER_WINDOW)

    def key_rotation(self, delta: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """Re-rotation of cached keys [..., n, head_dim] by position deltas [3, n], via the model's rotary module."""
        if self._rope_shift is None:
            from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import rotate_half

            lm = self.thinker.model.language_model
            tc = self.text_config
            head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
            self._rope_shift = RopeShift(lm.rotary_emb, rotate_half, head_dim)
        return self._rope_shift(delta)

    # ---- prompt layout ----------------------------------------------------------------------------
    def prompt_prefix(self, system_prompt: str | None = None) -> PromptPiece:
        """System turn, then `<|im_start|>user\n<|vision_bos|><|audio_bos|>` (or the chat template's), with positions.

        None means the model's default system prompt (the checkpoint template's, if it has one). Both
        bos markers share one position (as in get_rope_index); the block starts one after.
        """
        system_prompt = self.default_system_prompt if system_prompt is None else system_prompt
        if system_prompt not in self._prefix_cache:
            if self.chat.template is not None:
                text = _render(self.processor.tokenizer, self.chat.template, system_prompt)
                text = text.split("<|vision_bos|><|VIDEO|>")[0]
            else:
                system = f"<|im_start|>system\n{system_prompt}<|im_end|>\n" if system_prompt is not None else ""
                text = f"{system}<|im_start|>user\n"
            ids = self.processor.encode_text(text)
            n = len(ids)
            ids = ids + [self.token_ids["<|vision_bos|>"], self.token_ids["<|audio_bos|>"]]
            pos = torch.cat([text_position_ids(n, 0), text_position_ids(1, n), text_position_ids(1, n)], dim=1)
            self._prefix_cache[system_prompt] = PromptPiece(ids, pos)
        return self._prefix_cache[system_prompt]

    def mm_offset(self, system_prompt: str | None = None) -> int:
        """Position where the multimodal block starts after the prefix of `system_prompt`."""
        return int(self.prompt_prefix(system_prompt).position_ids.max()) + 1

    def prompt_suffix(self, question: str, start: int) -> PromptPiece:
        """`<|audio_eos|><|vision_eos|>{question}<|im_end|>\n<|im_start|>assistant\n` (or the template's) from `start`.

        The question is encoded as plain text: marker strings typed into it are not control tokens.
        """
        if not isinstance(question, str) or not question.strip():
            raise ValueError("question must be a non-empty string")
        enc = self.processor.encode_text
        q_ids = (enc(self.chat.between) + self.processor.encode_text(question, plain=True) + enc(self.chat.after))
        ids = [self.token_ids["<|audio_eos|>"], self.token_ids["<|vision_eos|>"]] + q_ids
        pos = torch.cat([text_position_ids(1, start), text_position_ids(1, start),
                         text_position_ids(len(q_ids), start + 1)], dim=1)
        return PromptPiece(ids, pos)

    # ---- encoding ---------------------------------------------------------------------------------
    def encode_window(self, audio_16k: Audio, frames: Frames, index: int = 0, *, sample_rate: int = SAMPLE_RATE,
                      offset: int | None = None) -> EncodedWindow:
        """One 2-s window (audio [32000] float, frames uint8 [4, H, W, 3]) through the stock encoders."""
        return self.encode_windows([(audio_16k, frames)], [index], sample_rate=sample_rate, offset=offset)[0]

    def encode_windows(self, windows: Sequence[tuple[Audio | None, Frames | None]], indices: Sequence[int], *,
                       sample_rate: int = SAMPLE_RATE, offset: int | None = None) -> list[EncodedWindow]:
        """Several windows (of one or many streams) in one batched call of each encoder.

        A window without video (frames None, or [4, 0, 0, 3] as ingestion sends it) gets video [0, 0, D];
        one without audio (audio None: a video-only source) gets audio [0, D], so its video is
        compressed at rho_video (SPEC 2.2: groups without audio).
        """
        if len(windows) != len(indices) or not windows:
            raise InputShapeError(f"need one index per window, got {len(windows)} windows, {len(indices)} indices")
        mels, patches, heard = [], [], []
        for i, (audio, frames) in enumerate(windows):
            if audio is not None:
                mel = self.processor.mel_windows(audio, sample_rate)
                if mel.shape[0] != 1:
                    raise InputShapeError(f"window {i}: expected 2 s of audio (32000 samples at 16 kHz), "
                                          f"got {mel.shape[0] * 2} s")
                mels.append(mel)
            heard.append(audio is not None)
            vp = None
            if frames is not None and not (frames.shape[1:3] == (0, 0) and frames.ndim == 4):
                vp = self.processor.video_patches(frames)
                if vp.grid_thw[0] * 2 != FRAMES_PER_WINDOW:
                    raise InputShapeError(f"window {i}: expected {FRAMES_PER_WINDOW} frames (2 s at 2 fps), "
                                          f"got {vp.grid_thw[0] * 2}")
            if audio is None and vp is None:
                raise InputShapeError(f"window {i}: neither audio nor video")
            patches.append(vp)
        if mels:
            mel = torch.cat(mels)  # [W, 128, 200]
            audio_tokens, scores = self._audio(mel, torch.full((mel.shape[0],), MEL_FRAMES_PER_WINDOW))
        else:  # video only
            audio_tokens = torch.zeros(0, self.hidden_size, device=self.device, dtype=self.dtype)
            scores = torch.zeros(0)
        with_video = [p for p in patches if p is not None]
        video = (self._video(torch.cat([p.pixels for p in with_video]), [p.grid_thw for p in with_video])
                 if with_video else audio_tokens[:0])
        grids = [p.llm_grid_hw if p is not None else None for p in patches]
        return self._split(audio_tokens, scores, video, grids, list(indices), offset, heard)

    def encode_clip(self, audio_16k: Audio, frames: Frames, *, sample_rate: int = SAMPLE_RATE,
                    offset: int | None = None, features: str = "clip") -> list[EncodedWindow]:
        """A whole clip as ONE audio and ONE video through the stock encoders, split into windows after.

        Log-mel comes from the stock extractor over the whole clip (`mel_clip`), as the stock processor
        feeds the model; frames share the processor's total-pixel budget if it has one. The live path
        (`encode_windows`) computes log-mel per window (`features="window"` here gives those, for
        comparison): docs/omnizip.md measures the difference.
        """
        if features == "clip":
            whole = self.processor.mel_clip(audio_16k, sample_rate)  # [1, 128, 200 W]
        elif features == "window":
            mel = self.processor.mel_windows(audio_16k, sample_rate)  # [W, 128, 200]
            whole = mel.permute(1, 0, 2).reshape(1, mel.shape[1], -1)
        else:
            raise ValueError(f"features must be 'clip' or 'window', got {features!r}")
        vp = self.processor.video_patches(frames)
        n = whole.shape[-1] // MEL_FRAMES_PER_WINDOW
        if vp.grid_thw[0] * 2 != n * FRAMES_PER_WINDOW:
            raise InputShapeError(f"clip has {n * 2} s of audio but {vp.grid_thw[0] * 2} frames; "
                                  f"expected {n * FRAMES_PER_WINDOW} frames at 2 fps")
        audio_tokens, scores = self._audio(whole, torch.tensor([whole.shape[-1]]))
        video = self._video(vp.pixels, [vp.grid_thw])
        return self._split(audio_tokens, scores, video, [vp.llm_grid_hw] * n, list(range(n)), offset)

    @torch.no_grad()
    def _audio(self, features: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stock audio features [Na, D] of `features` [B, 128, T] (B audios of `lens` frames) and scores [Na]."""
        mask = (torch.arange(features.shape[-1])[None] < lens[:, None]).long().to(self.device)
        with self.scores.capture() as rec:
            out = self.thinker.get_audio_features(features.to(self.device, self.dtype), feature_attention_mask=mask)
        return out.last_hidden_state, rec.token_scores(lens)

    @torch.no_grad()
    def _video(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        grid = torch.tensor(grids, dtype=torch.long, device=self.device)
        out = self.thinker.get_video_features(pixels.to(self.device, self.dtype), grid)
        return torch.cat(list(out.pooler_output))

    def _split(self, audio: torch.Tensor, scores: torch.Tensor, video: torch.Tensor,
               grids: list[tuple[int, int] | None],
               indices: list[int], offset: int | None, heard: list[bool] | None = None) -> list[EncodedWindow]:
        offset = self.mm_offset() if offset is None else int(offset)
        n = len(indices)
        sizes = [50 if h else 0 for h in (heard or [True] * n)]  # heard: which windows have audio
        if audio.shape[0] != sum(sizes) or len(sizes) != n:
            raise InputShapeError(f"audio encoder gave {audio.shape[0]} tokens for {sum(s > 0 for s in sizes)} "
                                  f"windows with audio (want 50 each)")
        a_chunks, s_chunks = audio.split(sizes), scores.split(sizes)
        v_chunks = video.split([2 * g[0] * g[1] if g else 0 for g in grids])
        out = []
        for k, idx in enumerate(indices):
            gh, gw = grids[k] or (0, 0)
            frames = 2 if grids[k] else 0
            out.append(EncodedWindow(
                index=int(idx), audio=a_chunks[k], audio_scores=s_chunks[k].float(),
                video=v_chunks[k].reshape(frames, gh * gw, audio.shape[-1]), llm_grid_hw=(gh, gw), offset=offset,
                position_ids=window_position_ids(int(idx), (gh, gw), n_frames=frames, n_audio=sizes[k], offset=offset)))
        return out

    # ---- language model ---------------------------------------------------------------------------
    @torch.no_grad()
    def embed_ids(self, ids: Sequence[int]) -> torch.Tensor:
        t = torch.as_tensor(list(ids), dtype=torch.long, device=self.device)
        return self.thinker.get_input_embeddings()(t)

    @torch.no_grad()
    def forward_embeds(self, embeds: torch.Tensor, position_ids: torch.Tensor, cache: DynamicCache | None = None,
                       logits: str = "last") -> torch.Tensor | None:
        """Run the LM over `embeds` [n, D] at `position_ids` [3, n], appending to `cache` if given.

        logits: "last" -> [1, V] (what prefill needs), "all" -> [n, V], "none" -> None.
        """
        if embeds.ndim != 2 or position_ids.shape != (3, embeds.shape[0]):
            raise InputShapeError(f"embeds {tuple(embeds.shape)} / position_ids {tuple(position_ids.shape)} "
                                  "must be [n, D] / [3, n]")
        out = self.thinker.model.language_model(
            inputs_embeds=embeds[None].to(self.device, self.dtype), position_ids=position_ids[:, None].to(self.device),
            cache=cache, use_cache=cache is not None)
        if logits == "none":
            return None
        hidden = out.last_hidden_state[0]
        return self.thinker.lm_head(hidden[-1:] if logits == "last" else hidden).float()

    def greedy(self, cache: DynamicCache, embeds: torch.Tensor, position_ids: torch.Tensor, max_new_tokens: int,
               stop_ids: frozenset[int] | None = None) -> Iterator[int]:
        """Prefill `embeds` on `cache`, then yield greedy tokens; positions continue from the last + 1."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        stop_ids = self.stop_ids if stop_ids is None else stop_ids
        logits = self.forward_embeds(embeds, position_ids, cache, "last")
        next_pos = position_ids[:, -1:].to(self.device) + 1
        for step in range(max_new_tokens):
            token = int(logits[-1].argmax())
            yield token
            if token in stop_ids or step == max_new_tokens - 1:
                return
            logits = self.forward_embeds(self.embed_ids([token]), next_pos, cache, "last")
            next_pos = next_pos + 1


# ---- construction -------------------------------------------------------------------------------------
def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build_preset(name: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 seed: int = 0) -> Qwen25OmniAdapter:
    """A random-weight model of preset `name` (deterministic for a seed) with its offline processor."""
    preset = get_preset(name)
    tokenizer = build_preset_tokenizer()
    processor = OmniProcessor(tokenizer, min_pixels=preset.min_pixels, max_pixels=preset.max_pixels)
    config = build_config(preset, processor.token_ids, len(tokenizer))
    device = torch.device(device)
    torch.manual_seed(seed)
    with torch.device(device):
        thinker = Qwen2_5OmniThinkerForConditionalGeneration._from_config(config, dtype=dtype or default_dtype(device))
    return Qwen25OmniAdapter(thinker, processor, name=name)


def thinker_config_of(path: Path) -> tuple[Qwen2_5OmniThinkerConfig, bool]:
    """The thinker config of checkpoint `path` and whether its weights carry a `thinker.` prefix."""
    if not path.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist (and is not a preset name)")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    try:
        raw = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}/config.json is not valid JSON: {exc}") from exc
    model_type = raw.get("model_type")
    if model_type == "qwen2_5_omni":
        return Qwen2_5OmniConfig.from_pretrained(path, local_files_only=True).thinker_config, True
    if model_type == "qwen2_5_omni_thinker":
        return Qwen2_5OmniThinkerConfig.from_pretrained(path, local_files_only=True), False
    raise ModelLoadError(f"{path} holds a {model_type!r} model (architectures {raw.get('architectures')}); "
                         "this adapter needs a Qwen2.5-Omni checkpoint (model_type 'qwen2_5_omni' or "
                         "'qwen2_5_omni_thinker')")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> Qwen25OmniAdapter:
    """A local Qwen2.5-Omni checkpoint (thinker only; talker weights are skipped), local_files_only."""
    path = Path(path)
    config, prefixed = thinker_config_of(path)
    device = torch.device(device)
    processor = OmniProcessor.from_pretrained(path)
    kwargs = {"key_mapping": {r"^thinker\.": ""}} if prefixed else {}
    try:
        thinker = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
            path, config=config, dtype=dtype or default_dtype(device), local_files_only=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load Qwen2.5-Omni thinker weights from {path}: {exc}") from exc
    return Qwen25OmniAdapter(thinker.to(device), processor, name=str(path))
