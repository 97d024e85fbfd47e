"""The API's edge against the real Serve app (real Ray, real Redis, the tiny model): slow request
bodies, DNS rebinding in keyless mode, out-of-range query parameters, what ``/healthz`` tells a
caller without a key, and a 500 that never carries a backend's text (issue 18 rows 1, 5, 9, 10).

Two more apps share the session's Serve instance and its engine (same engine settings, so no new
engine): ``/slow`` with keys, a small replica (``max_ongoing_requests`` 10) and a small per-client
bound, so a handful of slow sockets would fill it; ``/local`` with no key (loopback mode)."""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from serve_helpers import Api

SLOW_SLOTS, PER_CLIENT, BODY_TIMEOUT_S = 10, 4, 3.0
HANG_S = 30.0  # generous: only a hung request takes this long
CLIP = ("lavfi:testsrc2=size=160x120:rate=10,trim=duration=2[out0];"
        "sine=f=440:sample_rate=16000,atrim=duration=2[out1]")


def _deploy(serve_api: dict[str, Any], name: str, prefix: str, gate: dict[str, Any], **options: Any) -> str:
    from ray import serve

    from pipeline.api.app import build_app

    serve.run(build_app(serve_api["config"], gate=gate, **options), name=name, route_prefix=prefix)
    url = f"{serve_api['url']}{prefix}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if requests.get(url + "/healthz", timeout=10).status_code == 200:
                return url
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, f"{url}/healthz not 200 within 120 s"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def slow_app(serve_api: dict[str, Any]) -> Iterator[str]:
    from ray import serve

    gate = {"api_keys": [serve_api["key"], serve_api["other_key"]], "requests_per_s": 1000.0,
            "request_burst": 1000, "max_open_per_client": PER_CLIENT, "body_timeout_s": BODY_TIMEOUT_S}
    yield _deploy(serve_api, "edge-slow", "/slow", gate, max_ongoing_requests=SLOW_SLOTS)
    serve.delete("edge-slow")


@pytest.fixture(scope="module")
def local_app(serve_api: dict[str, Any]) -> Iterator[str]:
    from ray import serve

    yield _deploy(serve_api, "edge-local", "/local", {"api_keys": [], "insecure": False})
    serve.delete("edge-local")


class SlowBodies:
    """Raw sockets that each announce ``Content-Length: 1000000`` and then send one byte every
    half second, as the review's attack did; a thread trickles and records each one's status."""

    def __init__(self) -> None:
        self.socks: list[socket.socket] = []
        self.status: dict[int, int | None] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def open(self, url: str, path: str, key: str | None = None) -> None:
        u = urlsplit(url)
        s = socket.create_connection((u.hostname, u.port), timeout=5)
        auth = f"Authorization: Bearer {key}\r\n" if key else ""
        s.sendall((f"POST {u.path}{path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
                   f"{auth}Content-Length: 1000000\r\n\r\n{{").encode())
        self.socks.append(s)
        self.status[s.fileno()] = None

    def start(self) -> SlowBodies:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            open_ = [s for s in self.socks if self.status.get(s.fileno()) is None]
            readable = select.select(open_, [], [], 0.5)[0] if open_ else []
            for s in readable:
                line = s.recv(64).split(b"\r\n", 1)[0].split()
                self.status[s.fileno()] = int(line[1]) if len(line) >= 2 else 0  # 0: closed without an answer
            for s in open_:
                if s not in readable:
                    try:
                        s.send(b" ")
                    except OSError:
                        self.status[s.fileno()] = 0

    def answered(self, timeout_s: float) -> list[int | None]:
        deadline = time.monotonic() + timeout_s
        while any(self.status[s.fileno()] is None for s in self.socks) and time.monotonic() < deadline:
            time.sleep(0.2)
        return [self.status[s.fileno()] for s in self.socks]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for s in self.socks:
            s.close()


def test_slow_bodies_do_not_freeze_the_replica(serve_api: dict[str, Any], slow_app: str) -> None:
    """Row 1: slow bodies on the open path (never read: 405 at once) and with a key (cut off at
    the body deadline with 408, or refused with 429 past the per-client bound) leave the replica
    free: another key's requests are answered meanwhile."""
    n = 8  # per kind: 16 slow sockets against a replica of 10 slots
    slow = SlowBodies()
    try:
        for _ in range(n):
            slow.open(slow_app, "/healthz")
            slow.open(slow_app, "/v1/sources/probe", key=str(serve_api["key"]))
        slow.start()
        time.sleep(1.0)  # every slow request has reached the replica
        other = Api(slow_app, str(serve_api["other_key"]))
        answers = []
        for _ in range(4):
            try:
                answers.append(other.get("/v1/streams", timeout=HANG_S / 3).status_code)
            except requests.Timeout:
                answers.append("timeout")
        got = slow.answered(HANG_S)
    finally:
        slow.close()
    assert answers == [200] * 4, answers
    healthz, keyed = got[0::2], got[1::2]
    assert healthz == [405] * n, healthz
    assert sorted(keyed) == sorted([408] * PER_CLIENT + [429] * (n - PER_CLIENT)), keyed


