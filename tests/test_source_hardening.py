"""Issue 18, source side: what an outside review got through the source policy.

Row 2: a playlist-like container (ffconcat, sdp, ...) whose entries FFmpeg would open with its own
I/O, around the guarded opener: refused by FFmpeg's format whitelist before its header is read.
Row 3: RTSP over UDP only where the operator allows it. Rows 4 and 6: the probe answers the same
for every kind of "not a media source", at the deadline, bounded per key and in all, on threads
of its own; private / CGNAT / unique-local addresses refused unless the operator names their
network. Row 10: IPv4-translated and other embedded-IPv4 spellings judged as the IPv4 address.

Every server is on 127/8; other addresses are only judged by the policy, never opened."""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import socket
import threading
from pathlib import Path

import pytest
import requests

import media_fixtures as mf
from ingest_servers import (
    RecordingTcpListener,
    RoutedHttpServer,
    RtspServer,
    SilentTcpServer,
    free_port,
    gst_rtsp_available,
)
from pipeline.core.config import ServiceConfig
from pipeline.errors import LimitExceeded, SourceError, SourceRefused
from pipeline.sources.probe import NOT_MEDIA, ProbeLimiter, probe_source
from pipeline.sources.policy import SourcePolicy
from pipeline.sources.source import Source, open_source
from pipeline.sources.windows import iter_windows

pytestmark = pytest.mark.timeout(120)

# the media server lives on 127.0.0.2 and is the only host allowed; the listener on 127.0.0.1
# stands for an internal service that must never be reached
SERVER_ONLY = SourcePolicy(allow={"loopback"}, hosts=("127.0.0.2/32",))


def rule_of(policy: SourcePolicy, source: str) -> str | None:
    try:
        policy.check(source)
    except SourceRefused as e:
        return e.rule
    return None


@pytest.fixture()
def listener():
    lst = RecordingTcpListener("127.0.0.1")
    yield lst
    lst.close()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("hardening_media")
    mf.make(d, "clean.ts")
    return d


# -- row 2: demuxers that open URLs named inside the media ------------------------------------
def playlists(d: Path, port: int) -> None:
    """Spellings of the same attack: lists whose entries FFmpeg would open by itself."""
    (d / "list.txt").write_text("ffconcat version 1.0\nfile s.ts\n")
    (d / "list").write_text("ffconcat version 1.0\nfile s.ts\n")
    (d / "abs.ffconcat").write_text(f"ffconcat version 1.0\nfile http://127.0.0.1:{port}/abs\n")
    (d / "cam.sdp").write_text(f"v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=x\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
                               f"m=video {port} RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n")


@pytest.fixture()
def lists_server(tmp_path, listener, media):
    (tmp_path / "s.ts").write_bytes((media / "clean.ts").read_bytes())
    playlists(tmp_path, listener.port)
    srv = RoutedHttpServer(tmp_path, host="127.0.0.2",
                           redirects={"/s.ts": f"http://127.0.0.1:{listener.port}/stolen"})
    yield srv
    srv.close()


def test_control_ffmpeg_follows_a_concat_entry_by_itself(lists_server, listener):
    """Control: with FFmpeg's own I/O (the operator's permissive use) the entry's redirect does
    reach the listener; this is the path a restricting policy must close."""
    with pytest.raises(SourceError):
        open_source(lists_server.url("list.txt"), {"open_timeout_s": 2})
    assert any(b"GET /stolen" in s for s in listener.wait_quiet())


@pytest.mark.parametrize("name, fmt", [("list.txt", "concat"), ("list", "concat"),
                                       ("abs.ffconcat", "concat"), ("cam.sdp", "sdp")])
def test_playlist_containers_over_http_refused_naming_the_format(lists_server, listener, name, fmt):
    with pytest.raises(SourceRefused) as e:
        with Source(lists_server.url(name), {"open_timeout_s": 3}, policy=SERVER_ONLY) as src:
            list(iter_windows(src))
    assert e.value.rule == "format" and f"'{fmt}'" in str(e.value)
    assert listener.wait_quiet(0.5) == []
    assert lists_server.requests == [f"/{name}"]  # only the list itself was fetched


