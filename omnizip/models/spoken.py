"""A spoken question after a stream's warm context: the user's turn is their audio, not
compressed, as Qwen2.5-Omni takes spoken questions natively, so an answer costs the turn's own
tokens however long the stream.

Layout after the held windows (as ``prompt_suffix`` closes the stream's block):
``<|audio_eos|><|vision_eos|>{between}<|audio_bos|>[turn audio tokens]<|audio_eos|>{text}{after}``
with text positions running on (an audio-only block advances one position per token, 25 a
second, as ``get_rope_index`` numbers it). The audio goes through the stock audio tower on the
whole turn's log-mel (``mel_clip``), padded to whole 2-s windows and cut back to the turn's
length (one token per 40 ms).
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np
import torch

from .adapter import PromptTokens
from .positions import text_position_ids
from .processor import SAMPLE_RATE, WINDOW_SAMPLES

__all__ = ["MAX_TURN_S", "answer_spoken", "spoken_suffix"]

MAX_TURN_S = 120.0  # a spoken turn at most (3000 audio tokens)
SAMPLES_PER_TOKEN = SAMPLE_RATE // 25


def spoken_suffix(adapter: Any, audio_16k: np.ndarray, start: int,
                  text: str | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(embeds [n, D], positions [3, n], audio tokens) of a spoken turn starting at ``start``."""
    audio = np.asarray(audio_16k, dtype=np.float32).reshape(-1)
    if audio.size == 0:
        raise ValueError("audio: a spoken question needs some audio")
    if audio.size > MAX_TURN_S * SAMPLE_RATE:
        raise ValueError(f"audio: a spoken question is at most {MAX_TURN_S:g} s, got {audio.size / SAMPLE_RATE:.1f} s")
    windows = math.ceil(audio.size / WINDOW_SAMPLES)
    padded = np.zeros(windows * WINDOW_SAMPLES, np.float32)
    padded[:audio.size] = audio
    mel = adapter.processor.mel_clip(padded, SAMPLE_RATE)
    tokens, _ = adapter._audio(mel, torch.tensor([mel.shape[-1]]))
    n_audio = max(1, min(tokens.shape[0], math.ceil(audio.size / SAMPLES_PER_TOKEN)))
    tokens = tokens[:n_audio]
    ids, enc = adapter.token_ids, adapter.processor.encode_text
    head = [ids["<|audio_eos|>"], ids["<|vision_eos|>"]] + enc(adapter.chat.between) + [ids["<|audio_bos|>"]]
    tail = [ids["<|audio_eos|>"]] + (enc(text, plain=True) if text and text.strip() else []) \
        + enc(adapter.chat.after)
    head_pos = torch.cat([text_position_ids(1, start), text_position_ids(1, start),
                          text_position_ids(len(head) - 2, start + 1)], dim=1)
    nxt = int(head_pos.max()) + 1
    embeds = torch.cat([adapter.embed_ids(head), tokens.to(adapter.device, adapter.dtype), adapter.embed_ids(tail)])
    pos = torch.cat([head_pos, text_position_ids(n_audio, nxt), text_position_ids(len(tail), nxt + n_audio)], dim=1)
    return embeds, pos, n_audio


def answer_spoken(ctx: Any, audio_16k: np.ndarray, text: str | None, max_new_tokens: int,
                  stop_ids: frozenset[int] | None = None) -> Iterator[int]:
    """Greedy answer tokens to a spoken turn on a RollingContext's warm cache; the cache is cropped
    back after (also when the caller stops early), as ``RollingContext.answer`` does."""
    embeds, pos, _ = spoken_suffix(ctx.adapter, audio_16k, ctx.next_position, text)
    end = ctx.next_position + embeds.shape[0] + max_new_tokens
    if end > ctx.max_positions:
        raise ValueError(f"the spoken question ({embeds.shape[0]} tokens) and max_new_tokens ({max_new_tokens}) "
                         f"do not fit the {ctx.max_positions - ctx.next_position} positions left after the context")
    ctx.last_prompt_tokens = PromptTokens(ctx.n_tokens, int(embeds.shape[0]))
    length = ctx.n_tokens
    try:
        yield from ctx.adapter.greedy(ctx.cache, embeds, pos, max_new_tokens, stop_ids)
    finally:
        ctx.cache.crop(length - ctx.cache.get_seq_length())
