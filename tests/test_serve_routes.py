"""The HTTP API (pipeline.api.app) against a real Ray Serve app on 127.0.0.1 over the real engine
(tiny model, real Redis): stream lifecycle, every validation error, answers as JSON, as
Server-Sent Events and through the official openai client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from serve_helpers import Api, sse_answer, tone_clip

LIVE = ("lavfi:testsrc2=size=160x120:rate=10[out0];"
        "sine=f=440:sample_rate=16000[out1]")


@pytest.fixture(scope="module")
def api(serve_api: dict[str, Any]) -> Api:
    return Api(str(serve_api["url"]), str(serve_api["key"]))


@pytest.fixture(scope="module")
def oai(serve_api: dict[str, Any]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{serve_api['url']}/v1", api_key=str(serve_api["key"]), timeout=60, max_retries=0)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-s test pattern with a tone (H.264 + AAC)."""
    return tone_clip(tmp_path_factory.mktemp("serve") / "clip.mp4", 440)


@pytest.fixture(scope="module")
def ended(api: Api, clip: Path) -> Iterator[dict[str, Any]]:
    """A stream that played a file in real time and ended: its context no longer changes, so
    greedy answers to one question are the same whichever route asks."""
    st = api.create(source=str(clip), name="clip", realtime=True, omnizip={"rho_video": 0.6})
    st = api.wait(st["id"], lambda s: s["status"] in ("ended", "failed"), 90, "the end of the file")
    assert st["status"] == "ended", st
    yield st
    api.delete(f"/v1/streams/{st['id']}")


