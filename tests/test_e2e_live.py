"""End to end, through HTTP only (issue 5, Done when): two live RTSP streams from GStreamer's
test server at once, the service on Ray Serve over the real engine (tiny model) with a real
redis-server, and a real Prometheus scraping Ray's metrics export port from the first minute.

The tests run in file order and share the two streams: questions while they stream (SSE and the
openai client), Redis holding the windows, the decoder actor killed mid-stream, Redis restarted,
one camera killed and restarted, and at the end every Grafana panel returning data.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import redis

import prom_helpers as ph
from ingest_servers import RtspServer, free_port, gst_rtsp_available
from serve_helpers import Api, sse_answer, tone_clip

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(gst_rtsp_available() is not None, reason=str(gst_rtsp_available())),
]

# Lose a camera fast and retry it fast, so an outage is seen and survived within seconds.
LIVE_OPTIONS = {"open_timeout_s": 5.0, "read_timeout_s": 2.0,  # the typed options HTTP clients get
                "reconnect_delay_s": 0.2, "reconnect_max_delay_s": 1.0}
QUESTION = "What is moving on screen, and what do you hear?"


@pytest.fixture(scope="module")
def api(serve_api: dict[str, Any]) -> Api:
    return Api(str(serve_api["url"]), str(serve_api["key"]))


@pytest.fixture(scope="module")
def oai(serve_api: dict[str, Any]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{serve_api['url']}/v1", api_key=str(serve_api["key"]), timeout=90, max_retries=0)


@pytest.fixture(scope="module")
def prom(serve_api: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ph.Prometheus]:
    """Started first, so it has scraped the whole run when the panels are checked."""
    with ph.start_prometheus({"ray": [f"127.0.0.1:{serve_api['metrics_port']}"]},
                             tmp_path_factory.mktemp("prom")) as p:
        yield p


@pytest.fixture(scope="module")
def cameras() -> Iterator[dict[str, RtspServer]]:
    cams = {"cam-a": RtspServer(free_port(), "opus").start(),
            "cam-b": RtspServer(free_port(), "aac").start()}
    yield cams
    for c in cams.values():
        c.kill()


@pytest.fixture(scope="module")
def streams(api: Api, prom: ph.Prometheus, cameras: dict[str, RtspServer]) -> Iterator[dict[str, str]]:
    """Both cameras watched at once; yields name -> stream id once each has windows in context."""
    ids = {name: api.create(source=cam.url, name=name, options=LIVE_OPTIONS,
                            context_tokens=4096)["id"] for name, cam in cameras.items()}
    try:
        for sid in ids.values():
            api.wait(sid, lambda s: s["status"] == "live" and s["windows"] >= 2, 120, "two live windows")
        yield ids
    finally:
        for sid in ids.values():
            api.delete(f"/v1/streams/{sid}")


def progressing(api: Api, sid: str, timeout_s: float = 60.0, by: int = 2) -> dict[str, Any]:
    """Wait until the stream's window count grows by `by` from now: it is still streaming."""
    start = api.status(sid)["windows_total"]
    return api.wait(sid, lambda s: s["windows_total"] >= start + by, timeout_s,
                    f"{by} more windows after {start}")


