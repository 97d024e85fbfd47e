"""The stream state store: one contract, two implementations, against a real redis-server."""

from __future__ import annotations

import threading
import uuid

import pytest
import torch

from omnizip import codec
from pipeline.store.memory import MemoryStore
from pipeline.store.open import open_store
from pipeline.store.contract import Retention, StreamExists, StreamNotFound, WindowOrderError
from pipeline.store.redis_store import RedisStore


def own_db(redis_server) -> str:
    """A database of the session's redis-server that only this file uses: the contract tests
    list and delete *all* streams, so they must not share a database with the engine's tests."""
    return redis_server.url.rsplit("/", 1)[0] + "/9"


@pytest.fixture(params=["memory", "redis"])
def make_store(request, redis_server):
    """Factory: a fresh store of each kind with the given retention."""
    made = []

    def make(retention: Retention = Retention()):
        s = MemoryStore(retention) if request.param == "memory" else \
            RedisStore(own_db(redis_server), retention)
        made.append(s)
        return s

    yield make
    for s in made:
        for rec in s.list_streams():
            s.delete_stream(rec["id"])
        s.close()


def sid() -> str:
    return "t" + uuid.uuid4().hex[:10]


def add(store, stream_id, index, **kw):
    return store.append_window(stream_id, index, f"payload-{index}".encode(),
                               media_start=2.0 * index, media_end=2.0 * index + 2, **kw)


# --- registry -------------------------------------------------------------------------------
def test_registry_crud(make_store):
    s = make_store()
    a = s.create_stream({"source": "rtsp://127.0.0.1/x", "name": "cam", "budget": 4096,
                         "omnizip": {"rho_audio": 0.4}})
    b = s.create_stream({"source": "file.mp4", "name": "f"}, stream_id=sid())
    assert a["status"] == "created" and a["created"] > 0 and len(a["id"]) == 16
    assert s.get_stream(a["id"]) == a
    assert [r["id"] for r in s.list_streams()] == [a["id"], b["id"]]
    up = s.update_stream(a["id"], {"status": "running", "lag_s": 0.5})
    assert up["status"] == "running" and up["name"] == "cam" and s.get_stream(a["id"]) == up
    with pytest.raises(ValueError, match="id"):
        s.update_stream(a["id"], {"id": "other"})
    assert s.delete_stream(a["id"]) is True
    assert s.delete_stream(a["id"]) is False
    with pytest.raises(StreamNotFound, match=a["id"]):
        s.get_stream(a["id"])
    with pytest.raises(StreamNotFound):
        s.update_stream(a["id"], {"status": "x"})
    assert [r["id"] for r in s.list_streams()] == [b["id"]]


def test_create_is_idempotent_but_conflicts_are_errors(make_store):
    s = make_store()
    i = sid()
    first = s.create_stream({"source": "a"}, stream_id=i)
    assert s.create_stream({"source": "a"}, stream_id=i) == first  # a retried create
    with pytest.raises(StreamExists):
        s.create_stream({"source": "b"}, stream_id=i)


@pytest.mark.parametrize("bad", ["", "a:b", "x{y}", "with space", "z" * 129])
def test_bad_stream_ids_are_rejected(make_store, bad):
    with pytest.raises(ValueError, match="stream_id"):
        make_store().create_stream({"source": "a"}, stream_id=bad)


def test_bad_specs_and_windows_are_rejected(make_store):
    s = make_store()
    with pytest.raises(TypeError, match="spec"):
        s.create_stream({"source": object()})
    i = s.create_stream({"source": "a"})["id"]
    with pytest.raises(ValueError, match="index"):
        s.append_window(i, -1, b"x", media_start=0, media_end=2)
    with pytest.raises(TypeError, match="payload"):
        s.append_window(i, 0, "text", media_start=0, media_end=2)
    with pytest.raises(ValueError, match="media_start"):
        s.append_window(i, 0, b"x", media_start=3, media_end=2)
    with pytest.raises(TypeError, match="fields"):
        s.append_window(i, 0, b"x", media_start=0, media_end=2, fields={"t": [1, 2]})
    with pytest.raises(StreamNotFound):
        add(s, "nosuchstream", 0)


