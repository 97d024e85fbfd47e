"""Push streams over WHIP against the real Serve app, engine and Redis: a real aiortc publisher
(tests/push_helpers.py, ICE on loopback only) sends a camera whose frames show their number and
a tone; the stream's windows hold them in order; the publisher leaves and comes back within the
grace, the gap is flagged; after the grace the stream ends with every window stored. Every
refusal of RFC 9725's road is asked over real HTTP."""

from __future__ import annotations

import time
from typing import Any

import pytest
import requests

from push_helpers import Publisher, read_stripes
from serve_helpers import Api

pytest.importorskip("aiortc")


@pytest.fixture(scope="module")
def api(serve_api: dict[str, Any]) -> Api:
    return Api(str(serve_api["url"]), str(serve_api["key"]))


def push_stream(api: Api, **spec: Any) -> dict[str, Any]:
    st = api.create(source="whip:", **spec)
    assert st["ingest"]["protocol"] == "whip", st
    assert st["ingest"]["url"] == f"{api.url}/v1/whip/{st['id']}", st  # absolute: OBS's Server field
    assert len(st["ingest"]["token"]) >= 32
    return st


def whip(url: str, token: str | None, body: bytes | str, ctype: str = "application/sdp") -> requests.Response:
    headers = {"Content-Type": ctype}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return requests.post(url, data=body, headers=headers, timeout=60)


def publish(st: dict[str, Any], pub: Publisher) -> str:
    r = whip(st["ingest"]["url"], st["ingest"]["token"], pub.offer())
    assert r.status_code == 201, r.text
    assert r.headers["content-type"].startswith("application/sdp")
    assert r.text.startswith("v=0") and "a=candidate:" in r.text
    location = r.headers["Location"]
    assert location.startswith(f"/v1/whip/{st['id']}/")
    pub.answer(r.text)
    return location


def stored_numbers(serve_api: dict[str, Any], sid: str, indices: list[int]) -> list[int]:
    """The frame numbers the stored windows' thumbnails show (one per LLM frame)."""
    import ray

    from pipeline.engine.service import find_service
    from pipeline.viz import window as window_viz

    svc = find_service(serve_api["config"])
    out = []
    for i in indices:
        data = ray.get(svc.window_viz.remote(sid, i))
        assert data is not None, f"window {i} has no picture"
        out += [read_stripes(f) for f in window_viz.decode_record(data)["thumb"]]
    return out


