"""A stream's rolling, compressed context kept warm in a KV cache (one per stream, held by the decoder).

Layout of the cache: [system prefix | window a | window a+1 | ... ]. Appending a window runs the LM
on that window's tokens only (incremental prefill). Before an append would exceed the token budget,
or the position range, the oldest windows are cut out of every layer's keys/values.

Bounded positions: the held windows are always numbered as if the stream had started at the oldest
held window (`base_index`), i.e. right after the system prefix. When eviction moves the oldest window,
the cached keys of everything after the prefix are re-rotated by the position change (exact: RoPE
rotations add; the adapter checks this on the model's rotary layout), values stay. So positions fed to
the LM never exceed the model's range however long the stream, and `rebuild()` (numbering from its
oldest kept window too) gives the live context's positions. Without eviction (a stream from window 0)
nothing moves.

Residue: kept windows were computed while evicted windows were in the cache; `refresh_every` re-prefills
the held windows every N appended windows (after an eviction), `refresh()` does it on demand.
`answer` appends the question, streams greedy tokens, then crops the cache back.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch

from .adapter import ModelAdapter, PromptTokens, fold_messages
from .window import CompressedWindow


@dataclass(frozen=True)
class Span:
    """One window's place in the cache: original positions [3, n] and their change per window renumbered."""

    index: int
    n_tokens: int
    position_ids: torch.Tensor  # original numbering, re-based to the context's prefix
    unit_delta: torch.Tensor  # position change when the stream is renumbered one window earlier
    max_position: int  # largest position of the UNCOMPRESSED window (original numbering)

    def positions(self, base: int) -> torch.Tensor:
        return self.position_ids + self.unit_delta * base


def cut_cache(cache: Any, start: int, stop: int, rotate=None) -> None:
    """Remove cached positions [start, stop) from every layer; `rotate` re-rotates the keys after them."""
    for layer in cache.layers:
        if layer.keys is None or layer.keys.numel() == 0:
            continue
        tail = layer.keys[..., stop:, :]
        layer.keys = torch.cat([layer.keys[..., :start, :], rotate(tail) if rotate else tail], dim=-2)
        layer.values = torch.cat([layer.values[..., :start, :], layer.values[..., stop:, :]], dim=-2)