def test_concat_list_named_m3u8_reaches_nothing(lists_server, listener, tmp_path):
    (tmp_path / "list.m3u8").write_text("ffconcat version 1.0\nfile s.ts\n")
    with pytest.raises(SourceError):
        with Source(lists_server.url("list.m3u8"), {"open_timeout_s": 3}, policy=SERVER_ONLY) as src:
            list(iter_windows(src))
    assert listener.wait_quiet(0.5) == []
    assert "/s.ts" not in lists_server.requests


@pytest.mark.parametrize("name, fmt", [("list.txt", "concat"), ("abs.ffconcat", "concat"), ("cam.sdp", "sdp")])
def test_file_sources_holding_a_list_refused(tmp_path, listener, name, fmt):
    playlists(tmp_path, listener.port)
    policy = SourcePolicy(allow={"file"}, file_roots=(str(tmp_path),))
    with pytest.raises(SourceRefused) as e:
        with Source(str(tmp_path / name), {"open_timeout_s": 3}, policy=policy) as src:
            list(iter_windows(src))
    assert e.value.rule == "format" and f"'{fmt}'" in str(e.value)
    assert listener.wait_quiet(0.3) == []


def test_probe_of_a_concat_list_reaches_nothing(lists_server, listener):
    got = probe_source(lists_server.url("list.txt"), {}, SERVER_ONLY, timeout_s=2)
    assert got["ok"] is False and got["error"] == NOT_MEDIA
    assert listener.wait_quiet(0.3) == []


def test_self_contained_media_still_plays(media):
    srv = RoutedHttpServer(media, host="127.0.0.2")
    try:
        for source, policy in ((srv.url("clean.ts"), SERVER_ONLY),
                               (str(media / "clean.ts"), SourcePolicy(allow={"file"}, file_roots=(str(media),)))):
            assert len(list(iter_windows(source, policy=policy, options={"open_timeout_s": 5}))) == 3
    finally:
        srv.close()


# -- row 3: RTSP over UDP -------------------------------------------------------------------
def test_rtsp_udp_is_an_operator_setting():
    url = "rtsp://93.184.216.34/live"  # judged, never opened
    with pytest.raises(SourceRefused) as e:
        Source(url, {"rtsp_transport": "udp"}, policy=SourcePolicy()).check()
    assert e.value.rule == "rtsp:udp" and "OMNIZIP_RTSP_UDP" in str(e.value)
    assert SourcePolicy().protocol_whitelist(url) == "rtsp,tcp"
    assert SourcePolicy(rtsp_udp=True).protocol_whitelist(url) == "rtsp,rtp,udp,tcp"
    assert SourcePolicy.from_env({"OMNIZIP_RTSP_UDP": "1"}).rtsp_udp is True
    assert SourcePolicy.from_env({}).rtsp_udp is False
    assert ServiceConfig(rtsp_udp=True).source_policy().rtsp_udp is True
    assert ServiceConfig().source_policy().rtsp_udp is False
    with pytest.raises(ValueError, match="OMNIZIP_RTSP_UDP"):
        SourcePolicy.from_env({"OMNIZIP_RTSP_UDP": "maybe"})


@pytest.fixture(scope="module")
def rtsp():
    why = gst_rtsp_available()
    if why:
        pytest.skip(why)
    srv = RtspServer(free_port()).start()
    yield srv
    srv.kill()


def _first_events(url: str, options: dict, policy: SourcePolicy, n: int = 5) -> int:
    with Source(url, {"open_timeout_s": 8, **options}, policy=policy) as src:
        got = 0
        for _ in src.events():
            got += 1
            if got >= n:
                break
    return got


def test_rtsp_udp_refused_against_a_real_server_tcp_plays(rtsp):
    loop = SourcePolicy(allow={"loopback"})
    with pytest.raises(SourceRefused) as e:
        _first_events(rtsp.url, {"rtsp_transport": "udp"}, loop)
    assert e.value.rule == "rtsp:udp"
    assert _first_events(rtsp.url, {"rtsp_transport": "tcp"}, loop) == 5  # interleaved, "rtsp,tcp" only
    assert _first_events(rtsp.url, {"rtsp_transport": "udp"}, SourcePolicy(allow={"loopback"}, rtsp_udp=True)) == 5


