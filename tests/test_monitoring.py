"""monitoring/: the dashboard parses with grafana-foundation-sdk, its queries and the alert rules
pass promtool, and a real Prometheus scraping real exporters (prometheus_client, and Ray's
per-node metrics agent) returns data for every panel that they feed. The Ray Serve panels are
fed by Serve's HTTP proxies: tests/test_e2e_live.py checks them against the real Serve app. The
GPU panels are fed by Ray's node metrics, on nodes with a GPU only."""

from __future__ import annotations

import json
import threading
import time

import pytest
import yaml
from prometheus_client import CollectorRegistry

import prom_helpers as ph
from pipeline import metrics as pm
from redis_helpers import free_port


def feed(m: pm.Metrics, k: int) -> None:
    """What the pipeline records for one window of each of two streams, and one answer; and what
    the engine's scaling round records: both pools, with encoder streams moving now and then
    and no decoder stream ever moving (its moves panel series must still read 0)."""
    for stream in ("cam1", "cam2"):
        m.stream_info(stream, f"camera {stream[-1]}")
        for stage, t in zip(pm.STAGES, (0.01, 0.2, 0.03, 0.1)):
            m.observe_stage(stage, t * (1 + k % 3))
        m.record_window(stream, {"audio": 50, "video": 400}, {"audio": 30, "video": 100 + k % 7})
        m.set_lag(stream, 0.5 + 0.1 * (k % 5))
        m.set_context_tokens(stream, 1000 + 130 * k)
        m.set_queue_depth(f"ingest:{stream}", k % 3)
        if k % 4 == 0:
            m.drop_window(stream, "behind_live")
        if k % 5 == 0:
            m.reconnect("source", stream)
    m.observe_batch(1 + k % 4)
    m.observe_answer(ttft_s=0.2 + 0.01 * (k % 10), n_tokens=32, total_s=1.5)
    m.set_pool("encoder", ready=1 + k % 3, starting=1 if k % 3 == 0 else 0, restarting=1 if k % 5 == 0 else 0,
               low=1, high=4)
    m.set_pool("decoder", ready=1, starting=0, restarting=0, low=1, high=2)
    if k % 3 == 1:
        m.stream_moved("encoder")
    m.push_publisher("cam2", True)  # a push stream's publisher and a watch, as the ingest and decoder record them
    m.push_received("cam2", packets=50 + k, nbytes=40000 + k, lost=k % 2)
    for outcome, n in (("decoded", 6), ("kept", 2), ("dropped", k % 2)):
        m.push_frames("cam2", outcome, n)
    if k % 4 == 0:
        m.push_failure("ice")
    m.watch_evaluated("yes_no")
    m.watch_evaluated("yes_no", seconds=0.02 + 0.001 * (k % 5))
    m.watch_event("fired" if k % 2 else "cleared")
    m.watch_skipped("busy")
    m.webhook_delivery("delivered" if k % 3 else "failed")
    m.set_webhook_pending(k % 4)
    m.realtime_session("opened")  # a realtime session's socket, as the replica records it
    m.realtime_event("input_audio_buffer.append")
    m.realtime_turn("vad")
    m.realtime_response("completed" if k % 3 else "cancelled")
    m.observe_realtime_latency(0.05 + 0.01 * (k % 4))


def serve_and_gpu_names() -> dict[str, set[str]]:
    """The names the Serve and GPU panels must use, from the installed Ray itself: Serve's HTTP
    ingress metrics and the reporter agent's GPU gauges, as the node's metrics agent exports
    them (ray_ prefix; counters _total, histograms _bucket)."""
    from ray.dashboard.modules.reporter.reporter_agent import METRICS_GAUGES
    from ray.serve._private.common import RequestProtocol
    from ray.serve._private.request_ingress_metrics import RequestIngressMetrics

    m = RequestIngressMetrics(RequestProtocol.HTTP, source="proxy", node_id="n", node_ip_address="i")
    return {"serve": {f"ray_{m.request_counter.info['name']}_total",
                      f"ray_{m.request_error_counter.info['name']}_total",
                      f"ray_{m.processing_latency_tracker.info['name']}_bucket"},
            "gpu": {f"ray_{g}" for g in ("node_gpus_utilization", "node_gram_used") if g in METRICS_GAUGES}}


