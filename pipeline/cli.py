"""`omnizip-stream`: the service's command line.

    omnizip-stream serve [--host 0.0.0.0 --port 8000 --model tiny --redis-url redis://...]
    omnizip-stream run SOURCE --question "What is happening?" [--model --device --redis-url ...]
    omnizip-stream demo

Each starts a local Ray (no dashboard, a small object store) unless RAY_ADDRESS names a cluster.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from typing import Any

QUESTION = "What is happening in the stream?"
DEMO_SECONDS = 12
DEMO_SOURCE = (f"lavfi:testsrc2=size=320x240:rate=25,trim=duration={DEMO_SECONDS}[out0];"
               f"sine=f=440:beep_factor=4:sample_rate=16000,atrim=duration={DEMO_SECONDS}[out1]")


def start_ray(metrics_port: int | None = None) -> None:
    """Attach to RAY_ADDRESS, or start a local Ray sized for this machine. A local Ray uses
    Ray's token authentication (RAY_AUTH_MODE=token, a token generated on first use) unless
    the environment says otherwise: Ray's own ports listen on every interface, and without a
    token anyone who reaches them can run code on the cluster."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING, log_to_driver=False)
        return
    kw: dict[str, Any] = {}
    if metrics_port:
        kw["_metrics_export_port"] = metrics_port
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, object_store_memory=256 * 2**20,
             _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"), logging_level=logging.WARNING,
             log_to_driver=False, **kw)


