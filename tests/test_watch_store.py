"""Watches, events and the webhook outbox in both stores (the in-process one and a real
redis-server): kept with the stream and removed with it, writers that never bring a deleted
watch back, event ids in order and resumable, the outbox in order until delivered."""

from __future__ import annotations

import uuid

import pytest

from pipeline.store.contract import StreamNotFound
from pipeline.store.memory import MemoryStore
from pipeline.store.redis_store import RedisStore


@pytest.fixture(params=["memory", "redis"])
def store(request, redis_server):
    s = MemoryStore() if request.param == "memory" else RedisStore(redis_server.url.rsplit("/", 1)[0] + "/8")
    yield s
    for rec in s.list_streams():
        s.delete_stream(rec["id"])
    s.close()


def stream(store) -> str:
    return store.create_stream({"source": "lavfi:x"}, "ws" + uuid.uuid4().hex[:10])["id"]


def watch(wid: str, created: float = 1.0, **spec) -> dict:
    return {"id": wid, "created": created, "spec": {"question": "q", **spec}, "secret": "whsec_x"}


def test_watches_round_trip_and_parts_are_separate(store) -> None:
    sid = stream(store)
    store.put_watch(sid, watch("wa", 1.0))
    store.put_watch(sid, watch("wb", 2.0, kind="answer"))
    assert [w["id"] for w in store.list_watches(sid)] == ["wa", "wb"]
    assert store.set_watch_part(sid, "wa", "state", {"state": "fired", "evaluations": 3})
    assert store.set_watch_part(sid, "wa", "delivery", {"status": "active", "delivered": 1})
    got = store.get_watch(sid, "wa")
    assert got["state"]["state"] == "fired" and got["delivery"]["delivered"] == 1 and got["secret"] == "whsec_x"
    assert store.delete_watch(sid, "wa") and not store.delete_watch(sid, "wa")
    assert not store.set_watch_part(sid, "wa", "state", {"state": "clear"})  # a late write: not brought back
    assert [w["id"] for w in store.list_watches(sid)] == ["wb"]
    with pytest.raises(StreamNotFound):
        store.put_watch("nosuch" + uuid.uuid4().hex[:6], watch("wc"))
    with pytest.raises(ValueError):
        store.put_watch(sid, watch("bad id"))


def test_events_in_order_resumable_and_bounded(store) -> None:
    sid = stream(store)
    ids = [store.add_event(sid, {"watch": "wa", "window": i, "state": "fired"}, max_events=1000) for i in range(5)]
    assert all(isinstance(i, str) for i in ids) and len(set(ids)) == 5
    events = store.events(sid)
    assert [e["id"] for e in events] == ids and [e["window"] for e in events] == list(range(5))
    assert [e["window"] for e in store.events(sid, after=ids[1])] == [2, 3, 4]
    assert [e["window"] for e in store.events(sid, after=ids[1], limit=2)] == [2, 3]
    assert store.events(sid, after=ids[-1]) == []
    with pytest.raises(ValueError):
        store.events(sid, after="not-an-id")
    for i in range(5, 400):
        store.add_event(sid, {"watch": "wa", "window": i}, max_events=50)
    kept = store.events(sid, limit=1000)
    assert 50 <= len(kept) < 400 and kept[-1]["window"] == 399  # bounded (Redis trims whole nodes: about 50)


def test_outbox_in_order_until_done_and_removed_with_the_stream(store) -> None:
    sid = stream(store)
    store.put_watch(sid, watch("wa"))
    store.put_watch(sid, watch("wb", 2.0))
    a1 = store.add_event(sid, {"watch": "wa", "window": 1}, max_events=100, deliver_to="wa")
    store.add_event(sid, {"watch": "wb", "window": 1}, max_events=100, deliver_to="wb")
    a2 = store.add_event(sid, {"watch": "wa", "window": 2}, max_events=100, deliver_to="wa")
    store.add_event(sid, {"watch": "wa", "window": 3}, max_events=100)  # no webhook: log only
    box = store.outbox(sid)
    assert [(o["watch"], o["event"]["window"]) for o in box] == [("wa", 1), ("wb", 1), ("wa", 2)]
    assert box[0]["id"] == a1 == box[0]["event"]["id"]  # the delivery id is the event id
    assert sid in store.outbox_streams()
    store.outbox_done(sid, a1)
    assert [o["id"] for o in store.outbox(sid) if o["watch"] == "wa"] == [a2]
    assert store.delete_watch(sid, "wb")  # its pending deliveries go with it
    assert [o["watch"] for o in store.outbox(sid)] == ["wa"]
    store.outbox_done(sid, a2)
    assert store.outbox(sid) == [] and sid not in store.outbox_streams()
    store.add_event(sid, {"watch": "wa", "window": 4}, max_events=100, deliver_to="wa")
    assert store.delete_stream(sid)
    assert sid not in store.outbox_streams() and store.outbox(sid) == []
    with pytest.raises(StreamNotFound):
        store.list_watches(sid)
    assert store.add_event(sid, {"watch": "wa"}, max_events=10) is None  # a late event of a deleted stream
