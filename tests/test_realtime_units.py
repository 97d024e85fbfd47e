"""The realtime pieces alone: turn decisions (pure), appended media checks (a PNG that claims a
huge picture refused from its header), the session rules of session.update, silero-vad on
espeak-ng speech between silences, and a spoken question on the tiny model's warm context."""

from __future__ import annotations

import base64
import struct
import zlib

import numpy as np
import pytest

from pipeline.api.realtime_events import EventError, SessionConfig
from pipeline.core.turns import TurnDetection, TurnDetector
from pipeline.sources.appended import check_image, check_pcm, decode_image, pcm_to_16k
from realtime_helpers import image, silence, speech


def test_a_turn_starts_padded_and_stops_after_the_silence() -> None:
    d = TurnDetector(TurnDetection(threshold=0.5, prefix_padding_ms=300, silence_duration_ms=200))
    events = []
    for k, p in enumerate([0.1] * 20 + [0.9] * 30 + [0.2] * 10):
        events += d.push(p, k * 32.0, (k + 1) * 32.0)
    assert [(e.kind, e.ms) for e in events] == [("speech_started", 20 * 32 - 300), ("speech_stopped", 57 * 32)]
    with pytest.raises(ValueError, match="threshold"):
        TurnDetection(threshold=1.5)


def _png_header(w: int, h: int) -> bytes:
    """A small PNG whose header claims w x h (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) \
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_images_are_judged_by_their_header() -> None:
    jpeg = base64.b64decode(image(3).split(",", 1)[1])
    assert check_image(jpeg, 10**6).format == "jpeg"
    frame = decode_image(jpeg, 10**6)
    assert (frame.width, frame.height) == (160, 120)
    with pytest.raises(ValueError, match="5000x5000"):
        check_image(_png_header(5000, 5000), 4096 * 4096)
    with pytest.raises(ValueError, match="JPEG or PNG"):
        check_image(b"GIF89a" + bytes(20), 10**6)
    with pytest.raises(ValueError, match="odd"):
        check_pcm(b"\x00\x01\x02")
    assert pcm_to_16k(silence(1.5)).size == pytest.approx(24000, abs=200)


def test_session_update_rules() -> None:
    cfg = SessionConfig("s1").updated({"type": "realtime", "instructions": "hi", "audio": {"input": {
        "format": {"type": "audio/pcm", "rate": 24000},
        "turn_detection": {"type": "server_vad", "threshold": 0.6, "silence_duration_ms": 300}}}})
    assert cfg.vad is not None and cfg.vad.threshold == 0.6 and cfg.vad.silence_duration_ms == 300
    assert SessionConfig("s1").updated({"audio": {"input": {"turn_detection": None}}}).vad is None
    for bad, param in (({"output_modalities": ["audio"]}, "session.output_modalities"),
                       ({"audio": {"input": {"format": {"type": "audio/pcmu"}}}}, "session.audio.input.format.type"),
                       ({"audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}},
                        "session.audio.input.turn_detection.type"),
                       ({"voice": "alloy"}, "session.voice")):
        with pytest.raises(EventError) as e:
            SessionConfig("s1").updated(bad)
        assert e.value.param == param


def test_silero_hears_espeak_between_silences() -> None:
    pytest.importorskip("silero_vad")
    from pipeline.engine.vad import Vad

    vad = Vad(TurnDetection(silence_duration_ms=500))
    pcm = silence(1.0) + speech("What is happening in the video?") + silence(1.5)
    events, step = [], 2400 * 2
    for a in range(0, len(pcm), step):
        events += vad.push(pcm[a:a + step], a / 2 / 24.0)
    kinds = [e.kind for e in events]
    assert kinds == ["speech_started", "speech_stopped"], events
    assert 500 <= events[0].ms <= 1200 and events[1].ms > events[0].ms + 1000


def test_a_spoken_question_leaves_the_context_as_it_was() -> None:
    from omnizip.models import load_model
    from omnizip.models.rolling import RollingContext
    from omnizip.models.spoken import answer_spoken

    ctx = RollingContext(load_model("tiny"), budget_tokens=4096)
    before = ctx.n_tokens
    audio = (np.random.RandomState(0).randn(16000 * 3) * 0.1).astype(np.float32)
    tokens = list(answer_spoken(ctx, audio, "what?", 6))
    assert 1 <= len(tokens) <= 6 and ctx.n_tokens == before
    assert ctx.last_prompt_tokens.question > 75  # 3 s of audio: 75 tokens, plus the turn's markers
    with pytest.raises(ValueError, match="audio"):
        list(answer_spoken(ctx, np.zeros(0, np.float32), None, 4))