def test_a_browser_like_publisher_streams_into_the_context(api: Api, serve_api: dict[str, Any]) -> None:
    st = push_stream(api, name="whip-cam", method="keep_all")
    sid, token = st["id"], st["ingest"]["token"]
    assert "token" not in api.status(sid)["ingest"]  # shown once
    first, second = Publisher(fps=15), Publisher(fps=15)
    try:
        location = publish(st, first)
        live = api.wait(sid, lambda s: s["status"] == "live" and s["windows"] >= 3, 120, "three windows in context")
        assert live["ingest"]["connected"] and live["tokens"]["video"]["in"] > 0 and live["tokens"]["audio"]["in"] > 0
        # a second publisher while one is connected
        other = Publisher()
        r = whip(st["ingest"]["url"], token, other.offer())
        other.close()
        assert r.status_code == 409 and r.json()["error"]["type"] == "conflict", r.text
        # trickle ICE is not offered; a stop needs the token
        assert requests.patch(api.url + location, data="a=candidate:x", timeout=30,
                              headers={"Content-Type": "application/trickle-ice-sdpfrag",
                                       "Authorization": f"Bearer {token}"}).status_code == 405
        assert requests.delete(api.url + location, timeout=30).status_code == 401
        r = requests.delete(api.url + location, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert r.status_code == 200, r.text
        r = requests.delete(api.url + location, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert r.status_code == 404, r.text  # that session is over
        away = api.status(sid)
        time.sleep(2.0)
        publish(st, second)  # back within the grace (8 s here)
        back = api.wait(sid, lambda s: s["windows_total"] >= away["windows_total"] + 3, 120, "windows after the return")
        assert back["reconnects"] >= 1 and back["status"] == "live", back
        second.close()
        ended = api.wait(sid, lambda s: s["status"] == "ended", 120, "the end after the grace")
    finally:
        first.close()
        second.close()
    windows = api.get(f"/v1/streams/{sid}/windows", params={"limit": 500}).json()["windows"]
    assert [w["index"] for w in windows] == list(range(ended["windows_total"]))  # every window stored
    assert any(w["flags"]["audio_gap"] or w["flags"]["video_gap"] or w["flags"]["discontinuity"]
               for w in windows if w["index"] > 0), "the publisher's absence is not flagged"
    numbers = stored_numbers(serve_api, sid, [0, 1, 2])
    assert numbers == sorted(numbers) and numbers[-1] > numbers[0], numbers  # the camera's frames, in order
    late = Publisher()
    r = whip(st["ingest"]["url"], token, late.offer())
    late.close()
    assert r.status_code == 409, r.text  # an ended stream takes no publisher
    assert api.delete(f"/v1/streams/{sid}").status_code == 200


def test_whip_refusals(api: Api, serve_api: dict[str, Any]) -> None:
    st = push_stream(api)
    url, token = st["ingest"]["url"], st["ingest"]["token"]
    pub = Publisher()
    offer = pub.offer()
    pub.close()
    try:
        for bad in (None, "", "wrong-token", serve_api["key"], token + "x"):  # an API key is no publish token
            r = whip(url, bad, offer)
            assert r.status_code == 401, (bad, r.text)
            assert r.json()["error"]["type"] == "authentication_error" and "WWW-Authenticate" in r.headers
        r = whip(url, token, offer, ctype="text/plain")
        assert r.status_code == 415 and r.json()["error"]["param"] == "content-type", r.text
        r = whip(url, token, offer + "a=x:" + "y" * 70000 + "\r\n")
        assert r.status_code == 413, r.text
        r = whip(url, token, "this is not an offer")
        assert r.status_code == 400 and "not an SDP offer" in r.json()["error"]["message"], r.text
        no_codec = "\r\n".join(ln for ln in offer.splitlines() if not ln.startswith("a=rtpmap:"))
        r = whip(url, token, no_codec)
        assert r.status_code == 400 and "codec" in r.json()["error"]["message"], r.text
        r = whip(url.rsplit("/", 1)[0] + "/0123456789abcdef", token, offer)
        assert r.status_code == 404, r.text
        r = requests.options(url, timeout=30)
        assert r.status_code == 204 and "POST" in r.headers["Allow"], r.headers
        # a pulled stream takes no publisher
        pulled = api.create(source="lavfi:testsrc2=size=64x64:rate=5,trim=duration=2[out0]")
        r = whip(url.rsplit("/", 1)[0] + "/" + pulled["id"], token, offer)
        assert r.status_code == 401, r.text
        api.delete(f"/v1/streams/{pulled['id']}")
        # bad create requests: a push source is just "whip:"
        r = api.post("/v1/streams", json={"source": "whip:extra"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "source", r.text
        for spelling in ("realtime:", "REALTIME:", " realtime:"):  # a session's stream only comes with its socket
            r = api.post("/v1/streams", json={"source": spelling})
            assert r.status_code == 422 and r.json()["error"]["param"] == "source", r.text
        # push streams per key (3 in the test engine): this one and two more, then 429
        more = [push_stream(api), push_stream(api)]
        r = api.post("/v1/streams", json={"source": "whip:"})
        assert r.status_code == 429 and "push streams" in r.json()["error"]["message"], r.text
        for s in more:
            api.delete(f"/v1/streams/{s['id']}")
    finally:
        api.delete(f"/v1/streams/{st['id']}")
