"""Watches on the real engine (real Ray, a real redis-server, the tiny model): the decoder
evaluates them after each due window of a paced stream, raises events kept in Redis, and the
service POSTs them to a webhook receiver on loopback (allowed by this engine's operator
settings) that verifies every signature with `standardwebhooks`. Deterministic through
thresholds and kinds: a tiny threshold always fires, a threshold near 1 never does."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from webhook_helpers import Receiver


def lavfi(seconds: int) -> str:
    return (f"lavfi:testsrc2=size=160x120:rate=10,trim=duration={seconds}[out0];"
            f"sine=f=440:sample_rate=16000,atrim=duration={seconds}[out1]")


def healthy(svc: Any, timeout_s: float = 180) -> dict:
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        h = ray.get(svc.health.remote(), timeout=timeout_s)
        if h["ok"] or time.monotonic() > deadline:
            return h
        time.sleep(1.0)


@pytest.fixture(scope="module")
def svc(ray_session: dict, redis_server: Any) -> Iterator[Any]:
    from pipeline.engine.service import get_or_create_service, shutdown_service

    handle = get_or_create_service({"name": "eng-watch", "redis_url": redis_server.url, "context_tokens": 4096,
                                    "allow_sources": "lavfi", "webhook_allow": "loopback", "torch_threads": 1,
                                    "webhook_retry_s": 0.5})
    assert healthy(handle)["ok"]
    yield handle
    shutdown_service(handle)


def test_watches_fire_events_and_webhooks(svc: Any) -> None:
    import ray

    st = ray.get(svc.create_stream.remote({"source": lavfi(20), "realtime": True, "backpressure": True}, "k1"))
    sid = st["id"]
    hook = ray.get(svc.create_watch.remote(sid, {"question": "Is anything on screen?", "threshold": 1e-6,
                                                  "webhook": {"url": "http://127.0.0.1:9/unused"}}, "k1"))
    assert hook["webhook"]["secret"].startswith("whsec_")
    rx = Receiver(hook["webhook"]["secret"]).start()
    try:
        ray.get(svc.delete_watch.remote(sid, hook["id"], "k1"))  # and again, to the receiver's port
        hook = ray.get(svc.create_watch.remote(sid, {"question": "Is anything on screen?", "threshold": 1e-6,
                                                      "webhook": {"url": rx.url}}, "k1"))
        rx.secret = hook["webhook"]["secret"]
        never = ray.get(svc.create_watch.remote(sid, {"question": "Is it raining?", "threshold": 0.999999,
                                                       "every_s": 4}, "k1"))
        said = ray.get(svc.create_watch.remote(sid, {"question": "What is shown?", "kind": "answer",
                                                      "max_tokens": 4}, "k1"))
        got = rx.wait_for(1, 120)
        body = got[0]["body"]
        assert got[0]["verified"] and body["watch"] == hook["id"] and body["state"] == "fired"
        assert 0 < body["p_yes"] <= 1 and body["picture"] == f"/v1/streams/{sid}/windows/{body['window']}/frames.png"
        deadline = time.monotonic() + 120
        while True:
            ws = {w["id"]: w for w in ray.get(svc.list_watches.remote(sid, "k1"))}
            if ws[never["id"]]["state"]["evaluations"] and ws[said["id"]]["state"]["evaluations"]:
                break
            assert time.monotonic() < deadline, ws
            time.sleep(0.5)
        evs = ray.get(svc.watch_events.remote(sid, None, 100, "k1"))
        by = {}
        for e in evs:
            by.setdefault(e["watch"], []).append(e)
        assert [e["state"] for e in by[hook["id"]]] == ["fired"]  # fired once, stays fired (always above)
        assert never["id"] not in by  # never above its threshold
        assert isinstance(by[said["id"]][0]["answer"], str) and by[said["id"]][0]["state"] == "fired"
        assert ws[hook["id"]]["state"]["skipped"] == 0  # a backpressure stream waits for its watches
        assert ws[hook["id"]]["webhook"]["delivered"] >= 1 and "secret" not in ws[hook["id"]]["webhook"]
        with pytest.raises(Exception):  # another key's stream is not found
            ray.get(svc.list_watches.remote(sid, "k2"))
    finally:
        rx.stop()
        ray.get(svc.delete_stream.remote(sid, "k1"))
