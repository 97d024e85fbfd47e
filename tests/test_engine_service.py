"""The engine end to end on real Ray and a real redis-server: two live (real-time) streams at
once, windows in Redis and in the decoder's context, answers, a killed decoder rebuilt from Redis,
a Redis restart mid-stream, deletion freeing everything, spec validation."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from omnizip.models import CompressedWindow


def lavfi(seconds: int, freq: int = 440, size: str = "160x120") -> str:
    return (f"lavfi:testsrc2=size={size}:rate=10,trim=duration={seconds}[out0];"
            f"sine=f={freq}:sample_rate=16000,atrim=duration={seconds}[out1]")


def wait(svc: Any, sid: str, pred: Callable[[dict], bool], timeout_s: float = 90, what: str = "") -> dict:
    import ray
    deadline = time.monotonic() + timeout_s
    while True:
        st = ray.get(svc.get_stream.remote(sid))
        if pred(st):
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"stream {sid}: {what or 'condition'} not reached in {timeout_s} s: {st}")
        time.sleep(0.3)


def answer(svc: Any, sid: str, max_tokens: int = 6) -> list[str]:
    import ray
    return [ray.get(r) for r in svc.ask.options(num_returns="streaming").remote(sid, "What happens?", max_tokens)]


def healthy(svc: Any, timeout_s: float = 180) -> dict:
    """The engine's health once it is ok (its model actors load their model first)."""
    import ray
    deadline = time.monotonic() + timeout_s
    while True:
        h = ray.get(svc.health.remote(), timeout=timeout_s)
        if h["ok"] or time.monotonic() > deadline:
            return h
        time.sleep(1.0)


def ended(st: dict) -> bool:
    return st["status"] in ("ended", "failed")


@pytest.fixture(scope="module")
def svc(ray_session: dict, redis_server: Any) -> Iterator[Any]:
    from pipeline.engine.service import get_or_create_service, shutdown_service
    handle = get_or_create_service(engine_config(redis_server.url))
    assert healthy(handle)["ok"]
    yield handle
    shutdown_service(handle)


@pytest.fixture()
def rdb(redis_server: Any) -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(redis_server.url, socket_timeout=10)
    yield r
    r.close()


def stored(redis_server: Any, sid: str) -> list[Any]:
    from pipeline.store.open import open_store
    with open_store(redis_server.url) as s:
        return s.windows(sid)


def engine_config(redis_url: str) -> dict[str, Any]:
    return {"name": "eng-redis", "redis_url": redis_url, "context_tokens": 4096, "allow_sources": "file,lavfi"}


def actor(config: dict[str, Any], kind: str, which: Any = 0) -> Any:
    """One of the engine's actors by kind ("encoder", "decoder", "ingest", "store", "service")."""
    import ray

    from pipeline.core.config import ServiceConfig
    from pipeline.engine.runtime import ActorNames
    names = ActorNames.of(ServiceConfig.coerce(config))
    name = getattr(names, kind)(which) if kind in ("encoder", "decoder", "ingest") else getattr(names, kind)()
    return ray.get_actor(name, namespace="omnizip")


def decoder() -> Any:
    """The module engine's decoder 0 (its name carries the config's hash)."""
    import ray
    return ray.get_actor(next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                              if a["name"].startswith("eng-redis-") and a["name"].endswith("-decoder-0")),
                         namespace="omnizip")


def test_two_live_streams_land_in_redis_and_the_context(svc: Any, redis_server: Any) -> None:
    import ray
    a = ray.get(svc.create_stream.remote({"source": lavfi(8, 440), "name": "a", "realtime": True}))
    b = ray.get(svc.create_stream.remote({"source": lavfi(8, 880, "128x96"), "name": "b", "realtime": True,
                                          "omnizip": {"rho_video": 0.5}}))
    assert a["id"] != b["id"] and a["status"] in ("starting", "live")
    # both stream at the same time: each is live with windows in context before either ends
    live = [wait(svc, s["id"], lambda st: st["windows"] >= 1, 60, "a window in context") for s in (a, b)]
    assert all(st["status"] == "live" and st["context_tokens"] > 0 for st in live)
    assert answer(svc, a["id"])  # a question while it streams gets tokens
    done = {s["id"]: wait(svc, s["id"], ended, 90, "the end") for s in (a, b)}
    names = {st["name"] for st in ray.get(svc.list_streams.remote())}
    assert {"a", "b"} <= names
    for sid, st in done.items():
        assert st["status"] == "ended" and st["error"] is None, st
        assert st["windows_total"] == 4 and st["media_s"] == pytest.approx(8.0)
        ws = stored(redis_server, sid)
        assert [w.index for w in ws] == list(range(st["windows_total"] - st["dropped"])) or st["dropped"]
        assert st["windows"] == len(ws) and st["dropped"] == 0
        cws = [CompressedWindow.from_bytes(w.payload) for w in ws]
        prefix = st["context_tokens"] - sum(c.n_tokens for c in cws)
        assert 0 < prefix < 200  # the system prompt, and exactly the stored windows' tokens after it
        for m in ("audio", "video"):
            assert st["tokens"][m]["in"] == sum(getattr(c, f"{m}_in") for c in cws) > 0
            assert 0 < st["tokens"][m]["kept"] == sum(getattr(c, f"{m}_kept") for c in cws) < st["tokens"][m]["in"]
        assert st["lag_s"] < 30
        assert len(answer(svc, sid, 4)) >= 1
    # the stream asked to discard less video keeps more of it
    ka, kb = (done[s["id"]]["tokens"]["video"] for s in (a, b))
    assert kb["kept"] / kb["in"] > ka["kept"] / ka["in"]


