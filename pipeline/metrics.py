"""Every Prometheus metric of the service, defined once (``SPECS``), recorded through typed
helpers so the pipeline never spells a metric name or label by hand.

Two backends, one set of names (see docs/metrics.md):
- ``ray``: ``ray.util.metrics``, used in any process attached to Ray (actors, Serve replicas,
  a driver after ``ray.init``). Ray aggregates every worker of a node in its per-node metrics
  agent, which serves ``/metrics`` on the node's ``metrics_export_port``: one scrape target per
  node, next to Ray's and Serve's own metrics. Ray prefixes the names with ``ray_``; the
  scrape config (monitoring/prometheus.yml) renames ``ray_omnizip_*`` back to ``omnizip_*``.
- ``prometheus``: ``prometheus_client`` in this process, exported by :func:`start_exporter`;
  for processes outside Ray (a CLI run without Ray, benchmarks, tests).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["SPECS", "STAGES", "MODALITIES", "DROP_REASONS", "RECONNECT_COMPONENTS", "POOLS", "POOL_STATES",
           "Metrics", "get_metrics", "start_exporter", "exported_names"]

PREFIX = "omnizip_"
STAGES = ("decode", "encode", "compress", "prefill")
MODALITIES = ("audio", "video")
DROP_REASONS = ("behind_live", "queue_full", "error", "unstored")  # unstored: fell out of a full store buffer
RECONNECT_COMPONENTS = ("source", "redis", "actor", "move")  # move: the engine moved the stream (not a fault)
POOLS = ("encoder", "decoder")  # the engine's elastic pools (pipeline.engine.elastic)
POOL_STATES = ("ready", "starting", "restarting")  # a pool member as the last health round saw it

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
RATE_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
BATCH_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)

Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class MetricSpec:
    """One metric. ``name`` is the base name; counters are exported with ``_total``."""

    name: str
    kind: Kind
    doc: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


SPECS: tuple[MetricSpec, ...] = (
    MetricSpec("omnizip_window_latency_seconds", "histogram",
               "Wall time one window spends in a pipeline stage.", ("stage",), LATENCY_BUCKETS),
    MetricSpec("omnizip_tokens_in", "counter",
               "Tokens produced by the encoders before compression.", ("stream", "modality")),
    MetricSpec("omnizip_tokens_kept", "counter",
               "Tokens kept by OmniZip and appended to the context.", ("stream", "modality")),
    MetricSpec("omnizip_compression_ratio", "gauge",
               "Tokens kept / tokens in over the stream's last window (lower = more compression).",
               ("stream",)),
    MetricSpec("omnizip_stream_lag_seconds", "gauge",
               "How far the stream's newest context window is behind live, in seconds.",
               ("stream",)),
    MetricSpec("omnizip_dropped_windows", "counter",
               "Windows dropped instead of entering the context, by reason.", ("stream", "reason")),
    MetricSpec("omnizip_reconnects", "counter",
               "Reconnections after a lost source, Redis connection or actor.",
               ("component", "stream")),
    MetricSpec("omnizip_context_tokens", "gauge",
               "Tokens in the stream's rolling decoder context.", ("stream",)),
    MetricSpec("omnizip_answer_ttft_seconds", "histogram",
               "Time from a question to its first answer token.", (), LATENCY_BUCKETS),
    MetricSpec("omnizip_answer_tokens_per_second", "histogram",
               "Answer decoding speed after the first token.", (), RATE_BUCKETS),
    MetricSpec("omnizip_queue_depth", "gauge",
               "Items waiting in a bounded queue.", ("queue",)),
    MetricSpec("omnizip_encoder_batch_size", "histogram",
               "Windows per encoder call (several streams batched).", (), BATCH_BUCKETS),
    MetricSpec("omnizip_stream_info", "gauge",
               "1 for each stream, labelled with its name: dashboards join it on `stream` "
               "(* on(stream) group_left(name)) to show names instead of ids.", ("stream", "name")),
    MetricSpec("omnizip_pool_members", "gauge",
               "Members of an elastic pool (encoder workers or decoders) by state: ready (answering), "
               "starting (not yet answered once), restarting (was up, silent within its grace).",
               ("pool", "state")),
    MetricSpec("omnizip_pool_min", "gauge",
               "The configured lower bound of an elastic pool's members.", ("pool",)),
    MetricSpec("omnizip_pool_max", "gauge",
               "The configured upper bound of an elastic pool's members.", ("pool",)),
    MetricSpec("omnizip_stream_moves", "counter",
               "Streams the engine moved from one pool member to another (a member joined, left or "
               "stayed away past its grace); the stream continues from the store.", ("pool",)),
)
_BY_NAME = {s.name: s for s in SPECS}


def exported_names() -> list[str]:
    """The sample names Prometheus holds (after the scrape config's renaming)."""
    out = []
    for s in SPECS:
        if s.kind == "counter":
            out.append(s.name + "_total")
        elif s.kind == "histogram":
            out += [s.name + "_bucket", s.name + "_sum", s.name + "_count"]
        else:
            out.append(s.name)
    return out


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


def _check(value: str, allowed: Sequence[str], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {list(allowed)}, got {value!r}")
    return value


def _num(value: float, what: str, minimum: float = 0.0) -> float:
    v = float(value)
    if not v >= minimum:  # also rejects NaN
        raise ValueError(f"{what} must be a number >= {minimum}, got {value!r}")
    return v


def _count(value: int, what: str, minimum: int = 0) -> float:
    """A whole number >= minimum (a member count), as the float the backends record."""
    v = _num(value, what, minimum)
    if isinstance(value, bool) or not v.is_integer():  # also rejects infinity
        raise ValueError(f"{what} must be a whole number >= {minimum}, got {value!r}")
    return v


class Metrics:
    """Typed recording helpers over one backend; safe to call from many threads."""

    def __init__(self, backend: Literal["prometheus", "ray"] = "prometheus",
                 registry: Any = None) -> None:
        if backend == "prometheus":
            self._b: Any = _PromBackend(registry)
        elif backend == "ray":
            if registry is not None:
                raise ValueError("registry only applies to the prometheus backend")
            self._b = _RayBackend()
        else:
            raise ValueError(f"backend must be 'prometheus' or 'ray', got {backend!r}")
        self.backend = backend
        self._names: dict[str, str] = {}  # stream -> the name its info series carries
        self._names_lock = threading.Lock()
        self._primed: set[str] = set()  # pools whose moves counter is exported (from 0)

    @property
    def registry(self) -> Any:
        """The prometheus_client registry (prometheus backend only)."""
        return getattr(self._b, "registry", None)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self._b.observe("omnizip_window_latency_seconds", _num(seconds, "seconds"),
                        {"stage": _check(stage, STAGES, "stage")})

    def record_window(self, stream: str, tokens_in: Mapping[str, int],
                      tokens_kept: Mapping[str, int]) -> None:
        """Count one compressed window's tokens per modality and set the stream's ratio."""
        total_in = total_kept = 0.0
        for modality in set(tokens_in) | set(tokens_kept):
            _check(modality, MODALITIES, "modality")
            n_in = _num(tokens_in.get(modality, 0), f"tokens_in[{modality!r}]")
            n_kept = _num(tokens_kept.get(modality, 0), f"tokens_kept[{modality!r}]")
            if n_kept > n_in:
                raise ValueError(f"tokens_kept[{modality!r}]={n_kept} exceeds tokens_in={n_in}")
            tags = {"stream": stream, "modality": modality}
            self._b.inc("omnizip_tokens_in", n_in, tags)
            self._b.inc("omnizip_tokens_kept", n_kept, tags)
            total_in += n_in
            total_kept += n_kept
        if total_in > 0:
            self._b.set("omnizip_compression_ratio", total_kept / total_in, {"stream": stream})

    def set_lag(self, stream: str, seconds: float) -> None:
        self._b.set("omnizip_stream_lag_seconds", _num(seconds, "lag seconds", float("-inf")),
                    {"stream": stream})

    def drop_window(self, stream: str, reason: str, n: int = 1) -> None:
        self._b.inc("omnizip_dropped_windows", _num(n, "n"),
                    {"stream": stream, "reason": _check(reason, DROP_REASONS, "reason")})

    def reconnect(self, component: str, stream: str = "") -> None:
        self._b.inc("omnizip_reconnects", 1.0, {
            "component": _check(component, RECONNECT_COMPONENTS, "component"), "stream": stream})

    def set_context_tokens(self, stream: str, n: int) -> None:
        self._b.set("omnizip_context_tokens", _num(n, "context tokens"), {"stream": stream})

    def observe_answer(self, ttft_s: float, n_tokens: int, total_s: float) -> None:
        """One answer: time to its first token, and tokens/s over the rest of it."""
        ttft = _num(ttft_s, "ttft_s")
        total = _num(total_s, "total_s", ttft)
        self._b.observe("omnizip_answer_ttft_seconds", ttft, {})
        n = _num(n_tokens, "n_tokens")
        if n > 1 and total > ttft:
            self._b.observe("omnizip_answer_tokens_per_second", (n - 1) / (total - ttft), {})

    def set_queue_depth(self, queue: str, n: int) -> None:
        self._b.set("omnizip_queue_depth", _num(n, "queue depth"), {"queue": queue})

    def observe_batch(self, size: int) -> None:
        self._b.observe("omnizip_encoder_batch_size", _num(size, "batch size", 1.0), {})

    def stream_info(self, stream_id: str, name: str | None) -> None:
        """``omnizip_stream_info{stream, name} = 1``: the stream's name, for dashboards to join on
        (``* on(stream) group_left(name) omnizip_stream_info``). Call it when a stream is created
        or re-attached; a new name replaces the old one (its series is dropped, or set to 0 under
        Ray, which cannot drop a series: dashboards join on ``== 1``). ``None``: no name ("")."""
        if not isinstance(stream_id, str) or not stream_id:
            raise ValueError(f"stream_id must be a non-empty string, got {stream_id!r}")
        label = "" if name is None else str(name)
        with self._names_lock:
            old = self._names.get(stream_id)
            if old is not None and old != label:
                self._b.drop("omnizip_stream_info", {"stream": stream_id, "name": old})
            self._names[stream_id] = label
            self._b.set("omnizip_stream_info", 1.0, {"stream": stream_id, "name": label})

    def set_pool(self, pool: str, ready: int, starting: int, restarting: int, low: int, high: int) -> None:
        """One elastic pool as the engine's scaling round left it: its members by state
        (``omnizip_pool_members{pool, state}``, every state set, 0 included) and its bounds
        (``omnizip_pool_min{pool}``, ``omnizip_pool_max{pool}``). ``pool``: encoder or decoder.
        The first call for a pool also exports its ``omnizip_stream_moves_total{pool}`` at 0, so
        the first move shows in ``rate()``/``increase()`` (a counter series that appears at 1
        shows no increase)."""
        tags = {"pool": _check(pool, POOLS, "pool")}
        counts = dict(zip(POOL_STATES, (_count(ready, "ready"), _count(starting, "starting"),
                                        _count(restarting, "restarting"))))
        lo, hi = _count(low, "low"), _count(high, "high")
        if lo > hi:
            raise ValueError(f"pool bounds need low <= high, got low={low!r} high={high!r}")
        for state, n in counts.items():
            self._b.set("omnizip_pool_members", n, {**tags, "state": state})
        self._b.set("omnizip_pool_min", lo, tags)
        self._b.set("omnizip_pool_max", hi, tags)
        with self._names_lock:
            first = pool not in self._primed
            self._primed.add(pool)
        if first:
            self._b.prime("omnizip_stream_moves", tags)

    def stream_moved(self, pool: str, n: int = 1) -> None:
        """``n`` streams moved by the engine from one member of ``pool`` (encoder or decoder)
        to another (``omnizip_stream_moves_total{pool}``)."""
        tags = {"pool": _check(pool, POOLS, "pool")}
        v = _count(n, "n")
        if v > 0:  # Ray's counters refuse 0
            self._b.inc("omnizip_stream_moves", v, tags)

    def forget_stream(self, stream: str) -> None:
        """A deleted stream's series stop being exported (prometheus) or read 0 (ray), its
        ``omnizip_stream_info`` included."""
        with self._names_lock:
            name = self._names.pop(stream, None)
            if name is not None:
                self._b.drop("omnizip_stream_info", {"stream": stream, "name": name})
        self._b.forget("stream", stream)


_lock = threading.Lock()
_default: dict[str, Metrics] = {}


def _auto_backend() -> str:
    forced = os.environ.get("OMNIZIP_METRICS_BACKEND")
    if forced:
        return forced
    try:
        import ray
        return "ray" if ray.is_initialized() else "prometheus"
    except ImportError:
        return "prometheus"


def get_metrics(backend: str | None = None) -> Metrics:
    """This process's :class:`Metrics` (created on first use): the ``ray`` backend when the
    process is attached to Ray, else ``prometheus``; ``OMNIZIP_METRICS_BACKEND`` overrides."""
    name = backend or _auto_backend()
    with _lock:
        if name not in _default:
            _default[name] = Metrics(name)  # type: ignore[arg-type]
        return _default[name]


def start_exporter(port: int, addr: str = "0.0.0.0", registry: Any = None) -> tuple[Any, Any]:
    """Serve ``/metrics`` of the prometheus backend on ``addr:port``; returns (server, thread).
    Processes attached to Ray need none: the node's Ray metrics agent exports them."""
    import prometheus_client as pc
    if registry is None:
        registry = get_metrics("prometheus").registry
    return pc.start_http_server(port, addr=addr, registry=registry)
