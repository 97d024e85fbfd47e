"""Faults injected into a running engine, one at a time, with two streams flowing: a paced
"live" stream that may drop (no backpressure) and a file with backpressure. For each fault:
windows lost (accepted windows that never reached the decoder's context), recovery time (from
the end of the fault until both streams make durable progress again: a new window in the
store) and whether questions are answered afterwards.

    python bench/chaos.py [--faults ingest_kill,redis_kill_10s,...] [--seconds 20]

Everything runs on this machine: a local Ray, a redis-server (AOF everysec) and, for the source
outage, a GStreamer RTSP server, all on 127.0.0.1. The last line is one JSON object mapping each
fault to {"windows_lost": n, "recovery_s": s}. tests/chaos/ runs the same scenarios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test servers

from redis_helpers import RedisServer  # noqa: E402

FAULTS = ("ingest_kill", "encoder_kill", "decoder_kill", "engine_kill", "worker_stop_5s",
          "redis_kill_10s", "redis_empty", "source_outage_10s")


def lavfi(seconds: int, freq: int = 440) -> str:
    return (f"lavfi:testsrc2=size=160x120:rate=10,trim=duration={seconds}[out0];"
            f"sine=f={freq}:sample_rate=16000,atrim=duration={seconds}[out1]")


@dataclass
class Outcome:
    fault: str
    windows_lost: int
    recovery_s: float
    answered: bool
    detail: dict[str, Any] = field(default_factory=dict)


class ChaosRig:
    """One engine (named ``name``) over its own redis-server; faults by real signals to the
    actors' processes (SIGKILL / SIGSTOP), to redis-server, and to the RTSP server."""

    def __init__(self, workdir: Path, name: str = "chaos") -> None:
        import ray

        from pipeline.core.config import ServiceConfig
        from pipeline.engine.runtime import ActorNames
        from pipeline.engine.service import get_or_create_service

        self.dir, self.name = Path(workdir), name
        self.probe: dict[str, Any] = {}  # what a fault measured on the way (the API during an outage)
        self.redis = RedisServer(self.dir / "redis", extra_args=["--appendfsync", "everysec"])
        self.redis.start()
        self.config = {"name": name, "redis_url": self.redis.url, "context_tokens": 8192,
                       "allow_sources": "lavfi,loopback", "torch_threads": 1}
        self.names = ActorNames.of(ServiceConfig.coerce(self.config))  # the engine's actors' names
        self.svc = get_or_create_service(self.config)
        deadline = time.monotonic() + 240
        while not ray.get(self.svc.health.remote(), timeout=240)["ok"]:
            assert time.monotonic() < deadline, "chaos engine not healthy"
            time.sleep(1)

    def close(self) -> None:
        from pipeline.engine.service import shutdown_engine
        try:
            shutdown_engine(self.config)
        finally:
            self.redis.stop()

    # -- processes --
    def pid(self, actor: str) -> int:
        import ray
        handle = ray.get_actor(actor, namespace="omnizip")
        return int(ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=60))

    def signal(self, actor: str, sig: int) -> None:
        os.kill(self.pid(actor), sig)

    # -- the engine, through its service actor --
    def call(self, method: str, *args: Any, timeout: float = 30, **kw: Any) -> Any:
        """An engine call, retried while the engine actor is restarting."""
        import ray
        deadline = time.monotonic() + 90
        while True:
            try:
                return ray.get(getattr(self.svc, method).remote(*args, **kw), timeout=timeout)
            except (KeyError, ValueError):
                raise
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def stored(self, sid: str) -> list[int]:
        from pipeline.store.open import open_store
        with open_store(self.redis.url, retries=1, socket_timeout_s=1.0) as s:
            return [w.index for w in s.windows(sid)]

    def answered(self, sid: str) -> bool:
        import ray
        try:
            refs = self.svc.ask.options(num_returns="streaming").remote(sid, "What happens?", 4)
            [ray.get(r, timeout=60) for r in refs]
            return True
        except Exception:
            return False

    # -- one run --
    def run(self, fault: str, inject: Callable[["ChaosRig", dict[str, str]], None], seconds: int = 20,
            live_source: str | None = None) -> Outcome:
        """Two streams; ``inject`` the fault once both have durable windows; measure."""
        expected = seconds // 2
        specs = {"live": {"source": live_source or lavfi(seconds, 440), "realtime": True, "backpressure": False},
                 "file": {"source": lavfi(seconds, 880), "realtime": True, "backpressure": True}}
        ids = {k: self.call("create_stream", v)["id"] for k, v in specs.items()}
        self._until(lambda: all(len(self.stored(s)) >= 2 for s in ids.values()), 90, "first windows")
        inject(self, ids)
        t_end = time.monotonic()  # the fault is over (a kill is instant; outages end inside inject)
        before = {k: len(self.stored_safe(s)) for k, s in ids.items()}
        self._until(lambda: all(len(self.stored_safe(s)) > before[k] or self._ended(s)
                                for k, s in ids.items()), 60, "durable progress")
        recovery = time.monotonic() - t_end
        finite = ids if live_source is None else {"file": ids["file"]}
        final = {k: self._until(lambda s=s: self._ended(s), 180, f"{k} to end") for k, s in finite.items()}
        lost = {k: expected - int(f["windows"]) for k, f in final.items()}
        if live_source is not None:  # a live camera never ends: the windows missing from its timeline
            n = len(self.stored(ids["live"]))
            self._until(lambda: len(self.stored(ids["live"])) >= n + 3, 60, "the camera's windows after recovery")
            idx = self.stored(ids["live"])
            lost["live"] = idx[-1] - idx[0] + 1 - len(idx)
            final["live"] = self.call("get_stream", ids["live"])
        answered = all(self.answered(s) for s in ids.values())
        for s in ids.values():
            self.call("delete_stream", s)
        detail = {"lost": lost, "drops": {k: f["drops"] for k, f in final.items()},
                  "windows": {k: f["windows"] for k, f in final.items()}, **({"api": self.probe} if self.probe else {})}
        self.probe = {}
        return Outcome(fault, max(0, sum(lost.values())), round(recovery, 2), answered, detail)

    def stored_safe(self, sid: str) -> list[int]:
        try:
            return self.stored(sid)
        except Exception:
            return []

    def _ended(self, sid: str) -> dict | None:
        st = self.call("get_stream", sid)
        return st if st["status"] in ("ended", "failed") else None

    @staticmethod
    def _until(pred: Callable[[], Any], timeout_s: float, what: str) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            got = pred()
            if got:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"chaos: {what} not reached in {timeout_s} s")
            time.sleep(0.2)


