"""Issue 19, item 1: a decoder's memory is bounded. A context rebuilt from Redis stays near its
steady size (streamed, not all at once); streams are admitted by the memory their contexts take
(429 naming it when no decoder has room); a stream whose rebuild keeps killing its decoder is
failed with the reason instead of crash-looping. Real redis-server, real Ray, real decoder actors."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

MIB = 1 << 20
CONFIG = {"name": "eng-mem", "context_tokens": 4096, "allow_sources": "lavfi",
          "decoder_memory_bytes": 6 * MIB, "rebuild_attempts": 2}  # tiny: 512 B of KV per token


def test_rebuild_peak_stays_near_steady(redis_server: Any) -> None:
    """60 stored 720p-sized windows, a 16k-token context rebuilt in a fresh process: peak resident
    memory under 1.3x the steady one (all at once it was 4.5x in the issue, 14x here at 32k)."""
    import rebuild as bench

    from omnizip.models import load_model
    from pipeline.store.redis_store import RedisStore

    store = RedisStore(redis_server.url)
    sid = "rebuild-peak"
    store.delete_stream(sid)
    store.create_stream({"source": "bench"}, sid)
    bench.fill_store(store, sid, load_model("tiny", "cpu"), 60, 0.35)
    res = bench.run_child("streamed", "tiny", redis_server.url, sid, 16384)
    assert res["context_tokens"] > 12000 and res["windows"] < 60, res  # only the newest that fit
    assert res["peak_over_steady"] < 1.3, res
    store.delete_stream(sid)


@pytest.fixture(scope="module")
def engine(ray_session: dict, redis_server: Any) -> Iterator[tuple[Any, dict]]:
    from test_engine_service import healthy

    from pipeline.engine.service import get_or_create_service, shutdown_service

    config = {**CONFIG, "redis_url": redis_server.url}
    handle = get_or_create_service(config)
    assert healthy(handle)["ok"]
    yield handle, config
    shutdown_service(handle)


def _lavfi(seconds: int) -> str:
    return (f"lavfi:testsrc2=size=160x120:rate=10,trim=duration={seconds}[out0];"
            f"sine=f=440:sample_rate=16000,atrim=duration={seconds}[out1]")


def test_admission_by_context_memory(engine: tuple[Any, dict]) -> None:
    """6 MiB for contexts: an 8192-token stream (4 MiB of KV) is admitted, a second one is
    refused with 429 naming the memory, a 2048-token one (1 MiB) still fits."""
    import ray

    from pipeline.api.errors import to_api_error

    svc, _ = engine
    first = ray.get(svc.create_stream.remote({"source": _lavfi(4), "context_tokens": 8192}))
    with pytest.raises(Exception) as err:
        ray.get(svc.create_stream.remote({"source": _lavfi(4), "context_tokens": 8192}))
    api = to_api_error(err.value)
    assert api.status == 429, api.body()
    assert "memory" in api.body()["error"]["message"] and "context_tokens" in api.body()["error"]["message"]
    assert int(api.headers["Retry-After"]) > 0
    small = ray.get(svc.create_stream.remote({"source": _lavfi(4), "context_tokens": 2048}))
    for s in (first, small):
        ray.get(svc.delete_stream.remote(s["id"]))


def test_decoder_dying_in_rebuilds_fails_the_stream(engine: tuple[Any, dict], redis_server: Any) -> None:
    """The decoder is killed (SIGKILL, restarted by Ray) during each rebuild of one stream: after
    `rebuild_attempts` deaths the stream is failed with the reason and the decoder lives on."""
    import ray
    import rebuild as bench
    from test_engine_service import actor

    from omnizip.models import load_model
    from pipeline.core.records import StreamRecord, StreamSpec
    from pipeline.engine.rebuild import ATTEMPTS_KEY
    from pipeline.store.redis_store import RedisStore

    svc, config = engine
    store = RedisStore(redis_server.url)
    rec = StreamRecord.from_spec(StreamSpec.parse({"source": _lavfi(2), "context_tokens": 16384}), 4096)
    rec.status, rec.extra["engine"] = "ended", config["name"]
    sid = store.create_stream(rec.to_dict())["id"]
    bench.fill_store(store, sid, load_model("tiny", "cpu"), 40, 0.35)  # a rebuild of seconds
    dec = actor(config, "decoder")  # one handle: it follows the actor's restarts
    for death in range(config["rebuild_attempts"]):
        ray.kill(dec, no_restart=False)  # a restarted decoder rebuilds the stream when it is touched
        deadline = time.monotonic() + 300
        while len(store.get_stream(sid).get(ATTEMPTS_KEY) or []) <= death:
            dec.stats.remote(sid)  # touch it (fire and forget)
            assert time.monotonic() < deadline, store.get_stream(sid)
            time.sleep(0.05)
        ray.kill(dec, no_restart=False)  # dies while rebuilding
    deadline = time.monotonic() + 300
    while not store.get_stream(sid).get("context_failed"):
        try:
            ray.get(dec.stats.remote(sid), timeout=30)
        except Exception:
            pass
        assert time.monotonic() < deadline, store.get_stream(sid)
        time.sleep(0.5)
    st = ray.get(svc.get_stream.remote(sid))
    assert st["status"] == "failed", st
    assert "rebuild" in st["error"] and "memory" in st["error"], st
    assert ray.get(dec.stats.remote(sid)).known is False  # not rebuilt again
    assert ray.get(dec.health.remote())["ok"]
    ray.get(svc.delete_stream.remote(sid))
