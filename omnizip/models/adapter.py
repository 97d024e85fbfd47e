"""What the rolling context, the offline path and the engine need from a model: the `ModelAdapter` protocol.

They depend on this protocol, never on the Qwen2.5-Omni class, so another model family plugs in by
implementing it (its own encoders, prompt layout, position scheme and key rotation). Also here: the
model-agnostic prompt helpers (`PromptPiece`, `fold_messages`, `PromptTokens`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import torch

from .window import CompressedWindow, EncodedWindow

Frames = Any  # uint8 RGB frames [T, H, W, 3], numpy or torch
Audio = Any  # mono float samples at 16 kHz, numpy or torch


@dataclass(frozen=True)
class PromptPiece:
    """Token ids of a text piece and their [3, n] positions."""

    ids: list[int]
    position_ids: torch.Tensor


@dataclass(frozen=True)
class PromptTokens:
    """Prompt size of one question: what the HTTP usage reports (`cached` = the warm context)."""

    context: int  # system prefix + held windows, already in the KV cache
    question: int  # the question's own tokens (markers, chat turn, assistant header included)

    @property
    def total(self) -> int:
        return self.context + self.question

    @property
    def cached(self) -> int:
        return self.context


@runtime_checkable
class ModelAdapter(Protocol):
    """One loaded multimodal LLM; stateless per stream (streams keep their own caches)."""

    family: str
    name: str
    processor: Any  # has .tokenizer, .decode(ids), .encode_text(text)
    stop_ids: frozenset[int]
    default_system_prompt: str | None

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def hidden_size(self) -> int: ...

    @property
    def max_positions(self) -> int:
        """Positions fed to the LM must stay below this (the model's max_position_embeddings)."""

    @property
    def positions_per_window(self) -> int:
        """Time positions one 2-s window spans (window k starts at offset + k * this)."""

    def new_cache(self) -> Any: ...

    def prompt_prefix(self, system_prompt: str | None = None) -> PromptPiece: ...

    def mm_offset(self, system_prompt: str | None = None) -> int: ...

    def prompt_suffix(self, question: str, start: int) -> PromptPiece: ...

    def encode_windows(self, windows: Sequence[tuple[Audio, Frames | None]], indices: Sequence[int], *,
                       sample_rate: int = ..., offset: int | None = None) -> list[EncodedWindow]:
        """Live path: 2-s windows (of one or many streams), each on its own features."""

    def encode_clip(self, audio_16k: Audio, frames: Frames, *, sample_rate: int = ...,
                    offset: int | None = None) -> list[EncodedWindow]:
        """Offline path: a whole clip on the stock processor's whole-clip features, split into windows."""

    def embed_ids(self, ids: Sequence[int]) -> torch.Tensor: ...

    def forward_embeds(self, embeds: torch.Tensor, position_ids: torch.Tensor, cache: Any = None,
                       logits: str = "last") -> torch.Tensor | None: ...

    def greedy(self, cache: Any, embeds: torch.Tensor, position_ids: torch.Tensor, max_new_tokens: int,
               stop_ids: frozenset[int] | None = None) -> Iterator[int]: ...

    def window_position_delta(self, window: CompressedWindow, windows_back: int) -> torch.Tensor:
        """[3, n] change of `window`'s positions when the stream is renumbered `windows_back` windows earlier
        (linear in `windows_back`: the rolling context scales the one-window delta)."""

    def key_rotation(self, delta: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """A function re-rotating cached keys [..., n, head_dim] by position deltas [3, n] (exact RoPE shift)."""


# ---- chat messages -> one question ------------------------------------------------------------------
def _text(content: Any) -> str:
    """Text of an OpenAI-style content: a string or a list of parts ({"type": "text", "text": ...})."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for p in content:
        t = p.get("text") if isinstance(p, Mapping) else getattr(p, "text", None)
        if isinstance(t, str):
            parts.append(t)
    return "\n".join(parts)


def _role_text(m: Any) -> tuple[str, str]:
    if isinstance(m, Mapping):
        return str(m.get("role", "")), _text(m.get("content"))
    text = m.text() if callable(getattr(m, "text", None)) else _text(getattr(m, "content", None))
    return str(getattr(m, "role", "")), text


def fold_messages(messages: Sequence[Any], max_chars: int = 8192) -> str:
    """One question from a chat: system messages and earlier turns folded in front of the last user message.

    The stream's cached context already holds the context's own system prompt, so a request's system
    message and history can only travel in the question. Oldest turns go first when over `max_chars`;
    the last user message is always kept (its end, if it alone is too long).
    """
    turns = [_role_text(m) for m in messages]
    last = max((i for i, (r, t) in enumerate(turns) if r == "user" and t.strip()), default=None)
    if last is None:
        raise ValueError("messages must contain a user message with text")
    question = turns[last][1].strip()
    system = "\n".join(t.strip() for r, t in turns[:last] if r in ("system", "developer") and t.strip())
    history = [f"{'User' if r == 'user' else 'Assistant'}: {t.strip()}" for r, t in turns[:last]
               if r in ("user", "assistant") and t.strip()]

    def build(hist: list[str], sys_text: str) -> str:
        head = [sys_text] if sys_text else []
        if hist:
            head.append("Conversation so far:\n" + "\n".join(hist))
        return "\n\n".join(head + [question]) if head else question

    text = build(history, system)
    while len(text) > max_chars and history:
        history.pop(0)
        text = build(history, system)
    if len(text) > max_chars and system:
        room = max_chars - len(question) - 2
        text = build([], system[:room].rstrip()) if room > 0 else question
    return text if len(text) <= max_chars else text[-max_chars:]


__all__ = ["Audio", "Frames", "ModelAdapter", "PromptPiece", "PromptTokens", "fold_messages"]
