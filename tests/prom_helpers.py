"""Checks of monitoring/ against a real Prometheus, reusable against a running pipeline:

    with start_prometheus({"ray": ["127.0.0.1:8080"]}, workdir) as prom:
        missing = wait_for_panels(prom.url, panel_queries(load_dashboard()), timeout_s=60)

The Prometheus config is monitoring/prometheus.yml itself (its relabelling included) with the
targets swapped for the given ones, a 1 s scrape interval and the alert rules loaded.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from redis_helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "omnizip.json"
# Grafana fills these in at query time; promtool and the HTTP API need concrete values.
GRAFANA_VARS = {"$__rate_interval": "30s", "$__interval": "5s", "$stream": ".*", "$name": ".*"}
# Panels fed by Ray itself rather than by pipeline.metrics: Ray Serve's HTTP proxies, and the
# GPUs of Ray's node metrics (only on nodes that have one).
SERVE_METRICS = ("ray_serve_",)
GPU_METRICS = ("ray_node_gpus_", "ray_node_gram_")


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    ref_id: str
    expr: str


def load_dashboard(path: Path = DASHBOARD) -> Any:
    """Parse the dashboard with grafana-foundation-sdk (the Prometheus query plugin included)."""
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard
    register_default_plugins()
    return Dashboard.from_json(json.loads(Path(path).read_text()))


def panel_queries(dashboard: Any, variables: Mapping[str, str] = GRAFANA_VARS) -> list[PanelQuery]:
    """Every Prometheus query of every panel (rows included), Grafana variables substituted."""
    from grafana_foundation_sdk.models import prometheus
    out: list[PanelQuery] = []
    panels = list(dashboard.panels or [])
    while panels:
        p = panels.pop(0)
        if getattr(p, "type_val", "") == "row":
            panels.extend(p.panels)
            continue
        for t in p.targets or []:
            if not isinstance(t, prometheus.Dataquery):
                raise TypeError(f"panel {p.title!r}: target {t!r} is not a Prometheus query")
            expr = t.expr
            # longest names first, so $__rate_interval is not eaten by a shorter variable
            for k in sorted(variables, key=len, reverse=True):
                expr = expr.replace(k, variables[k])
            if "$" in expr:
                raise ValueError(f"panel {p.title!r}: unresolved variable in {expr!r}")
            out.append(PanelQuery(p.title or "", t.ref_id, expr))
    return out


def source_of(q: PanelQuery) -> str:
    """Who feeds a panel query: "serve" (Ray Serve's proxies), "gpu" (Ray's GPU node metrics)
    or "omnizip" (pipeline.metrics, and Prometheus' own `up`)."""
    if any(m in q.expr for m in SERVE_METRICS):
        return "serve"
    if any(m in q.expr for m in GPU_METRICS):
        return "gpu"
    return "omnizip"


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    if exe is None:
        raise RuntimeError("promtool is not installed (Debian package 'prometheus')")
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def check_exprs_with_promtool(queries: Sequence[PanelQuery], workdir: Path) -> subprocess.CompletedProcess[str]:
    """One recording rule per query in a temporary rules file, checked by `promtool check rules`."""
    rules = [{"record": f"omnizip:panel_check:{i}", "expr": q.expr} for i, q in enumerate(queries)]
    path = Path(workdir) / "panel_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    return promtool("check", "rules", str(path))


class Prometheus:
    """A real prometheus process on 127.0.0.1 with temp storage."""

    def __init__(self, targets: Mapping[str, Sequence[str]], workdir: Path,
                 config: Path = MONITORING / "prometheus.yml", scrape_interval: str = "1s") -> None:
        exe = shutil.which("prometheus")
        if exe is None:
            raise RuntimeError("prometheus is not installed (Debian package 'prometheus')")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = yaml.safe_load(Path(config).read_text())
        cfg["global"].update(scrape_interval=scrape_interval, evaluation_interval=scrape_interval)
        cfg["rule_files"] = [str((Path(config).parent / f).resolve()) for f in cfg.get("rule_files", [])]
        jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
        unknown = set(targets) - set(jobs)
        if unknown:
            raise ValueError(f"jobs {sorted(unknown)} are not in {config}; it has {sorted(jobs)}")
        cfg["scrape_configs"] = [{**jobs[name], "static_configs": [{"targets": list(t)}]}
                                 for name, t in targets.items()]
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(self.workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [exe, f"--config.file={self.workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}: "
                                   f"{(self.workdir / 'prometheus.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"prometheus not ready within {timeout_s}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


@contextmanager
def start_prometheus(targets: Mapping[str, Sequence[str]], workdir: Path, **kw: Any) -> Iterator[Prometheus]:
    prom = Prometheus(targets, workdir, **kw)
    try:
        prom.wait_ready()
        yield prom
    finally:
        prom.stop()


def api(url: str, path: str, **params: str) -> Any:
    full = f"{url}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(full, timeout=10) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"{path} {params}: {body}")
    return body["data"]


def query(url: str, expr: str) -> list[dict[str, Any]]:
    """Instant query through /api/v1/query; the result vector (empty = no data)."""
    data = api(url, "/api/v1/query", query=expr)
    if data["resultType"] != "vector":
        raise RuntimeError(f"{expr!r} gave a {data['resultType']}, not a vector")
    return data["result"]


def has_data(result: list[dict[str, Any]]) -> bool:
    """At least one sample with a number (a histogram quantile over no events is NaN)."""
    return any(re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?Inf", s["value"][1])
               for s in result)


def wait_for_panels(url: str, queries: Sequence[PanelQuery], timeout_s: float = 60.0,
                    poll_s: float = 0.5) -> list[PanelQuery]:
    """Poll until every query returns data or the deadline passes; returns the ones without."""
    pending = list(queries)
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        pending = [q for q in pending if not has_data(query(url, q.expr))]
        if pending:
            time.sleep(poll_s)
    return pending


def wait_for(url: str, expr: str, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """Poll one query until it returns data; AssertionError naming it if it never does."""
    deadline = time.monotonic() + timeout_s
    while True:
        res = query(url, expr)
        if has_data(res) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert has_data(res), f"no data for {expr!r} within {timeout_s}s"
    return res
