"""The decoder's answer generator on its own (no Ray): whenever the stream's lock is free - and
so another question or window may use the context - the KV cache holds exactly the context again,
whether the answer ended on a stop token, on its length, or was abandoned by its consumer."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from pipeline.engine.decoder import DecoderActor, _Stream
from pipeline.core.messages import AnswerEnd, AnswerStart
from pipeline.metrics import get_metrics


@pytest.fixture(scope="module")
def model():
    from omnizip.models import load_model
    return load_model("tiny", "cpu", None)


def decoder(model, st: _Stream) -> SimpleNamespace:
    d = SimpleNamespace(_stream=lambda sid: st, model=model, metrics=get_metrics(), _start=DecoderActor._start,
                        cfg=SimpleNamespace(max_questions_per_stream=2), cond=threading.Condition())
    d._admit_question = lambda sid, s: DecoderActor._admit_question(d, sid, s)
    d._answer = lambda *a: DecoderActor._answer(d, *a)
    return d


@pytest.mark.parametrize("question, max_tokens", [("What happens?", 64), ("Describe it.", 3), ("short?", 1)])
def test_the_cache_is_cropped_before_the_lock_is_released(model, question: str, max_tokens: int) -> None:
    from omnizip.models.rolling import RollingContext

    st = _Stream(RollingContext(model, budget_tokens=4096))
    context = st.ctx.n_tokens
    events = []
    for ev in DecoderActor.ask(decoder(model, st), "s", question, max_tokens):
        events.append(ev)
        if not st.lock.locked():  # another thread could take the context now
            assert st.ctx.n_tokens == context, (ev, st.ctx.n_tokens, context)
    assert isinstance(events[0], AnswerStart) and isinstance(events[-1], AnswerEnd)
    assert events[-1].completion_tokens <= max_tokens
    assert events[-1].finish_reason in ("stop", "length")
    assert st.ctx.n_tokens == context and not st.lock.locked()


def test_an_abandoned_answer_leaves_the_context_as_it_was(model) -> None:
    from omnizip.models.rolling import RollingContext

    st = _Stream(RollingContext(model, budget_tokens=4096))
    context = st.ctx.n_tokens
    gen = DecoderActor.ask(decoder(model, st), "s", "What happens?", 64)
    assert isinstance(next(gen), AnswerStart)
    gen.close()  # the consumer went away mid-answer
    assert st.ctx.n_tokens == context and not st.lock.locked()
    answer = [e for e in DecoderActor.ask(decoder(model, st), "s", "What happens?", 8) if isinstance(e, str)]
    assert isinstance("".join(answer), str)
