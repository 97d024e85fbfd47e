"""A store outage longer than the encoder's store buffer: the oldest waiting writes are dropped
and counted `unstored` (the window still reached the context; only its durable copy is lost),
the stream keeps running, and later windows reach the context and the store once Redis is back.
Before, `unstored` was not a known drop reason: the metrics call raised inside the writer, the
window being emitted was counted `error` and never reached the decoder."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from redis_helpers import RedisServer
from test_engine_service import healthy, lavfi, wait


def test_an_outage_past_the_buffer_counts_unstored_and_the_stream_goes_on(ray_session: dict,
                                                                          tmp_path: Path) -> None:
    import ray

    from pipeline.engine.service import get_or_create_service, shutdown_service

    server = RedisServer(tmp_path / "redis", extra_args=["--appendfsync", "everysec"])
    server.start()
    config = {"name": "eng-unstored", "redis_url": server.url, "context_tokens": 16384, "allow_sources": "lavfi",
              "store_buffer_windows": 2}
    handle = get_or_create_service(config)
    try:
        assert healthy(handle)["ok"]
        sid = ray.get(handle.create_stream.remote({"source": lavfi(90), "realtime": True, "backpressure": False}))["id"]
        before = wait(handle, sid, lambda s: s["windows"] >= 2, 120, "two windows")
        server.stop(hard=True)
        time.sleep(14.0)  # ~7 windows, over a buffer of 2
        server.start()
        st: dict[str, Any] = wait(handle, sid, lambda s: s.get("drops", {}).get("unstored", 0) >= 1
                                  and s["windows"] >= before["windows"] + 6, 180, "unstored drops, later windows")
        assert st["status"] == "live", st
        assert st["drops"].get("error", 0) == 0, st["drops"]
        windows_then = st["windows"]
        st = wait(handle, sid, lambda s: s["windows"] > windows_then, 60, "a window after the outage")
        stored = {w["index"] for w in ray.get(handle.windows.remote(sid))}
        assert max(stored) >= st["windows"] - 3, (sorted(stored), st)  # the store has the new ones again
    finally:
        shutdown_service(handle)
        server.stop()