def test_two_streams_answer_while_streaming(api: Api, oai: openai.OpenAI, streams: dict[str, str]) -> None:
    for name, sid in streams.items():
        before = api.status(sid)
        text, done = sse_answer(api.ask_sse(sid, QUESTION, max_tokens=8))
        assert done["stream_id"] == sid and done["answer"] == text
        assert 1 <= done["completion_tokens"] <= 8
        assert done["windows"] >= 2 and done["context_tokens"] > 0
        after = progressing(api, sid)
        assert after["status"] == "live" and after["windows_total"] > before["windows_total"]

        chunks = list(oai.chat.completions.create(
            model=name, messages=[{"role": "user", "content": QUESTION}], max_tokens=6, stream=True,
            stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].usage.completion_tokens >= 1 and text
        c = oai.chat.completions.create(model=sid, messages=[{"role": "user", "content": QUESTION}],
                                        max_tokens=4)
        assert c.choices[0].message.content and 1 <= c.usage.completion_tokens <= 4
    # the streams are distinct: each has its own windows and token counts
    a, b = (api.status(s) for s in streams.values())
    assert a["id"] != b["id"] and a["source"] != b["source"]
    assert a["tokens"]["video"]["in"] > 0 and b["tokens"]["video"]["in"] > 0


def stored_windows(r: redis.Redis, sid: str) -> list[dict[str, Any]]:
    """The stream's windows as pipeline.store.redis_store lays them out in Redis (a Redis stream per id)."""
    import json
    return [json.loads(f[b"meta"]) for _, f in r.xrange(f"omnizip:{{{sid}}}:windows")]


def test_redis_holds_the_windows(api: Api, serve_api: dict[str, Any], streams: dict[str, str]) -> None:
    r = redis.Redis.from_url(str(serve_api["redis_url"]), socket_timeout=10)
    try:
        assert set(streams.values()) <= {i.decode() for i in r.smembers("omnizip:streams")}
        for sid in streams.values():
            seen = api.status(sid)["windows_total"]
            metas = stored_windows(r, sid)
            assert len(metas) >= 2
            idx = [m["index"] for m in metas]
            assert idx == sorted(idx) and len(set(idx)) == len(idx)
            assert all(m["end"] > m["start"] for m in metas)
            assert idx[-1] + 1 >= seen  # stored before it is counted into the context
            assert r.xlen(f"omnizip:{{{sid}}}:windows") == len(metas)
    finally:
        r.close()


def decoder_actors(service: str) -> list[tuple[str, str]]:
    """(name, namespace) of this service's decoder actors ("<service>-decoder-<i>")."""
    import ray
    return [(a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"{service}-decoder-")]


def test_killed_decoder_rebuilds_context(api: Api, serve_api: dict[str, Any], clip_stream: dict[str, Any],
                                         streams: dict[str, str]) -> None:
    import ray

    sid = clip_stream["id"]
    before = api.status(sid)
    ref = api.post(f"/v1/streams/{sid}/ask", json={"question": QUESTION, "max_tokens": 6}).json()
    actors = decoder_actors(str(serve_api["service"]))
    assert actors, ray.util.list_named_actors(all_namespaces=True)
    for name, ns in actors:
        ray.kill(ray.get_actor(name, namespace=ns), no_restart=False)
    # The restarted decoder rebuilds the ended stream's context from Redis: same windows, same
    # token count (one prefill instead of window-by-window appends, so answers are not compared
    # bit for bit), and it answers again.
    deadline = time.monotonic() + 90
    while True:
        r = api.post(f"/v1/streams/{sid}/ask", json={"question": QUESTION, "max_tokens": 6}, timeout=60)
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.status_code == 200, r.text
    health = api.get("/healthz").json()
    assert all(health["workers"][name]["rebuilds"] >= 1 for name, _ in actors), health
    after = api.status(sid)
    assert after["context_tokens"] == before["context_tokens"] > 0
    assert after["windows"] == before["windows"]
    assert r.json()["completion_tokens"] >= 1 and ref["completion_tokens"] >= 1
    # and the live streams go on and answer again
    for sid in streams.values():
        progressing(api, sid)
        text, _ = sse_answer(api.ask_sse(sid, QUESTION, max_tokens=4))
        assert text


def test_redis_restart_survived(api: Api, serve_api: dict[str, Any], redis_server: Any,
                                streams: dict[str, str]) -> None:
    r = redis.Redis.from_url(str(serve_api["redis_url"]), socket_timeout=10)
    try:
        sid = streams["cam-a"]
        redis_server.restart(hard=True, down_s=1.5)
        stored = stored_windows(r, sid)[-1]["index"]
        for s in streams.values():
            progressing(api, s, by=3)
        assert stored_windows(r, sid)[-1]["index"] > stored  # writes resumed after the restart
        text, _ = sse_answer(api.ask_sse(sid, QUESTION, max_tokens=4))
        assert text
    finally:
        r.close()


def test_source_outage_survived(api: Api, cameras: dict[str, RtspServer], streams: dict[str, str]) -> None:
    cam, sid, other = cameras["cam-a"], streams["cam-a"], streams["cam-b"]
    reconnects = api.status(sid)["reconnects"]
    cam.kill()
    api.wait(sid, lambda s: s["status"] == "reconnecting", 30, "reconnecting")
    progressing(api, other)  # the other camera is not affected
    cam.start()
    st = api.wait(sid, lambda s: s["status"] == "live" and s["reconnects"] > reconnects, 60,
                  "live again after a reconnect")
    assert st["error"] is None
    progressing(api, sid)
    text, _ = sse_answer(api.ask_sse(sid, QUESTION, max_tokens=4))
    assert text


def test_every_dashboard_panel_has_data(api: Api, prom: ph.Prometheus, flood_stream: dict[str, Any],
                                        streams: dict[str, str]) -> None:
    """Every panel of the checked-in dashboard returns data from the Prometheus that has been
    scraping this pipeline; questions keep coming so the answer-latency panels have events.
    The Serve panels read Ray Serve's own HTTP metrics from its proxy (an unknown stream gives a
    404 for the errors panel); the GPU panels have data exactly when the cluster has a GPU."""
    import ray

    assert api.get("/v1/streams/no-such-stream").status_code == 404
    has_gpu = ray.cluster_resources().get("GPU", 0) > 0
    # the panels of push streams, watches and realtime sessions have data when those run: this
    # pipeline pulls only (tests/test_monitoring.py feeds them through both backends)
    features = ("omnizip_push_", "omnizip_watch_", "omnizip_webhook_", "omnizip_realtime_")
    queries = [q for q in ph.panel_queries(ph.load_dashboard()) if (has_gpu or ph.source_of(q) != "gpu")
               and not any(f in q.expr for f in features)]
    assert {ph.source_of(q) for q in queries} >= {"omnizip", "serve"}
    stop = threading.Event()

    def keep_asking() -> None:
        while not stop.is_set():
            try:
                api.post(f"/v1/streams/{streams['cam-b']}/ask", json={"question": QUESTION, "max_tokens": 4})
            except Exception:
                pass
            stop.wait(3)

    t = threading.Thread(target=keep_asking, daemon=True)
    t.start()
    try:
        missing = ph.wait_for_panels(prom.url, queries, timeout_s=90)
    finally:
        stop.set()
        t.join(70)
    assert not missing, [f"{q.panel}: {q.expr}" for q in missing]
    # the streams' names (omnizip_stream_info, set by the service) are what the panels join on
    named = {x["metric"]["stream"]: x["metric"].get("name", "") for x in
             ph.query(prom.url, "max by (stream, name) (omnizip_stream_info) == 1")}
    assert {named.get(sid) for sid in streams.values()} == set(streams), named
    if not has_gpu:  # no GPU anywhere: no GPU series, so those panels are empty (not broken)
        assert not any(ph.has_data(ph.query(prom.url, q.expr))
                       for q in ph.panel_queries(ph.load_dashboard()) if ph.source_of(q) == "gpu")
    # each camera's context gauge, once its (restarted) decoder has exported it again
    deadline = time.monotonic() + 60
    while not set(streams.values()) <= (names := {x["metric"]["stream"] for x in
                                                  ph.query(prom.url, "omnizip_context_tokens")}):
        assert time.monotonic() < deadline, (set(streams.values()), names)
        time.sleep(1)


# --- more streams the tests above use ----------------------------------------------------------

@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tone_clip(tmp_path_factory.mktemp("e2e") / "clip.mkv", 660)


@pytest.fixture(scope="module")
def clip_stream(api: Api, clip: Path, streams: dict[str, str]) -> Iterator[dict[str, Any]]:
    """A file played in real time next to the cameras; once ended, its context is fixed."""
    st = api.create(source=str(clip), name="e2e-clip", realtime=True)
    try:
        yield api.wait(st["id"], lambda s: s["status"] in ("ended", "failed"), 90, "the end")
    finally:
        api.delete(f"/v1/streams/{st['id']}")


@pytest.fixture(scope="module")
def flood_stream(api: Api, streams: dict[str, str]) -> Iterator[dict[str, Any]]:
    """A source read as fast as it decodes (not paced) with backpressure off (files have it on by
    default): it outruns the encoder, so the bounded queue drops windows and the drop counters exist."""
    st = api.create(source="lavfi:testsrc2=size=160x120:rate=10,trim=duration=120[out0];"
                           "sine=f=330:sample_rate=16000,atrim=duration=120[out1]",
                    name="e2e-flood", realtime=False, backpressure=False)
    try:
        st = api.wait(st["id"], lambda s: s["dropped"] > 0 or s["status"] in ("ended", "failed"),
                      60, "a dropped window")
        assert st["dropped"] > 0, st
        yield st
    finally:
        api.delete(f"/v1/streams/{st['id']}")