def test_killed_decoder_rebuilds_the_same_context(svc: Any, redis_server: Any) -> None:
    import ray
    # mid-stream: kill the decoder while the stream is live; the new one rebuilds from Redis
    sid = ray.get(svc.create_stream.remote({"source": lavfi(10), "realtime": True}))["id"]
    wait(svc, sid, lambda st: st["windows"] >= 2, 60, "two windows")
    ray.kill(decoder(), no_restart=False)
    st = wait(svc, sid, ended, 120, "the end")
    assert st["status"] == "ended" and st["windows_total"] == 5
    ws = stored(redis_server, sid)
    assert st["windows"] == len(ws) == 5 - st["dropped"]
    cws = [CompressedWindow.from_bytes(w.payload) for w in ws]
    # after the stream ended: kill again, same token count, same windows, same answer
    before, ref = st, answer(svc, sid)
    assert ref
    ray.kill(decoder(), no_restart=False)
    after = wait(svc, sid, lambda s: s["context_tokens"] > 0, 120, "a rebuilt context")
    assert after["context_tokens"] == before["context_tokens"]
    assert after["windows"] == before["windows"] == len(cws)
    assert after["context_tokens"] - sum(c.n_tokens for c in cws) == before["context_tokens"] - sum(
        c.n_tokens for c in cws)
    assert answer(svc, sid) == ref
    assert ray.get(decoder().health.remote())["rebuilds"] >= 1


def test_redis_restart_mid_stream_is_survived(svc: Any, redis_server: Any) -> None:
    import ray
    sid = ray.get(svc.create_stream.remote({"source": lavfi(12), "realtime": True}))["id"]
    wait(svc, sid, lambda st: st["windows"] >= 2, 60, "two windows")
    redis_server.restart(hard=True, down_s=1.5)
    st = wait(svc, sid, ended, 120, "the end")
    assert st["status"] == "ended" and st["windows_total"] == 6, st
    ws = stored(redis_server, sid)
    assert [w.index for w in ws] == list(range(6))  # nothing accepted was lost
    assert st["windows"] == 6 and st["dropped"] == 0
    assert answer(svc, sid)


def test_delete_frees_everything(svc: Any, rdb: redis.Redis, redis_server: Any) -> None:
    import ray
    sid = ray.get(svc.create_stream.remote({"source": lavfi(30), "realtime": True}))["id"]
    wait(svc, sid, lambda st: st["windows"] >= 1, 60, "a window")
    assert rdb.keys(f"omnizip:{{{sid}}}:*")
    assert ray.get(svc.delete_stream.remote(sid)) is True
    assert rdb.keys(f"omnizip:{{{sid}}}:*") == [] and not rdb.sismember("omnizip:streams", sid)
    with pytest.raises(KeyError):
        ray.get(svc.get_stream.remote(sid))
    with pytest.raises(KeyError):
        ray.get(svc.delete_stream.remote(sid))
    with pytest.raises(ValueError):
        actor(engine_config(redis_server.url), "ingest", sid)
    time.sleep(1.0)  # windows in flight when it was deleted are discarded, not resurrected
    assert not ray.get(actor(engine_config(redis_server.url), "encoder").stats.remote(sid)).known
    assert not ray.get(decoder().stats.remote(sid)).known
    assert rdb.keys(f"omnizip:{{{sid}}}:*") == []
    assert sid not in {s["id"] for s in ray.get(svc.list_streams.remote())}


@pytest.mark.parametrize("spec, field", [
    ({}, "source"), ({"source": ""}, "source"), ({"source": "foo://x"}, "foo"),
    ({"source": "lavfi:testsrc2", "omnizip": {"rho_audio": 2}}, "rho_audio"),
    ({"source": "lavfi:testsrc2", "context_tokens": 3}, "context_tokens"),
    ({"source": "lavfi:testsrc2", "lookahead": -1}, "lookahead"),
    ({"source": "lavfi:testsrc2", "options": {"nope": 1}}, "options"),
    ({"source": "lavfi:testsrc2", "colour": "red"}, "colour"),
])
def test_bad_specs_name_the_field(svc: Any, spec: dict, field: str) -> None:
    import ray
    with pytest.raises(ValueError, match=field):
        ray.get(svc.create_stream.remote(spec))


