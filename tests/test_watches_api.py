"""Watches over HTTP (the real Serve app, engine and Redis of the `serve_api` fixture): the
routes, 422 naming the field, 400 naming the rule for a refused webhook (judged without
opening anything), 404 to other keys, 429 past the per-stream limit, and events as JSON pages
and as Server-Sent Events that resume after Last-Event-ID with exactly the missed events.
Deterministic through thresholds: a tiny threshold fires at the first due window and, always
above it, never clears."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import requests

from serve_helpers import Api

LAVFI = ("lavfi:testsrc2=size=160x120:rate=10,trim=duration=40[out0];"
         "sine=f=440:sample_rate=16000,atrim=duration=40[out1]")
ALWAYS = {"question": "Is anything on screen?", "threshold": 1e-6}


@pytest.fixture(scope="module")
def api(serve_api: dict[str, Any]) -> Api:
    return Api(str(serve_api["url"]), str(serve_api["key"]))


@pytest.fixture(scope="module")
def other(serve_api: dict[str, Any]) -> Api:
    return Api(str(serve_api["url"]), str(serve_api["other_key"]))


@pytest.fixture(scope="module")
def sid(api: Api) -> Any:
    st = api.create(source=LAVFI, realtime=True, backpressure=True)
    yield st["id"]
    api.delete(f"/v1/streams/{st['id']}")


def events(api: Api, sid: str, n: int, timeout_s: float = 90) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        r = api.get(f"/v1/streams/{sid}/events", params={"limit": 500})
        assert r.status_code == 200, r.text
        if len(r.json()["events"]) >= n:
            return r.json()["events"]
        assert time.monotonic() < deadline, r.json()
        time.sleep(0.3)


def sse(api: Api, sid: str, last: str | None, n: int) -> tuple[list[dict], list[str]]:
    """Read ``n`` events, then make sure no other follows within 3 s; (events, their SSE ids)."""
    headers = {"Accept": "text/event-stream", **({"Last-Event-ID": last} if last else {})}
    r = api.http.get(api.url + f"/v1/streams/{sid}/events", headers=headers, stream=True, timeout=(10, 3))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    got, ids, sse_id = [], [], None
    lines = r.iter_lines(decode_unicode=True)
    try:
        while len(got) < n:
            line = next(lines)
            if line.startswith("id:"):
                sse_id = line[3:].strip()
            elif line.startswith("data:"):
                got.append(json.loads(line[5:]))
                ids.append(sse_id)
        with pytest.raises(requests.exceptions.ConnectionError):  # a read timeout: nothing more came
            while True:
                line = next(lines)
                assert not line.startswith("data:"), f"an extra event: {line}"
    finally:
        r.close()
    return got, ids


@pytest.mark.parametrize("body, field", [
    ({"question": ""}, "question"), ({"question": "q", "every_s": 3}, "every_s"),
    ({"question": "q", "threshold": 1.5}, "threshold"), ({"question": "q", "hysteresis": {"fire": 0}}, "hysteresis.fire"),
    ({"question": "q", "kind": "maybe"}, "kind"), ({"question": "q", "webhook": {"url": "http://a:b@example.com/"}},
                                                   "webhook.url"),
])
def test_bad_input_is_422_naming_the_field(api: Api, sid: str, body: dict, field: str) -> None:
    r = api.post(f"/v1/streams/{sid}/watches", json=body)
    assert r.status_code == 422 and r.json()["error"]["param"] == field, r.text


@pytest.mark.parametrize("url, rule", [("http://127.0.0.1:9/h", "host:loopback"),
                                       ("http://169.254.169.254/latest", "host:link-local"),
                                       ("http://10.0.0.1/h", "host:private")])
def test_refused_webhooks_are_400_naming_the_rule(api: Api, sid: str, url: str, rule: str) -> None:
    r = api.post(f"/v1/streams/{sid}/watches", json={**ALWAYS, "webhook": {"url": url}})
    assert r.status_code == 400, r.text
    assert rule in r.json()["error"]["message"] and r.json()["error"]["param"] == "webhook.url"


def test_watches_events_and_sse_resume(api: Api, other: Api, sid: str) -> None:
    r = api.post(f"/v1/streams/{sid}/watches", json=ALWAYS)
    assert r.status_code == 201, r.text
    first = r.json()
    assert first["kind"] == "yes_no" and first["every_s"] == 2.0 and first["webhook"] is None
    (e1,), (id1,) = sse(api, sid, None, 1)  # the first event, then this client goes away
    assert e1["watch"] == first["id"] and e1["state"] == "fired" and 0 < e1["p_yes"] <= 1 and id1 == e1["id"]
    later = [api.post(f"/v1/streams/{sid}/watches", json=ALWAYS).json()["id"] for _ in range(2)]
    page = events(api, sid, 3)
    assert [e["watch"] for e in page][0] == first["id"] and {e["watch"] for e in page[1:]} == set(later)
    missed, ids = sse(api, sid, id1, 2)  # resumed: exactly what it missed
    assert [e["id"] for e in missed] == [e["id"] for e in page[1:]] == ids
    paged = api.get(f"/v1/streams/{sid}/events", params={"after": id1, "limit": 1}).json()
    assert [e["id"] for e in paged["events"]] == [page[1]["id"]] and paged["has_more"]
    assert api.get(f"/v1/streams/{sid}/events", headers={"Accept": "text/event-stream",
                                                          "Last-Event-ID": "nonsense"}).status_code == 422
    listed = api.get(f"/v1/streams/{sid}/watches").json()["watches"]
    assert {w["id"] for w in listed} >= {first["id"], *later}
    one = api.get(f"/v1/streams/{sid}/watches/{first['id']}").json()
    assert one["state"]["state"] == "fired" and one["state"]["evaluations"] >= 1
    for path in (f"/v1/streams/{sid}/watches", f"/v1/streams/{sid}/watches/{first['id']}",
                 f"/v1/streams/{sid}/events"):
        assert other.get(path).status_code == 404
    assert other.post(f"/v1/streams/{sid}/watches", json=ALWAYS).status_code == 404
    assert other.delete(f"/v1/streams/{sid}/watches/{first['id']}").status_code == 404
    r = api.get(f"/v1/streams/{sid}/watches/wnosuch")
    assert r.status_code == 404 and r.json()["error"]["param"] == "watch_id"


def test_limit_per_stream_is_429_and_delete(api: Api, sid: str) -> None:
    have = len(api.get(f"/v1/streams/{sid}/watches").json()["watches"])
    made = [api.post(f"/v1/streams/{sid}/watches", json={"question": "Is it night?", "threshold": 0.999999})
            for _ in range(16 - have)]
    assert all(r.status_code == 201 for r in made), [r.text for r in made if r.status_code != 201]
    r = api.post(f"/v1/streams/{sid}/watches", json=ALWAYS)
    assert r.status_code == 429 and r.json()["error"]["param"] == "watches" and "Retry-After" in r.headers
    wid = made[0].json()["id"]
    assert api.delete(f"/v1/streams/{sid}/watches/{wid}").json() == {"id": wid, "deleted": True}
    assert api.get(f"/v1/streams/{sid}/watches/{wid}").status_code == 404
    assert api.post(f"/v1/streams/{sid}/watches", json=ALWAYS).status_code == 201