# --- windows --------------------------------------------------------------------------------
def test_windows_round_trip_in_order_with_fields(make_store):
    s = make_store()
    i = s.create_stream({"source": "a"})["id"]
    for k in range(70):  # more than one read batch
        assert add(s, i, k, fields={"audio_in": 50, "audio_kept": 20 + k % 3, "note": "w"}) is True
    wins = s.windows(i)
    assert [w.index for w in wins] == list(range(70))
    assert wins[5].payload == b"payload-5" and wins[5].media_start == 10.0 and wins[5].media_end == 12.0
    assert wins[7].fields == {"audio_in": 50, "audio_kept": 21, "note": "w"}
    assert [w.index for w in s.windows(i, start=65)] == [65, 66, 67, 68, 69]
    assert s.window_count(i) == 70 and s.last_window_index(i) == 69


def test_retried_append_does_not_duplicate_and_order_is_enforced(make_store):
    s = make_store()
    i = s.create_stream({"source": "a"})["id"]
    assert add(s, i, 0) and add(s, i, 1) and add(s, i, 3)  # window 2 was dropped upstream
    assert add(s, i, 1) is False  # a retry after a lost reply
    assert add(s, i, 3) is False
    with pytest.raises(WindowOrderError, match="window 2"):
        add(s, i, 2)
    assert [w.index for w in s.windows(i)] == [0, 1, 3]


def test_trim_by_size(make_store):
    s = make_store(Retention(max_windows=5))
    i = s.create_stream({"source": "a"})["id"]
    for k in range(12):
        add(s, i, k)
    assert [w.index for w in s.windows(i)] == [7, 8, 9, 10, 11]
    assert add(s, i, 3) is False  # trimmed away long ago: still a duplicate, not an error


def test_trim_by_media_age(make_store):
    s = make_store(Retention(max_age_s=7.0))
    i = s.create_stream({"source": "a"})["id"]
    for k in range(10):  # window k = [2k, 2k+2)
        add(s, i, k)
    # newest ends at 20 s: keep windows ending at >= 13 s -> k = 6 (ends 14) .. 9
    assert [w.index for w in s.windows(i)] == [6, 7, 8, 9]
    assert s.window_count(i) == 4


def test_retention_is_validated():
    with pytest.raises(ValueError, match="max_windows"):
        Retention(max_windows=0)
    with pytest.raises(ValueError, match="max_age_s"):
        Retention(max_age_s=float("inf"))


def test_delete_removes_windows_and_state_and_blocks_late_writes(make_store):
    s = make_store()
    i = s.create_stream({"source": "a"})["id"]
    add(s, i, 0, state=b"st")
    s.delete_stream(i)
    with pytest.raises(StreamNotFound):
        add(s, i, 1)  # a lagging worker must not resurrect the stream
    s.create_stream({"source": "a"}, stream_id=i)
    assert s.windows(i) == [] and s.load_state(i) is None and add(s, i, 0) is True


def test_concurrent_appends_from_threads(make_store):
    s = make_store()
    ids = [s.create_stream({"source": str(n)})["id"] for n in range(4)]

    def feed(i):
        for k in range(25):
            add(s, i, k)

    ts = [threading.Thread(target=feed, args=(i,)) for i in ids]
    [t.start() for t in ts]
    [t.join() for t in ts]
    for i in ids:
        assert [w.index for w in s.windows(i)] == list(range(25))


# --- compressor state -----------------------------------------------------------------------
def test_compressor_state_round_trips(make_store):
    s = make_store()
    i = s.create_stream({"source": "a"})["id"]
    assert s.load_state(i) is None
    state = {"history": torch.randn(37), "controller": {"discard": 0.71, "n": 12,
             "bounds": (0.3, 0.9)}, "mask": torch.tensor([True, False, True]),
             "half": torch.ones(2, 3, dtype=torch.bfloat16), "lst": [1, None, "x"], 3: "int key"}
    s.save_state(i, 11, codec.encode(state))
    got = s.load_state(i)
    assert got.index == 11
    back = codec.decode(got.data)
    assert torch.equal(back["history"], state["history"]) and back["mask"].dtype == torch.bool
    assert back["half"].dtype == torch.bfloat16 and back["controller"] == state["controller"]
    assert back["lst"] == [1, None, "x"] and back[3] == "int key"
    # appending a window with its state is one atomic step
    add(s, i, 12, state=codec.encode({"n": 13}))
    assert s.load_state(i).index == 12 and codec.decode(s.load_state(i).data) == {"n": 13}
    assert add(s, i, 12, state=codec.encode({"n": 99})) is False  # retry changes nothing
    assert codec.decode(s.load_state(i).data) == {"n": 13}


