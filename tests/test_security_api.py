"""The front door, tried as an outside client would, against the real Serve app over real Ray
and redis-server: API keys (401s), the tenancy matrix (two keys, every route), refused sources
in many spellings with a listener proving nothing was opened, typed options, redaction of
credentials, and each limit with its status code, the service healthy afterwards.

Two apps share the session's Serve instance: the session's own (``serve_api``, whose operator
allows lavfi, files under pytest's temp dir and network sources on 127.0.0.1 only), and a strict
one mounted at ``/strict`` with the default source policy plus lavfi test graphs."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import requests

from ingest_servers import RecordingTcpListener, RoutedHttpServer
from serve_helpers import Api, tone_clip

KEY_C = "test-key-charlie-0123456789"  # the strict app's third key: the rate-limit test's alone
RATE, BURST = 2.0, 60


def lavfi(seconds: int) -> str:
    return (f"lavfi:testsrc2=size=160x120:rate=10,trim=duration={seconds}[out0];"
            f"sine=f=440:sample_rate=16000,atrim=duration={seconds}[out1]")


@pytest.fixture(scope="module")
def api(serve_api: dict) -> Api:
    return Api(str(serve_api["url"]), str(serve_api["key"]))


@pytest.fixture(scope="module")
def other(serve_api: dict) -> Api:
    return Api(str(serve_api["url"]), str(serve_api["other_key"]))


@pytest.fixture(scope="module")
def strict(serve_api: dict, redis_server: Any) -> Iterator[dict[str, Any]]:
    """A second app with the default source policy (plus lavfi generators), two streams per key,
    three in all, a low request rate."""
    from ray import serve

    from pipeline.api.app import build_app

    keys = [str(serve_api["key"]), str(serve_api["other_key"]), KEY_C]
    config = {"model": "tiny", "device": "cpu", "redis_url": redis_server.url, "name": "httpstrict",
              "torch_threads": 1, "allow_sources": "lavfi", "max_streams_per_key": 2, "max_streams": 3}
    serve.run(build_app(config, gate={"api_keys": keys, "requests_per_s": RATE, "request_burst": BURST}),
              name="strict", route_prefix="/strict")
    url = f"{serve_api['url']}/strict"
    deadline = time.monotonic() + 180
    while requests.get(url + "/healthz", timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "strict app not healthy"
        time.sleep(0.5)
    yield {"url": url, "keys": keys}
    serve.delete("strict")
    from pipeline.engine.service import shutdown_engine
    shutdown_engine(config)


def err(r: requests.Response, status: int) -> dict[str, Any]:
    """The response's OpenAI-shaped error, after checking its status."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()["error"]
    assert set(body) >= {"message", "type", "param", "code"} and body["message"], body
    return body


# ---- API keys --------------------------------------------------------------------------------------
ROUTES = [("GET", "/v1/streams"), ("POST", "/v1/streams"), ("GET", "/v1/streams/x"),
          ("DELETE", "/v1/streams/x"), ("POST", "/v1/streams/x/ask"), ("POST", "/v1/chat/completions"),
          ("GET", "/v1/models"), ("GET", "/v1/models/x"), ("GET", "/openapi.json"), ("GET", "/docs")]


@pytest.mark.parametrize("auth", [None, "Bearer wrong-key-0123456789abcdef", "Basic dGVzdDp0ZXN0",
                                  "Bearer", "bearer  ", "test-key-alpha-0123456789"])
def test_every_route_but_healthz_needs_a_valid_key(serve_api: dict, auth: str | None) -> None:
    headers = {"Authorization": auth} if auth is not None else {}
    for method, path in ROUTES:
        r = requests.request(method, serve_api["url"] + path, headers=headers, json={}, timeout=30)
        body = err(r, 401)
        assert body["type"] == "authentication_error" and "key" in body["message"]
        assert "test-key" not in r.text  # a key is never echoed
    assert requests.get(serve_api["url"] + "/healthz", timeout=30).status_code == 200


