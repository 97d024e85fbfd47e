"""Concurrent real-time streams on this machine with the `tiny` preset: how many streams the
engine sustains with lag under 2 s, and the per-window end-to-end latency.

For N = 1, 4, 8, 16, 24, 32, 48, 64 streams at once (until a level fails or the time budget is
spent), every stream is a synthetic audio-video source (lavfi test pattern + tone, 320x240 at
25 fps) played in real time through the whole engine on a local Ray: one IngestActor per stream,
one EncoderWorker (windows of all streams batched), one DecoderActor, the in-process store.
A window's latency runs from its end in media time (on the stream's live clock: wall time of
media 0 = the earliest arrival of a window minus its media end) to the moment it is in the
decoder's context. A level is sustained when no window was dropped and the p95
latency (after each stream's first 2 warm-up windows) and the final lag are under 2 s.

    python bench/stream.py [--seconds 12] [--budget-s 200] [--max-streams 64]

Last line: {"streams_sustained": N, "latency_p50_s": ..., "latency_p95_s": ..., ...} where the
latencies are those of the largest sustained level.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LEVELS = (1, 4, 8, 16, 24, 32, 48, 64)
LAG_LIMIT_S = 2.0
WARMUP_WINDOWS = 2


def source(seconds: int, k: int) -> str:
    return (f"lavfi:testsrc2=size=320x240:rate=25,trim=duration={seconds}[out0];"
            f"sine=f={220 + 20 * k}:sample_rate=16000,atrim=duration={seconds}[out1]")


def run_level(svc, n: int, seconds: int) -> dict:
    import ray

    t = time.monotonic()
    ids = [ray.get(svc.create_stream.remote({"source": source(seconds, k), "realtime": True,
                                               "name": f"bench-{n}-{k}"}))["id"] for k in range(n)]
    deadline = time.monotonic() + seconds + 120
    while True:
        sts = ray.get([svc.get_stream.remote(s) for s in ids])
        if all(s["status"] in ("ended", "failed") for s in sts) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    lats = []
    for s in ids:
        lats += ray.get(svc.window_latencies.remote(s))[WARMUP_WINDOWS:]
    dropped = sum(s["dropped"] for s in sts)
    failed = sum(s["status"] != "ended" for s in sts)
    final_lag = max(s["lag_s"] for s in sts)
    for s in ids:
        ray.get(svc.delete_stream.remote(s))
    a = np.asarray(lats) if lats else np.asarray([float("inf")])
    p50, p95 = float(np.percentile(a, 50)), float(np.percentile(a, 95))
    ok = not dropped and not failed and p95 < LAG_LIMIT_S and final_lag < LAG_LIMIT_S
    return {"streams": n, "sustained": ok, "latency_p50_s": round(p50, 3), "latency_p95_s": round(p95, 3),
            "latency_max_s": round(float(a.max()), 3), "windows": len(lats), "dropped": dropped,
            "failed": failed, "final_lag_s": final_lag, "wall_s": round(time.monotonic() - t, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=12, help="media seconds per stream and level")
    ap.add_argument("--budget-s", type=float, default=200, help="stop starting levels after this much wall time")
    ap.add_argument("--max-streams", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=8)
    args = ap.parse_args()

    from pipeline.cli.main import start_ray
    from pipeline.engine.service import get_or_create_service, shutdown_service

    start_ray()
    svc = get_or_create_service({"name": f"bench-{os.getpid()}", "detached": False, "ingest_cpus": 0.02,
                                 "max_batch": args.max_batch, "allow_sources": "lavfi"})
    import ray
    ray.get(svc.health.remote(), timeout=300)
    t0 = time.monotonic()
    results, best = [], None
    try:
        for n in LEVELS:
            if n > args.max_streams or time.monotonic() - t0 > args.budget_s:
                break
            r = run_level(svc, n, args.seconds)
            results.append(r)
            print(json.dumps(r), flush=True)
            if not r["sustained"]:
                break
            best = r
    finally:
        shutdown_service(svc)
        ray.shutdown()
    print(json.dumps({
        "streams_sustained": best["streams"] if best else 0,
        "latency_p50_s": best["latency_p50_s"] if best else None,
        "latency_p95_s": best["latency_p95_s"] if best else None,
        "limit_found": bool(results) and not results[-1]["sustained"],  # else: a lower bound
        "lag_limit_s": LAG_LIMIT_S, "model": "tiny", "seconds_per_stream": args.seconds,
        "cpus": os.cpu_count(), "machine": platform.machine(), "levels": results}))


if __name__ == "__main__":
    main()