def test_codec_rejects_what_it_cannot_hold():
    with pytest.raises(codec.CodecError, match=r"obj\.x"):
        codec.encode({"x": object()})
    with pytest.raises(codec.CodecError, match="not an encoded object"):
        codec.decode(b"\x00" * 4)
    assert codec.encode({"a": torch.arange(3)}) == codec.encode({"a": torch.arange(3)})


# --- open_store -----------------------------------------------------------------------------
def test_open_store_picks_the_implementation(redis_server):
    assert isinstance(open_store(None), MemoryStore)
    assert isinstance(open_store("memory://"), MemoryStore)
    with open_store(own_db(redis_server), Retention(max_windows=3)) as s:
        assert isinstance(s, RedisStore) and s.ping() and s.retention.max_windows == 3
    with pytest.raises(ValueError, match="scheme"):
        open_store("http://127.0.0.1:1")


# --- Redis restarts -------------------------------------------------------------------------
@pytest.mark.parametrize("hard", [False, True], ids=["sigterm", "sigkill"])
def test_redis_restart_keeps_windows_and_state(redis_server, hard):
    s = RedisStore(own_db(redis_server), Retention(max_windows=100))
    try:
        i = s.create_stream({"source": "a", "name": "restart"})["id"]
        for k in range(10):
            add(s, i, k, state=codec.encode({"after": k}))
        redis_server.restart(hard=hard)
        # the same client object reconnects by itself
        for k in range(10, 15):
            add(s, i, k, state=codec.encode({"after": k}))
        assert [w.index for w in s.windows(i)] == list(range(15))
        assert s.get_stream(i)["name"] == "restart"
        assert codec.decode(s.load_state(i).data) == {"after": 14}
    finally:
        s.delete_stream(i)
        s.close()


def test_redis_outage_is_ridden_out_by_retries(redis_server):
    """Redis is down for a second while a write is issued: the write waits and lands."""
    s = RedisStore(own_db(redis_server))
    try:
        i = s.create_stream({"source": "a"})["id"]
        add(s, i, 0)
        t = threading.Thread(target=redis_server.restart, kwargs={"hard": True, "down_s": 1.0})
        t.start()
        try:
            import time
            time.sleep(0.3)  # inside the outage
            assert add(s, i, 1) is True
        finally:
            t.join()
        assert [w.index for w in s.windows(i)] == [0, 1]
    finally:
        s.delete_stream(i)
        s.close()


# --- side blobs (per-window picture data, pipeline.viz.window) -----------------------------
def test_blobs_round_trip_replace_and_kinds(make_store):
    s = make_store()
    i = s.create_stream({"source": "a"})["id"]
    assert s.get_blob(i, 0, "viz") is None
    s.put_blob(i, 0, "viz", b"\x00one")  # may come before its window
    add(s, i, 0)
    s.put_blob(i, 0, "viz", b"\x00two")  # replaces
    s.put_blob(i, 0, "other", b"x")
    assert s.get_blob(i, 0, "viz") == b"\x00two" and s.get_blob(i, 0, "other") == b"x"
    assert s.get_blob(i, 1, "viz") is None
    for bad in ("", "a:b", "a b", "x" * 33, "é"):
        with pytest.raises(ValueError, match="kind"):
            s.put_blob(i, 0, bad, b"x")
    with pytest.raises(ValueError, match="index"):
        s.put_blob(i, -1, "viz", b"x")
    with pytest.raises(TypeError):
        s.put_blob(i, 0, "viz", "text")
    with pytest.raises(StreamNotFound):
        s.put_blob("nosuchstream", 0, "viz", b"x")
    with pytest.raises(StreamNotFound):
        s.get_blob("nosuchstream", 0, "viz")