def test_the_openai_client_authenticates_with_its_api_key(serve_api: dict) -> None:
    import openai
    good = openai.OpenAI(base_url=f"{serve_api['url']}/v1", api_key=str(serve_api["key"]), max_retries=0)
    assert isinstance(good.models.list().data, list)
    bad = openai.OpenAI(base_url=f"{serve_api['url']}/v1", api_key="nope-nope-nope-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# ---- tenancy ---------------------------------------------------------------------------------------
def test_streams_belong_to_the_key_that_created_them(api: Api, other: Api, serve_api: dict) -> None:
    import openai
    mine = api.create(source=lavfi(30), name="tenant-cam", realtime=True)
    sid = mine["id"]
    try:
        api.wait(sid, lambda st: st["windows"] >= 1, 90, "a window")
        # the other key sees nothing of it, on every route, by id or by name
        assert sid not in {s["id"] for s in other.get("/v1/streams").json()["streams"]}
        assert sid not in {m["id"] for m in other.get("/v1/models").json()["data"]}
        for r in (other.get(f"/v1/streams/{sid}"), other.delete(f"/v1/streams/{sid}"),
                  other.post(f"/v1/streams/{sid}/ask", json={"question": "hi?"}),
                  other.get(f"/v1/models/{sid}"), other.get("/v1/models/tenant-cam"),
                  other.post("/v1/chat/completions", json={"model": "tenant-cam",
                                                           "messages": [{"role": "user", "content": "hi?"}]}),
                  other.post("/v1/chat/completions", json={"model": sid,
                                                           "messages": [{"role": "user", "content": "hi?"}]})):
            assert err(r, 404)["type"] == "not_found"
        client = openai.OpenAI(base_url=f"{serve_api['url']}/v1", api_key=str(serve_api["other_key"]), max_retries=0)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="tenant-cam", messages=[{"role": "user", "content": "hi?"}])
        # names are unique per key: the owner gets 409, the other key may use the name
        assert err(api.post("/v1/streams", json={"source": lavfi(2), "name": "tenant-cam"}), 409)["param"] == "name"
        theirs = other.create(source=lavfi(2), name="tenant-cam")
        assert theirs["id"] != sid
        assert other.delete(f"/v1/streams/{theirs['id']}").status_code == 200
        # the owner still has everything, by id and by name
        assert api.status(sid)["status"] in ("live", "starting")
        r = api.post("/v1/chat/completions", json={"model": "tenant-cam", "max_tokens": 2,
                                                   "messages": [{"role": "user", "content": "hi?"}]})
        assert r.status_code == 200, r.text
    finally:
        assert api.delete(f"/v1/streams/{sid}").status_code == 200


# ---- sources -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def target() -> Iterator[RecordingTcpListener]:
    """A loopback listener that must never be reached by a refused source."""
    t = RecordingTcpListener("127.0.0.1")
    yield t
    t.close()


