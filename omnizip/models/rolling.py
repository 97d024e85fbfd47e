"""A stream's rolling, compressed context kept warm in a KV cache (one per stream, held by the decoder).

Layout of the cache: [system prefix | window a | window a+1 | ... ]. Appending a window runs the LM
on that window's tokens only (incremental prefill at their TMRoPE positions). Before an append would
exceed the token budget, the oldest windows are cut out of every layer's keys/values; RoPE is already
applied to cached keys, so the remaining positions stay valid. `answer` appends the question, streams
greedy tokens, then crops the cache back, so the next window follows the context, not the Q&A.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from transformers import DynamicCache

from .qwen2_5_omni import Qwen25OmniAdapter
from .window import CompressedWindow


@dataclass(frozen=True)
class Span:
    """One window's place in the cache."""

    index: int
    n_tokens: int


def cut_cache(cache: DynamicCache, start: int, stop: int) -> None:
    """Remove cached positions [start, stop) from every layer's keys and values."""
    for layer in cache.layers:
        if layer.keys is None or layer.keys.numel() == 0:
            continue
        layer.keys = torch.cat([layer.keys[..., :start, :], layer.keys[..., stop:, :]], dim=-2)
        layer.values = torch.cat([layer.values[..., :start, :], layer.values[..., stop:, :]], dim=-2)


class RollingContext:
    """Compressed context of one stream: system prompt + the newest windows within `budget_tokens`."""

    def __init__(self, adapter: Qwen25OmniAdapter, budget_tokens: int = 8192, system_prompt: str | None = None):
        self.adapter = adapter
        self.system_prompt = system_prompt
        self.offset = adapter.mm_offset(system_prompt)
        self._prefix = adapter.prompt_prefix(system_prompt)
        self.prefix_tokens = len(self._prefix.ids)
        if budget_tokens <= self.prefix_tokens:
            raise ValueError(f"budget_tokens ({budget_tokens}) must exceed the system prompt's "
                             f"{self.prefix_tokens} tokens")
        self.budget_tokens = int(budget_tokens)
        self.reset()

    # ---- state ------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Drop every window; keep (recompute) the system prompt."""
        self.cache = self.adapter.new_cache()
        self.spans: deque[Span] = deque()
        self.next_position = self.offset
        self.evicted_windows = 0
        self.adapter.forward_embeds(self.adapter.embed_ids(self._prefix.ids), self._prefix.position_ids,
                                    self.cache, logits="none")

    @property
    def n_tokens(self) -> int:
        return self.cache.get_seq_length()

    @property
    def window_indices(self) -> list[int]:
        return [s.index for s in self.spans]

    @property
    def last_index(self) -> int | None:
        return self.spans[-1].index if self.spans else None

    # ---- windows ----------------------------------------------------------------------------------
    def _check(self, window: CompressedWindow, last: int | None) -> CompressedWindow:
        if last is not None and window.index <= last:
            raise ValueError(f"window {window.index} arrives after window {last}: windows must be appended in order")
        if window.n_tokens > self.budget_tokens - self.prefix_tokens:
            raise ValueError(f"window {window.index} has {window.n_tokens} tokens, more than the budget leaves "
                             f"after the system prompt ({self.budget_tokens - self.prefix_tokens})")
        return window.rebased(self.offset)

    def _evict_for(self, incoming: int) -> None:
        n = 0
        total = self.n_tokens
        while self.spans and total + incoming > self.budget_tokens:
            total -= self.spans.popleft().n_tokens
            n += 1
        if n:
            cut_cache(self.cache, self.prefix_tokens, self.prefix_tokens + (self.n_tokens - total))
            self.evicted_windows += n

    def append(self, window: CompressedWindow, return_logits: bool = False) -> torch.Tensor | None:
        """Incremental prefill of one window (evicting the oldest first if needed); logits [n, V] on request."""
        window = self._check(window, self.last_index)
        self._evict_for(window.n_tokens)
        logits = None
        if window.n_tokens:
            logits = self.adapter.forward_embeds(window.embeds, window.position_ids, self.cache,
                                                 logits="all" if return_logits else "none")
        self.spans.append(Span(window.index, window.n_tokens))
        self.next_position = max(self.next_position, window.max_position + 1)
        return logits

    def rebuild(self, windows: Iterable[CompressedWindow]) -> None:
        """Start over from stored windows (e.g. after a decoder restart): keep the newest that fit, one prefill."""
        ws = list(windows)
        last = None
        for w in ws:
            self._check(w, last)
            last = w.index
        room, keep = self.budget_tokens - self.prefix_tokens, []
        for w in reversed(ws):
            if w.n_tokens > room:
                break
            keep.append(w.rebased(self.offset))
            room -= w.n_tokens
        keep.reverse()
        self.reset()
        self.evicted_windows = len(ws) - len(keep)
        if keep:
            embeds = torch.cat([w.embeds.to(self.adapter.device, self.adapter.dtype) for w in keep])
            positions = torch.cat([w.position_ids.cpu() for w in keep], dim=1)
            if embeds.shape[0]:
                self.adapter.forward_embeds(embeds, positions, self.cache, logits="none")
        self.spans.extend(Span(w.index, w.n_tokens) for w in keep)
        self.next_position = max([self.offset] + [w.max_position + 1 for w in ws])

    # ---- questions --------------------------------------------------------------------------------
    def answer(self, question: str, max_new_tokens: int = 64, stop_ids: frozenset[int] | None = None) -> Iterator[int]:
        """Stream greedy answer tokens; the cache is cropped back afterwards (also if the caller stops early)."""
        suffix = self.adapter.prompt_suffix(question, self.next_position)
        length = self.n_tokens
        try:
            yield from self.adapter.greedy(self.cache, self.adapter.embed_ids(suffix.ids), suffix.position_ids,
                                           max_new_tokens, stop_ids)
        finally:
            self.cache.crop(length - self.cache.get_seq_length())

    def answer_text(self, question: str, max_new_tokens: int = 64) -> str:
        return self.adapter.processor.decode(list(self.answer(question, max_new_tokens)))
