"""Faults of the store and of restarts that the chaos suite does not inject (issue 19): an
evicting or full Redis, one that cannot persist, one that pauses, a port held in TIME_WAIT, a
context budget too small for one window. Every Redis here is a real redis-server on 127.0.0.1."""

from __future__ import annotations

import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis

from pipeline.cli.checks import SettingsError, check_port_free, check_store_url
from pipeline.core.records import StreamRecord, StreamSettings, smallest_context_tokens, window_token_bound
from pipeline.core.stats import DecoderStats, EncoderStats, missing_windows, stream_status
from pipeline.engine.ingest import durable_through
from pipeline.errors import StoreUnavailable
from pipeline.store.contract import StoreRefused
from pipeline.store.redis_store import RedisStore
from redis_helpers import RedisServer

EVICTING = ["allkeys-lru", "allkeys-lfu", "allkeys-random", "volatile-lru", "volatile-lfu", "volatile-random",
            "volatile-ttl"]


@pytest.fixture
def make_redis(tmp_path: Path):
    """Factory: a redis-server of its own with extra arguments, stopped after the test."""
    started: list[RedisServer] = []

    def make(*args: str) -> RedisServer:
        srv = RedisServer(tmp_path / f"r{len(started)}", extra_args=list(args))
        srv.start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop(hard=True)


def sid() -> str:
    return "f" + uuid.uuid4().hex[:10]


def add(store: RedisStore, stream_id: str, index: int, payload: bytes = b"x") -> bool:
    return store.append_window(stream_id, index, payload, media_start=2.0 * index, media_end=2.0 * index + 2)


# --- row 2: an evicting policy is refused ---------------------------------------------------------
@pytest.mark.parametrize("policy", EVICTING)
def test_an_evicting_policy_is_refused_by_name(make_redis, policy: str) -> None:
    srv = make_redis("--maxmemory", "8mb", "--maxmemory-policy", policy)
    with RedisStore(srv.url) as store:
        with pytest.raises(StoreRefused) as err:
            store.create_stream({"source": "a.mp4"}, sid())
        assert policy in str(err.value) and "noeviction" in str(err.value)
        assert isinstance(err.value, StoreUnavailable)  # -> 503, not 500
        assert any(policy in p for p in store.problems())  # -> /healthz degraded
    with pytest.raises(SettingsError, match=f"{policy}.*noeviction"):
        check_store_url(srv.url)  # `serve` / `run` refuse to start


def test_noeviction_is_accepted(make_redis) -> None:
    srv = make_redis("--maxmemory", "8mb", "--maxmemory-policy", "noeviction")
    check_store_url(srv.url)
    with RedisStore(srv.url) as store:
        assert store.create_stream({"source": "a.mp4"}, sid())["status"] == "created"
        assert store.problems() == []


def test_the_policy_is_read_from_info_when_config_is_renamed(make_redis) -> None:
    srv = make_redis("--maxmemory", "8mb", "--maxmemory-policy", "allkeys-lru", "--rename-command", "CONFIG", "")
    with RedisStore(srv.url) as store:
        assert store.eviction_policy() == "allkeys-lru"
        with pytest.raises(StoreRefused, match="allkeys-lru"):
            store.create_stream({"source": "a.mp4"}, sid())


def test_a_policy_changed_at_run_time_is_seen_by_health(make_redis) -> None:
    srv = make_redis()
    with RedisStore(srv.url) as store:
        store.create_stream({"source": "a.mp4"}, sid())
        redis.Redis.from_url(srv.url).config_set("maxmemory-policy", "volatile-lru")
        assert any("volatile-lru" in p for p in store.problems())


# --- row 2: refused writes are 503 and make health degraded --------------------------------------
def test_out_of_memory_writes_are_store_unavailable(make_redis) -> None:
    srv = make_redis("--maxmemory", "3mb", "--maxmemory-policy", "noeviction")
    from pipeline.api.errors import to_api_error

    with RedisStore(srv.url) as store:
        s = store.create_stream({"source": "a.mp4"}, sid())["id"]
        with pytest.raises(StoreRefused) as err:
            for i in range(200):  # 64 KiB windows: 3 MB is full long before 200
                add(store, s, i, bytes(64 * 1024))
        assert "OOM" in str(err.value) and "maxmemory" in str(err.value)
        assert "command not allowed" not in str(err.value)  # our sentence, not Redis's text
        api = to_api_error(err.value)
        assert api.status == 503 and api.headers.get("Retry-After")
        with pytest.raises(StoreRefused):  # fill the last bytes: now even a tiny write is refused
            for j in range(i, i + 100_000):
                add(store, s, j, b"y" * 64)
        with pytest.raises(StoreRefused):
            store.create_stream({"source": "b.mp4"}, sid())
        assert any("OOM" in p for p in store.problems())


def test_a_redis_that_cannot_persist_is_store_unavailable(make_redis) -> None:
    srv = make_redis()
    r = redis.Redis.from_url(srv.url)
    r.config_set("save", "3600 1")  # MISCONF needs save points and a failed snapshot
    with RedisStore(srv.url) as store:
        s = store.create_stream({"source": "a.mp4"}, sid())["id"]
        shutil.rmtree(srv.dir)  # the snapshot cannot be written: its directory is gone
        r.bgsave()
        deadline = time.monotonic() + 30
        while r.info("persistence")["rdb_last_bgsave_status"] != "err" and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(StoreRefused, match="MISCONF") as err:
            add(store, s, 0)
        assert isinstance(err.value, StoreUnavailable)
        assert any("MISCONF" in p for p in store.problems())