# -- rows 4 and 6: the probe ----------------------------------------------------------------
class BannerServer:
    """A non-HTTP service on loopback: greets every connection with a secret-bearing line."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                c.sendall(b"-ERR secret-token=abc\r\n")
                c.recv(1024)
            except OSError:
                pass
            c.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture()
def targets(tmp_path):
    """Four kinds of "not a media source" on loopback: closed, non-HTTP, HTTP 404, silent."""
    banner, silent = BannerServer(), SilentTcpServer()
    www = RoutedHttpServer(tmp_path, host="127.0.0.1")
    yield {"closed": f"http://127.0.0.1:{free_port()}/x.ts", "banner": f"http://127.0.0.1:{banner.port}/x.ts",
           "404": www.url("missing.ts"), "silent": f"http://127.0.0.1:{silent.port}/x.ts"}
    banner.close(), silent.close(), www.close()


def test_probe_answers_are_uniform(targets):
    policy = SourcePolicy(allow={"loopback"})
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = dict(zip(targets, pool.map(lambda u: probe_source(u, {}, policy, timeout_s=2), targets.values())))
    for kind, r in got.items():
        assert r["ok"] is False and r["error"] == NOT_MEDIA, (kind, r)
        assert r["elapsed_s"] >= 2.0, (kind, r)  # no failure is answered before the deadline
        assert "secret" not in json.dumps(r) and "ERR" not in json.dumps(r)
    assert len({json.dumps({k: v for k, v in r.items() if k not in ("source", "elapsed_s")})
                for r in got.values()}) == 1


def test_remote_text_never_in_source_errors(targets):
    """The same banner by stream creation's path: the error names no remote text either."""
    with pytest.raises(SourceError) as e:
        open_source(targets["banner"], {"open_timeout_s": 3}, policy=SourcePolicy(allow={"loopback"}))
    assert "secret" not in str(e.value) and "ERR" not in str(e.value)


def test_probe_limiter_bounds_per_key_and_in_all():
    silent = SilentTcpServer()
    url = f"http://127.0.0.1:{silent.port}/x.ts"
    policy = SourcePolicy(allow={"loopback"})
    limiter = ProbeLimiter(total=2, per_key=1, timeout_s=2)
    seen_threads: list[str] = []

    async def run_all() -> list:
        # bravo runs while alpha's probe holds the other slot, then charlie finds room again
        a = asyncio.ensure_future(limiter.run("alpha", url, {}, policy))
        await asyncio.sleep(0.3)
        seen_threads.extend(t.name for t in threading.enumerate())
        second_alpha = third = None
        try:
            await limiter.run("alpha", url, {}, policy)
        except LimitExceeded as e:
            second_alpha = e
        b = asyncio.ensure_future(limiter.run("bravo", url, {}, policy))
        await asyncio.sleep(0)
        try:
            await limiter.run("charlie", url, {}, policy)
        except LimitExceeded as e:
            third = e
        return [second_alpha, third, await a, await b, dict(limiter.running)]

    try:
        second_alpha, third, ra, rb, running = asyncio.run(run_all())
    finally:
        silent.close()
    assert isinstance(second_alpha, LimitExceeded) and "this API key" in str(second_alpha)
    assert isinstance(third, LimitExceeded) and "on this service" in str(third)
    assert ra["error"] == NOT_MEDIA and rb["error"] == NOT_MEDIA and running == {}
    assert any(n.startswith("probe") for n in seen_threads)  # its own pool, not asyncio's default


def test_probe_through_the_serve_app_is_bounded_and_uniform(serve_api, targets):
    """The real Serve app: one key's parallel probes get 429 past its bound while another key
    is answered; a banner and a closed port get the same answer."""
    url, keys = serve_api["url"], (serve_api["key"], serve_api["other_key"])
    auth = [{"Authorization": f"Bearer {k}"} for k in keys]

    def probe(i: int, source: str) -> requests.Response:
        return requests.post(url + "/v1/sources/probe", json={"source": source}, headers=auth[i], timeout=60)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        flood = [pool.submit(probe, 0, targets["silent"]) for _ in range(6)]
        other = [pool.submit(probe, 1, targets[k]) for k in ("banner", "closed")]
        listed = requests.get(url + "/v1/streams", headers=auth[1], timeout=30)
        codes = sorted(f.result().status_code for f in flood)
        answers = [f.result() for f in other]
    assert listed.status_code == 200
    assert codes.count(200) <= 2 and codes.count(429) >= 4, codes
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    bodies = [r.json() for r in answers]
    assert all(b["ok"] is False and b["error"] == NOT_MEDIA for b in bodies)
    assert "secret" not in json.dumps(bodies)