def test_a_body_is_read_within_its_deadline(serve_api: dict[str, Any], slow_app: str) -> None:
    """A body sent at once is read and answered as before; an unauthenticated one is 401 without
    being read; one slow body alone is cut off with 408 naming the deadline."""
    api = Api(slow_app, str(serve_api["key"]))
    r = api.post("/v1/sources/probe", json={"source": ""})
    assert r.status_code == 422 and r.json()["error"]["param"] == "source", r.text
    slow = SlowBodies()
    try:
        slow.open(slow_app, "/v1/streams")
        slow.open(slow_app, "/v1/streams", key=str(serve_api["other_key"]))
        got = slow.start().answered(HANG_S)
    finally:
        slow.close()
    assert got == [401, 408], got


@pytest.mark.parametrize("host", [
    "rebind.test:{port}", "rebind.test", "127.0.0.1.nip.io:{port}", "localhost.rebind.test:{port}",
    "0x7f000001:{port}", "2130706433:{port}", "127.1:{port}", "0177.0.0.1:{port}", "localhost.:{port}",
    "127.0.0.1.:{port}", "foo.localhost:{port}", "[::ffff:127.0.0.1]:{port}", "[::1%lo]:{port}",
    "localhost:{port}@rebind.test", "localhost:x", "10.0.0.1:{port}", "0.0.0.0:{port}"])
def test_keyless_mode_refuses_other_hosts(local_app: str, host: str) -> None:
    """Row 5: with no key configured, a request whose Host is not a loopback name or address is
    refused (a DNS-rebinding page sends its own name), open paths included; nothing is created."""
    port = urlsplit(local_app).port
    h = host.format(port=port)
    for method, path, body in (("GET", "/v1/streams", None), ("GET", "/", None), ("GET", "/healthz", None),
                               ("POST", "/v1/streams", {"source": CLIP, "name": "rebound"})):
        r = requests.request(method, local_app + path, json=body, headers={"Host": h}, timeout=HANG_S)
        assert r.status_code == 421, (h, method, path, r.status_code, r.text)
        e = r.json()["error"]
        assert "Host" in e["message"] and "loopback" in e["message"] and e["code"] == "host_not_allowed", e
    names = [s.get("name") for s in requests.get(local_app + "/v1/streams", timeout=HANG_S).json()["streams"]]
    assert "rebound" not in names


def test_keyless_mode_serves_loopback_hosts_and_checks_origin(local_app: str) -> None:
    port = urlsplit(local_app).port
    for h in (f"localhost:{port}", f"127.0.0.1:{port}", f"LocalHost:{port}", f"127.0.0.2:{port}",
              f"[::1]:{port}", "localhost", "127.0.0.1"):
        r = requests.get(local_app + "/v1/streams", headers={"Host": h}, timeout=HANG_S)
        assert r.status_code == 200, (h, r.text)
        assert requests.get(local_app + "/", headers={"Host": h}, timeout=HANG_S).status_code == 200, h
    same = {"Host": f"localhost:{port}"}
    # a same-origin POST (the console's) passes the gate: the empty body is then a 422
    for origin in (f"http://localhost:{port}", f"http://127.0.0.1:{port}", f"http://[::1]:{port}", None):
        hdrs = {**same, **({"Origin": origin} if origin else {})}
        r = requests.post(local_app + "/v1/streams", json={}, headers=hdrs, timeout=HANG_S)
        assert r.status_code == 422, (origin, r.text)
    for origin in (f"http://rebind.test:{port}", "null", f"http://127.0.0.1.nip.io:{port}", "file://",
                   f"http://localhost.:{port}", "garbage"):
        for method in ("POST", "DELETE"):
            r = requests.request(method, local_app + ("/v1/streams" if method == "POST" else "/v1/streams/x"),
                                 json={}, headers={**same, "Origin": origin}, timeout=HANG_S)
            assert r.status_code == 403, (origin, method, r.text)
            assert r.json()["error"]["code"] == "origin_not_allowed" and "Origin" in r.json()["error"]["message"]
    # a read is not state-changing: a foreign Origin on GET is left to the browser's same-origin rule
    r = requests.get(local_app + "/v1/streams", headers={**same, "Origin": "http://rebind.test"}, timeout=HANG_S)
    assert r.status_code == 200, r.text


