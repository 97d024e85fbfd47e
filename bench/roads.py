"""The roads of a window and of a question, counted: Redis commands per window of a file stream
through the whole engine (a real redis-server; `INFO commandstats` before and after), and the
HTTP overhead of a question (time to the first answer piece over HTTP/SSE minus the decoder's own
time to its first token), median of N asks, with the `tiny` preset on a local Ray.

    python bench/roads.py [--windows 20] [--asks 10] [--skip-ask]

Last line: {"redis_commands_per_window": ..., "redis_by_command": {...}, "idle_commands_per_s": ...,
"ask_http_first_piece_ms": ..., "ask_decoder_first_token_ms": ..., "ask_overhead_ms": ...}.
The idle rate (the engine's background rounds with no stream) is measured first and subtracted, so
the per-window figure is what a window costs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from redis_helpers import RedisServer  # noqa: E402


def clip(path: Path, seconds: int) -> Path:
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y",
                    "-f", "lavfi", "-i", f"testsrc2=size=160x120:rate=10:duration={seconds}",
                    "-f", "lavfi", "-i", f"sine=f=440:sample_rate=16000:duration={seconds}",
                    "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
                    "-c:a", "aac", "-shortest", str(path)], check=True, timeout=120)
    return path


def _name(module: str, before_layout: str, name: str):
    """``name`` from ``module``, or from where it lived before the package layout (so this script
    measures a checkout from before it too, in the same run conditions): the first of the two
    that this checkout holds."""
    import importlib

    root = Path(__file__).resolve().parents[1]
    for candidate in (module, before_layout):
        try:
            mod = importlib.import_module(candidate)
        except ImportError:
            continue
        if Path(mod.__file__).resolve().is_relative_to(root) and hasattr(mod, name):
            return getattr(mod, name)
    raise ImportError(f"neither {module}.{name} nor {before_layout}.{name} in {root}")


def command_counts(r) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in r.info("commandstats").items()}


def diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0) > 0}


def stream_cost(svc, r, media: Path, n: int, idle_rate: float, ray) -> tuple[dict, dict[str, int], str]:
    """Play one file stream of ``n`` windows to its end; the Redis commands it cost (the idle
    rate of the engine's background rounds subtracted), per command, and its id."""
    before = command_counts(r)
    t0 = time.monotonic()
    sid = ray.get(svc.create_stream.remote({"source": str(media), "name": f"roads-{n}"}))["id"]
    while ray.get(svc.get_stream.remote(sid))["status"] not in ("ended", "failed"):
        time.sleep(2.0)  # the poll's own reads count too: seldom
    elapsed = time.monotonic() - t0
    used = diff(command_counts(r), before)
    windows = int(ray.get(svc.get_stream.remote(sid))["windows_total"])
    return {"windows": windows, "commands": sum(used.values()) - idle_rate * elapsed}, used, sid


def first_piece_ms(base: str, stream_id: str, question: str) -> float:
    """Milliseconds from sending an SSE ask to its first token event."""
    import requests

    t = time.perf_counter()
    with requests.post(f"{base}/v1/streams/{stream_id}/ask", json={"question": question, "stream": True,
                                                                   "max_tokens": 8}, stream=True, timeout=120) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith(b"event: token"):
                return (time.perf_counter() - t) * 1000
    raise RuntimeError("the answer had no token")


def decoder_first_token_ms(stream_id: str, names, question: str) -> float:
    """The decoder's own time to its first answer piece, called directly on its actor."""
    import ray

    dec = ray.get_actor(names.decoder(0), namespace="omnizip")
    t = time.perf_counter()
    gen = dec.ask.options(num_returns="streaming").remote(stream_id, question, 8, None)
    for ref in gen:
        if isinstance(ray.get(ref), str):
            return (time.perf_counter() - t) * 1000
    raise RuntimeError("the answer had no piece")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--asks", type=int, default=10)
    p.add_argument("--skip-ask", action="store_true")
    p.add_argument("--idle-s", type=float, default=10.0)
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import redis as redis_lib

    start_ray = _name("pipeline.cli.main", "pipeline.cli", "start_ray")
    ServiceConfig = _name("pipeline.core.config", "pipeline.config", "ServiceConfig")
    ActorNames = _name("pipeline.engine.runtime", "pipeline.runtime", "ActorNames")
    get_or_create_service = _name("pipeline.engine.service", "pipeline.service", "get_or_create_service")
    shutdown_service = _name("pipeline.engine.service", "pipeline.service", "shutdown_service")

    work = Path(tempfile.mkdtemp(prefix="roads"))
    server = RedisServer(work / "redis", extra_args=["--appendfsync", "everysec"])
    server.start()
    r = redis_lib.Redis.from_url(server.url)
    start_ray()
    name = f"roads-{os.getpid()}"
    config = {"name": name, "redis_url": server.url, "allow_sources": "file", "file_roots": str(work),
              "ingest_cpus": 0.02, "detached": False}
    names = ActorNames.of(ServiceConfig.coerce(config))
    svc = get_or_create_service(config)
    try:
        while not ray.get(svc.health.remote(), timeout=300)["ok"]:
            time.sleep(1)
        before = command_counts(r)
        time.sleep(args.idle_s)
        idle = diff(command_counts(r), before)
        idle_rate = sum(idle.values()) / args.idle_s

        runs = [stream_cost(svc, r, clip(work / f"clip{n}.mp4", 2 * n), n, idle_rate, ray)
                for n in (args.windows, 3 * args.windows)]
        (short, used, sid), (long_, _, _) = runs
        marginal = (long_["commands"] - short["commands"]) / max(1, long_["windows"] - short["windows"])
        out: dict = {"windows": short["windows"], "redis_commands_per_window": round(marginal, 2),
                     "redis_commands_per_window_all_in": round(short["commands"] / max(1, short["windows"]), 2),
                     "redis_by_command": {k: round(v / max(1, short["windows"]), 2) for k, v in sorted(used.items())},
                     "idle_commands_per_s": round(idle_rate, 2)}
        print(f"{short['windows']} and {long_['windows']} windows: {out['redis_commands_per_window']} Redis commands "
              f"per window more ({out['redis_commands_per_window_all_in']} per window all in, the stream's fixed "
              f"costs included; idle {idle_rate:.2f}/s subtracted)")
        if not args.skip_ask:
            from ray import serve

            from redis_helpers import free_port

            build_app = _name("pipeline.api.app", "pipeline.serve", "build_app")

            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app(config, {"insecure": False}), name="roads", route_prefix="/")
            base = f"http://127.0.0.1:{port}"
            q = "What happens in the video?"
            first_piece_ms(base, sid, q)  # warm-up
            decoder_first_token_ms(sid, names, q)
            http = [first_piece_ms(base, sid, q) for _ in range(args.asks)]
            own = [decoder_first_token_ms(sid, names, q) for _ in range(args.asks)]
            out.update(ask_http_first_piece_ms=round(statistics.median(http), 1),
                       ask_decoder_first_token_ms=round(statistics.median(own), 1),
                       ask_overhead_ms=round(statistics.median(http) - statistics.median(own), 1))
            print(f"ask: first piece over HTTP {out['ask_http_first_piece_ms']} ms, decoder's own "
                  f"{out['ask_decoder_first_token_ms']} ms, overhead {out['ask_overhead_ms']} ms (median of {args.asks})")
            serve.delete("roads")
    finally:
        try:
            shutdown_service(svc)
        finally:
            server.stop()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
