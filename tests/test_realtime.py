"""/v1/realtime against the real Serve app, engine, Redis and Ray, driven by the official openai
SDK's realtime client: a text turn; camera images and audio appended in real time, a manual
commit and response.create; server VAD (silero-vad) on espeak-ng speech between silences; barge-
in; every bad input answered by an ``error`` naming it while the socket stays open; the handshake
refusals and the browser's single-use client secret."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import zlib
from typing import Any

import pytest
import requests

from realtime_helpers import append_realtime, b64, client, image, silence, speech, tone, until

pytest.importorskip("silero_vad")


@pytest.fixture(scope="module")
def rt(serve_api: dict[str, Any]) -> Any:
    """The session app; after this module the sessions' streams of both keys are deleted (they
    end with their sockets but stay listed, and later modules share the keys and the Redis)."""
    yield serve_api
    for key in (serve_api["key"], serve_api["other_key"]):
        headers = {"Authorization": f"Bearer {key}"}
        listed = requests.get(f"{serve_api['url']}/v1/streams", headers=headers, timeout=60).json()["streams"]
        for st in listed:
            if st["source"] == "realtime:":
                requests.delete(f"{serve_api['url']}/v1/streams/{st['id']}", headers=headers, timeout=60)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 300))


def collect_response(events: list[Any]) -> dict[str, Any]:
    done = [e for e in events if e.type == "response.done"][-1]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    text_done = [e for e in events if e.type == "response.output_text.done"][-1].text
    return {"done": done, "deltas": deltas, "text": text_done}


MANUAL = {"type": "realtime", "output_modalities": ["text"], "instructions": "Answer briefly.",
          "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": None}}}


def test_a_text_turn_is_a_stream_of_the_key(rt: dict[str, Any]) -> None:
    async def go() -> tuple[str, list[Any]]:
        async with client(rt["url"], rt["key"]).realtime.connect(model="omnizip") as conn:
            created = await until(conn, "session.created")
            sid = created.session.id
            await conn.session.update(session=MANUAL)
            updated = await until(conn, "session.updated")
            assert updated.session.audio.input.turn_detection is None
            assert updated.session.instructions == "Answer briefly."
            await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "What is happening?"}]})
            seen: list[Any] = []
            await until(conn, "conversation.item.done", seen=seen)
            await conn.response.create(response={"max_output_tokens": 12})
            await until(conn, "response.done", seen=seen)
            streams = requests.get(rt["url"] + "/v1/streams", headers={"Authorization": f"Bearer {rt['key']}"},
                                   timeout=30).json()["streams"]
            mine = [s for s in streams if s["id"] == sid]
            assert mine and mine[0]["ingest"]["protocol"] == "realtime", mine
            other = requests.get(rt["url"] + f"/v1/streams/{sid}",
                                 headers={"Authorization": f"Bearer {rt['other_key']}"}, timeout=30)
            assert other.status_code == 404
            return sid, seen

    sid, seen = run(go())
    order = [e.type for e in seen if e.type.startswith("response.")]
    assert order[:4] == ["response.created", "response.output_item.added", "response.content_part.added",
                         "response.output_text.delta"], order
    r = collect_response(seen)
    assert r["deltas"] == r["text"] and r["text"]
    assert r["done"].response.status in ("completed", "incomplete")
    usage = r["done"].response.usage
    assert usage.input_token_details.cached_tokens > 0  # the stream's warm context
    assert usage.input_tokens > usage.input_token_details.cached_tokens and usage.output_tokens >= 1


def test_images_and_audio_in_real_time_then_commit(rt: dict[str, Any]) -> None:
    async def go() -> tuple[str, list[Any]]:
        async with client(rt["url"], rt["key"]).realtime.connect(model="omnizip") as conn:
            sid = (await until(conn, "session.created")).session.id
            await conn.session.update(session=MANUAL)
            await until(conn, "session.updated")
            await append_realtime(conn, tone(5.0), images_every_s=0.5)
            seen: list[Any] = []
            await conn.input_audio_buffer.commit()
            committed = await until(conn, "input_audio_buffer.committed", seen=seen)
            added = await until(conn, "conversation.item.added", seen=seen)
            assert added.item.id == committed.item_id and added.item.content[0].type == "input_audio"
            await conn.response.create()
            await until(conn, "response.done", seen=seen)
            errors = [e for e in seen if e.type == "error"]
            assert not errors, errors
            return sid, seen

    sid, seen = run(go())
    r = collect_response(seen)
    assert r["done"].response.status in ("completed", "incomplete") and r["text"] == r["deltas"]
    # the audio (5 s) counted as the question's own audio tokens, 25 a second
    assert r["done"].response.usage.input_token_details.audio_tokens == 125
    st = requests.get(rt["url"] + f"/v1/streams/{sid}", headers={"Authorization": f"Bearer {rt['key']}"},
                      timeout=30).json()
    assert st["tokens"]["audio"]["in"] > 0 and st["tokens"]["video"]["in"] > 0, st  # windows of both


def test_server_vad_answers_speech_without_a_commit(rt: dict[str, Any]) -> None:
    said = speech("What is happening in the video right now?")

    async def go() -> list[Any]:
        async with client(rt["url"], rt["key"]).realtime.connect(model="omnizip") as conn:
            session = (await until(conn, "session.created")).session
            assert session.audio.input.turn_detection.type == "server_vad"  # on by default, as OpenAI's
            seen: list[Any] = []
            sender = asyncio.create_task(append_realtime(conn, silence(1.0) + said + silence(2.5)))
            await until(conn, "response.done", timeout=120, seen=seen)
            await sender
            return seen

    seen = run(go())
    kinds = [e.type for e in seen]
    for k in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
              "input_audio_buffer.committed", "response.created", "response.done"):
        assert k in kinds, kinds
    assert kinds.index("input_audio_buffer.speech_started") < kinds.index("input_audio_buffer.speech_stopped") \
        < kinds.index("input_audio_buffer.committed") < kinds.index("response.created")
    started = next(e for e in seen if e.type == "input_audio_buffer.speech_started")
    stopped = next(e for e in seen if e.type == "input_audio_buffer.speech_stopped")
    assert 300 <= started.audio_start_ms <= 1300 and stopped.audio_end_ms > started.audio_start_ms + 1000
    assert started.item_id == stopped.item_id
    r = collect_response(seen)
    assert r["text"] == r["deltas"] and r["done"].response.usage.input_token_details.audio_tokens > 25


def test_speech_while_an_answer_streams_cancels_it(rt: dict[str, Any]) -> None:
    said = speech("Stop. Tell me something else.")
    lead = int(0.8 * 24000) * 2  # the first 0.8 s of the speech in one append (the bound is 0.9 s ahead)

    async def go() -> list[Any]:
        async with client(rt["url"], rt["key"]).realtime.connect(model="omnizip") as conn:
            await until(conn, "session.created")
            await append_realtime(conn, silence(0.5))
            await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "Describe everything you saw, in detail."}]})
            seen: list[Any] = []
            await conn.response.create(response={"max_output_tokens": "inf"})
            await conn.input_audio_buffer.append(audio=b64(said[:lead]))  # the user speaks over the answer
            await asyncio.sleep(0.8)
            await append_realtime(conn, said[lead:] + silence(2.0))
            await until(conn, "input_audio_buffer.speech_stopped", seen=seen)
            second = await until(conn, "response.done", seen=seen)  # the spoken turn's own answer
            # response.cancel: the client stops an answer
            await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "And now?"}]})
            await conn.response.create(response={"max_output_tokens": "inf"})
            await conn.response.cancel()
            third = await until(conn, "response.done", seen=seen)
            return seen + [second, third]

    seen = run(go())
    kinds = [e.type for e in seen]
    done = [e for e in seen if e.type == "response.done"]
    first = done[0]
    assert kinds.index("response.created") < kinds.index("input_audio_buffer.speech_started") \
        < kinds.index("response.done"), kinds
    assert first.response.status == "cancelled" and first.response.status_details.reason == "turn_detected"
    assert kinds.index("response.output_text.done") < kinds.index("response.done")  # its parts were closed
    assert done[1].response.status in ("completed", "incomplete")  # the barge-in's own turn is answered
    assert done[-1].response.status == "cancelled" and done[-1].response.status_details.reason == "client_cancelled"


def _bomb_png(width: int, height: int) -> str:
    """A tiny PNG whose header claims ``width`` x ``height`` (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) \
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def test_bad_input_is_named_and_the_socket_stays_open(rt: dict[str, Any]) -> None:
    gif = "data:image/png;base64," + base64.b64encode(b"GIF89a" + bytes(40)).decode()

    async def go() -> list[tuple[str, Any]]:
        async with client(rt["url"], rt["key"]).realtime.connect(model="omnizip") as conn:
            await until(conn, "session.created")
            got = []

            async def expect(label: str, send: Any) -> None:
                await send
                ev = await until(conn, "error", timeout=60)
                got.append((label, ev.error))

            raw = conn.send_raw
            await expect("unknown", raw(json.dumps({"type": "session.destroy", "event_id": "evt_1"})))
            await expect("json", raw("{not json"))
            await expect("base64", raw(json.dumps({"type": "input_audio_buffer.append", "audio": "###"})))
            await expect("odd", conn.input_audio_buffer.append(audio=b64(b"\x00\x01\x02")))
            await expect("big", raw(json.dumps({"type": "input_audio_buffer.append", "audio": "A" * (15 << 20)})))
            await expect("gif", conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
                {"type": "input_image", "image_url": gif}]}))
            await expect("bomb", conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
                {"type": "input_image", "image_url": _bomb_png(12000, 12000)}]}))
            await expect("fast", conn.input_audio_buffer.append(audio=b64(silence(3.0))))
            await expect("audio_out", conn.session.update(session={"type": "realtime",
                                                                   "output_modalities": ["audio"]}))
            await expect("tools", conn.session.update(session={"type": "realtime", "tools": [
                {"type": "function", "name": "f", "parameters": {}}]}))
            await expect("truncate", raw(json.dumps({"type": "conversation.item.truncate", "item_id": "x",
                                                     "content_index": 0, "audio_end_ms": 0})))
            await expect("cancel", conn.response.cancel())
            await expect("vad", conn.session.update(session={"type": "realtime", "audio": {"input": {
                "turn_detection": {"type": "server_vad", "threshold": 2.0}}}}))
            # still open: a good event is answered
            await conn.session.update(session={"instructions": "still here"})
            assert (await until(conn, "session.updated")).session.instructions == "still here"
            return got

    got = dict(run(go()))
    assert got["unknown"].code == "unknown_event" and got["unknown"].param == "type"
    assert got["unknown"].event_id == "evt_1" and "session.destroy" in got["unknown"].message
    assert got["json"].code == "invalid_json"
    assert got["base64"].code == "invalid_base64" and got["base64"].param == "audio"
    assert got["odd"].code == "invalid_audio" and "odd" in got["odd"].message
    assert got["big"].code == "event_too_large" and "15 MiB" in got["big"].message
    assert got["gif"].code == "invalid_image" and "JPEG or PNG" in got["gif"].message
    assert got["gif"].param == "item.content[0].image_url"
    assert got["bomb"].code == "invalid_image" and "12000x12000" in got["bomb"].message
    assert got["fast"].code == "append_too_fast" and "faster than real time" in got["fast"].message
    assert got["audio_out"].code == "unsupported" and got["audio_out"].param == "session.output_modalities"
    assert got["tools"].code == "unsupported" and got["tools"].param == "session.tools"
    assert got["truncate"].code == "unsupported"
    assert got["cancel"].code == "response_cancel_not_active"
    assert got["vad"].param == "session.audio.input.turn_detection.threshold"