def test_keyed_mode_does_not_judge_host(serve_api: dict[str, Any]) -> None:
    """With keys the key is the guard: a deployment behind any name keeps working."""
    r = requests.get(serve_api["url"] + "/v1/streams", timeout=HANG_S,
                     headers={"Host": "omnizip.example", "Authorization": f"Bearer {serve_api['key']}"})
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def ended(serve_api: dict[str, Any]) -> Iterator[tuple[Api, str]]:
    api = Api(str(serve_api["url"]), str(serve_api["key"]))
    st = api.create(source=CLIP, name="edge-clip")
    st = api.wait(st["id"], lambda s: s["status"] in ("ended", "failed"), 120, "the end of the clip")
    assert st["status"] == "ended" and st["windows"] >= 1, st
    yield api, st["id"]
    api.delete(f"/v1/streams/{st['id']}")


@pytest.mark.parametrize("query,param", [
    ("after=99999999999999999999", "after"), ("after=2147483648", "after"), ("after=-2", "after"),
    ("limit=0", "limit"), ("limit=501", "limit"), ("limit=99999999999999999999", "limit"),
    ("tail=0", "tail"), ("tail=99999999999999999999", "tail"), ("after=1e3", "after")])
def test_out_of_range_window_queries_are_422(ended: tuple[Api, str], query: str, param: str) -> None:
    """Row 9: an out-of-range query parameter is 422 naming it (it was a 500 with Redis's text)."""
    api, sid = ended
    r = api.get(f"/v1/streams/{sid}/windows?{query}")
    assert r.status_code == 422, (query, r.status_code, r.text)
    e = r.json()["error"]
    assert e["param"] == f"query.{param}" and param in e["message"], e
    assert "redis" not in r.text.lower() and "ResponseError" not in r.text


@pytest.mark.parametrize("index", ["-1", "2147483648", "99999999999999999999"])
def test_out_of_range_window_index_is_422(ended: tuple[Api, str], index: str) -> None:
    api, sid = ended
    for kind in ("frames", "audio"):
        r = api.get(f"/v1/streams/{sid}/windows/{index}/{kind}.png")
        assert r.status_code == 422, (index, r.status_code, r.text)
        assert r.json()["error"]["param"] == "path.index", r.text


def test_in_range_window_queries_still_answer(ended: tuple[Api, str]) -> None:
    api, sid = ended
    for query in ("", "after=-1", "after=2147483647", "limit=500", "tail=500", "after=0&limit=1"):
        r = api.get(f"/v1/streams/{sid}/windows?{query}")
        assert r.status_code == 200, (query, r.text)
    assert api.get(f"/v1/streams/{sid}/windows/2147483647/audio.png").status_code == 404


def test_a_500_carries_no_backend_text(redis_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A backend's own error (a real Redis ResponseError here) becomes a generic 500 whose id is
    logged with the full error server-side."""
    import logging

    import redis

    from pipeline.api.errors import to_api_error

    r = redis.Redis.from_url(redis_server.url)
    with pytest.raises(redis.ResponseError) as got:
        r.xrange("omnizip:edge-test", min="99999999999999999999999", max="+")
    text = str(got.value)
    assert text
    with caplog.at_level(logging.ERROR, logger="pipeline.api.app"):
        err = to_api_error(got.value)
    assert err.status == 500 and err.type == "internal_error"
    assert text not in err.message and "ResponseError" not in err.message and "internal error" in err.message
    ref = err.message.rsplit(" ", 1)[-1]
    assert any(ref in rec.getMessage() and rec.exc_info for rec in caplog.records), caplog.records


def test_healthz_without_a_key_says_only_ok(serve_api: dict[str, Any], local_app: str) -> None:
    """Row 10: without a key (keyed deployment's open path, or keyless loopback mode) /healthz
    shows ok/degraded only; a valid key sees the engine's details."""
    for url in (serve_api["url"], local_app):
        r = requests.get(url + "/healthz", timeout=HANG_S)
        assert r.status_code == 200 and r.json() == {"ok": True, "degraded": False}, r.text
    bad = requests.get(serve_api["url"] + "/healthz", headers={"Authorization": "Bearer not-a-key-0123456789"},
                       timeout=HANG_S)
    assert set(bad.json()) == {"ok", "degraded"}, bad.text
    full = Api(str(serve_api["url"]), str(serve_api["key"])).get("/healthz").json()
    assert full["ok"] is True and full["engine"] and full["workers"] and "streams" in full, full
