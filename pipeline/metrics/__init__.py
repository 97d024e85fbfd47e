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
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pipeline.metrics.backends import _PromBackend, _RayBackend
from pipeline.metrics.specs import (  # noqa: F401  (the vocabulary, importable from here)
    BATCH_BUCKETS, DROP_REASONS, LATENCY_BUCKETS, MODALITIES, POOL_STATES, POOLS, PREFIX, PUSH_FAILURE_STAGES,
    PUSH_FRAME_OUTCOMES, RATE_BUCKETS, REALTIME_EVENTS, REALTIME_RESPONSE_STATUSES, REALTIME_SESSION_OUTCOMES,
    REALTIME_TURN_TRIGGERS, RECONNECT_COMPONENTS, SPECS, STAGES, WATCH_KINDS, WATCH_SKIP_REASONS,
    WATCH_STATES, WEBHOOK_OUTCOMES, MetricSpec, exported_names)

__all__ = ["SPECS", "STAGES", "MODALITIES", "DROP_REASONS", "RECONNECT_COMPONENTS", "POOLS", "POOL_STATES",
           "PUSH_FRAME_OUTCOMES", "PUSH_FAILURE_STAGES",
           "Metrics", "get_metrics", "start_exporter", "exported_names"]


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

    def push_publisher(self, stream: str, connected: bool) -> None:
        self._b.set("omnizip_push_publishers", 1.0 if connected else 0.0, {"stream": stream})

    def push_received(self, stream: str, packets: int, nbytes: int, lost: int) -> None:
        """What a push stream's transport received since the last call (deltas, >= 0)."""
        tags = {"stream": stream}
        for name, v in (("omnizip_push_packets", packets), ("omnizip_push_bytes", nbytes),
                        ("omnizip_push_packets_lost", lost)):
            n = _count(v, name)
            if n > 0:  # Ray's counters refuse 0
                self._b.inc(name, n, tags)

    def push_frames(self, stream: str, outcome: str, n: int) -> None:
        v = _count(n, "n")
        if v > 0:
            self._b.inc("omnizip_push_frames", v,
                        {"stream": stream, "outcome": _check(outcome, PUSH_FRAME_OUTCOMES, "outcome")})

    def push_failure(self, stage: str) -> None:
        self._b.inc("omnizip_push_failures", 1.0, {"stage": _check(stage, PUSH_FAILURE_STAGES, "stage")})

    def watch_evaluated(self, kind: str, seconds: float | None = None) -> None:
        """One watch evaluated; with ``seconds``: the wall time of the call that evaluated it (a
        packed yes_no forward over several streams is one observation)."""
        tags = {"kind": _check(kind, WATCH_KINDS, "kind")}
        if seconds is None:
            self._b.inc("omnizip_watch_evaluations", 1.0, tags)
        else:
            self._b.observe("omnizip_watch_evaluation_seconds", _num(seconds, "seconds"), tags)

    def watch_event(self, state: str) -> None:
        self._b.inc("omnizip_watch_events", 1.0, {"state": _check(state, WATCH_STATES, "state")})

    def watch_skipped(self, reason: str) -> None:
        self._b.inc("omnizip_watch_skipped", 1.0, {"reason": _check(reason, WATCH_SKIP_REASONS, "reason")})

    def webhook_delivery(self, outcome: str) -> None:
        self._b.inc("omnizip_webhook_deliveries", 1.0, {"outcome": _check(outcome, WEBHOOK_OUTCOMES, "outcome")})

    def set_webhook_pending(self, n: int) -> None:
        self._b.set("omnizip_webhook_pending", _count(n, "pending"), {})

    def realtime_session(self, outcome: str) -> None:
        self._b.inc("omnizip_realtime_sessions", 1.0,
                    {"outcome": _check(outcome, REALTIME_SESSION_OUTCOMES, "outcome")})

    def realtime_event(self, kind: str) -> None:
        """One client event of a realtime session (``other``: an unknown or unsupported type)."""
        self._b.inc("omnizip_realtime_events", 1.0, {"type": _check(kind, REALTIME_EVENTS, "type")})

    def realtime_turn(self, trigger: str) -> None:
        self._b.inc("omnizip_realtime_turns", 1.0, {"trigger": _check(trigger, REALTIME_TURN_TRIGGERS, "trigger")})

    def realtime_response(self, status: str) -> None:
        self._b.inc("omnizip_realtime_responses", 1.0,
                    {"status": _check(status, REALTIME_RESPONSE_STATUSES, "status")})

    def observe_realtime_latency(self, seconds: float) -> None:
        """A turn's end (speech stopped, or response.create) to its first text delta."""
        self._b.observe("omnizip_realtime_first_delta_seconds", _num(seconds, "seconds"), {})

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
