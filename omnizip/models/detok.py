"""Incremental detokenization that never splits a character.

Byte-level BPE tokens are bytes, not characters: "é" is two tokens, an emoji four, so decoding one token
at a time yields U+FFFD halves. `IncrementalDetokenizer` decodes a short sliding window of ids and only
emits text once it no longer ends in an incomplete character, so the joined pieces equal the full decode.
Works with any Hugging Face tokenizer (or an object with a `.tokenizer`, like `OmniProcessor`).
"""

from __future__ import annotations

from typing import Any

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """`push(token_id)` returns the text completed by that token ('' while a character is unfinished);
    `flush()` returns what is left at the end. Pieces joined == tokenizer.decode(all ids).

    Special tokens are skipped as in `tokenizer.decode(ids, skip_special_tokens=True)` (the default).
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        tok = getattr(tokenizer, "tokenizer", tokenizer)  # OmniProcessor -> its tokenizer
        if not callable(getattr(tok, "decode", None)):
            raise TypeError(f"need a tokenizer with decode(), got {type(tokenizer).__name__}")
        self.tokenizer = tok
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the ids decoded for context (so leading-space rules see a prefix)
        self._read = 0  # ids before this are emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Text that became complete with `token_id` (never half a character)."""
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        if len(text) <= len(before) or text.endswith(_REPLACEMENT) or not text.startswith(before):
            return ""  # unfinished character (or nothing visible yet): wait for more bytes
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(before):]

    def flush(self) -> str:
        """The rest (an unfinished character at the very end comes out as U+FFFD, as in the full decode)."""
        before = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return text[len(before):] if text.startswith(before) else text

    def reset(self) -> None:
        self.ids.clear()
        self._prefix = self._read = 0


def stream_text(tokenizer: Any, token_ids: Any) -> list[str]:
    """The non-empty pieces an IncrementalDetokenizer emits for `token_ids` (flush included)."""
    d = IncrementalDetokenizer(tokenizer)
    pieces = [p for p in (d.push(t) for t in token_ids) if p]
    tail = d.flush()
    return pieces + ([tail] if tail else [])


__all__ = ["IncrementalDetokenizer", "stream_text"]