def err(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()["error"]
    assert body["code"] == status and body["message"], body
    return body


def test_healthz(api: Api) -> None:
    r = api.get("/healthz")
    assert r.status_code == 200, r.text
    assert r.json()["ok"] is True


def test_stream_lifecycle(api: Api) -> None:
    st = api.create(source=LIVE, name="pattern", realtime=True, context_tokens=2048,
                    omnizip={"rho_audio": 0.3, "rho_video": 0.6})
    sid = st["id"]
    assert st["name"] == "pattern" and st["source"] == LIVE
    assert st["status"] in ("starting", "live")
    assert st["settings"]["omnizip"]["rho_video"] == pytest.approx(0.6)
    assert st["settings"]["context_tokens"] == 2048
    try:
        assert sid in [s["id"] for s in api.get("/v1/streams").json()["streams"]]
        st = api.wait(sid, lambda s: s["windows"] >= 2, 60, "two windows in context")
        assert st["status"] == "live"
        for m in ("audio", "video"):
            t = st["tokens"][m]
            assert 0 < t["kept"] < t["in"], (m, t)  # compressed, not emptied
        assert 0 < st["context_tokens"] <= 2048
        assert st["media_s"] >= 4.0 and st["lag_s"] >= 0.0
        assert st["windows_total"] >= st["windows"]
    finally:
        r = api.delete(f"/v1/streams/{sid}")
    assert r.status_code == 200 and r.json() == {"id": sid, "deleted": True}
    err(api.get(f"/v1/streams/{sid}"), 404)
    err(api.delete(f"/v1/streams/{sid}"), 404)
    assert sid not in [s["id"] for s in api.get("/v1/streams").json()["streams"]]


OK_SOURCE = {"source": "lavfi:testsrc2"}

CREATE_ERRORS = [
    ({}, "source"),
    ({"source": ""}, "source"),
    ({"source": "   "}, "source"),
    ({"source": 7}, "source"),
    ({**OK_SOURCE, "name": "two words"}, "name"),
    ({**OK_SOURCE, "omnizip": {"rho_audio": 1.5}}, "omnizip.rho_audio"),
    ({**OK_SOURCE, "omnizip": {"g": -1}}, "omnizip.g"),
    ({**OK_SOURCE, "omnizip": {"rho_vidoe": 0.5}}, "omnizip.rho_vidoe"),
    ({**OK_SOURCE, "omnizip": {"min_ratio": 0.9, "max_ratio": 0.5}}, "omnizip"),
    ({**OK_SOURCE, "context_tokens": 0}, "context_tokens"),
    ({**OK_SOURCE, "size": [0, 64]}, "size.0"),
    ({**OK_SOURCE, "lookahead": -1}, "lookahead"),
    ({**OK_SOURCE, "realtime": "sometimes"}, "realtime"),
    ({**OK_SOURCE, "colour": "red"}, "colour"),
]


@pytest.mark.parametrize("body,field", CREATE_ERRORS, ids=[f for _, f in CREATE_ERRORS])
def test_create_validation(api: Api, body: dict[str, Any], field: str) -> None:
    e = err(api.post("/v1/streams", json=body), 422)
    assert e["param"] == field
    assert e["message"].startswith(field + ":"), e["message"]


def test_create_not_json(api: Api) -> None:
    e = err(api.post("/v1/streams", data=b"source=x", headers={"content-type": "application/json"}), 422)
    assert "JSON" in e["message"] or "json" in e["message"], e


@pytest.mark.parametrize("source,words", [("foo://camera/1", "foo"), ("lavfi:", "lavfi")])
def test_create_refused_by_engine(api: Api, source: str, words: str) -> None:
    e = err(api.post("/v1/streams", json={"source": source}), 400)
    assert words in e["message"], e


ASK_ERRORS = [({}, "question"), ({"question": ""}, "question"), ({"question": " \n"}, "question"),
              ({"question": "q", "max_tokens": 0}, "max_tokens"),
              ({"question": "q", "max_tokens": 10**6}, "max_tokens"),
              ({"question": "q", "stream": "yes please"}, "stream"),
              ({"question": "q", "temperature": 0.5}, "temperature")]


@pytest.mark.parametrize("body,field", ASK_ERRORS, ids=[f"{f}-{i}" for i, (_, f) in enumerate(ASK_ERRORS)])
def test_ask_validation(api: Api, ended: dict[str, Any], body: dict[str, Any], field: str) -> None:
    e = err(api.post(f"/v1/streams/{ended['id']}/ask", json=body), 422)
    assert e["param"] == field, e


CHAT_ERRORS = [
    ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": "clip"}, "messages"),
    ({"model": "clip", "messages": []}, "messages"),
    ({"model": "clip", "messages": [{"role": "system", "content": "be brief"}]}, "messages"),
    ({"model": "clip", "messages": [{"role": "user", "content": "  "}]}, "messages"),
    ({"model": "clip", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ({"model": "clip", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"model": "clip", "messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
    ({"model": "clip", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
]


@pytest.mark.parametrize("body,field", CHAT_ERRORS, ids=[f"{f}-{i}" for i, (_, f) in enumerate(CHAT_ERRORS)])
def test_chat_validation(api: Api, body: dict[str, Any], field: str) -> None:
    e = err(api.post("/v1/chat/completions", json=body), 422)
    assert e["param"] == field, e


def test_unknown_stream(api: Api, oai: openai.OpenAI) -> None:
    err(api.get("/v1/streams/nope"), 404)
    err(api.delete("/v1/streams/nope"), 404)
    err(api.post("/v1/streams/nope/ask", json={"question": "what?"}), 404)
    err(api.post("/v1/streams/nope/ask", json={"question": "what?", "stream": True}), 404)
    with pytest.raises(openai.NotFoundError, match="nope"):
        oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "what?"}])
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("nope")


def test_ask_json_and_sse_agree(api: Api, ended: dict[str, Any]) -> None:
    sid = ended["id"]
    r = api.post(f"/v1/streams/{sid}/ask", json={"question": "What is on screen?", "max_tokens": 6})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["stream_id"] == sid and body["question"] == "What is on screen?"
    assert 1 <= body["completion_tokens"] <= 6
    assert body["finish_reason"] == ("length" if body["completion_tokens"] == 6 else "stop")
    assert body["windows"] == ended["windows"] >= 1
    assert body["context_tokens"] == ended["context_tokens"] > 0

    text, done = sse_answer(api.ask_sse(sid, "What is on screen?", max_tokens=6))
    assert text == body["answer"] == done["answer"]  # greedy over an unchanging context
    assert done["completion_tokens"] == body["completion_tokens"]


def test_openai_models(oai: openai.OpenAI, ended: dict[str, Any]) -> None:
    ids = [m.id for m in oai.models.list()]
    assert ended["id"] in ids
    assert oai.models.retrieve("clip").id == ended["id"]  # by name too


def test_openai_chat(api: Api, oai: openai.OpenAI, ended: dict[str, Any]) -> None:
    from omnizip.models import fold_messages

    q = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "earlier"},
         {"role": "assistant", "content": "ok"}, {"role": "user", "content": "What is on screen?"}]
    # the system message and the earlier turns are folded into the question, as the model's own
    # rules fold them: the same prompt through /ask gives the same greedy answer
    ref = api.post(f"/v1/streams/{ended['id']}/ask",
                   json={"question": fold_messages(q), "max_tokens": 5}).json()
    last_only = api.post(f"/v1/streams/{ended['id']}/ask",
                         json={"question": "What is on screen?", "max_tokens": 5}).json()
    for model in (ended["id"], "clip"):
        c = oai.chat.completions.create(model=model, messages=q, max_tokens=5)
        assert c.object == "chat.completion" and c.model == model
        assert c.choices[0].message.role == "assistant"
        assert c.choices[0].message.content == ref["answer"]
        assert c.choices[0].finish_reason == ref["finish_reason"]
        assert c.usage.completion_tokens == ref["completion_tokens"]
        # prompt = the cached context + the folded question's own tokens
        assert c.usage.prompt_tokens_details.cached_tokens == ended["context_tokens"] == ref["context_tokens"]
        assert c.usage.prompt_tokens > ended["context_tokens"]
        assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
    short = oai.chat.completions.create(model="clip", messages=q[-1:], max_tokens=5)
    assert short.choices[0].message.content == last_only["answer"]
    assert short.usage.prompt_tokens < c.usage.prompt_tokens  # the longer conversation counts


def test_openai_chat_streaming(api: Api, oai: openai.OpenAI, ended: dict[str, Any]) -> None:
    ref = api.post(f"/v1/streams/{ended['id']}/ask",
                   json={"question": "Describe it.", "max_tokens": 5}).json()
    chunks = list(oai.chat.completions.create(
        model="clip", messages=[{"role": "user", "content": "Describe it."}], max_tokens=5,
        stream=True, stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == ref["answer"]
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [ref["finish_reason"]]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == ref["completion_tokens"]

    # without include_usage: no usage chunk, and the stream still ends cleanly at [DONE]
    plain = list(oai.chat.completions.create(
        model=ended["id"], messages=[{"role": "user", "content": "Describe it."}], max_tokens=5,
        stream=True))
    assert all(ch.choices for ch in plain)
    assert "".join(ch.choices[0].delta.content or "" for ch in plain) == ref["answer"]


def test_chat_refused_fields_via_openai(oai: openai.OpenAI, ended: dict[str, Any]) -> None:
    with pytest.raises(openai.UnprocessableEntityError, match="messages"):
        oai.chat.completions.create(model="clip", messages=[{"role": "system", "content": "x"}])


@pytest.mark.parametrize("question", ["café, naïve, Zürich?", "日本語で説明して", "🎥🔊 what now? 👀", "plain"])
def test_answers_are_whole_characters_over_sse_and_openai(api: Api, oai: openai.OpenAI, ended: dict[str, Any],
                                                          serve_api: dict, question: str) -> None:
    """The answer's pieces, streamed or not, join to exactly the full decode of the tokens the
    same model generates from the same context (rebuilt here from the stored windows: the
    presets are deterministic), so no piece ever splits a multi-byte character."""
    from omnizip.models import CompressedWindow, load_model
    from omnizip.models.rolling import RollingContext
    from pipeline.store.open import open_store

    n = 48
    with open_store(str(serve_api["redis_url"])) as store:
        windows = [CompressedWindow.from_bytes(w.payload) for w in store.windows(ended["id"])]
    model = load_model("tiny", "cpu", None)
    ctx = RollingContext(model, budget_tokens=int(ended["settings"]["context_tokens"]))
    ctx.rebuild(windows)
    ids = []
    for tok in ctx.answer(question, n):
        if tok in model.stop_ids:
            break
        ids.append(tok)
    full = model.processor.decode(ids, skip_special_tokens=True)

    events = api.ask_sse(ended["id"], question, max_tokens=n)
    text, done = sse_answer(events)
    assert text == full and done["answer"] == full
    assert api.post(f"/v1/streams/{ended['id']}/ask", json={"question": question, "max_tokens": n}).json()["answer"] == full
    chunks = list(oai.chat.completions.create(model=ended["id"], messages=[{"role": "user", "content": question}],
                                              max_tokens=n, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == full
    assert oai.chat.completions.create(model=ended["id"], messages=[{"role": "user", "content": question}],
                                       max_tokens=n).choices[0].message.content == full
    # and no piece is half a character: each encodes to whole UTF-8 and none is a lone replacement
    # that the full text does not have at that place
    pieces = [e.json()["text"] for e in events[:-1]]
    assert all(p.encode("utf-8").decode("utf-8") == p for p in pieces)
    assert "".join(pieces).count("\ufffd") == full.count("\ufffd")