def test_dashboard_parses_and_covers_every_metric():
    dash = ph.load_dashboard()
    assert dash.uid == "omnizip-stream" and dash.title
    queries = ph.panel_queries(dash)
    assert len(dash.panels) >= 20 and len(queries) >= 20
    text = " ".join(q.expr for q in queries)
    for spec in pm.SPECS:
        assert spec.name in text, f"no panel shows {spec.name}"
    assert 'up{job="ray"}' in text and "omnizip|" not in text  # the ray job is the only one
    names = serve_and_gpu_names()
    assert names["serve"] == {"ray_serve_num_http_requests_total", "ray_serve_num_http_error_requests_total",
                              "ray_serve_http_request_latency_ms_bucket"}
    assert names["gpu"] == {"ray_node_gpus_utilization", "ray_node_gram_used"}
    for name in names["serve"] | names["gpu"]:
        assert name in text, f"no panel shows {name}"
    # names joined on the per-stream panels; the name variable filters them
    per_stream = [q for q in queries if 'stream=~".*"' in q.expr and "by (stream" in q.expr]
    assert per_stream and all("group_left(name)" in q.expr for q in per_stream)


def test_pool_panels():
    """Pools: members by pool and state, with the pool's min and max as dashed lines; Stream
    moves: the moves' rate by pool."""
    raw = json.loads(ph.DASHBOARD.read_text())
    panels = {p["title"]: p for p in raw["panels"]}
    pools, moves = panels["Pools"], panels["Stream moves"]
    exprs = {t["refId"]: (t["expr"], t["legendFormat"]) for t in pools["targets"]}
    assert exprs["A"] == ("sum by (pool, state) (omnizip_pool_members)", "{{pool}} {{state}}")
    assert exprs["B"] == ("sum by (pool) (omnizip_pool_min)", "{{pool}} min")
    assert exprs["C"] == ("sum by (pool) (omnizip_pool_max)", "{{pool}} max")
    dashed = {o["matcher"]["options"] for o in pools["fieldConfig"]["overrides"]
              if o["matcher"]["id"] == "byFrameRefID"
              and {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}} in o["properties"]}
    assert dashed == {"B", "C"}
    (t,) = moves["targets"]
    assert t["expr"] == "sum by (pool) (rate(omnizip_stream_moves_total[$__rate_interval]))" and t["legendFormat"] == "{{pool}}"
    # parsed the same way by the SDK
    by_panel = {q.panel for q in ph.panel_queries(ph.load_dashboard())}
    assert {"Pools", "Stream moves"} <= by_panel