def test_handshake_keys_secrets_and_the_session_limit(rt: dict[str, Any]) -> None:
    import websockets

    ws_url = rt["url"].replace("http://", "ws://") + "/v1/realtime?model=x"
    auth = {"Authorization": f"Bearer {rt['key']}"}

    def secret(**body: Any) -> dict[str, Any]:
        r = requests.post(rt["url"] + "/v1/realtime/client_secrets", json=body, headers=auth, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    assert requests.post(rt["url"] + "/v1/realtime/client_secrets", json={}, timeout=30).status_code == 401

    async def refused(**kw: Any) -> None:
        with pytest.raises(websockets.exceptions.InvalidStatus):
            async with websockets.connect(ws_url, open_timeout=30, **kw):
                pass

    async def browser(value: str) -> tuple[str | None, dict[str, Any]]:
        async with websockets.connect(ws_url, subprotocols=["realtime", f"openai-insecure-api-key.{value}"],
                                      open_timeout=30) as ws:
            return ws.subprotocol, json.loads(await asyncio.wait_for(ws.recv(), 60))

    async def go() -> None:
        await refused()
        await refused(additional_headers={"Authorization": "Bearer not-a-key-0123456789"})
        s = secret()
        assert s["value"].startswith("ek_") and s["expires_at"] > 0
        proto, first = await browser(s["value"])
        assert proto == "realtime" and first["type"] == "session.created"
        await refused(subprotocols=["realtime", f"openai-insecure-api-key.{s['value']}"])  # used up
        short = secret(expires_after={"anchor": "created_at", "seconds": 1})
        await asyncio.sleep(2.5)
        await refused(subprotocols=["realtime", f"openai-insecure-api-key.{short['value']}"])  # expired
        # the key's push streams bound its sessions (3 in the test engine)
        conns = [client(rt["url"], rt["other_key"]).realtime.connect(model="x") for _ in range(3)]
        opened = [await c.enter() for c in conns]
        try:
            for c in opened:
                await until(c, "session.created")
            async with websockets.connect(ws_url, additional_headers={"Authorization": f"Bearer {rt['other_key']}"},
                                          open_timeout=30) as ws:
                ev = json.loads(await asyncio.wait_for(ws.recv(), 60))
                assert ev["type"] == "error" and ev["error"]["code"] == "session_limit_exceeded", ev
                with pytest.raises(websockets.exceptions.ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 30)
        finally:
            for c in opened:
                await c.close()

    run(go())
