"""Spoken questions in the decoder (a mixin of DecoderActor): a realtime session's turn, its
audio uncompressed after the stream's warm context (omnizip.models.spoken), answered as events
like a text question (AnswerStart, text pieces, AnswerEnd) under the same per-stream bound."""
from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from pipeline.core.messages import AnswerEnd, AnswerStart, MAX_ANSWER_TOKENS

__all__ = ["SpokenQuestions"]


class SpokenQuestions:
    """DecoderActor's spoken side; expects ``model``, ``metrics``, ``_stream``, ``_admit_question``, ``_start``."""

    model: Any
    metrics: Any

    def ask_spoken(self, stream_id: str, audio_16k: bytes, text: str | None = None,
                   max_tokens: int = 64) -> Iterator[AnswerStart | str | AnswerEnd]:
        """An answer to a spoken turn: ``audio_16k`` is mono float32 at 16 kHz (bytes), ``text``
        optional words after it (the session's instructions)."""
        from omnizip.models import IncrementalDetokenizer
        from omnizip.models.spoken import answer_spoken

        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_ANSWER_TOKENS:
            raise ValueError(f"max_tokens: must be an integer in [1, {MAX_ANSWER_TOKENS}], got {max_tokens!r}")
        if not isinstance(audio_16k, (bytes, bytearray)) or len(audio_16k) % 4:
            raise ValueError("audio: float32 samples as bytes")
        audio = np.frombuffer(bytes(audio_16k), dtype=np.float32)
        st = self._stream(stream_id)  # type: ignore[attr-defined]
        detok = IncrementalDetokenizer(self.model.processor)
        with self._admit_question(stream_id, st):  # type: ignore[attr-defined]
            t0 = time.perf_counter()
            ttft, n, reason = None, 0, "length"
            with st.lock:
                tokens = answer_spoken(st.ctx, audio, text, max_tokens, None)
                try:
                    for tok in tokens:
                        if ttft is None:
                            ttft = time.perf_counter() - t0
                            yield self._start(st)  # type: ignore[attr-defined]
                        if tok in self.model.stop_ids:
                            reason = "stop"
                            break
                        n += 1
                        piece = detok.push(tok)
                        if piece:
                            yield piece
                finally:
                    tokens.close()
                if ttft is None:
                    yield self._start(st)  # type: ignore[attr-defined]
            tail = detok.flush()
            if tail:
                yield tail
            yield AnswerEnd(n, reason)
            if ttft is not None:
                self.metrics.observe_answer(ttft, n, time.perf_counter() - t0)