def _config(args: argparse.Namespace, **extra: Any) -> Any:
    from pipeline.service import ServiceConfig

    cfg = ServiceConfig.from_env()
    fields = {"model": args.model, "device": args.device, "dtype": args.dtype, "redis_url": args.redis_url,
              "behind_policy": getattr(args, "behind_policy", None)}
    return ServiceConfig(**{**cfg.__dict__, **{k: v for k, v in fields.items() if v is not None}, **extra})


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="preset (tiny|small|3b|7b, random weights) or a local checkpoint dir")
    p.add_argument("--device", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", help="float32 | bf16 | fp16 (default: the device's)")
    p.add_argument("--redis-url", help="redis://host:port/db (default: the in-process store)")


# ---- serve -----------------------------------------------------------------------------------------
def _is_loopback_host(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def cmd_serve(args: argparse.Namespace) -> int:
    from ray import serve

    from pipeline.serve import build_app

    from pipeline.serve import gate_settings

    gate = gate_settings({"api_keys": args.api_key or (), "insecure": args.insecure})
    if not gate.api_keys and not gate.insecure and not _is_loopback_host(args.host):
        print(f"omnizip-stream: refusing to listen on {args.host} without an API key: give --api-key KEY "
              "(or OMNIZIP_API_KEYS), or --insecure to serve anyone who can reach the port", file=sys.stderr)
        return 2
    cfg = _config(args)
    start_ray(args.metrics_port)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(cfg, gate={"api_keys": list(gate.api_keys), "insecure": gate.insecure}), name="omnizip",
              route_prefix="/", blocking=False)
    who = (f"{len(gate.api_keys)} API key(s) required" if gate.api_keys else
           "NO API KEY: anyone who reaches the port owns the service (--insecure)" if gate.insecure else
           "no API key: loopback clients only")
    from pipeline.source_policy import redact

    print(f"omnizip-stream: serving on http://{args.host}:{args.port} (model {cfg.model}, "
          f"store {redact(cfg.redis_url) if cfg.redis_url else 'in-process'}; {who}); Ctrl-C stops", flush=True)
    import signal

    import ray

    def _stop(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        ray.shutdown()
    return 0


# ---- run / demo ------------------------------------------------------------------------------------
def _duration_windows(source: str) -> int | None:
    """Windows in a file (for the progress bar); None for live sources or when unknown."""
    import av

    from pipeline.sources import classify

    spec = classify(source)
    if spec.kind != "file":
        return None
    try:
        with av.open(spec.target) as c:
            return int(-(-c.duration // (2 * av.time_base))) if c.duration else None
    except Exception:
        return None


def _answer(svc: Any, sid: str, question: str, max_tokens: int, out: Any) -> tuple[str, float, int]:
    import ray

    t = time.perf_counter()
    ttft, parts = None, []
    for ref in svc.ask.options(num_returns="streaming").remote(sid, question, max_tokens):
        piece = ray.get(ref)
        if ttft is None:
            ttft = time.perf_counter() - t
        parts.append(piece)
        out.write(piece)
        out.flush()
    out.write("\n")
    return "".join(parts), ttft or 0.0, len(parts)


def _window_line(w: dict) -> str:
    a_in, a_k, v_in, v_k = (int(w.get(k, 0)) for k in ("audio_in", "audio_kept", "video_in", "video_kept"))
    ratio = (a_k + v_k) / max(1, a_in + v_in)
    extra = "  (compressed harder)" if w.get("harder") else ""
    return (f"window {w['index']:3d} [{w['start']:6.1f}-{w['end']:6.1f} s]  audio {a_k:3d}/{a_in:3d}  "
            f"video {v_k:4d}/{v_in:4d}  kept {ratio:6.1%}{extra}")


def _summary(st: dict) -> str:
    t = st["tokens"]
    tin = t["audio"]["in"] + t["video"]["in"]
    kept = t["audio"]["kept"] + t["video"]["kept"]
    return (f"stream {st['id']} ({st['status']}): {st['windows_total']} windows, {st['windows']} in context, "
            f"{st['dropped']} dropped; audio kept {t['audio']['kept']}/{t['audio']['in']}, video kept "
            f"{t['video']['kept']}/{t['video']['in']} ({kept / max(1, tin):.1%} of tokens); "
            f"context {st['context_tokens']} tokens; lag {st['lag_s']:.2f} s")


def run_stream(cfg: Any, spec: dict, question: str, max_tokens: int, *, per_window: bool, progress: bool,
               duration_s: float | None, as_json: bool, out: Any = sys.stdout) -> int:
    """Create the stream, follow it to its end (or for duration_s), ask, print; 0 on success."""
    import ray

    from pipeline.service import get_or_create_service, shutdown_service

    svc = get_or_create_service(cfg)
    try:
        st = ray.get(svc.create_stream.remote(spec))
        sid = st["id"]
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=_duration_windows(spec["source"]), unit="window", desc="windows", file=sys.stderr)
        shown, t_start = 0, time.monotonic()
        while True:
            st = ray.get(svc.get_stream.remote(sid))
            if per_window:
                for w in ray.get(svc.windows.remote(sid, shown)):
                    print(_window_line(w), file=out, flush=True)
                    shown = w["index"] + 1
            if bar is not None:
                bar.n = st["windows_total"]
                bar.set_postfix(in_context=st["windows"], dropped=st["dropped"], refresh=False)
                bar.refresh()
            if st["status"] in ("ended", "failed"):
                break
            if duration_s is not None and time.monotonic() - t_start > duration_s:
                break
            time.sleep(0.25)
        if bar is not None:
            bar.close()
        if st["status"] == "failed":
            print(f"stream failed: {st['error']}", file=sys.stderr)
            return 1
        print(f"Q: {question}\nA: ", end="", file=out, flush=True)
        text, ttft, n = _answer(svc, sid, question, max_tokens, out)
        st = ray.get(svc.get_stream.remote(sid))
        print(_summary(st), file=out)
        print(f"answer: {n} tokens, first after {ttft * 1000:.0f} ms", file=out)
        if as_json:
            print(json.dumps({**st, "question": question, "answer": text, "ttft_s": ttft}), file=out)
        return 0
    finally:
        shutdown_service(svc)


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.sources import classify

    start_ray()
    oz = {k: v for k, v in (("rho_audio", args.rho_audio), ("rho_video", args.rho_video)) if v is not None}
    live = bool(classify(args.source).live)
    spec = {"source": args.source, "method": args.method, "omnizip": oz or None,
            "context_tokens": args.context_tokens, "lookahead": args.lookahead, "realtime": args.realtime or None,
            "backpressure": not live and not args.realtime}  # a file waits for the model instead of dropping
    # the operator names the source on the command line: any kind is theirs to open
    cfg = _config(args, name=f"omnizip-run-{os.getpid()}", detached=False, allow_sources="*")
    return run_stream(cfg, spec, args.question, args.max_tokens, per_window=args.per_window,
                      progress=not args.no_progress, duration_s=args.duration, as_json=args.json)


def cmd_demo(args: argparse.Namespace) -> int:
    start_ray()
    print(f"OmniZip-Stream demo: a synthetic {DEMO_SECONDS}-s audio-video clip (test pattern + beeps), "
          "the 'tiny' Qwen2.5-Omni preset (random weights: the words mean nothing), the in-process store.",
          flush=True)
    cfg = _config(argparse.Namespace(model="tiny", device="cpu", dtype=None, redis_url=None),
                  name=f"omnizip-demo-{os.getpid()}", detached=False, allow_sources="*")
    spec = {"source": DEMO_SOURCE, "name": "demo", "backpressure": True}
    return run_stream(cfg, spec, args.question, args.max_tokens, per_window=True, progress=False,
                      duration_s=None, as_json=False)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="omnizip-stream", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="the HTTP API (Ray Serve) over the engine")
    _model_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--api-key", action="append", metavar="KEY",
                   help="an API key clients must send as 'Authorization: Bearer KEY' (repeatable; also OMNIZIP_API_KEYS)")
    s.add_argument("--insecure", action="store_true",
                   help="serve clients from anywhere without an API key (only with no key configured)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--metrics-port", type=int, default=None, help="Ray's per-node Prometheus export port")
    r = sub.add_parser("run", help="watch one source, then answer a question about it")
    r.add_argument("source", help="rtsp://..., http(s)://..., a file, v4l2:/dev/video0, lavfi:GRAPH")
    r.add_argument("--question", "-q", required=True)
    _model_args(r)
    r.add_argument("--method", default="omnizip",
                   help="compression method: omnizip (default), keep_all, random, fixed_ratio")
    r.add_argument("--rho-audio", type=float, help="fraction of audio tokens discarded (default 0.4)")
    r.add_argument("--rho-video", type=float, help="fraction of video tokens discarded (default 0.7)")
    r.add_argument("--context-tokens", type=int, default=None, help="rolling context budget (default 8192)")
    r.add_argument("--lookahead", type=int, default=0, help="windows of compressor look-ahead")
    r.add_argument("--realtime", action="store_true", help="play a file at media speed, like a live source")
    r.add_argument("--behind-policy", choices=["drop_oldest", "compress_harder"])
    r.add_argument("--duration", type=float, default=None, help="stop following a live source after S seconds")
    r.add_argument("--max-tokens", type=int, default=64)
    r.add_argument("--per-window", action="store_true", help="print each window's compression")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--json", action="store_true", help="also print the final status and answer as JSON")
    d = sub.add_parser("demo", help="the README's demo: a synthetic clip, the tiny model, local Ray")
    d.add_argument("--question", "-q", default=QUESTION)
    d.add_argument("--max-tokens", type=int, default=16)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        return {"serve": cmd_serve, "run": cmd_run, "demo": cmd_demo}[args.cmd](args)
    except (ValueError, KeyError) as e:
        print(f"omnizip-stream {args.cmd}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
