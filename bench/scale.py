"""The stream limit on one worker node and on two: how many concurrent real-time streams the
engine sustains before its end-to-end window latency breaks, on a Ray cluster of separate node
processes on this machine (bench/local_cluster.py), both sizes measured in one run.

For each cluster (a head with no CPUs + 1 worker node, then + 2 worker nodes; each worker node
``--worker-cpus`` logical CPUs) an engine with one encoder worker and one decoder per worker node
(the engine SPREADs them: one of each per node) takes synthetic live streams (bench/stream.py's
source: lavfi test pattern + tone, 320x240 at 25 fps, played in real time). The number of streams
is raised level by level, N = 1, 2, 4, 8, 12, 16, 20, 24, 32, 48, 64: the streams of a level keep
running into the next, which only adds streams (starting a stream's ingest actor takes seconds on
a busy machine, so fresh streams per level would never all run at once). A level is measured once
every stream is live with its warm-up windows in context: for ``--seconds`` of wall time, the
end-to-end latency of each window that reached a context (window end in media time -> in the
decoder's context; bench/stream.py's measure) and the windows dropped. A level holds when every
stream delivered windows, none was dropped (a live stream further behind live than ``max_lag_s``
drops its oldest) and the p95 latency is at most the threshold, the window length plus
``max_lag_s`` (2 + 4 = 6 s by default). The limit is the largest level that held; the ramp stops
at the first level that breaks (or when the time budget is spent: the limit is then a lower bound).

    python bench/scale.py [--seconds 12] [--budget-s 600] [--worker-cpus 4] [--max-streams 64]

Progress lines go to stderr; stdout gets a table, then as its LAST line one JSON object:
{"limit_1node": N, "limit_2node": M, "latency_p95_s": .., "ratio": M/N, "latency_p95_1node_s": .., ...}
(latency_p95_s: the p95 at the two-node limit; latency_p95_<n>node_s: at each size's limit).

Every node here shares this machine's cores: a second worker node adds Ray's bookkeeping room
(logical CPUs, one more encoder and decoder) but no compute, so the ratio measures what spreading
the engine over nodes costs or gains on the same cores, not what a second machine would add.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import stream as single  # noqa: E402  (bench/stream.py: one level of real-time streams)
from local_cluster import LocalCluster  # noqa: E402

LEVELS = (1, 2, 4, 8, 12, 16, 20, 24, 32, 48, 64)
WINDOW_S = 2.0


def say(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def engine_config(nodes: int, args: argparse.Namespace) -> dict[str, Any]:
    members = args.members or nodes
    return {"name": f"scale{nodes}-{os.getpid()}", "model": args.model, "detached": False,
            "encoder_workers": members, "decoder_actors": members, "max_batch": args.max_batch,
            "max_lag_s": args.max_lag_s, "torch_threads": args.torch_threads, "ingest_cpus": 0.02,
            "allow_sources": "lavfi", "max_streams": max(LEVELS), "max_streams_per_key": max(LEVELS)}


def _statuses(svc: Any, ids: list[str]) -> list[dict[str, Any]]:
    import ray

    return ray.get([svc.get_stream.remote(sid) for sid in ids], timeout=120)


def _latencies(svc: Any, ids: list[str]) -> dict[str, list[float]]:
    import ray

    return dict(zip(ids, ray.get([svc.window_latencies.remote(sid) for sid in ids], timeout=120)))


def run_level(svc: Any, ids: list[str], n: int, seconds: float, threshold_s: float, tag: str) -> dict[str, Any]:
    """Add streams up to ``n`` (``ids`` grows), wait until all are live past their warm-up, then
    measure ``seconds`` of wall time."""
    import ray

    t = time.monotonic()
    for k in range(len(ids), n):
        ids.append(ray.get(svc.create_stream.remote({"source": single.source(86400, k), "realtime": True,
                                                      "name": f"scale-{k}"}), timeout=120)["id"])
    deadline, shown = time.monotonic() + 120 + 6 * n, 0.0
    while True:  # every stream live with its warm-up windows in context
        sts = _statuses(svc, ids)
        failed = [s for s in sts if s["status"] == "failed"]
        ready = sum(s["status"] == "live" and s["windows"] > single.WARMUP_WINDOWS for s in sts)
        if failed or ready == n or time.monotonic() > deadline:
            break
        if time.monotonic() - shown > 10:
            say(f"{tag}: level {n}: {ready}/{n} streams live ...")
            shown = time.monotonic()
        time.sleep(1.0)
    started_s = time.monotonic() - t
    if failed or ready < n:
        return {"streams": n, "held": False, "why": f"{len(failed)} failed, {n - ready} not live in time",
                "latency_p50_s": None, "latency_p95_s": None, "latency_max_s": None, "windows": 0,
                "dropped": None, "failed": len(failed), "start_s": round(started_s, 1)}
    before, drops0 = _latencies(svc, ids), {s["id"]: s["dropped"] for s in sts}
    time.sleep(seconds)
    after, sts = _latencies(svc, ids), _statuses(svc, ids)
    new = {sid: after[sid][len(before[sid]):] for sid in ids}  # the decoder keeps the last 2048
    lats = [x for v in new.values() for x in v]
    dropped = sum(s["dropped"] - drops0.get(s["id"], 0) for s in sts)
    failed = sum(s["status"] == "failed" for s in sts)
    silent = sum(not v for v in new.values())  # no window reached the context while measured
    a = np.asarray(lats) if lats else np.asarray([float("inf")])
    p95 = float(np.percentile(a, 95))
    held = not failed and not dropped and not silent and p95 <= threshold_s
    why = "" if held else ", ".join(x for x in (f"{failed} failed" if failed else "", f"{dropped} dropped" if dropped
                                                 else "", f"{silent} silent" if silent else "",
                                                 f"p95 {p95:.2f} s > {threshold_s:g} s" if p95 > threshold_s else "")
                                     if x)
    return {"streams": n, "held": held, "why": why, "latency_p50_s": round(float(np.percentile(a, 50)), 3),
            "latency_p95_s": round(p95, 3), "latency_max_s": round(float(a.max()), 3), "windows": len(lats),
            "dropped": dropped, "failed": failed, "lag_max_s": max(s["lag_s"] for s in sts),
            "start_s": round(started_s, 1)}


def measure(nodes: int, args: argparse.Namespace, threshold_s: float) -> dict[str, Any]:
    """Start a cluster of ``nodes`` worker nodes and raise the level until it breaks."""
    import ray

    from pipeline.engine.service import get_or_create_service, shutdown_service

    t0, tag = time.monotonic(), f"{nodes} worker node{'s' if nodes > 1 else ''}"
    say(f"{tag}: starting the cluster ({args.worker_cpus:g} logical CPUs per worker node)")
    levels: list[dict[str, Any]] = []
    with LocalCluster(workers=nodes, worker_cpus=args.worker_cpus) as cluster:
        os.environ["RAY_AUTH_MODE"] = cluster.env["RAY_AUTH_MODE"]
        ray.init(address=cluster.address, logging_level=logging.ERROR, log_to_driver=False)
        try:
            svc = get_or_create_service(engine_config(nodes, args))
            ray.get(svc.health.remote(), timeout=300)
            members = args.members or nodes
            say(f"{tag}: engine up in {time.monotonic() - t0:.0f} s ({members} encoder worker(s), "
                f"{members} decoder(s))")
            ids: list[str] = []
            start = time.monotonic()
            try:
                for n in LEVELS:
                    if n > args.max_streams:
                        break
                    if time.monotonic() - start > args.budget_s:
                        say(f"{tag}: time budget spent before level {n}")
                        break
                    say(f"{tag}: level {n}: adding {n - len(ids)} stream(s), then {args.seconds:g} s measured ...")
                    r = run_level(svc, ids, n, args.seconds, threshold_s, tag)
                    levels.append(r)
                    if r["latency_p95_s"] is None:
                        say(f"{tag}: level {n}: BROKE ({r['why']})")
                    else:
                        say(f"{tag}: level {n}: p95 {r['latency_p95_s']:.2f} s, max {r['latency_max_s']:.2f} s, "
                            f"{r['windows']} windows, dropped {r['dropped']} -> "
                            f"{'held' if r['held'] else 'BROKE (' + r['why'] + ')'}")
                    if not r["held"]:
                        break
            finally:
                shutdown_service(svc)
        finally:
            ray.shutdown()
    best = max((r for r in levels if r["held"]), key=lambda r: r["streams"], default=None)
    return {"nodes": nodes, "limit": best["streams"] if best else 0,
            "limit_found": bool(levels) and not levels[-1]["held"],  # else: a lower bound
            "latency_p95_s": best["latency_p95_s"] if best else None,
            "levels": levels, "wall_s": round(time.monotonic() - t0, 1)}


def table(results: list[dict[str, Any]]) -> str:
    rows = ["nodes  streams  p50 s   p95 s   max s  windows  dropped  held",
            "-----  -------  ------  ------  -----  -------  -------  ----"]

    def num(x: Any, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)
    for res in results:
        for r in res["levels"]:
            rows.append(f"{res['nodes']:>5}  {r['streams']:>7}  {num(r['latency_p50_s'], '6.2f'):>6}  "
                        f"{num(r['latency_p95_s'], '6.2f'):>6}  {num(r['latency_max_s'], '5.1f'):>5}  "
                        f"{r['windows']:>7}  {num(r['dropped'], 'd'):>7}  {'yes' if r['held'] else 'NO: ' + r['why']}")
    for res in results:
        bound = "" if res["limit_found"] else " (a lower bound: the last level held)"
        rows.append(f"limit on {res['nodes']} worker node(s): {res['limit']} streams{bound}")
    return "\n".join(rows)


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM too: the clusters are stopped on the way out


def main() -> None:
    signal.signal(signal.SIGTERM, _interrupt)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=12, help="wall seconds measured per level")
    ap.add_argument("--budget-s", type=float, default=600, help="per cluster size: no new level after this")
    ap.add_argument("--max-streams", type=int, default=64)
    ap.add_argument("--worker-cpus", type=float, default=4, help="logical CPUs of each worker node")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-lag-s", type=float, default=4.0)
    ap.add_argument("--torch-threads", type=int, default=1, help="torch threads in each model actor")
    ap.add_argument("--nodes", default="1,2", help="the cluster sizes measured, worker nodes (default 1,2)")
    ap.add_argument("--members", type=int, default=None,
                    help="encoder workers and decoders whatever the size (default: one of each per worker node); "
                         "--nodes 1 --members 2 tells what the second node adds from what two members add")
    args = ap.parse_args()
    sizes = sorted({int(x) for x in args.nodes.split(",") if x.strip()})
    threshold_s = WINDOW_S + args.max_lag_s
    say(f"threshold: p95 window latency <= {threshold_s:g} s (window {WINDOW_S:g} s + max_lag {args.max_lag_s:g} s), "
        f"no window dropped, no stream failed; {os.cpu_count()} CPU cores on this machine")
    results = [measure(n, args, threshold_s) for n in sizes]
    by = {r["nodes"]: r for r in results}
    one, two = by.get(1, {}), by.get(2, {})
    print(table(results), flush=True)
    print(json.dumps({
        "limit_1node": one.get("limit"), "limit_2node": two.get("limit"),
        # at the limit of the largest cluster measured (as bench/stream.py reports its largest level's)
        "latency_p95_s": results[-1]["latency_p95_s"],
        **{f"latency_p95_{n}node_s": r["latency_p95_s"] for n, r in by.items()},
        "ratio": round(two["limit"] / one["limit"], 2) if one.get("limit") and two else None,
        "limit_found": {f"{n}node": r["limit_found"] for n, r in by.items()},
        "members": args.members or "one per node",
        "threshold_s": threshold_s, "model": args.model, "measured_s_per_level": args.seconds,
        "worker_cpus": args.worker_cpus, "cpus": os.cpu_count(), "machine": platform.machine(),
        "levels": {f"{r['nodes']}node": r["levels"] for r in results},
        "wall_s": {f"{r['nodes']}node": r["wall_s"] for r in results}}), flush=True)


if __name__ == "__main__":
    main()
