"""monitoring/: the dashboard parses with grafana-foundation-sdk, its queries and the alert rules
pass promtool, and a real Prometheus scraping real exporters (prometheus_client, and Ray's
per-node metrics agent) returns data for every panel."""

from __future__ import annotations

import threading
import time

import pytest
import yaml
from prometheus_client import CollectorRegistry

import prom_helpers as ph
from pipeline import metrics as pm
from redis_helpers import free_port


def feed(m: pm.Metrics, k: int) -> None:
    """What the pipeline records for one window of each of two streams, and one answer."""
    for stream in ("cam1", "cam2"):
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


def test_dashboard_parses_and_covers_every_metric():
    dash = ph.load_dashboard()
    assert dash.uid == "omnizip-stream" and dash.title
    queries = ph.panel_queries(dash)
    assert len(dash.panels) >= 12 and len(queries) >= 12
    text = " ".join(q.expr for q in queries)
    for spec in pm.SPECS:
        assert spec.name in text, f"no panel shows {spec.name}"
    assert 'up{job=~"omnizip|ray"}' in text
    ds = yaml.safe_load((ph.MONITORING / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    uid = ds["datasources"][0]["uid"]
    assert all(p.datasource.uid == uid for p in dash.panels)


def test_panel_queries_refuse_unknown_variables():
    with pytest.raises(ValueError, match="unresolved variable"):
        ph.panel_queries(ph.load_dashboard(), variables={"$stream": ".*"})


def test_promtool_checks(tmp_path):
    r = ph.promtool("check", "rules", str(ph.MONITORING / "alerts.yml"))
    assert r.returncode == 0 and "4 rules found" in r.stdout, r.stdout + r.stderr
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
        with ph.start_prometheus({"omnizip": [f"127.0.0.1:{port}"]}, tmp_path / "prom") as prom:
            missing = ph.wait_for_panels(prom.url, ph.panel_queries(ph.load_dashboard()), 60)
            assert not missing, f"panels without data: {missing}"
            up = ph.query(prom.url, 'up{job="omnizip"}')
            assert [s["value"][1] for s in up] == ["1"]
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
        with ph.start_prometheus({"ray": [target]}, tmp_path / "prom") as prom:
            missing = ph.wait_for_panels(prom.url, ph.panel_queries(ph.load_dashboard()), 90)
            assert not missing, f"panels without data: {missing}"
            names = set(ph.api(prom.url, "/api/v1/label/__name__/values"))
            assert set(pm.exported_names()) <= names
            assert not [n for n in names if n.startswith("ray_omnizip_")]
            # two workers feed the same streams: their series stay apart (WorkerId) and sum up
            per_worker = ph.query(prom.url, 'omnizip_tokens_in_total{stream="cam1", modality="audio"}')
            assert len(per_worker) == 2
            assert not any(k.startswith("otel_scope") for s in per_worker for k in s["metric"])
    finally:
        ticks = ray.get([f.finish.remote() for f in feeders])
        assert min(ticks) > 0
        for f in feeders:
            ray.kill(f)
