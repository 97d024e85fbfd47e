"""`omnizip-stream`: the service's command line.

    omnizip-stream serve [--host 0.0.0.0 --port 8000 --api-key KEY --model tiny --redis-url redis://...]
                         [--ray-address HOST:PORT]
    omnizip-stream run SOURCE --question "What is happening?" [--model --method --rho-video ...]
    omnizip-stream viz SOURCE -o OUT.png|OUT.mp4 [--model --method --rho-video ...]
    omnizip-stream demo
    every command: [--config FILE] [--log-level debug|info|warning|error] [--json];  omnizip-stream --version

Settings come from flags over OMNIZIP_* variables over --config FILE (pipeline.cli.settings;
docs/configuration.md lists them all). The source, the model and the options are checked before
Ray starts or torch loads (pipeline.cli.checks): a mistake is one line on stderr and exit code 2.
Each command starts a local Ray (no dashboard, a small object store, its own temporary directory,
removed on exit) unless --ray-address (OMNIZIP_RAY_ADDRESS, else Ray's own RAY_ADDRESS) names a
running cluster to attach to: `ray start --head` on one machine, `ray start --address HEAD:PORT` on
the others, then `omnizip-stream serve --ray-address HEAD:PORT`. Attached, `serve` runs one HTTP
proxy, on the head, and leaves the cluster as it found it when it stops (Ctrl-C, SIGTERM): its Serve
application deleted, its engine drained and stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from pipeline.cli.checks import (METHOD_NAMES, check_dtype, check_model, check_output, check_port_free,
                                 check_ray_address, check_source, check_store_url, check_stream_options,
                                 parse_ray_address)
from pipeline.core.messages import MAX_ANSWER_TOKENS
from pipeline.cli.settings import LOG_LEVEL_ENV, LOG_LEVELS, load_settings
from pipeline.cli.checks import SettingsError

QUESTION = "What is happening in the stream?"
DEMO_SECONDS = 12
DEMO_SOURCE = (f"lavfi:testsrc2=size=320x240:rate=25,trim=duration={DEMO_SECONDS}[out0];"
               f"sine=f=440:beep_factor=4:sample_rate=16000,atrim=duration={DEMO_SECONDS}[out1]")


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("omnizip-stream")
    except PackageNotFoundError:
        return "unknown"


# ---- Ray ------------------------------------------------------------------------------------------
def start_ray(metrics_port: int | None = None, log_level: str = "warning", address: str | None = None) -> str | None:
    """Attach to the cluster at ``address`` (None: RAY_ADDRESS, if set), or start a local Ray sized
    for this machine in a temporary directory of its own (returned, for :func:`stop_ray` to remove).
    A local Ray uses Ray's token authentication (RAY_AUTH_MODE=token) unless the environment says
    otherwise: Ray's own ports listen on every interface, and without a token anyone who reaches
    them can run code there; attached, the cluster's own mode holds (RAY_AUTH_MODE as for any of its
    drivers). Actors log at ``log_level`` (pipeline.cli.settings.worker_logging), their logs reach stderr."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return None
    level = getattr(logging, log_level.upper())
    forward = level <= logging.WARNING  # the actors' own lines (warnings by default) reach stderr
    env = {"env_vars": {LOG_LEVEL_ENV: log_level}, "worker_process_setup_hook": "pipeline.cli.settings.worker_logging"}
    if address is not None:
        ray.init(address=address, logging_level=level, log_to_driver=forward, runtime_env=env)
        return None
    kw: dict[str, Any] = {"_metrics_export_port": metrics_port} if metrics_port else {}
    temp = tempfile.mkdtemp(prefix=f"ray-oz{os.getpid()}-", dir="/tmp")  # short: Ray's socket paths are limited
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, object_store_memory=256 * 2**20,
             _temp_dir=temp, logging_level=level, log_to_driver=forward, runtime_env=env, **kw)
    return temp


def stop_ray(temp: str | None) -> None:
    """Shut Ray down and remove the temporary directory a local Ray was started in."""
    import ray

    try:
        ray.shutdown()
    finally:
        if temp:
            shutil.rmtree(temp, ignore_errors=True)