def test_unknown_stream_and_bad_questions(svc: Any) -> None:
    import ray
    with pytest.raises(KeyError):
        ray.get(svc.get_stream.remote("nosuchstream"))
    with pytest.raises(KeyError):
        answer(svc, "nosuchstream")
    sid = ray.get(svc.create_stream.remote({"source": lavfi(2)}))["id"]
    with pytest.raises(ValueError, match="question"):
        [ray.get(r) for r in svc.ask.options(num_returns="streaming").remote(sid, " ", 4)]
    with pytest.raises(ValueError, match="max_tokens"):
        [ray.get(r) for r in svc.ask.options(num_returns="streaming").remote(sid, "why?", 0)]
    ray.get(svc.delete_stream.remote(sid))


def test_failing_source_fails_only_its_stream(svc: Any, tmp_path: Any) -> None:
    import ray
    bad = tmp_path / "not_media.mp4"
    bad.write_bytes(b"this is not a video" * 100)
    good = ray.get(svc.create_stream.remote({"source": lavfi(4), "realtime": True}))["id"]
    sid = ray.get(svc.create_stream.remote({"source": str(bad)}))["id"]
    st = wait(svc, sid, ended, 60, "failure")
    assert st["status"] == "failed" and st["error"]
    assert answer(svc, sid)  # no window: answered from the system prompt alone
    assert wait(svc, good, ended, 60, "the end")["status"] == "ended"
    health = ray.get(svc.health.remote())
    assert health["ok"] and health["streams"] >= 2


def stream_series(port: int, sid: str) -> dict[str, float]:
    """The omnizip_* series of stream ``sid`` in a real scrape of Ray's metrics agent."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {s.name.removeprefix("ray_"): s.value for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name.removeprefix("ray_").startswith("omnizip_") and s.labels.get("stream") == sid}


def test_a_deleted_streams_metrics_leave_the_export(svc: Any, ray_session: dict) -> None:
    """Not left at their last value (the decoder and encoder re-recorded them forever), nor 0
    for good: gone from the scrape once Ray's exporter lets a series go."""
    import ray
    port = ray_session["metrics_port"]
    sid = ray.get(svc.create_stream.remote({"source": lavfi(30), "realtime": True}))["id"]
    wait(svc, sid, lambda st: st["windows"] >= 2, 90, "two windows")
    deadline = time.monotonic() + 60
    while stream_series(port, sid).get("omnizip_context_tokens", 0) <= 0 and time.monotonic() < deadline:
        time.sleep(1.0)
    assert stream_series(port, sid).get("omnizip_context_tokens", 0) > 0, stream_series(port, sid)
    from pipeline.metrics import SPECS
    gauges = {s.name for s in SPECS if s.kind == "gauge"}
    ray.get(svc.delete_stream.remote(sid))
    deadline = time.monotonic() + 90
    while (left := {k: v for k, v in stream_series(port, sid).items() if k in gauges}) and time.monotonic() < deadline:
        time.sleep(1.0)
    assert left == {}, left  # (Ray cannot drop a counter's series: those stay until the process ends)


def test_ended_streams_per_key_are_bounded_oldest_first(ray_session: dict, redis_server: Any, tmp_path: Any) -> None:
    """A key's ended streams are kept up to max_ended_per_key, the oldest forgotten first with
    their store keys (the review saw 29 records of one key after 20 short streams)."""
    import ray

    from pipeline.engine.service import get_or_create_service, shutdown_service
    config = {**engine_config(redis_server.url), "name": "eng-ended", "max_ended_per_key": 2}
    handle = get_or_create_service(config)
    r = redis.Redis.from_url(redis_server.url, socket_timeout=10)
    try:
        assert healthy(handle)["ok"]
        ids = []
        for k in range(4):
            ids.append(ray.get(handle.create_stream.remote({"source": lavfi(2, 300 + k)}, owner="tenant-a"))["id"])
            wait(handle, ids[-1], ended, 120, "the end of a short stream")
        ray.get(handle.forget_ended.remote())
        kept = [s["id"] for s in ray.get(handle.list_streams.remote(owner="tenant-a"))]
        assert kept == ids[2:], (kept, ids)
        for sid in ids[:2]:
            assert r.keys(f"omnizip:{{{sid}}}:*") == []
        other = ray.get(handle.create_stream.remote({"source": lavfi(2, 400)}, owner="tenant-b"))["id"]
        wait(handle, other, ended, 120, "another key's stream")
        ray.get(handle.forget_ended.remote())
        assert {s["id"] for s in ray.get(handle.list_streams.remote())} >= {other, *ids[2:]}  # per key
    finally:
        r.close()
        shutdown_service(handle)