def test_dashboard_datasource_is_a_variable():
    """No hard-coded data source uid: a `datasource` variable of type prometheus, used by every
    panel, every query and every query variable; provisioning gives it a default to start on."""
    raw = json.loads(ph.DASHBOARD.read_text())
    variables = {v["name"]: v for v in raw["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ref = {"type": "prometheus", "uid": "${datasource}"}
    uses = [v["datasource"] for v in variables.values() if v["type"] == "query"]
    for p in raw["panels"]:
        uses.append(p["datasource"])
        uses += [t["datasource"] for t in p["targets"]]
    assert len(uses) > len(raw["panels"]) and all(u == ref for u in uses), uses
    assert variables["name"]["query"]["query"] == "label_values(omnizip_stream_info, name)"
    ds = yaml.safe_load((ph.MONITORING / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    (prom,) = ds["datasources"]
    assert prom["type"] == "prometheus" and prom["isDefault"] is True
    assert "uid" not in json.dumps(raw).replace('"uid": "${datasource}"', "").replace('"uid": "omnizip-stream"', "")
    # the provider serves the folder compose mounts the dashboards into
    prov = yaml.safe_load((ph.MONITORING / "grafana/provisioning/dashboards/omnizip.yaml").read_text())
    compose = yaml.safe_load((ph.ROOT / "deploy/docker-compose.yml").read_text())
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["grafana"]["volumes"]}
    assert mounts[prov["providers"][0]["options"]["path"]] == "../monitoring/grafana/dashboards"


def test_panel_queries_refuse_unknown_variables():
    with pytest.raises(ValueError, match="unresolved variable"):
        ph.panel_queries(ph.load_dashboard(), variables={"$stream": ".*"})


def test_promtool_checks(tmp_path):
    r = ph.promtool("check", "rules", str(ph.MONITORING / "alerts.yml"))
    assert r.returncode == 0 and "7 rules found" in r.stdout, r.stdout + r.stderr
    r = ph.promtool("test", "rules", "alerts_test.yml", cwd=ph.MONITORING)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr
    r = ph.promtool("check", "config", str(ph.MONITORING / "prometheus.yml"))
    assert r.returncode == 0, r.stdout + r.stderr
    queries = ph.panel_queries(ph.load_dashboard())
    r = ph.check_exprs_with_promtool(queries, tmp_path)
    assert r.returncode == 0 and f"{len(queries)} rules found" in r.stdout, r.stdout + r.stderr
    # and the check does catch a broken expression
    bad = [*queries, ph.PanelQuery("broken", "Z", "sum by (stream (omnizip_queue_depth)")]
    assert ph.check_exprs_with_promtool(bad, tmp_path).returncode != 0


def test_alerts_are_about_what_exists():
    """Every alert reads metrics pipeline.metrics exports or the scrape job the config has (the
    old OmnizipWorkerDown watched a job at :9400 that nothing served, so it fired forever)."""
    import re

    rules = yaml.safe_load((ph.MONITORING / "alerts.yml").read_text())["groups"][0]["rules"]
    jobs = {j["job_name"] for j in yaml.safe_load((ph.MONITORING / "prometheus.yml").read_text())["scrape_configs"]}
    assert jobs == {"ray"}
    exported = set(pm.exported_names())
    for rule in rules:
        for metric in re.findall(r"\b(omnizip_\w+|up)\b(?=\s*[{\[)])", rule["expr"]):
            assert metric == "up" or metric in exported, (rule["alert"], metric)
        for job in re.findall(r'job=~?"([^"]+)"', rule["expr"]):
            assert job in jobs, (rule["alert"], job)
    assert {r["alert"] for r in rules} >= {"RayNodeMetricsDown", "OmnizipEngineActorRestarts", "OmnizipPoolBelowMin"}


def omnizip_panels(queries: list[ph.PanelQuery]) -> list[ph.PanelQuery]:
    """The panel queries pipeline.metrics feeds; the Serve and GPU ones are Ray's (see module doc)."""
    assert {ph.source_of(q) for q in queries} == {"omnizip", "serve", "gpu"}
    return [q for q in queries if ph.source_of(q) == "omnizip"]


def assert_pool_panels(url: str) -> None:
    """What feed() recorded, through the Pools and Stream moves panels: members by pool and every
    state, both bounds, encoder moves at a rate above 0 and the decoder's, never moved, at 0."""
    queries = {(q.panel, q.ref_id): q.expr for q in ph.panel_queries(ph.load_dashboard())}

    def by(expr: str, *labels: str) -> dict[tuple, float]:
        return {tuple(s["metric"][k] for k in labels): float(s["value"][1]) for s in ph.query(url, expr)}

    members = by(queries[("Pools", "A")], "pool", "state")
    assert set(members) == {(p, s) for p in pm.POOLS for s in pm.POOL_STATES}, members
    assert members[("decoder", "ready")] > 0 and members[("decoder", "starting")] == 0
    lows, highs = by(queries[("Pools", "B")], "pool"), by(queries[("Pools", "C")], "pool")
    assert set(lows) == set(highs) == {("encoder",), ("decoder",)}
    # feed(): encoder 1 .. 4, decoder 1 .. 2 per feeding process; under Ray the panel also sums
    # the engines of other test modules still running in the session, so only the order holds
    assert highs[("encoder",)] > lows[("encoder",)] > 0 and highs[("decoder",)] > lows[("decoder",)] > 0
    deadline = time.monotonic() + 30
    while True:  # rate() needs two scrapes after the first move
        moves = by(queries[("Stream moves", "A")], "pool")
        if moves.get(("encoder",), 0) > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert set(moves) == {("encoder",), ("decoder",)} and moves[("encoder",)] > 0 and moves[("decoder",)] == 0, moves


def test_every_panel_has_data_from_a_prometheus_client_exporter(tmp_path):
    reg = CollectorRegistry()
    m = pm.Metrics("prometheus", registry=reg)
    port = free_port()
    server, _ = pm.start_exporter(port, addr="127.0.0.1", registry=reg)
    stop = threading.Event()

    def loop():
        k = 0
        while not stop.is_set():
            feed(m, k)
            k += 1
            stop.wait(0.2)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        # the shipped config's one job; its relabelling leaves omnizip_* names as they are
        with ph.start_prometheus({"ray": [f"127.0.0.1:{port}"]}, tmp_path / "prom") as prom:
            missing = ph.wait_for_panels(prom.url, omnizip_panels(ph.panel_queries(ph.load_dashboard())), 60)
            assert not missing, f"panels without data: {missing}"
            up = ph.query(prom.url, 'up{job="ray"}')
            assert [s["value"][1] for s in up] == ["1"]
            names = ph.query(prom.url, 'max by (stream, name) (omnizip_stream_info) == 1')
            assert {(s["metric"]["stream"], s["metric"]["name"]) for s in names} == {("cam1", "camera 1"), ("cam2", "camera 2")}
            assert_pool_panels(prom.url)
    finally:
        stop.set()
        t.join()
        server.shutdown()
        server.server_close()


def test_ray_backend_names_after_relabelling_match_the_dashboard(ray_session, tmp_path):
    """Actors record through ray.util.metrics; the node's metrics agent is the one scrape target;
    the shipped scrape config turns ray_omnizip_* into omnizip_*."""
    import sys

    import ray
    from ray import cloudpickle

    # workers cannot import this test module: ship its code (feed, Feeder) by value
    cloudpickle.register_pickle_by_value(sys.modules[__name__])

    @ray.remote(num_cpus=0.1)
    class Feeder:
        def __init__(self):
            from pipeline import metrics
            self.m = metrics.get_metrics()  # auto: this process is a Ray worker
            self.stop = threading.Event()
            self.k = 0

        def backend(self):
            return self.m.backend

        def start(self):
            def loop():
                while not self.stop.is_set():
                    feed(self.m, self.k)
                    self.k += 1
                    self.stop.wait(0.2)
            threading.Thread(target=loop, daemon=True).start()

        def finish(self):
            self.stop.set()
            return self.k

    feeders = [Feeder.remote() for _ in range(2)]  # two worker processes on one node
    assert ray.get([f.backend.remote() for f in feeders]) == ["ray", "ray"]
    ray.get([f.start.remote() for f in feeders])
    try:
        target = f"127.0.0.1:{ray_session['metrics_port']}"
        queries = ph.panel_queries(ph.load_dashboard())
        # this Ray runs no Serve app (tests/test_e2e_live.py checks those panels); the GPU
        # panels must have data exactly when the node has a GPU
        has_gpu = ray.cluster_resources().get("GPU", 0) > 0
        expected = [q for q in queries if ph.source_of(q) == "omnizip" or (has_gpu and ph.source_of(q) == "gpu")]
        with ph.start_prometheus({"ray": [target]}, tmp_path / "prom") as prom:
            missing = ph.wait_for_panels(prom.url, expected, 90)
            assert not missing, f"panels without data: {missing}"
            if not has_gpu:  # no GPU, no GPU series: the GPU panels stay empty, as they should
                assert not any(ph.has_data(ph.query(prom.url, q.expr)) for q in queries if ph.source_of(q) == "gpu")
            names = set(ph.api(prom.url, "/api/v1/label/__name__/values"))
            assert set(pm.exported_names()) <= names
            assert not [n for n in names if n.startswith("ray_omnizip_")]
            assert_pool_panels(prom.url)  # summed over the two workers and the session's engines
            # two workers feed the same streams: their series stay apart (WorkerId) and sum up
            per_worker = ph.query(prom.url, 'omnizip_tokens_in_total{stream="cam1", modality="audio"}')
            assert len(per_worker) == 2
            assert not any(k.startswith("otel_scope") for s in per_worker for k in s["metric"])
    finally:
        ticks = ray.get([f.finish.remote() for f in feeders])
        assert min(ticks) > 0
        for f in feeders:
            ray.kill(f)