# --- row 2: missing windows are noticed -----------------------------------------------------------
def test_windows_the_store_lost_are_counted(make_redis) -> None:
    srv = make_redis()
    with RedisStore(srv.url) as store:
        s = store.create_stream({"source": "a.mp4"}, sid())["id"]
        for i in range(12):
            add(store, s, i)
        enc = EncoderStats(known=True, last_stored=11)
        assert missing_windows(store.window_span(s), enc, skipped=0) == 0
        assert missing_windows(store.window_span(s), enc, skipped=0, retention_windows=5) == 0
        redis.Redis.from_url(srv.url).delete(store._k(s, "windows"))  # what an evicting Redis does
        for i in range(12, 15):
            add(store, s, i)  # later windows recreate the key: the store holds 12-14 only
        span = store.window_span(s)
        assert (span.count, span.first, span.last) == (3, 12, 14)
        enc = EncoderStats(known=True, last_stored=14)
        assert missing_windows(span, enc, skipped=0) == 12
        assert missing_windows(span, enc, skipped=2) == 10  # windows dropped on purpose are no loss
        rec = StreamRecord(s, "a.mp4", StreamSettings({}, 4096))
        assert stream_status(rec, None, enc, None, span=span)["missing_windows"] == 12


# --- row 3: resumption waits for a paused store -------------------------------------------------
def test_the_resume_point_is_read_through_a_paused_store(make_redis) -> None:
    srv = make_redis()
    with RedisStore(srv.url) as setup:
        s = setup.create_stream({"source": "rtsp://127.0.0.1/cam"}, sid())["id"]
        for i in range(10):
            add(setup, s, i)
    store = RedisStore(srv.url, fail_fast=True)  # the ingest actor's client
    store.ping()
    redis.Redis.from_url(srv.url).execute_command("CLIENT", "PAUSE", "3000", "ALL")
    assert durable_through(store, s, threading.Event()) == 9  # was -1: numbering restarted at 0
    stop = threading.Event()
    stop.set()
    assert durable_through(RedisStore("redis://127.0.0.1:1/0", fail_fast=True), s, stop) == -1  # stopping


# --- row 6: status from durable facts -----------------------------------------------------------
def test_an_ended_stream_stays_ended_after_a_restart() -> None:
    rec = StreamRecord("e1", "a.mp4", StreamSettings({}, 4096), status="ended",
                       ingest={"status": "ended", "windows_total": 20, "last_index": 19, "done": True})
    # the restarted worker does not hold the stream; the restarted decoder rebuilt it from the store
    dec = DecoderStats(known=True, windows=20, last=19, handled=19)
    assert stream_status(rec, None, EncoderStats(), dec)["status"] == "ended"  # was "live" forever
    assert stream_status(rec, None, EncoderStats(), None)["status"] == "ended"
    busy = EncoderStats(known=True, last_stored=19, queue=1)
    assert stream_status(rec, None, busy, dec)["status"] == "live"  # still draining: not yet


def test_duplicates_refused_by_the_encoder_show_in_the_status() -> None:
    rec = StreamRecord("d1", "rtsp://127.0.0.1/cam", StreamSettings({}, 4096), status="live")
    assert stream_status(rec, None, EncoderStats(known=True, duplicates=10), None)["duplicates"] == 10


# --- row 7: restart at once ---------------------------------------------------------------------
def test_the_port_check_passes_time_wait_and_refuses_a_listener() -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the real server binds
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    with pytest.raises(SettingsError, match=f"--port {port}"):
        check_port_free("127.0.0.1", port)  # a real listener: refused
    cli = socket.create_connection(("127.0.0.1", port))
    conn, _ = srv.accept()
    conn.close()  # the server closes first: its side of the connection goes to TIME_WAIT
    cli.recv(1)
    cli.close()
    srv.close()
    check_port_free("127.0.0.1", port)  # was: "address already in use" for up to 60 s


# --- row 8: a budget that cannot hold one window; a store outage answers fast -------------------
def test_the_smallest_budget_holds_a_real_window_and_prompt() -> None:
    torch = pytest.importorskip("torch")
    import numpy as np

    from omnizip.models import load_model

    model = load_model("tiny", "cpu", None)
    for h, w in ((112, 112), (224, 392)):
        frames = np.zeros((4, h, w, 3), dtype=np.uint8)
        enc = model.encode_windows([(np.zeros(32000, dtype=np.float32), frames)], [0])[0]
        n = int(enc.audio.shape[0]) + int(enc.video.shape[0])
        assert n <= window_token_bound((h, w))
        prefix = len(model.prompt_prefix(None).ids)
        assert prefix + n < smallest_context_tokens((h, w))
    assert smallest_context_tokens(None) > smallest_context_tokens((112, 112))
    del torch


def test_a_paused_store_costs_one_timeout_not_retries(make_redis) -> None:
    srv = make_redis()
    control = redis.Redis.from_url(srv.url)
    with RedisStore(srv.url, fail_fast=True) as store:
        s = store.create_stream({"source": "a.mp4"}, sid())["id"]
        before = control.info("stats")["total_connections_received"]
        control.execute_command("CLIENT", "PAUSE", "2500", "ALL")
        with pytest.raises(redis.TimeoutError):
            store.get_stream(s)
        time.sleep(2.6)  # the pause ends
        # a timeout is not retried: no second connection (each retry reconnected, x socket timeout)
        assert control.info("stats")["total_connections_received"] == before