# -- row 6, second half, and row 10: addresses ----------------------------------------------
@pytest.mark.parametrize("url", [
    "rtsp://10.0.0.5/stream", "http://172.16.3.4/cam.m3u8", "http://172.31.255.1/", "http://192.168.1.20/",
    "https://100.64.0.9/live/index.m3u8", "http://100.127.255.254/", "http://[fc00::5]/x", "http://[fd12:3456::1]/",
    "http://[fec0::1]/", "http://192.0.2.10/", "http://198.18.0.1/", "http://[2001:db8::1]/",
    "http://[::ffff:10.1.2.3]/", "http://[64:ff9b::192.168.0.1]/", "http://[2002:c0a8:1::]/",
    "http://012.0.0.1/", "http://0xc0a80001/",
])
def test_private_and_non_public_addresses_refused_by_default(url):
    assert rule_of(SourcePolicy(), url) == "host:private"


def test_operator_names_camera_subnets():
    p = SourcePolicy(hosts=("10.20.0.0/16", "fd00:cafe::/32", "cam.example.com"))
    assert rule_of(p, "rtsp://10.20.3.4/live") is None
    assert rule_of(p, "rtsp://[fd00:cafe::9]/live") is None
    assert rule_of(p, "rtsp://10.21.0.1/live") == "host:private"
    p = SourcePolicy.from_env({"OMNIZIP_SOURCE_HOSTS": "192.168.7.0/24"})
    assert rule_of(p, "rtsp://192.168.7.9/live") is None
    assert rule_of(p, "rtsp://192.168.8.9/live") == "host:private"


def test_names_resolving_to_private_addresses_refused(monkeypatch):
    import ipaddress

    from pipeline.sources import hosts

    table = {"cam.example": ["10.0.0.7"], "mixed.example": ["93.184.216.34", "100.64.1.1"],
             "pub.example": ["93.184.216.34"]}
    monkeypatch.setattr(hosts, "resolve", lambda h, port: [ipaddress.ip_address(a) for a in table[h]])
    monkeypatch.setattr("pipeline.sources.policy.resolve", hosts.resolve)
    assert rule_of(SourcePolicy(), "rtsp://cam.example/live") == "host:private"
    assert rule_of(SourcePolicy(), "http://mixed.example/x.ts") == "host:private"
    assert rule_of(SourcePolicy(), "http://pub.example/x.ts") is None
    assert rule_of(SourcePolicy(hosts=("cam.example", "10.0.0.0/8")), "rtsp://cam.example/live") is None


@pytest.mark.parametrize("url, rule", [
    ("http://[::ffff:0:127.0.0.1]/", "host:loopback"), ("http://[::ffff:0:7f00:1]/", "host:loopback"),
    ("http://[::ffff:0:169.254.169.254]/", "host:link-local"), ("http://[::ffff:0:10.0.0.1]/", "host:private"),
    ("http://[::ffff:127.0.0.1]/", "host:loopback"), ("http://[2002:7f00:1::]/", "host:loopback"),
    ("http://[64:ff9b::7f00:1]/", "host:loopback"), ("http://[::127.0.0.1]/", "host:loopback"),
    ("http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/", "host:loopback"),  # Teredo, client 127.0.0.1
])
def test_embedded_ipv4_judged_as_the_ipv4_address(url, rule):
    assert rule_of(SourcePolicy(), url) == rule
    if rule == "host:loopback":
        assert rule_of(SourcePolicy(allow={"loopback"}), url) is None


def test_public_addresses_still_pass():
    for url in ("http://[2606:4700::1111]/x", "http://8.8.8.8/", "rtsp://[::ffff:8.8.8.8]/", "http://[64:ff9b::808:808]/"):
        assert rule_of(SourcePolicy(), url) is None, url
