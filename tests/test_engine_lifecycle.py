"""An engine's life under Ray Serve, for real: a redeploy with a changed config replaces the
engine (the old one drained and stopped, its streams taken on by the new one from the store, no
window of a file lost), and deleting the app leaves no actor of it behind."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from test_engine_elastic import clip, stored, until
from test_engine_service import ended, wait

pytestmark = pytest.mark.timeout(600)

APP = "lifecycle"
SECONDS = 20  # 10 windows in real time: the redeploy happens while the stream runs


def config(root: Path, **changes: Any) -> dict[str, Any]:
    return {"name": "eng-life", "allow_sources": "file", "file_roots": str(root), "torch_threads": 1,
            "ingest_cpus": 0.02, "cpus_per_actor": 0.05, **changes}


def ours() -> set[str]:
    """Every named actor of the test's engines (any config hash), the in-process store included."""
    import ray
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a.get("namespace") == "omnizip" and a["name"].startswith("eng-life-")}


def deploy(cfg: dict[str, Any]) -> None:
    from ray import serve

    from pipeline.api.app import build_app
    serve.run(build_app(cfg, gate={"api_keys": ["lifecycle-key-0123456789abc"]}), name=APP,
              route_prefix=f"/{APP}")


@pytest.fixture()
def root(serve_api: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from ray import serve
    d = tmp_path_factory.mktemp("life")
    yield d
    serve.delete(APP)


def service_of(cfg: dict[str, Any]) -> Any:
    from pipeline.engine.service import find_service
    return until(lambda: find_service(cfg), 120, "the engine's service actor")


def test_redeploy_with_another_config_replaces_the_engine(root: Path) -> None:
    import ray

    from pipeline.core.config import ServiceConfig
    from pipeline.engine.runtime import ActorNames
    old_cfg, new_cfg = config(root), config(root, max_batch=4)
    old_names, new_names = (ActorNames.of(ServiceConfig.coerce(c)) for c in (old_cfg, new_cfg))
    assert old_names.prefix != new_names.prefix and old_names.store() == new_names.store()
    deploy(old_cfg)
    old = service_of(old_cfg)
    sid = ray.get(old.create_stream.remote({"source": str(clip(root, SECONDS)), "realtime": True}))["id"]
    wait(old, sid, lambda st: st["windows"] >= 2, 120, "two windows")
    deploy(new_cfg)  # the same app, another config
    new = service_of(new_cfg)
    # the old engine is drained and every one of its actors stopped; the new one runs the stream
    until(lambda: not {n for n in ours() if n.startswith(old_names.prefix)}, 120, "the old engine gone")
    st = wait(new, sid, ended, 180, "the end on the new engine")
    assert st["status"] == "ended" and st["dropped"] == 0, st
    assert st["windows_total"] == SECONDS // 2, st
    assert stored(new_cfg, sid) == list(range(SECONDS // 2))  # every window of the file, each once
    assert {n for n in ours() if n.startswith(new_names.prefix)} >= {new_names.service(), new_names.encoder(0),
                                                                     new_names.decoder(0)}


def test_deleting_the_app_leaves_no_actor_behind(root: Path) -> None:
    import ray
    from ray import serve
    cfg = config(root, queue_windows=6)
    deploy(cfg)
    svc = service_of(cfg)
    sid = ray.get(svc.create_stream.remote({"source": str(clip(root, SECONDS)), "realtime": True}))["id"]
    wait(svc, sid, lambda st: st["windows"] >= 1, 120, "a window")
    assert ours()
    t0 = time.monotonic()
    serve.delete(APP)
    until(lambda: not ours(), 60, "every actor of the engine stopped")
    print(f"engine gone {time.monotonic() - t0:.1f} s after the app was deleted")


def test_an_engine_takes_on_only_streams_of_its_own_name(ray_session: dict, redis_server: Any) -> None:
    """Engines of different names may share one Redis: a starting engine takes on the running
    streams of older engines of its own name only, never another name's."""
    import ray

    from pipeline.core.config import ServiceConfig
    from pipeline.engine.runtime import ActorNames
    from pipeline.engine.service import get_or_create_service, shutdown_engine
    from test_engine_service import lavfi
    a_cfg = {"name": "eng-share-a", "redis_url": redis_server.url, "allow_sources": "lavfi", "torch_threads": 1}
    b_cfg = {**a_cfg, "name": "eng-share-b"}
    a = get_or_create_service(a_cfg)
    try:
        sid = ray.get(a.create_stream.remote({"source": lavfi(600), "realtime": True}))["id"]  # deleted below
        wait(a, sid, lambda st: st["windows"] >= 1, 120, "a window")
        b = get_or_create_service(b_cfg)
        assert sid in {s["id"] for s in ray.get(b.list_streams.remote())}  # it sees the shared store...
        live = {x["name"] for x in ray.util.list_named_actors(all_namespaces=True)}
        assert ActorNames.of(ServiceConfig.coerce(a_cfg)).ingest(sid) in live
        assert ActorNames.of(ServiceConfig.coerce(b_cfg)).ingest(sid) not in live  # ...and leaves it alone
        assert ray.get(a.get_stream.remote(sid))["status"] not in ("ended", "failed")  # still A's, running
        ray.get(a.delete_stream.remote(sid))
    finally:
        shutdown_engine(b_cfg)
        shutdown_engine(a_cfg)