def refused_sources(port: int, redis_port: int) -> list[tuple[str, str]]:
    """(source, what the refusal names) in many spellings: loopback, link-local, unspecified,
    multicast, files, devices, lavfi, FFmpeg protocols, other schemes, the service's own Redis."""
    return [
        (f"http://127.0.0.1:{port}/a.mp4", "loopback"), (f"http://127.1:{port}/", "loopback"),
        (f"http://2130706433:{port}/", "loopback"), (f"http://0x7f000001:{port}/", "loopback"),
        (f"http://0177.0.0.1:{port}/", "loopback"), (f"http://[::ffff:127.0.0.1]:{port}/", "loopback"),
        (f"http://[::1]:{port}/", "loopback"), (f"http://localhost:{port}/", "loopback"),
        (f"http://LOCALHOST.:{port}/", "loopback"), (f"rtsp://127.0.0.1:{port}/cam", "loopback"),
        (f"rtsps://127.0.0.1:{port}/cam", "loopback"), (f"https://127.0.0.1:{port}/x.m3u8", "loopback"),
        (f"http://user:pw@127.0.0.1:{port}/", "loopback"), (f"http://127.0.0.1:{redis_port}/", "loopback"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"), ("http://[fe80::1]/x", "link-local"),
        (f"http://0.0.0.0:{port}/", "unspecified"), ("http://224.0.0.1/x", "multicast"),
        ("/etc/passwd", "file"), ("file:///etc/passwd", "file"), ("/proc/self/environ", "file"),
        ("/dev/video0", "device"), ("v4l2:/dev/video0", "device"),
        ("lavfi:amovie=/etc/passwd", "lavfi"), ("lavfi:testsrc2,drawtext=textfile=/etc/passwd", "lavfi"),
        (f"lavfi:movie=http\\://127.0.0.1\\:{port}/", "lavfi"),
        ("concat:/etc/passwd|/etc/hosts", "scheme"), ("subfile:,,start,0,end,0,,:/etc/passwd", "scheme"),
        ("data:video/mp4;base64,AAAA", "scheme"), ("pipe:0", "scheme"), (f"tcp://127.0.0.1:{port}", "scheme"),
        ("ftp://127.0.0.2/x.mp4", "scheme"), ("gopher://127.0.0.2/", "scheme"),
    ]


def test_refused_sources_name_the_rule_and_open_nothing(strict: dict, target: RecordingTcpListener,
                                                         redis_server: Any) -> None:
    s = Api(strict["url"], strict["keys"][0])
    r0 = redis.Redis.from_url(redis_server.url)
    before = r0.info("stats")["total_connections_received"]
    for source, rule in refused_sources(target.port, int(urlsplit(redis_server.url).port)):
        body = err(s.post("/v1/streams", json={"source": source}), 400)
        assert body["param"] == "source" and rule in body["message"].lower(), (source, body)
        assert "pw@" not in body["message"]
    assert target.wait_quiet(0.5) == []  # nothing connected to the listener
    assert s.get("/v1/streams").json()["streams"] == []  # nothing registered
    # the service's own Redis saw no connection beyond the engine's own pool (no FFmpeg client)
    after = r0.info("stats")["total_connections_received"]
    assert after - before <= 4, (before, after)


@pytest.fixture(scope="module")
def target2() -> Iterator[RecordingTcpListener]:
    """A listener on 127.0.0.2: loopback, but not on the session app's host list."""
    t = RecordingTcpListener("127.0.0.2")
    yield t
    t.close()


def test_a_host_off_the_operators_list_is_refused(api: Api, target2: RecordingTcpListener) -> None:
    for source in (f"http://127.0.0.2:{target2.port}/x.mp4", f"rtsp://127.0.0.2:{target2.port}/cam"):
        body = err(api.post("/v1/streams", json={"source": source}), 400)
        assert body["param"] == "source" and "host" in body["message"]
    assert target2.wait_quiet(0.5) == []


def test_a_redirect_to_a_forbidden_target_is_not_followed(api: Api, target2: RecordingTcpListener,
                                                          tmp_path: Path) -> None:
    tone_clip(tmp_path / "clip.mp4", 440, seconds=2)
    srv = RoutedHttpServer(tmp_path, host="127.0.0.1", redirects={
        "/to-host.mp4": f"http://127.0.0.2:{target2.port}/clip.mp4",
        "/to-file.mp4": "file:///etc/passwd", "/to-ftp.mp4": f"ftp://127.0.0.2:{target2.port}/clip.mp4"})
    s = api
    try:
        ok = s.create(source=srv.url("clip.mp4"))["id"]  # the server itself is fine
        assert s.wait(ok, lambda st: st["status"] in ("failed", "ended"), 60, "the end")["windows_total"] == 1
        assert s.delete(f"/v1/streams/{ok}").status_code == 200
        for path in ("/to-host.mp4", "/to-file.mp4", "/to-ftp.mp4"):
            sid = s.create(source=srv.url(path))["id"]
            st = s.wait(sid, lambda st: st["status"] in ("failed", "ended"), 60, "the refusal")
            assert st["status"] == "failed" and st["windows_total"] == 0, st
            assert s.delete(f"/v1/streams/{sid}").status_code == 200
        assert target2.wait_quiet(0.5) == []
    finally:
        srv.close()


def test_a_playlist_cannot_pull_local_files_or_other_hosts(api: Api, target2: RecordingTcpListener,
                                                           tmp_path: Path) -> None:
    (tmp_path / "bad.m3u8").write_text(
        "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\nfile:///etc/passwd\n"
        f"#EXTINF:2.0,\nhttp://127.0.0.2:{target2.port}/seg.ts\n#EXT-X-ENDLIST\n")
    srv = RoutedHttpServer(tmp_path, host="127.0.0.1")
    s = api
    try:
        sid = s.create(source=srv.url("bad.m3u8"))["id"]
        st = s.wait(sid, lambda st: st["status"] in ("failed", "ended"), 60, "the end")
        assert st["windows_total"] == 0, st
        assert s.delete(f"/v1/streams/{sid}").status_code == 200
        assert target2.wait_quiet(0.5) == []
    finally:
        srv.close()


# ---- typed options, injection ----------------------------------------------------------------------
@pytest.mark.parametrize("options, field", [
    ({"input_options": {"user_agent": "x\r\nSET pwned yes\r\n"}}, "options"),  # control characters: refused whole
    ({"input_options": {"protocol_whitelist": "file,http"}}, "options.input_options"),
    ({"audio_device": "alsa:hw:1"}, "options.audio_device"),
    ({"open_timeout_s": -1}, "options.open_timeout_s"), ({"open_timeout_s": "soon"}, "options.open_timeout_s"),
    ({"read_timeout_s": 1e9}, "options.read_timeout_s"), ({"rtsp_transport": "http"}, "options.rtsp_transport"),
    ({"max_reconnects": -3}, "options.max_reconnects"),
])
def test_http_clients_get_typed_options_only(api: Api, options: dict, field: str) -> None:
    body = err(api.post("/v1/streams", json={"source": lavfi(2), "options": options}), 422)
    assert body["param"] == field, body


def test_raw_nan_in_options_is_refused(serve_api: dict) -> None:
    raw = b'{"source": "lavfi:testsrc2", "options": {"open_timeout_s": NaN}}'
    r = requests.post(serve_api["url"] + "/v1/streams", data=raw, timeout=30,
                      headers={"Authorization": f"Bearer {serve_api['key']}", "Content-Type": "application/json"})
    assert r.status_code == 422, r.text


def test_header_injection_through_a_source_leaves_redis_untouched(strict: dict, redis_server: Any) -> None:
    r0 = redis.Redis.from_url(redis_server.url)
    port = urlsplit(redis_server.url).port
    s = Api(strict["url"], strict["keys"][0])
    for source in (f"http://127.0.0.1:{port}/", f"http://127.0.0.1:{port}/\r\nSET pwned yes\r\n",
                   f"http://127.0.0.1:{port}/%0d%0aSET%20pwned%20yes%0d%0a"):
        r = s.post("/v1/streams", json={"source": source,
                                        "options": {"input_options": {"user_agent": "x\r\nSET pwned yes\r\n"}}})
        assert r.status_code in (400, 422), r.text
    assert r0.get("pwned") is None and r0.ping()


# ---- secrets -----------------------------------------------------------------------------------
def test_credentials_in_a_source_never_come_back(api: Api, strict: dict, ray_session: dict) -> None:
    import ray
    s = api
    secret = "Sup3rSecretPw"
    silent = RecordingTcpListener("127.0.0.1")
    refused = err(Api(strict["url"], strict["keys"][1]).post(
        "/v1/streams", json={"source": f"rtsp://admin:{secret}@127.0.0.1:1/x?token=Tok3nValue"}), 400)
    assert secret not in json.dumps(refused) and "Tok3nValue" not in json.dumps(refused)
    try:
        src = f"rtsp://admin:{secret}@127.0.0.1:{silent.port}/live?token=Tok3nValue&channel=1"
        created = s.create(source=src, options={"open_timeout_s": 1.0, "read_timeout_s": 1.0, "max_reconnects": 0})
        sid = created["id"]
        st = s.wait(sid, lambda st: st["status"] in ("failed", "ended"), 60, "the failure")
        for text in (json.dumps(created), json.dumps(st), s.get("/v1/streams").text, s.get("/v1/models").text):
            assert secret not in text and "Tok3nValue" not in text, text
        assert "***" in st["source"] and "127.0.0.1" in st["source"]
        assert st["error"] and secret not in st["error"]
        # nor in any log the cluster wrote
        logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
        hits = [p.name for p in logs.glob("*") if p.is_file() and secret in p.read_text(errors="ignore")]
        assert hits == []
        assert s.delete(f"/v1/streams/{sid}").status_code == 200
    finally:
        silent.close()


# ---- limits ----------------------------------------------------------------------------------------
def test_a_body_over_the_limit_is_413_before_it_is_read(serve_api: dict, api: Api) -> None:
    host, port = urlsplit(serve_api["url"]).hostname, urlsplit(serve_api["url"]).port
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Authorization", f"Bearer {serve_api['key']}")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(100 * 2**20))  # announced, never sent
    conn.endheaders()
    conn.send(b'{"model": "x", "messages": [')
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "request_too_large"
    conn.close()

    def chunks() -> Iterator[bytes]:  # no Content-Length: cut off once past the limit
        yield b'{"model": "x", "messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"a" * 65536
        yield b'"}]}'
    r = requests.post(serve_api["url"] + "/v1/chat/completions", data=chunks(), timeout=60,
                      headers={"Authorization": f"Bearer {serve_api['key']}", "Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    assert requests.get(serve_api["url"] + "/healthz", timeout=30).status_code == 200
    assert api.get("/v1/streams").status_code == 200


def test_question_and_chat_length_caps(api: Api) -> None:
    sid = api.create(source=lavfi(2))["id"]
    try:
        assert err(api.post(f"/v1/streams/{sid}/ask", json={"question": "a" * 8193}), 422)["param"] == "question"
        many = [{"role": "user", "content": "b" * 100}] * 90  # 9000 characters in all
        assert err(api.post("/v1/chat/completions", json={"model": sid, "messages": many}), 422)["param"] == "messages"
        one = [{"role": "system", "content": "s" * 8000}, {"role": "user", "content": "q" * 500}]
        assert err(api.post("/v1/chat/completions", json={"model": sid, "messages": one}), 422)["param"] == "messages"
        r = api.post("/v1/chat/completions", json={"model": sid, "max_tokens": 2,
                                                   "messages": [{"role": "user", "content": "ok?"}]})
        assert r.status_code == 200, r.text
    finally:
        api.delete(f"/v1/streams/{sid}")


@pytest.mark.parametrize("spec, field", [
    ({"context_tokens": 10**15}, "context_tokens"), ({"context_tokens": 1e15}, "context_tokens"),
    ({"size": [100000, 100000]}, "size"), ({"size": [100, 100]}, "size"), ({"size": [0, 28]}, "size.0"),
    ({"source": "lavfi:test\x00src"}, "source"), ({"source": "lavfi:testsrc2\n"}, "source"),
    ({"name": "bad name"}, "name"), ({"method": "nope"}, "method"), ({"lookahead": 65}, "lookahead"),
    ({"omnizip": {"rho_audio": 2}}, "omnizip.rho_audio"), ({"omnizip": {"knn_k": 0}}, "omnizip.knn_k"),
])
def test_bounds_are_422s_naming_the_field(api: Api, spec: dict, field: str) -> None:
    body = err(api.post("/v1/streams", json={"source": lavfi(2), **spec}), 422)
    assert body["param"] == field, body


def test_context_budget_beyond_the_model_is_400(api: Api) -> None:
    body = err(api.post("/v1/streams", json={"source": lavfi(2), "context_tokens": 100_000}), 400)
    assert body["param"] == "context_tokens"


def test_streams_per_key_and_in_all_are_429(strict: dict) -> None:
    a, b = Api(strict["url"], strict["keys"][0]), Api(strict["url"], strict["keys"][1])
    made: list[tuple[Api, str]] = []
    try:
        for api in (a, a):
            made.append((api, api.create(source=lavfi(60), realtime=True)["id"]))
        r = a.post("/v1/streams", json={"source": lavfi(60), "realtime": True})
        assert err(r, 429)["type"] == "rate_limit_exceeded" and "per API key" in r.json()["error"]["message"]
        assert int(r.headers["Retry-After"]) > 0
        made.append((b, b.create(source=lavfi(60), realtime=True)["id"]))
        r = b.post("/v1/streams", json={"source": lavfi(60), "realtime": True})
        assert err(r, 429) and "at once" in r.json()["error"]["message"]
        for api, sid in made:  # nothing accepted was lost: every stream still runs
            assert api.status(sid)["status"] in ("pending", "starting", "live")
    finally:
        for api, sid in made:
            api.delete(f"/v1/streams/{sid}")
    sid = b.create(source=lavfi(2))["id"]  # room again once deleted
    assert b.delete(f"/v1/streams/{sid}").status_code == 200


def test_requests_per_key_are_rate_limited_with_retry_after(strict: dict) -> None:
    c, a = Api(strict["url"], KEY_C), Api(strict["url"], strict["keys"][0])
    answers = [c.get("/v1/streams") for _ in range(BURST + 20)]
    codes = [r.status_code for r in answers]
    assert codes[:BURST // 2] == [200] * (BURST // 2) and 429 in codes
    r = answers[codes.index(429)]  # one of the loop's own refusals: a slow machine refills the bucket meanwhile
    assert err(r, 429)["type"] == "rate_limit_exceeded" and int(r.headers["Retry-After"]) >= 1
    assert a.get("/v1/streams").status_code == 200  # another key is not slowed down
    time.sleep(1.5)
    assert c.get("/v1/streams").status_code == 200  # the bucket refills


def test_questions_on_one_stream_are_bounded(api: Api) -> None:
    """Eight questions at once on one stream (each takes a few tenths of a second on tiny): at
    most two are answered or waiting, the rest get 429 at once instead of queueing."""
    sid = api.create(source=lavfi(2))["id"]
    go = threading.Barrier(8, timeout=60)
    results: list[tuple[int, float, str]] = []

    def ask() -> None:
        go.wait()
        t = time.monotonic()
        r = api.post(f"/v1/streams/{sid}/ask", timeout=120, json={"question": "What happens?", "max_tokens": 64})
        results.append((r.status_code, time.monotonic() - t, r.headers.get("Retry-After", "")))
    try:
        threads = [threading.Thread(target=ask) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        codes = sorted(c for c, _, _ in results)
        assert len(codes) == 8 and set(codes) == {200, 429} and codes.count(200) >= 2, results
        refused = [(dt, ra) for c, dt, ra in results if c == 429]
        assert all(int(ra) >= 1 for _, ra in refused)
        r = api.post(f"/v1/streams/{sid}/ask", json={"question": "short?", "max_tokens": 4})
        assert r.status_code == 200, r.text  # answered once the others are done
    finally:
        api.delete(f"/v1/streams/{sid}")
