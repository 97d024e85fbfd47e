"""The two metric backends behind pipeline.metrics.Metrics: prometheus-client in this process,
or Ray's metrics (aggregated by each node's metrics agent). Same names, same labels."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from typing import Any

from pipeline.metrics.specs import _BY_NAME, SPECS

class _PromBackend:
    def __init__(self, registry: Any = None) -> None:
        import prometheus_client as pc
        self.registry = registry if registry is not None else pc.REGISTRY
        self.m: dict[str, Any] = {}
        for s in SPECS:
            if s.kind == "counter":
                self.m[s.name] = pc.Counter(s.name, s.doc, s.labels, registry=self.registry)
            elif s.kind == "gauge":
                self.m[s.name] = pc.Gauge(s.name, s.doc, s.labels, registry=self.registry)
            else:
                self.m[s.name] = pc.Histogram(s.name, s.doc, s.labels, buckets=s.buckets,
                                              registry=self.registry)

    def _child(self, name: str, tags: Mapping[str, str]) -> Any:
        m = self.m[name]
        return m.labels(**tags) if _BY_NAME[name].labels else m

    def inc(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        self._child(name, tags).inc(value)

    def set(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        self._child(name, tags).set(value)

    def observe(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        self._child(name, tags).observe(value)

    def prime(self, name: str, tags: Mapping[str, str]) -> None:
        self._child(name, tags)  # a labelled child starts at 0 and is exported from then on

    def drop(self, name: str, tags: Mapping[str, str]) -> None:
        m = self.m[name]
        try:
            m.remove(*(tags[k] for k in _BY_NAME[name].labels))
        except KeyError:
            pass

    def forget(self, label: str, value: str) -> None:
        for s in SPECS:
            if label in s.labels:
                m = self.m[s.name]
                for key in list(m._metrics):  # no public API lists a metric's children
                    if key[s.labels.index(label)] == value:
                        m.remove(*key)


def _gauge_refresh_s() -> float:
    """How often the Ray backend re-records its gauges: half of Ray's metrics report interval
    (``RAY_metrics_report_interval_ms``, 10 s by default), within 0.2 .. 5 s."""
    try:
        interval_ms = float(os.environ.get("RAY_metrics_report_interval_ms", "10000"))
    except ValueError:
        interval_ms = 10000.0
    return min(5.0, max(0.2, interval_ms / 2000.0))


class _RayBackend:
    """ray.util.metrics. Ray's exporter shows a gauge only for a report interval or so after it
    was last set (measured: with RAY_metrics_report_interval_ms=1000 a gauge set once is gone two
    seconds later), so a value that does not change - a stream's name, a stalled stream's lag -
    would vanish from Prometheus. Gauges are therefore re-recorded with their last value by one
    daemon thread per process until they are dropped or their stream is forgotten, which is what
    prometheus_client gauges do by themselves."""

    def __init__(self) -> None:
        from ray.util import metrics as rm
        self.m: dict[str, Any] = {}
        for s in SPECS:
            tags = s.labels or None
            if s.kind == "counter":
                self.m[s.name] = rm.Counter(s.name, description=s.doc, tag_keys=tags)
            elif s.kind == "gauge":
                self.m[s.name] = rm.Gauge(s.name, description=s.doc, tag_keys=tags)
            else:
                self.m[s.name] = rm.Histogram(s.name, description=s.doc,
                                              boundaries=list(s.buckets), tag_keys=tags)
        self._gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._lock = threading.Lock()
        self._refresher: threading.Thread | None = None

    def inc(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        if value <= 0:  # Ray's Counter refuses 0 (a window without video adds 0 video tokens)
            return
        self.m[name].inc(value, tags=dict(tags) or None)

    def set(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        with self._lock:
            self._gauges[(name, tuple(sorted(tags.items())))] = value
            self.m[name].set(value, tags=dict(tags) or None)
            if self._refresher is None:
                self._refresher = threading.Thread(target=self._refresh, name="omnizip-gauges", daemon=True)
                self._refresher.start()

    def _refresh(self) -> None:
        period = _gauge_refresh_s()
        while True:
            time.sleep(period)
            with self._lock:
                for (name, tags), value in list(self._gauges.items()):
                    try:
                        self.m[name].set(value, tags=dict(tags) or None)
                    except Exception:  # never let the refresher die
                        pass

    def observe(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        self.m[name].observe(value, tags=dict(tags) or None)

    def prime(self, name: str, tags: Mapping[str, str]) -> None:
        # Counter.inc refuses 0; recording 0 through the metric's own _record exports the series
        # at 0 (tests/test_metrics.py checks it against the installed Ray). If a Ray release
        # changes that, the series appears at its first increment instead, as without priming.
        try:
            self.m[name]._record(0.0, tags=dict(tags) or None)
        except Exception:
            pass

    def forget(self, label: str, value: str) -> None:
        # Ray cannot drop a series: stop re-recording the stream's gauges and set them to 0, so
        # dashboards read 0 until Ray's exporter lets the series go
        with self._lock:
            gone = [k for k in self._gauges if dict(k[1]).get(label) == value]
            for k in gone:
                del self._gauges[k]
            for name, tags in gone:
                self.m[name].set(0.0, tags=dict(tags))
        for s in SPECS:
            if s.kind == "gauge" and s.labels == (label,):  # also ones another process recorded
                self.m[s.name].set(0.0, tags={label: value})

    def drop(self, name: str, tags: Mapping[str, str]) -> None:
        with self._lock:
            self._gauges.pop((name, tuple(sorted(tags.items()))), None)
            self.m[name].set(0.0, tags=dict(tags))  # 0 until Ray's exporter lets it go

