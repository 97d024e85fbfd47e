"""Soak: N paced streams for M minutes through one engine over a real redis-server, sampling every
actor's resident memory and Redis's memory. Passes when no window is lost and nothing grows after
the warm-up beyond noise.

    python bench/soak.py [--streams 8] [--minutes 10] [--sample-s 10]

Streams are lavfi test graphs played in real time without backpressure (live semantics: a stream
that fell behind would drop, and that would count as lost). The context budget and the store's
retention are small by default, so both are full within the warm-up: growth after it is a leak. Last line: one JSON object with
streams, minutes, windows, lost, rss_growth_pct (the largest per-actor growth from the end of the
warm-up, the first fifth, to the last fifth) and redis_growth_pct.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test servers

from redis_helpers import RedisServer  # noqa: E402


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc (MiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def growth_pct(series: list[float]) -> float:
    """Mean of the last fifth over the mean of the second fifth (after warm-up), in percent."""
    n = len(series)
    k = max(1, n // 5)
    base = sum(series[k:2 * k]) / len(series[k:2 * k]) if n >= 2 * k and series[k:2 * k] else series[0]
    tail = sum(series[-k:]) / k
    return 100.0 * (tail - base) / base if base else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--sample-s", type=float, default=10.0)
    # small budgets, so the steady state (a full context, a full retention) comes within the
    # warm-up and growth after it means a leak, not data still arriving
    p.add_argument("--context-tokens", type=int, default=1024)
    p.add_argument("--retention-windows", type=int, default=30)
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from tqdm import tqdm

    from pipeline.cli.main import start_ray
    from pipeline.core.config import ServiceConfig
    from pipeline.engine.runtime import ActorNames
    from pipeline.engine.service import get_or_create_service, shutdown_service
    from pipeline.store.open import open_store

    start_ray()
    work = Path(tempfile.mkdtemp(prefix="soak"))
    redis = RedisServer(work / "redis", extra_args=["--appendfsync", "everysec"])
    redis.start()
    name = f"soak-{os.getpid()}"
    config = {"name": name, "redis_url": redis.url, "allow_sources": "lavfi", "ingest_cpus": 0.02,
              "detached": False, "context_tokens": args.context_tokens, "retention_windows": args.retention_windows}
    names = ActorNames.of(ServiceConfig.coerce(config))
    svc = get_or_create_service(config)
    while not ray.get(svc.health.remote(), timeout=300)["ok"]:
        time.sleep(1)
    seconds = int(args.minutes * 60)
    src = (f"lavfi:testsrc2=size=160x120:rate=10,trim=duration={seconds}[out0];"
           f"sine=f=440:sample_rate=16000,atrim=duration={seconds}[out1]")
    ids = [ray.get(svc.create_stream.remote({"source": src, "realtime": True, "backpressure": False}))["id"]
           for _ in range(args.streams)]
    actors = {n: ray.get_actor(n, namespace="omnizip") for n in (names.encoder(0), names.decoder(0), names.service())}
    actors.update({f"ingest-{i}": ray.get_actor(names.ingest(s), namespace="omnizip") for i, s in enumerate(ids)})
    pids = {n: ray.get(h.__ray_call__.remote(lambda self: os.getpid())) for n, h in actors.items()}
    rss: dict[str, list[float]] = {n: [] for n in pids}
    redis_mem: list[float] = []
    import redis as redis_lib
    r = redis_lib.Redis.from_url(redis.url)
    t0 = time.monotonic()
    try:
        with tqdm(total=seconds, unit="s", desc="soak", file=sys.stderr) as bar:
            while time.monotonic() - t0 < seconds + 10:
                for n, pid in pids.items():
                    try:
                        rss[n].append(rss_mb(pid))
                    except OSError:  # an ingest actor whose stream ended
                        pass
                redis_mem.append(r.info("memory")["used_memory"] / 2**20)
                statuses = [ray.get(svc.get_stream.remote(s)) for s in ids]
                if all(st["status"] in ("ended", "failed") for st in statuses):
                    break
                time.sleep(args.sample_s)
                bar.update(min(args.sample_s, seconds - bar.n))
        statuses = [ray.get(svc.get_stream.remote(s)) for s in ids]
        with open_store(redis.url) as store:  # retention keeps the newest: the last index counts them all
            stored = [(store.last_window_index(s) or -1) + 1 for s in ids]
        expected = args.streams * (seconds // 2)
        windows = sum(stored)
        lost = expected - windows + sum(int(st["dropped"]) for st in statuses)
        growth = {n: round(growth_pct(v), 1) for n, v in rss.items() if len(v) >= 5}
        print(f"streams {args.streams}, {args.minutes} min: {windows} windows stored of {expected}, lost {lost}")
        for n, v in rss.items():
            if v:
                print(f"  {n:<28} rss {v[0]:7.1f} -> {v[-1]:7.1f} MiB  growth after warm-up {growth.get(n, 0.0):+.1f}%")
        print(f"  redis used_memory {redis_mem[0]:.1f} -> {redis_mem[-1]:.1f} MiB")
        result = {"streams": args.streams, "minutes": args.minutes, "windows": windows, "lost": lost,
                  "rss_growth_pct": max(growth.values()) if growth else 0.0,
                  "redis_growth_pct": round(growth_pct(redis_mem), 1)}
    finally:
        shutdown_service(svc)
        redis.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