# ---- the faults ---------------------------------------------------------------------------------
def kill_ingest(rig: ChaosRig, ids: dict[str, str]) -> None:
    for sid in ids.values():
        rig.signal(rig.names.ingest(sid), signal.SIGKILL)


def kill_encoder(rig: ChaosRig, ids: dict[str, str]) -> None:
    rig.signal(rig.names.encoder(0), signal.SIGKILL)


def kill_decoder(rig: ChaosRig, ids: dict[str, str]) -> None:
    rig.signal(rig.names.decoder(0), signal.SIGKILL)


def kill_engine(rig: ChaosRig, ids: dict[str, str]) -> None:
    rig.signal(rig.names.service(), signal.SIGKILL)


def stop_worker_5s(rig: ChaosRig, ids: dict[str, str]) -> None:
    pid = rig.pid(rig.names.encoder(0))
    os.kill(pid, signal.SIGSTOP)
    time.sleep(5)
    os.kill(pid, signal.SIGCONT)


def kill_redis_10s(rig: ChaosRig, ids: dict[str, str]) -> None:
    """Redis SIGKILLed for 10 s; meanwhile the API is probed: it must refuse fast (503), not hang."""
    import ray
    rig.redis.stop(hard=True)
    t = time.monotonic()
    try:
        ray.get(rig.svc.list_streams.remote(), timeout=30)
        rig.probe = {"refused": None, "answer_s": round(time.monotonic() - t, 2)}
    except Exception as exc:
        cause = getattr(exc, "cause", exc)
        rig.probe = {"refused": type(cause).__name__, "answer_s": round(time.monotonic() - t, 2)}
    time.sleep(max(0.0, 10 - (time.monotonic() - t)))
    rig.redis.start()


def redis_empty(rig: ChaosRig, ids: dict[str, str]) -> None:
    rig.redis.stop(hard=True)
    for p in rig.redis.dir.iterdir():  # its data is gone: an empty Redis on the same port
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    rig.redis.start()


INJECT: dict[str, Callable[[ChaosRig, dict[str, str]], None]] = {
    "ingest_kill": kill_ingest, "encoder_kill": kill_encoder, "decoder_kill": kill_decoder,
    "engine_kill": kill_engine, "worker_stop_5s": stop_worker_5s, "redis_kill_10s": kill_redis_10s,
    "redis_empty": redis_empty,
}


def source_outage(rig: ChaosRig, seconds: int = 30) -> Outcome:
    """A live RTSP camera down for 10 s: only the outage's span may be missing."""
    from ingest_servers import RtspServer, free_port

    cam = RtspServer(free_port()).start()
    holder = {"cam": cam}

    def outage(r: ChaosRig, ids: dict[str, str]) -> None:
        holder["cam"].kill()
        time.sleep(10)
        holder["cam"] = RtspServer(cam.port).start()

    try:
        out = rig.run("source_outage_10s", outage, seconds=seconds, live_source=cam.url)
    finally:
        holder["cam"].kill()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--faults", default=",".join(FAULTS))
    p.add_argument("--seconds", type=int, default=20)
    args = p.parse_args()
    from pipeline.cli.main import start_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    start_ray()
    work = Path(tempfile.mkdtemp(prefix="chaos"))
    rig = ChaosRig(work, name=f"chaos-{os.getpid()}")
    results: dict[str, dict[str, Any]] = {}
    try:
        print(f"{'fault':<20} {'lost':>5} {'recovery_s':>11} answered", flush=True)
        for f in args.faults.split(","):
            out = source_outage(rig) if f == "source_outage_10s" else rig.run(f, INJECT[f], args.seconds)
            print(f"{f:<20} {out.windows_lost:>5} {out.recovery_s:>11.2f} {out.answered}  {out.detail}", flush=True)
            results[f] = {"windows_lost": out.windows_lost, "recovery_s": out.recovery_s}
    finally:
        rig.close()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
