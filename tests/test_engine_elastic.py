"""The elastic engine on real Ray: the encoder and decoder pools grow with streams, streams move
to a member that joined and off one that left, continuing from the store with no window of a
file lost, and the pools shrink back when the load is gone."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from test_engine_service import ended, healthy, wait

pytestmark = pytest.mark.timeout(600)

SECONDS = 40  # 20 windows, played in real time: the streams run while the pools change, even on a loaded machine


def config(root: Path) -> dict[str, Any]:
    return {"name": "eng-elastic", "allow_sources": "file", "file_roots": str(root), "torch_threads": 1,
            "encoder_workers": 1, "max_encoder_workers": 2, "decoder_actors": 1, "max_decoder_actors": 2,
            "streams_per_worker": 1, "scale_interval_s": 1.0, "scale_down_after_s": 4.0, "ingest_cpus": 0.02,
            "cpus_per_actor": 0.05}  # logical shares: the session's other engines hold CPUs too


def clip(directory: Path, seconds: int = SECONDS) -> Path:
    path = directory / f"clip{seconds}.mp4"
    if not path.exists():
        subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                        f"testsrc2=size=160x120:rate=10:duration={seconds}", "-f", "lavfi", "-i",
                        f"sine=f=440:sample_rate=16000:duration={seconds}", "-c:v", "libx264", "-preset",
                        "ultrafast", "-c:a", "aac", "-shortest", str(path)], check=True, timeout=120)
    return path


@pytest.fixture(scope="module")
def engine(ray_session: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from pipeline.engine.service import get_or_create_service, shutdown_engine
    root = tmp_path_factory.mktemp("elastic")
    cfg = config(root)
    svc = get_or_create_service(cfg)
    assert healthy(svc)["ok"]
    yield {"svc": svc, "config": cfg, "clip": clip(root)}
    shutdown_engine(cfg)


def pools(svc: Any) -> dict[str, dict[str, int]]:
    import ray
    return ray.get(svc.health.remote(), timeout=60)["pools"]


def records(cfg: dict[str, Any]) -> dict[str, Any]:
    """The streams' records in the engine's in-process store (where each stream is placed)."""
    import ray

    from pipeline.core.config import ServiceConfig
    from pipeline.core.records import StreamRecord
    from pipeline.engine.runtime import ActorNames, RemoteStore
    store = RemoteStore(ray.get_actor(ActorNames.of(ServiceConfig.coerce(cfg)).store(), namespace="omnizip"))
    return {r["id"]: StreamRecord.from_dict(r) for r in store.list_streams()}


def stored(cfg: dict[str, Any], sid: str) -> list[int]:
    import ray

    from pipeline.core.config import ServiceConfig
    from pipeline.engine.runtime import ActorNames, RemoteStore
    store = RemoteStore(ray.get_actor(ActorNames.of(ServiceConfig.coerce(cfg)).store(), namespace="omnizip"))
    return [w.index for w in store.windows(sid)]


def until(pred: Any, timeout_s: float, what: str) -> Any:
    import ray
    deadline = time.monotonic() + timeout_s
    while True:
        got = pred()
        if got:
            return got
        assert time.monotonic() < deadline, \
            f"{what} not within {timeout_s} s (Ray has {ray.available_resources()} of {ray.cluster_resources()})"
        time.sleep(0.5)


def test_pools_grow_with_streams_spread_them_and_shrink_after(engine: dict[str, Any]) -> None:
    import ray
    svc, cfg = engine["svc"], engine["config"]
    assert pools(svc)["encoder"] == {"members": 1, "ready": 1, "low": 1, "high": 2}
    ids = [ray.get(svc.create_stream.remote({"source": str(engine["clip"]), "realtime": True}))["id"]
           for _ in range(2)]
    # two streams at one stream per member: each pool grows to two, and the streams are spread
    until(lambda: all(p["ready"] == 2 for p in pools(svc).values()), 150, "both pools at two members")
    spread = until(lambda: (lambda rs: rs if {r.worker for r in rs} == {0, 1} and {r.decoder for r in rs} == {0, 1}
                            else None)([records(cfg)[i] for i in ids]), 60, "one stream on each member")
    assert len(spread) == 2
    assert ray.get(svc.health.remote())["moves"] >= 2  # one encoder move and one decoder move at least
    finals = [wait(svc, sid, ended, 180, "the end") for sid in ids]
    for sid, st in zip(ids, finals):  # moved mid-stream: every window of the file, each once
        assert st["status"] == "ended" and st["dropped"] == 0, st
        assert st["windows_total"] == st["windows"] == SECONDS // 2, st
        assert stored(cfg, sid) == list(range(SECONDS // 2))
    # the load is gone: after scale_down_after_s of calm each pool is back at its minimum and the
    # members that left are stopped
    until(lambda: all(p["members"] == 1 for p in pools(svc).values()), 60, "pools back at one member")
    from pipeline.core.config import ServiceConfig
    from pipeline.engine.runtime import ActorNames
    names = ActorNames.of(ServiceConfig.coerce(cfg))
    live = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    assert names.encoder(0) in live and names.decoder(0) in live
    assert names.encoder(1) not in live and names.decoder(1) not in live
    for sid in ids:
        ray.get(svc.delete_stream.remote(sid))


def test_streams_leave_a_member_that_does_not_come_back(engine: dict[str, Any]) -> None:
    """A member killed for good (its node lost and no room elsewhere): after its grace period
    its streams move to the members that are up and finish there, no window lost."""
    import ray

    from pipeline.core.config import ServiceConfig
    from pipeline.engine.runtime import ActorNames
    svc, cfg = engine["svc"], engine["config"]
    names = ActorNames.of(ServiceConfig.coerce(cfg))
    ids = [ray.get(svc.create_stream.remote({"source": str(engine["clip"]), "realtime": True}))["id"]
           for _ in range(2)]
    until(lambda: {records(cfg)[i].worker for i in ids} == {0, 1}, 150, "one stream on each encoder")
    victim = next(i for i in ids if records(cfg)[i].worker == 1)
    t0 = time.monotonic()
    ray.kill(ray.get_actor(names.encoder(1), namespace="omnizip"), no_restart=True)
    until(lambda: records(cfg)[victim].worker == 0, 60, "the stream moved off the lost member")
    moved_s = time.monotonic() - t0
    finals = [wait(svc, sid, ended, 180, "the end") for sid in ids]
    for sid, st in zip(ids, finals):
        assert st["status"] == "ended" and st["dropped"] == 0, st
        assert stored(cfg, sid) == list(range(SECONDS // 2)), sid
    print(f"stream moved {moved_s:.1f} s after its encoder was lost")
    for sid in ids:
        ray.get(svc.delete_stream.remote(sid))
