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
        # the store has the new windows again: one read after Redis came back is stored, once the
        # encoder's client has reconnected (its retries back off: seconds on a loaded machine)
        newest = st["windows_total"] - 1
        deadline, stored = time.monotonic() + 60, set()
        while time.monotonic() < deadline:
            stored = {w["index"] for w in ray.get(handle.windows.remote(sid))}
            if max(stored) >= newest:
                break
            time.sleep(0.5)
        assert max(stored) >= newest, (sorted(stored), st)
        assert len(stored) < newest + 1, sorted(stored)  # and the ones that fell out of the buffer are not
    finally:
        shutdown_service(handle)
        server.stop()


def test_a_full_buffer_reports_its_loss_outside_its_own_lock() -> None:
    """The loss callback takes the caller's lock; a caller that holds that lock while asking how
    many writes wait (the encoder's status call) must still get an answer. Before, the callback
    ran under the buffer's lock: the two threads deadlocked, the writer stopped for good and
    every window after the outage went unstored (CI saw the store stuck at windows 0-1)."""
    import threading

    from pipeline.store.memory import MemoryStore
    from pipeline.store.writer import PendingWrite, StoreWriter

    callers_lock, in_callback, lost = threading.Lock(), threading.Event(), []

    def on_lost(sid: str, index: int) -> None:
        in_callback.set()
        with callers_lock:
            lost.append(index)

    # the store does not know stream "s": every write waits in the buffer (capacity 1)
    writer = StoreWriter(MemoryStore(), 1, lambda s, c: None, on_lost, lambda s: None, retry_s=0.05)
    answered: list[int] = []
    with callers_lock:
        producer = threading.Thread(target=lambda: [writer.write(PendingWrite("s", i, b"w")) for i in range(2)],
                                    daemon=True)
        producer.start()
        assert in_callback.wait(5.0)
        asker = threading.Thread(target=lambda: answered.append(writer.waiting("s")), daemon=True)
        asker.start()
        asker.join(5.0)
        assert answered == [1], "waiting() blocked while the loss callback waited for the caller's lock"
    producer.join(5.0)
    assert not producer.is_alive() and lost == [0]