def test_blobs_follow_window_retention_and_their_own_cap(make_store):
    s = make_store(Retention(max_windows=4, max_blob_windows=10))
    i = s.create_stream({"source": "a"})["id"]
    for k in range(9):
        s.put_blob(i, k, "viz", b"v%d" % k)
        add(s, i, k)
    s.put_blob(i, 9, "viz", b"v9")  # before window 9: the floor is the oldest retained window (5)
    assert [k for k in range(10) if s.get_blob(i, k, "viz") is not None] == [5, 6, 7, 8, 9]
    s2 = make_store(Retention(max_blob_windows=3))
    j = s2.create_stream({"source": "a"})["id"]
    for k in range(8):
        add(s2, j, k)
        s2.put_blob(j, k, "viz", b"v")
        s2.put_blob(j, k, "b", b"w")
    assert [k for k in range(8) if s2.get_blob(j, k, "viz")] == [5, 6, 7]
    assert [k for k in range(8) if s2.get_blob(j, k, "b")] == [5, 6, 7]
    with pytest.raises(ValueError, match="max_blob_windows"):
        Retention(max_blob_windows=0)


def test_blobs_go_with_the_stream(make_store):
    s = make_store()
    i = s.create_stream({"source": "a"})["id"]
    add(s, i, 0)
    s.put_blob(i, 0, "viz", b"v")
    s.delete_stream(i)
    s.create_stream({"source": "a"}, stream_id=i)
    assert s.get_blob(i, 0, "viz") is None


def test_window_page_lists_without_payloads(make_store):
    s = make_store()
    i = s.create_stream({"source": "a"})["id"]
    for k in range(40):
        add(s, i, k, fields={"audio_kept": k})
    page = s.window_page(i, 5, 10)
    assert [w.index for w in page] == list(range(5, 15))
    assert all(w.payload == b"" for w in page) and page[0].fields == {"audio_kept": 5}
    assert [w.index for w in s.window_page(i, 35, 100)] == [35, 36, 37, 38, 39]
    assert s.window_page(i, 40, 5) == []
    with pytest.raises(ValueError, match="limit"):
        s.window_page(i, 0, 0)


def test_a_window_carries_its_blobs_in_the_same_write_and_they_follow_retention(make_store):
    s = make_store(Retention(max_windows=4, max_blob_windows=10))
    i = s.create_stream({"source": "a"})["id"]
    for k in range(40):
        if k in (20, 21):  # a gap: the sweep still removes what the gap left behind
            continue
        add(s, i, k, blobs={"viz": b"v%d" % k, "b": b"w"}, state=b"s%d" % k)
    assert [k for k in range(40) if s.get_blob(i, k, "viz") is not None] == [36, 37, 38, 39]
    assert s.get_blob(i, 39, "b") == b"w" and s.load_state(i).data == b"s39"
    assert add(s, i, 39, blobs={"viz": b"again"}) is False  # a retry changes nothing
    assert s.get_blob(i, 39, "viz") == b"v39"
    with pytest.raises(ValueError, match="kind"):
        add(s, i, 40, blobs={"a:b": b"x"})
    with pytest.raises(TypeError):
        add(s, i, 40, blobs={"viz": "text"})
    with pytest.raises(StreamNotFound):
        add(s, "nosuchstream", 0, blobs={"viz": b"x"})


def test_progress_notes_are_read_back_with_the_record(make_store):
    s = make_store()
    i = s.create_stream({"source": "a"})["id"]
    s.note_progress(i, {"windows_total": 3})
    assert s.get_stream(i)["progress"] == {"windows_total": 3}
    s.note_progress(i, {"windows_total": 4})
    assert [r["progress"] for r in s.list_streams() if r["id"] == i] == [{"windows_total": 4}]
    s.update_stream(i, {"status": "ended", "progress": {"windows_total": 5}})  # the record's own wins
    assert s.get_stream(i)["progress"] == {"windows_total": 5} and s.get_stream(i)["status"] == "ended"
    s.update_stream(i, {"name": "x"})  # other changes keep the latest progress
    assert s.get_stream(i)["progress"] == {"windows_total": 5}
    s.delete_stream(i)
    with pytest.raises(StreamNotFound):
        s.note_progress(i, {"windows_total": 6})
    with pytest.raises(StreamNotFound):
        s.get_stream(i)