@contextlib.contextmanager
def ray_session(metrics_port: int | None, log_level: str, address: str | None = None) -> Iterator[None]:
    """Ray for one command; SIGTERM (installed after ray.init, which sets its own) ends it like
    Ctrl-C, once: a second SIGTERM while the command cleans up is ignored, so the cleanup finishes."""
    temp = None

    def _stop(*_: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    try:
        temp = start_ray(metrics_port, log_level, address)
        signal.signal(signal.SIGTERM, _stop)
        yield
    finally:
        stop_ray(temp)


def ray_address(args: argparse.Namespace, s: Any) -> str | None:
    """The cluster to attach to (--ray-address / OMNIZIP_RAY_ADDRESS / --config, else Ray's own
    RAY_ADDRESS), checked: the form, and that a Ray head answers there; None: the command starts
    its own Ray."""
    if s.ray_address:
        where = ("--ray-address" if getattr(args, "ray_address", None) else
                 "OMNIZIP_RAY_ADDRESS" if os.environ.get("OMNIZIP_RAY_ADDRESS") else "ray_address (--config)")
        address = s.ray_address
    else:
        where, address = "RAY_ADDRESS", os.environ.get("RAY_ADDRESS", "").strip() or None
    if address is None:
        return None
    if where == "RAY_ADDRESS" and address == "auto":  # Ray's own: the cluster `ray start` left on this machine
        return address
    check_ray_address(address, where)
    return address


def _local(address: str | None) -> bool:
    """The HTTP proxy will listen on this machine: a local Ray, or a head on a loopback address."""
    return address is None or _is_loopback_host(parse_ray_address(address)[1])


def _oz(args: argparse.Namespace) -> dict[str, float] | None:
    oz = {k: v for k, v in (("rho_audio", args.rho_audio), ("rho_video", args.rho_video)) if v is not None}
    return oz or None


# ---- serve ----------------------------------------------------------------------------------------
def _is_loopback_host(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


APP = "omnizip"  # the Serve application's name
#: the HTTP replica beside the head's proxy: it holds no model (it forwards to the engine), so it
#: needs no CPU of the head's (often none) and the API stays up while worker nodes come and go
REPLICA_ON_HEAD = {"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}}


def cmd_serve(args: argparse.Namespace, s: Any) -> int:
    from pipeline.api.gate import parse_keys

    check_model(s.model)
    check_dtype(s.dtype)
    check_store_url(s.redis_url)
    try:
        keys = parse_keys(list(s.api_keys) + list(args.api_key or []))
    except ValueError as e:
        raise SettingsError(f"--api-key / OMNIZIP_API_KEYS: {e}") from None
    if not keys and not s.insecure and not _is_loopback_host(s.host):
        raise SettingsError(f"refusing to listen on {s.host} without an API key: give --api-key KEY (or "
                            "OMNIZIP_API_KEYS), or --insecure to serve anyone who can reach the port")
    address = ray_address(args, s)
    if address is not None and s.metrics_port is not None:
        raise SettingsError("--metrics-port: only for the command's own Ray; an attached cluster's nodes export "
                            "metrics on the port their `ray start --metrics-export-port` gave")
    if _local(address):  # else the head's proxy binds the port, on another machine
        check_port_free(s.host, s.port)
    cfg = s.service_config()
    gate = {**s.gate(), "api_keys": list(keys)}
    with ray_session(s.metrics_port, s.log_level, address):
        from ray import serve

        from pipeline.redact import redact
        from pipeline.api.app import build_app

        logging.getLogger("ray.serve").setLevel(s.level())
        serve_logs = {"log_level": s.log_level.upper()}  # Serve's controller, proxy and replicas too
        try:
            # one proxy, on the head: on a cluster of several nodes per machine, one per node would
            # all bind the same port
            serve.start(proxy_location="HeadOnly", http_options={"host": s.host, "port": s.port},
                        logging_config=serve_logs)
            serve.run(build_app(cfg, gate=gate, ray_actor_options=REPLICA_ON_HEAD), name=APP, route_prefix="/",
                      blocking=False, logging_config=serve_logs)
            who = (f"{len(keys)} API key(s) required" if keys else
                   "NO API KEY: anyone who reaches the port owns the service (--insecure)" if s.insecure else
                   "no API key: loopback clients only")
            store = redact(cfg.redis_url) if cfg.redis_url else "in-process"
            url = f"http://{s.host}:{s.port}"
            where = f"the Ray cluster at {address} (HTTP on its head)" if address else "a local Ray"
            if args.json:
                doc = {"url": url, "console": url + "/", "model": cfg.model, "store": store, "api_keys": len(keys),
                       "insecure": bool(s.insecure), "ray_address": address}
                print(json.dumps(doc), file=args.json_out, flush=True)
            else:
                print(f"omnizip-stream: serving on {url} (web console at {url}/; model {cfg.model}, store {store}; "
                      f"{who}; {where}); Ctrl-C stops", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
        finally:
            leave_cluster(cfg)
    return 0


def leave_cluster(cfg: Any) -> None:
    """What ``serve`` started, gone, in this order: the Serve application (its replicas would
    start the engine again), the engine (pipeline.engine.service.shutdown_engine: its streams drained,
    every actor stopped; a no-op when none runs), then Serve itself unless another application
    is left on the cluster. Each step is tried even when one before it failed (logged)."""
    from ray import serve

    from pipeline.engine.service import shutdown_engine

    log = logging.getLogger("pipeline.cli.main")
    try:
        serve.delete(APP)
    except Exception as e:
        log.warning("could not delete the Serve application %r: %s", APP, e)
    try:
        shutdown_engine(cfg)
    except Exception as e:
        log.warning("could not stop the engine: %s", e)
    try:
        others = serve.status().applications
    except Exception:
        others = {}
    if others:
        log.warning("Serve keeps running on the cluster for its other applications: %s", ", ".join(others))
    else:
        serve.shutdown()


# ---- run / demo / viz ------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace, s: Any) -> int:
    from pipeline.cli.run import run_stream

    spec_kind = check_source(args.source)  # the operator's own source: any kind, but it must exist
    check_model(s.model)
    check_dtype(s.dtype)
    check_store_url(s.redis_url)
    if args.duration is not None and not args.duration > 0:
        raise SettingsError(f"--duration: must be > 0 seconds, got {args.duration}")
    if not 1 <= args.max_tokens <= MAX_ANSWER_TOKENS:
        raise SettingsError(f"--max-tokens: must be in [1, {MAX_ANSWER_TOKENS}], got {args.max_tokens}")
    live = bool(spec_kind.live)
    spec = check_stream_options({
        "source": args.source, "method": args.method, "omnizip": _oz(args), "context_tokens": args.context_tokens,
        "lookahead": args.lookahead, "realtime": args.realtime or None,
        "backpressure": not live and not args.realtime})  # a file waits for the model instead of dropping
    # the operator names the source on the command line: any kind is theirs to open
    cfg = s.service_config(name=f"omnizip-run-{os.getpid()}", detached=False, allow_sources="*")
    address = ray_address(args, s)
    with ray_session(None, s.log_level, address):
        return run_stream(cfg, spec, args.question, args.max_tokens, per_window=args.per_window,
                          progress=not args.no_progress, duration_s=args.duration, as_json=args.json,
                          json_out=args.json_out)


def cmd_demo(args: argparse.Namespace, s: Any) -> int:
    from pipeline.cli.run import run_stream

    address = ray_address(args, s)  # checked before anything is printed
    print(f"OmniZip-Stream demo: a synthetic {DEMO_SECONDS}-s audio-video clip (test pattern + beeps), "
          "the 'tiny' Qwen2.5-Omni preset (random weights: the words mean nothing), the in-process store.",
          flush=True)
    cfg = s.service_config(model="tiny", device="cpu", dtype=None, redis_url=None,
                           name=f"omnizip-demo-{os.getpid()}", detached=False, allow_sources="*")
    spec = {"source": DEMO_SOURCE, "name": "demo", "backpressure": True}
    with ray_session(None, s.log_level, address):
        return run_stream(cfg, spec, args.question, args.max_tokens, per_window=True, progress=False,
                          duration_s=None, as_json=args.json, json_out=args.json_out)


def cmd_viz(args: argparse.Namespace, s: Any) -> int:
    from pipeline.viz.clip import VIZ_SUFFIXES

    check_source(args.source)
    check_model(s.model)
    out = check_output(args.output, VIZ_SUFFIXES)
    spec = check_stream_options({"source": args.source, "method": args.method, "omnizip": _oz(args)})
    if args.max_windows is not None and args.max_windows < 1:
        raise SettingsError(f"--max-windows: must be >= 1, got {args.max_windows}")
    from pipeline.viz.clip import render_clip

    res = render_clip(args.source, out, model=s.model, method=spec["method"], omnizip=spec.get("omnizip"),
                      max_windows=args.max_windows, device=s.device)
    t = res["tokens"]
    kept = (t["audio"]["kept"] + t["video"]["kept"]) / max(1, t["audio"]["in"] + t["video"]["in"])
    print(json.dumps(res) if args.json else f"wrote {res['output']}: {res['windows']} windows, audio kept "
          f"{t['audio']['kept']}/{t['audio']['in']}, video kept {t['video']['kept']}/{t['video']['in']} "
          f"({kept:.1%} of tokens)", file=args.json_out if args.json else sys.stdout, flush=True)
    return 0


# ---- the parser ------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """Usage errors are one line on stderr and exit code 2, like every other refusal."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: {' '.join(message.split())} (see --help)\n")


def _common() -> argparse.ArgumentParser:
    c = argparse.ArgumentParser(add_help=False)
    c.add_argument("--config", metavar="FILE", help="settings file (.toml, .json, .yaml): docs/configuration.md")
    c.add_argument("--log-level", choices=LOG_LEVELS, type=str.lower,
                   help="log level of the command and of the engine's actors (default warning; OMNIZIP_LOG_LEVEL)")
    c.add_argument("--json", action="store_true", help="print only JSON on stdout")
    return c


def _ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray-address", metavar="HOST:PORT",
                   help="attach to this running Ray cluster (the head's GCS address, or ray://HOST:PORT) instead of "
                        "starting a local Ray (OMNIZIP_RAY_ADDRESS; else RAY_ADDRESS)")


def _model_args(p: argparse.ArgumentParser, store: bool = True) -> None:
    p.add_argument("--model", help="preset (tiny|small|3b|7b, random weights) or a local checkpoint dir")
    p.add_argument("--device", help="cpu or cuda (default cpu)")
    if store:
        p.add_argument("--dtype", help="float32 | bf16 | fp16 (default: the device's)")
        p.add_argument("--redis-url", help="redis://host:port/db (default: the in-process store)")


def _method_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="omnizip", help=f"compression method: {', '.join(METHOD_NAMES)}")
    p.add_argument("--rho-audio", type=float, help="fraction of audio tokens discarded (default 0.4)")
    p.add_argument("--rho-video", type=float, help="fraction of video tokens discarded (default 0.7)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="omnizip-stream", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"omnizip-stream {version()}")
    sub = p.add_subparsers(dest="cmd", required=True)
    common = _common()
    s = sub.add_parser("serve", parents=[common], help="the HTTP API and web console (Ray Serve) over the engine")
    _model_args(s)
    s.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="HTTP port (default 8000)")
    s.add_argument("--api-key", action="append", metavar="KEY",
                   help="an API key clients must send as 'Authorization: Bearer KEY' "
                        "(repeatable; adds to OMNIZIP_API_KEYS)")
    s.add_argument("--insecure", action="store_true", default=None,
                   help="serve clients from anywhere without an API key (only with no key configured)")
    s.add_argument("--metrics-port", type=int, help="Ray's per-node Prometheus export port (the command's own Ray)")
    _ray_args(s)
    r = sub.add_parser("run", parents=[common], help="watch one source, then answer a question about it")
    r.add_argument("source", help="rtsp://..., http(s)://..., a file, v4l2:/dev/video0, lavfi:GRAPH")
    r.add_argument("--question", "-q", required=True)
    _model_args(r)
    _method_args(r)
    r.add_argument("--context-tokens", type=int, default=None, help="rolling context budget (default 8192)")
    r.add_argument("--lookahead", type=int, default=0, help="windows of compressor look-ahead")
    r.add_argument("--realtime", action="store_true", help="play a file at media speed, like a live source")
    r.add_argument("--behind-policy", choices=["drop_oldest", "compress_harder"])
    r.add_argument("--duration", type=float, default=None, help="stop following a live source after S seconds")
    r.add_argument("--max-tokens", type=int, default=64)
    r.add_argument("--per-window", action="store_true", help="print each window's compression")
    r.add_argument("--no-progress", action="store_true")
    _ray_args(r)
    v = sub.add_parser("viz", parents=[common], help="draw the kept patches and audio tokens over a clip (no Ray)")
    v.add_argument("source", help="a file, lavfi:GRAPH, rtsp://... (a live source: use --max-windows)")
    v.add_argument("-o", "--output", required=True, metavar="OUT", help="OUT.png (one row per window) or OUT.mp4")
    _model_args(v, store=False)
    _method_args(v)
    v.add_argument("--max-windows", type=int, default=None, help="windows to draw (default: 8 for .png, all for .mp4)")
    d = sub.add_parser("demo", parents=[common], help="the README's demo: a synthetic clip, the tiny model, local Ray")
    d.add_argument("--question", "-q", default=QUESTION)
    d.add_argument("--max-tokens", type=int, default=16)
    _ray_args(d)
    return p


_FLAGS = ("model", "device", "dtype", "redis_url", "behind_policy", "host", "port", "insecure", "metrics_port",
          "log_level", "ray_address")
COMMANDS = {"serve": cmd_serve, "run": cmd_run, "demo": cmd_demo, "viz": cmd_viz}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prog = f"omnizip-stream {args.cmd}"
    # --json: the real stdout is kept for the JSON alone; anything else printed to stdout (human
    # text, Ray's forwarded actor lines, libraries) goes to stderr instead
    args.json_out, saved = sys.stdout, sys.stdout
    if args.json:
        sys.stdout = sys.stderr
    try:
        s = load_settings({k: getattr(args, k, None) for k in _FLAGS}, args.config)
        logging.basicConfig(level=s.level(), stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return COMMANDS[args.cmd](args, s)
    except SettingsError as e:
        print(f"{prog}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # after the checks: a failure of the run itself, one line (details at debug)
        logging.getLogger("pipeline.cli.main").debug("failed", exc_info=True)
        print(f"{prog}: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    finally:
        sys.stdout = saved


if __name__ == "__main__":
    sys.exit(main())
