"""pipeline.metrics with the prometheus_client backend, scraped over HTTP from a real exporter."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from pipeline import metrics as pm
from redis_helpers import free_port


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from a real /metrics endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.fixture
def exported():
    """A Metrics on its own registry, served by start_exporter on a free port."""
    reg = CollectorRegistry()
    m = pm.Metrics("prometheus", registry=reg)
    port = free_port()
    server, thread = pm.start_exporter(port, addr="127.0.0.1", registry=reg)
    yield m, port
    server.shutdown()
    server.server_close()


def test_specs_cover_issue_5_and_share_the_prefix():
    names = {s.name for s in pm.SPECS}
    assert all(n.startswith("omnizip_") for n in names) and len(names) == len(pm.SPECS) == 34
    kinds = {s.name: s.kind for s in pm.SPECS}
    labels = {s.name: s.labels for s in pm.SPECS}
    assert kinds["omnizip_pool_members"] == kinds["omnizip_pool_min"] == kinds["omnizip_pool_max"] == "gauge"
    assert labels["omnizip_pool_members"] == ("pool", "state") and labels["omnizip_pool_max"] == ("pool",)
    assert kinds["omnizip_stream_moves"] == "counter" and labels["omnizip_stream_moves"] == ("pool",)
    assert "omnizip_stream_moves_total" in pm.exported_names()
    assert kinds["omnizip_window_latency_seconds"] == "histogram"
    assert kinds["omnizip_answer_ttft_seconds"] == "histogram"
    assert kinds["omnizip_tokens_in"] == kinds["omnizip_dropped_windows"] == "counter"
    assert "omnizip_tokens_in_total" in pm.exported_names()
    assert "omnizip_encoder_batch_size_bucket" in pm.exported_names()
    # every latency is a histogram in seconds
    assert all(s.kind == "histogram" for s in pm.SPECS if s.name.endswith("_seconds")
               and "lag" not in s.name)


def test_every_helper_lands_in_the_scrape(exported):
    m, port = exported
    m.observe_stage("encode", 0.3)
    m.observe_stage("encode", 0.02)
    m.record_window("cam1", {"audio": 50, "video": 400}, {"audio": 30, "video": 90})
    m.record_window("cam1", {"audio": 50, "video": 400}, {"audio": 25, "video": 110})
    m.set_lag("cam1", 1.25)
    m.drop_window("cam1", "behind_live")
    m.drop_window("cam1", "queue_full", n=2)
    m.reconnect("source", "cam1")
    m.reconnect("redis")
    m.set_context_tokens("cam1", 4321)
    m.observe_answer(ttft_s=0.4, n_tokens=21, total_s=2.4)
    m.set_queue_depth("encoder-0", 3)
    m.observe_batch(4)
    m.stream_info("cam1", "Lobby camera")
    m.set_pool("encoder", ready=2, starting=1, restarting=0, low=1, high=4)
    m.stream_moved("encoder")
    m.stream_moved("encoder", n=3)
    m.push_publisher("cam2", True)
    m.push_received("cam2", packets=120, nbytes=96000, lost=3)
    m.push_received("cam2", packets=0, nbytes=0, lost=0)  # no traffic since: nothing added (Ray refuses 0)
    m.push_frames("cam2", "decoded", 60)
    m.push_frames("cam2", "kept", 16)
    m.push_frames("cam2", "dropped", 1)
    m.push_failure("ice")
    m.watch_evaluated("yes_no")
    m.watch_evaluated("yes_no", seconds=0.02)
    m.watch_event("fired")
    m.watch_skipped("behind_live")
    m.webhook_delivery("failed")
    m.set_webhook_pending(2)
    m.realtime_session("opened")
    m.realtime_event("input_audio_buffer.append")
    m.realtime_event("other")
    m.realtime_turn("vad")
    m.realtime_response("cancelled")
    m.observe_realtime_latency(0.08)
    got = scrape(port)

    def v(metric, **labels):
        return got[(metric, tuple(sorted(labels.items())))]

    assert v("omnizip_window_latency_seconds_count", stage="encode") == 2
    assert v("omnizip_window_latency_seconds_bucket", stage="encode", le="0.25") == 1
    assert v("omnizip_tokens_in_total", stream="cam1", modality="video") == 800
    assert v("omnizip_tokens_kept_total", stream="cam1", modality="audio") == 55
    assert v("omnizip_compression_ratio", stream="cam1") == pytest.approx(135 / 450)
    assert v("omnizip_stream_lag_seconds", stream="cam1") == 1.25
    assert v("omnizip_dropped_windows_total", stream="cam1", reason="queue_full") == 2
    assert v("omnizip_reconnects_total", component="redis", stream="") == 1
    assert v("omnizip_context_tokens", stream="cam1") == 4321
    assert v("omnizip_answer_ttft_seconds_sum") == pytest.approx(0.4)
    assert v("omnizip_answer_tokens_per_second_sum") == pytest.approx(10.0)  # 20 tokens in 2 s
    assert v("omnizip_queue_depth", queue="encoder-0") == 3
    assert v("omnizip_encoder_batch_size_bucket", le="4.0") == 1
    assert v("omnizip_stream_info", stream="cam1", name="Lobby camera") == 1
    assert v("omnizip_pool_members", pool="encoder", state="starting") == 1
    assert v("omnizip_pool_max", pool="encoder") == 4
    assert v("omnizip_stream_moves_total", pool="encoder") == 4
    assert v("omnizip_push_publishers", stream="cam2") == 1
    assert v("omnizip_push_packets_total", stream="cam2") == 120
    assert v("omnizip_push_bytes_total", stream="cam2") == 96000
    assert v("omnizip_push_packets_lost_total", stream="cam2") == 3
    assert v("omnizip_push_frames_total", stream="cam2", outcome="kept") == 16
    assert v("omnizip_push_failures_total", stage="ice") == 1
    with pytest.raises(ValueError, match="outcome"):
        m.push_frames("cam2", "lost", 1)
    assert v("omnizip_watch_evaluations_total", kind="yes_no") == 1
    assert v("omnizip_watch_evaluation_seconds_count", kind="yes_no") == 1
    assert v("omnizip_watch_events_total", state="fired") == 1
    assert v("omnizip_watch_skipped_total", reason="behind_live") == 1
    assert v("omnizip_webhook_deliveries_total", outcome="failed") == 1
    assert v("omnizip_webhook_pending") == 2
    with pytest.raises(ValueError, match="state"):
        m.watch_event("maybe")
    assert v("omnizip_realtime_sessions_total", outcome="opened") == 1
    assert v("omnizip_realtime_events_total", type="input_audio_buffer.append") == 1
    assert v("omnizip_realtime_events_total", type="other") == 1
    assert v("omnizip_realtime_turns_total", trigger="vad") == 1
    assert v("omnizip_realtime_responses_total", status="cancelled") == 1
    assert v("omnizip_realtime_first_delta_seconds_bucket", le="0.1") == 1
    with pytest.raises(ValueError, match="type"):
        m.realtime_event("session.delete")
    present = {name for name, _ in got}
    assert set(pm.exported_names()) <= present


def test_forget_stream_drops_its_series(exported):
    m, port = exported
    for s in ("a", "b"):
        m.record_window(s, {"audio": 10}, {"audio": 5})
        m.set_lag(s, 0.5)
    m.forget_stream("a")
    streams = {dict(labels).get("stream") for (name, labels) in scrape(port)
               if name.startswith("omnizip_") and "stream" in dict(labels)}
    assert streams == {"b"}


def pool_series(port: int, prefix: str = "", worker: str | None = None) -> dict[tuple, float]:
    """The pool metrics of a scrape: {(name without ``prefix``, pool[, state]): value}; under Ray
    only the series of the worker process ``worker`` (Ray's ``WorkerId`` label) when given."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[tuple, float] = {}
    names = {prefix + n: n for n in ("omnizip_pool_members", "omnizip_pool_min", "omnizip_pool_max",
                                     "omnizip_stream_moves_total")}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in names and (worker is None or s.labels.get("WorkerId") == worker):
                key = (names[s.name], s.labels["pool"], *([s.labels["state"]] if "state" in s.labels else []))
                out[key] = max(out.get(key, float("-inf")), s.value)
    return out


def test_pools_and_moves(exported):
    """set_pool exports every state (0 included) and both bounds, a later round's counts replace
    the earlier ones, a pool's moves counter is exported at 0 from its first set_pool (so its
    first move shows in rate()), and forgetting a stream leaves the pools alone."""
    m, port = exported
    m.set_pool("encoder", ready=1, starting=1, restarting=0, low=1, high=3)
    m.set_pool("decoder", ready=1, starting=0, restarting=0, low=1, high=1)
    assert pool_series(port) == {
        ("omnizip_pool_members", "encoder", "ready"): 1, ("omnizip_pool_members", "encoder", "starting"): 1,
        ("omnizip_pool_members", "encoder", "restarting"): 0,
        ("omnizip_pool_members", "decoder", "ready"): 1, ("omnizip_pool_members", "decoder", "starting"): 0,
        ("omnizip_pool_members", "decoder", "restarting"): 0,
        ("omnizip_pool_min", "encoder"): 1, ("omnizip_pool_max", "encoder"): 3,
        ("omnizip_pool_min", "decoder"): 1, ("omnizip_pool_max", "decoder"): 1,
        ("omnizip_stream_moves_total", "encoder"): 0, ("omnizip_stream_moves_total", "decoder"): 0}
    # the next round: the starting member answered, another one went silent; two streams moved
    m.set_pool("encoder", ready=1, starting=0, restarting=1, low=1, high=3)
    m.stream_moved("encoder", 2)
    m.stream_moved("decoder", 0)  # nothing moved: no change (and no error under Ray)
    m.record_window("cam1", {"audio": 10}, {"audio": 5})
    m.forget_stream("cam1")
    got = pool_series(port)
    assert got[("omnizip_pool_members", "encoder", "ready")] == 1
    assert got[("omnizip_pool_members", "encoder", "starting")] == 0
    assert got[("omnizip_pool_members", "encoder", "restarting")] == 1
    assert got[("omnizip_stream_moves_total", "encoder")] == 2
    assert got[("omnizip_stream_moves_total", "decoder")] == 0
    assert len(got) == 12


def info_series(port: int, prefix: str = "") -> dict[tuple[str, str], float]:
    """{(stream, name): value} of omnizip_stream_info in a scrape (Ray's labels left out)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[tuple[str, str], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == prefix + "omnizip_stream_info":
                key = (s.labels["stream"], s.labels.get("name", ""))
                out[key] = max(out.get(key, 0.0), s.value)
    return out


def test_stream_info_names_streams_and_follows_renames(exported):
    m, port = exported
    m.stream_info("s1", "Lobby")
    m.stream_info("s2", None)  # no name: exported with name=""
    m.record_window("s1", {"audio": 10}, {"audio": 5})
    assert info_series(port) == {("s1", "Lobby"): 1, ("s2", ""): 1}
    m.stream_info("s1", "Lobby")  # re-attached with the same name: one series still
    m.stream_info("s1", "Front door")  # renamed: the old name's series goes
    assert info_series(port) == {("s1", "Front door"): 1, ("s2", ""): 1}
    m.forget_stream("s1")
    assert info_series(port) == {("s2", ""): 1}
    assert not [k for k in scrape(port) if dict(k[1]).get("stream") == "s1"]
    with pytest.raises(ValueError, match="stream_id"):
        m.stream_info("", "x")


def test_ray_gauges_stay_exported_and_names_follow_renames(ray_session):
    """Under Ray a gauge set once would vanish from the node's metrics agent a report interval
    later (Ray exports recently recorded values only): the backend re-records its gauges, so a
    stream's name and a lag that no longer changes stay visible; a renamed or forgotten stream's
    info is no longer 1 (0, then gone). Recorded in an actor, read from the metrics agent."""
    import time

    import ray

    @ray.remote(num_cpus=0.1)
    class Namer:
        def __init__(self):
            from pipeline import metrics
            self.m = metrics.get_metrics()

        def run(self, *calls):
            for name, args in calls:
                getattr(self.m, name)(*args)
            return self.m.backend

    def lag(port: int) -> float | None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            fams = list(text_string_to_metric_families(r.read().decode()))
        vals = [s.value for f in fams for s in f.samples
                if s.name == "ray_omnizip_stream_lag_seconds" and s.labels.get("stream") == "ray-s1"]
        return max(vals) if vals else None

    port = ray_session["metrics_port"]
    a = Namer.remote()
    try:
        assert ray.get(a.run.remote(("stream_info", ("ray-s1", "Lobby")), ("stream_info", ("ray-s2", "Gate")),
                                    ("set_lag", ("ray-s1", 1.5)))) == "ray"
        ray.get(a.run.remote(("stream_info", ("ray-s1", "Front door")), ("forget_stream", ("ray-s2",))))
        deadline = time.monotonic() + 30
        while True:
            got = {k: v for k, v in info_series(port, "ray_").items() if k[0].startswith("ray-s")}
            if (got.get(("ray-s1", "Front door")) == 1 and got.get(("ray-s1", "Lobby")) != 1
                    and got.get(("ray-s2", "Gate")) != 1) or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert got.get(("ray-s1", "Front door")) == 1, got
        assert got.get(("ray-s1", "Lobby")) != 1 and got.get(("ray-s2", "Gate")) != 1, got
        time.sleep(5)  # five report intervals (conftest: 1 s) without a new value
        got = {k: v for k, v in info_series(port, "ray_").items() if k[0].startswith("ray-s")}
        assert got.get(("ray-s1", "Front door")) == 1, got
        assert got.get(("ray-s1", "Lobby")) != 1 and got.get(("ray-s2", "Gate")) != 1, got
        assert lag(port) == 1.5
    finally:
        ray.kill(a)


@pytest.mark.parametrize("call, match", [
    (lambda m: m.observe_stage("upload", 1.0), "stage"),
    (lambda m: m.observe_stage("encode", -1.0), "seconds"),
    (lambda m: m.observe_stage("encode", float("nan")), "seconds"),
    (lambda m: m.record_window("s", {"text": 3}, {"text": 1}), "modality"),
    (lambda m: m.record_window("s", {"audio": 3}, {"audio": 4}), "exceeds"),
    (lambda m: m.drop_window("s", "bored"), "reason"),
    (lambda m: m.reconnect("gpu"), "component"),
    (lambda m: m.observe_answer(ttft_s=2.0, n_tokens=3, total_s=1.0), "total_s"),
    (lambda m: m.observe_batch(0), "batch size"),
    (lambda m: m.set_pool("gpu", 1, 0, 0, 1, 2), "pool"),
    (lambda m: m.set_pool("encoder", -1, 0, 0, 1, 2), "ready"),
    (lambda m: m.set_pool("encoder", 1, 0.5, 0, 1, 2), "starting"),
    (lambda m: m.set_pool("encoder", 1, 0, float("nan"), 1, 2), "restarting"),
    (lambda m: m.set_pool("encoder", 1, 0, 0, 3, 2), "low <= high"),
    (lambda m: m.set_pool("encoder", 1, 0, 0, 1, float("inf")), "high"),
    (lambda m: m.set_pool("decoder", True, 0, 0, 1, 2), "ready"),
    (lambda m: m.stream_moved("ingest"), "pool"),
    (lambda m: m.stream_moved("encoder", -1), "n"),
    (lambda m: m.stream_moved("encoder", 1.5), "n"),
])
def test_bad_values_are_rejected(call, match):
    m = pm.Metrics("prometheus", registry=CollectorRegistry())
    with pytest.raises(ValueError, match=match):
        call(m)


def test_ray_pools_and_moves(ray_session):
    """Under Ray (recorded in an actor, read from the node's metrics agent): the pool gauges stay
    exported while nothing changes (re-recorded), a new round's counts replace the old ones, and
    a pool's moves counter is exported at 0 from its first set_pool (Ray's Counter.inc refuses 0)."""
    import time

    import ray

    @ray.remote(num_cpus=0.1)
    class Pools:
        def __init__(self):
            from pipeline import metrics
            self.m = metrics.get_metrics()

        def run(self, *calls):
            for name, args in calls:
                getattr(self.m, name)(*args)
            return self.m.backend, ray.get_runtime_context().get_worker_id()

    def wait(port: int, want: dict, timeout_s: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            got = pool_series(port, "ray_", worker)
            if all(got.get(k) == v for k, v in want.items()) or time.monotonic() > deadline:
                return got
            time.sleep(0.3)

    port = ray_session["metrics_port"]
    a = Pools.remote()
    try:
        # only this actor's series: other tests' actors record pools on the same node
        backend, worker = ray.get(a.run.remote(("set_pool", ("encoder", 2, 1, 0, 1, 4)),
                                               ("set_pool", ("decoder", 1, 0, 0, 1, 2)),
                                               ("stream_moved", ("encoder", 3))))
        assert backend == "ray"
        want = {("omnizip_pool_members", "encoder", "ready"): 2, ("omnizip_pool_members", "encoder", "starting"): 1,
                ("omnizip_pool_members", "encoder", "restarting"): 0, ("omnizip_pool_members", "decoder", "ready"): 1,
                ("omnizip_pool_min", "encoder"): 1, ("omnizip_pool_max", "encoder"): 4,
                ("omnizip_pool_max", "decoder"): 2,
                ("omnizip_stream_moves_total", "encoder"): 3, ("omnizip_stream_moves_total", "decoder"): 0}
        got = wait(port, want)
        assert {k: got.get(k) for k in want} == want, got
        time.sleep(5)  # five report intervals (conftest: 1 s) without a new value: still there
        got = pool_series(port, "ray_", worker)
        assert {k: got.get(k) for k in want} == want, got
        ray.get(a.run.remote(("set_pool", ("encoder", 3, 0, 0, 1, 4)), ("stream_moved", ("decoder", 1))))
        want.update({("omnizip_pool_members", "encoder", "ready"): 3, ("omnizip_pool_members", "encoder", "starting"): 0,
                     ("omnizip_stream_moves_total", "decoder"): 1})
        got = wait(port, want)
        assert {k: got.get(k) for k in want} == want, got
    finally:
        ray.kill(a)


def test_backend_choice(monkeypatch):
    with pytest.raises(ValueError, match="backend"):
        pm.Metrics("statsd")
    monkeypatch.setenv("OMNIZIP_METRICS_BACKEND", "prometheus")
    m = pm.get_metrics()
    assert m.backend == "prometheus" and pm.get_metrics() is m  # one per process