class RollingContext:
    """Compressed context of one stream: system prompt + the newest windows within `budget_tokens`.

    refresh_every: re-prefill the held windows after this many appended windows once an eviction
    happened since the last refresh (keeps the held windows' embeddings: about one KV layer's worth).
    position_reserve: positions kept free after the windows for a question and its answer.
    """

    def __init__(self, adapter: ModelAdapter, budget_tokens: int = 8192, system_prompt: str | None = None, *,
                 refresh_every: int | None = None, position_reserve: int = 4096,
                 max_positions: int | None = None) -> None:
        self.adapter = adapter
        self.system_prompt = system_prompt
        self.offset = adapter.mm_offset(system_prompt)
        self._prefix = adapter.prompt_prefix(system_prompt)
        self.prefix_tokens = len(self._prefix.ids)
        if budget_tokens <= self.prefix_tokens:
            raise ValueError(f"budget_tokens ({budget_tokens}) must exceed the system prompt's "
                             f"{self.prefix_tokens} tokens")
        if refresh_every is not None and refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1 or None, got {refresh_every}")
        self.budget_tokens = int(budget_tokens)
        self.refresh_every = refresh_every
        self.max_positions = int(max_positions or adapter.max_positions)
        self.position_limit = self.max_positions - int(position_reserve)  # windows end below this
        self.per_window = adapter.positions_per_window
        if self.offset + self.per_window > self.position_limit:
            raise ValueError(f"position_reserve {position_reserve} leaves no room for one window below "
                             f"{self.max_positions} positions")
        self.reset()

    # ---- state ------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Drop every window; keep (recompute) the system prompt."""
        self.cache = self.adapter.new_cache()
        self.spans: deque[Span] = deque()
        self._windows: deque[CompressedWindow] = deque()
        self.base_index = 0
        self.evicted_windows = 0
        self.refreshes = 0
        self._since_refresh = 0
        self._evicted_since_refresh = 0
        self.next_position = self.offset
        self.last_prompt_tokens: PromptTokens | None = None
        self.max_position_used = int(self._prefix.position_ids.max())
        self._forward(self.adapter.embed_ids(self._prefix.ids), self._prefix.position_ids)

    @property
    def n_tokens(self) -> int:
        return self.cache.get_seq_length()

    @property
    def window_indices(self) -> list[int]:
        return [s.index for s in self.spans]

    @property
    def last_index(self) -> int | None:
        return self.spans[-1].index if self.spans else None

    def position_ids(self) -> torch.Tensor:
        """[3, n] positions of everything cached now (prefix, then the held windows as renumbered)."""
        return torch.cat([self._prefix.position_ids] + [s.positions(self.base_index) for s in self.spans], dim=1)

    def _forward(self, embeds: torch.Tensor, positions: torch.Tensor, logits: str = "none") -> torch.Tensor | None:
        if positions.numel():
            self.max_position_used = max(self.max_position_used, int(positions.max()))
        return self.adapter.forward_embeds(embeds, positions, self.cache, logits=logits)

    def _update_next_position(self) -> None:
        """Text continues after the held block's largest (uncompressed) position, as in the stock layout."""
        if not self.spans:
            self.next_position = self.offset
            return
        top = max(s.max_position - self.per_window * self.base_index for s in self.spans)
        kept = max((int(s.positions(self.base_index).max()) for s in self.spans if s.n_tokens), default=top)
        self.next_position = max(top, kept) + 1

    # ---- windows ----------------------------------------------------------------------------------
    def _check(self, window: CompressedWindow, last: int | None) -> CompressedWindow:
        if last is not None and window.index <= last:
            raise ValueError(f"window {window.index} arrives after window {last}: windows must be appended in order")
        if window.n_tokens > self.budget_tokens - self.prefix_tokens:
            raise ValueError(f"window {window.index} has {window.n_tokens} tokens, more than the budget leaves "
                             f"after the system prompt ({self.budget_tokens - self.prefix_tokens})")
        return window.rebased(self.offset)

    def _fits(self, first_index: int, last_index: int, tokens: int) -> bool:
        """Do windows first..last (holding `tokens` tokens) fit the token budget and the position range?"""
        span = self.offset + self.per_window * (last_index - first_index + 1)
        return self.prefix_tokens + tokens <= self.budget_tokens and span <= self.position_limit

    def _span(self, window: CompressedWindow) -> Span:
        return Span(window.index, window.n_tokens, window.position_ids.cpu().long(),
                    self.adapter.window_position_delta(window, 1).cpu().long(), window.max_position)

    def _evict_for(self, incoming: CompressedWindow) -> None:
        held = self.n_tokens - self.prefix_tokens
        n = cut = 0
        while self.spans and not self._fits(self.spans[0].index, incoming.index, held - cut + incoming.n_tokens):
            cut += self.spans.popleft().n_tokens
            if self._windows:
                self._windows.popleft()
            n += 1
        base = self.spans[0].index if self.spans else incoming.index
        if not n and base == self.base_index:
            return
        rotate = None
        if self.spans and base != self.base_index:
            delta = torch.cat([s.unit_delta * (base - self.base_index) for s in self.spans], dim=1)
            rotate = self.adapter.key_rotation(delta)
        if cut or rotate is not None:
            cut_cache(self.cache, self.prefix_tokens, self.prefix_tokens + cut, rotate)
        self.base_index = base
        self.evicted_windows += n
        self._evicted_since_refresh += n

    def append(self, window: CompressedWindow, return_logits: bool = False) -> torch.Tensor | None:
        """Incremental prefill of one window (evicting the oldest first if needed); logits [n, V] on request."""
        window = self._check(window, self.last_index)
        self._evict_for(window)
        span = self._span(window)
        logits = None
        if window.n_tokens:
            logits = self._forward(window.embeds.to(self.adapter.device, self.adapter.dtype),
                                   span.positions(self.base_index), "all" if return_logits else "none")
        self.spans.append(span)
        if self.refresh_every is not None:
            self._windows.append(window)
        self._update_next_position()
        self._since_refresh += 1
        if (self.refresh_every is not None and self._since_refresh >= self.refresh_every
                and self._evicted_since_refresh):
            self.refresh()
        return logits

    def _prefill(self, windows: Sequence[CompressedWindow]) -> None:
        """Reset, then one prefill of `windows` (checked, re-based, fitting) numbered from the first."""
        self.reset()
        spans = [self._span(w) for w in windows]
        self.base_index = windows[0].index if windows else 0
        if windows and sum(w.n_tokens for w in windows):
            embeds = torch.cat([w.embeds.to(self.adapter.device, self.adapter.dtype) for w in windows])
            self._forward(embeds, torch.cat([s.positions(self.base_index) for s in spans], dim=1))
        self.spans.extend(spans)
        if self.refresh_every is not None:
            self._windows.extend(windows)
        self._update_next_position()

    def rebuild_skip(self, sizes: Sequence[tuple[int, int]]) -> int:
        """How many of the oldest stored windows a rebuild leaves out: ``sizes`` are (index,
        n_tokens) in order; only the newest windows that fit the budget and the position range
        are prefilled (the others would be evicted at once), so a caller need not read them."""
        tokens = kept = 0
        for index, n in reversed(sizes):
            if not self._fits(index, sizes[-1][0], tokens + n):
                break
            tokens += n
            kept += 1
        return len(sizes) - kept

    def rebuild(self, windows: Iterable[CompressedWindow], *, skipped: int = 0, chunk_tokens: int = 256) -> None:
        """Start over from stored windows (e.g. after a decoder restart), streamed: windows are
        prefilled at most ``chunk_tokens`` at a time and not kept, so the peak memory stays near
        the context's own size however long the stream (one prefill of everything held every
        window, its copies and a whole-context activation at once: 4.5x in issue 19).

        A list keeps its newest windows that fit (``rebuild_skip``); an iterator should start
        at the first window that fits (``skipped``: how many older ones the caller left out),
        else older windows are evicted on the way as ``append`` does. The kept windows are
        numbered from the oldest kept one, as the live context numbers them.
        """
        if isinstance(windows, Sequence):
            last = None
            for w in windows:
                self._check(w, last)
                last = w.index
            skipped = self.rebuild_skip([(w.index, w.n_tokens) for w in windows])
            windows = windows[skipped:]
        self.reset()
        pending: list[CompressedWindow] = []
        for raw in windows:
            w = self._check(raw, pending[-1].index if pending else self.last_index)
            held = self.n_tokens - self.prefix_tokens + sum(p.n_tokens for p in pending)
            first = self.spans[0].index if self.spans else (pending[0].index if pending else w.index)
            if not self._fits(first, w.index, held + w.n_tokens) or not (self.spans or pending):
                self._prefill_more(pending, chunk_tokens)
                pending = []
                self._evict_for(w)  # the first window sets the numbering's base
            pending.append(w)
            if sum(p.n_tokens for p in pending) >= chunk_tokens:
                self._prefill_more(pending, chunk_tokens)
                pending = []
        self._prefill_more(pending, chunk_tokens)
        self.evicted_windows += skipped
        self._evicted_since_refresh = 0
        self._update_next_position()

    def _prefill_more(self, windows: Sequence[CompressedWindow], chunk_tokens: int) -> None:
        """Append checked, re-based, fitting windows at the current numbering, at most
        ``chunk_tokens`` per forward (a forward's activations grow with its tokens times the context)."""
        if not windows:
            return
        spans = [self._span(w) for w in windows]
        if sum(w.n_tokens for w in windows):
            embeds = torch.cat([w.embeds for w in windows])
            positions = torch.cat([s.positions(self.base_index) for s in spans], dim=1)
            for a in range(0, embeds.shape[0], chunk_tokens):
                self._forward(embeds[a:a + chunk_tokens].to(self.adapter.device, self.adapter.dtype),
                              positions[:, a:a + chunk_tokens])
            del embeds
        self.spans.extend(spans)
        if self.refresh_every is not None:
            self._windows.extend(windows)

    def refresh(self) -> None:
        """Re-prefill the held windows at their current positions: drops the residue of evicted windows."""
        if self.refresh_every is None:
            raise RuntimeError("refresh() needs the held windows: create the context with refresh_every")
        kept = (self.evicted_windows, self.refreshes, self.max_position_used)
        self._prefill(list(self._windows))
        self.evicted_windows, self.refreshes, self.max_position_used = kept[0], kept[1] + 1, kept[2]

    # ---- questions --------------------------------------------------------------------------------
    def _question(self, question: str | None, messages: Sequence[Any] | None) -> str:
        if messages is not None:
            if question is not None:
                raise ValueError("give a question or messages, not both")
            return fold_messages(messages)
        if question is None:
            raise ValueError("question must be a non-empty string")
        return question

    def prompt_tokens(self, question: str | None = None, *, messages: Sequence[Any] | None = None) -> PromptTokens:
        """Prompt size of asking `question` (or the folded `messages`) now: context + question tokens."""
        suffix = self.adapter.prompt_suffix(self._question(question, messages), self.next_position)
        return PromptTokens(self.n_tokens, len(suffix.ids))

    def answer(self, question: str | None = None, max_new_tokens: int = 64, stop_ids: frozenset[int] | None = None,
               *, messages: Sequence[Any] | None = None) -> Iterator[int]:
        """Stream greedy answer tokens to `question`, or to a chat's `messages` (system and earlier turns
        folded into the question, see `fold_messages`). The cache is cropped back afterwards (also if the
        caller stops early); `last_prompt_tokens` holds the prompt size once the first token is asked for.
        """
        suffix = self.adapter.prompt_suffix(self._question(question, messages), self.next_position)
        end = self.next_position + len(suffix.ids) + max_new_tokens
        if end > self.max_positions:
            raise ValueError(f"question ({len(suffix.ids)} tokens) and max_new_tokens ({max_new_tokens}) do not fit "
                             f"the {self.max_positions - self.next_position} positions left after the context")
        self.last_prompt_tokens = PromptTokens(self.n_tokens, len(suffix.ids))
        self.max_position_used = max(self.max_position_used, end - 2)
        length = self.n_tokens
        try:
            yield from self.adapter.greedy(self.cache, self.adapter.embed_ids(suffix.ids), suffix.position_ids,
                                           max_new_tokens, stop_ids)
        finally:
            self.cache.crop(length - self.cache.get_seq_length())
