"""Webhook delivery on loopback (a test operator policy that allows it): every request verified
with the `standardwebhooks` library, at least once and in order per watch through an outage,
the same id on every retry, redirects never followed, a failing endpoint disabled, and pending
deliveries delivered by a new process after the first was stopped (SIGTERM, then SIGKILL).
Refused destinations are judged without opening anything."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from pipeline.core.config import ServiceConfig
from pipeline.core.watches import new_secret
from pipeline.engine.webhooks import WebhookRefused, judge, webhook_policy
from pipeline.store.redis_store import RedisStore
from webhook_helpers import DELIVER_MAIN, Receiver, deliverer

LOOPBACK = {"webhook_allow": "loopback", "webhook_retry_s": 1.0, "webhook_retry_max_s": 4.0,
            "webhook_disable_after_s": 3600.0, "webhook_timeout_s": 5.0}


@pytest.mark.parametrize("url, rule", [
    ("http://127.0.0.1:9/h", "host:loopback"), ("http://localhost/h", "host:loopback"),
    ("http://169.254.169.254/latest/meta-data", "host:link-local"), ("http://10.0.0.1/h", "host:private"),
    ("http://[::1]/h", "host:loopback"), ("http://2130706433/h", "host:loopback"),
    ("https://user:pw@example.com/h", "url:credentials"), ("ftp://example.com/h", "scheme"),
])
def test_default_policy_refuses(url: str, rule: str) -> None:
    with pytest.raises(WebhookRefused) as e:
        judge(webhook_policy(ServiceConfig()), url)
    assert e.value.rule == rule and e.value.param == "webhook.url" and rule in str(e.value)


def test_operator_may_allow_loopback_only() -> None:
    policy = webhook_policy(ServiceConfig(webhook_allow="loopback"))
    assert judge(policy, "http://127.0.0.1:8080/h").addresses == ("127.0.0.1",)
    for url in ("http://169.254.169.254/", "http://10.0.0.1/"):
        with pytest.raises(WebhookRefused):
            judge(policy, url)
    assert judge(webhook_policy(ServiceConfig(webhook_hosts="10.0.0.0/8")), "http://10.0.0.1/").port == 80


@pytest.fixture()
def store(redis_server):
    s = RedisStore(redis_server.url.rsplit("/", 1)[0] + "/7")
    yield s
    for rec in s.list_streams():
        s.delete_stream(rec["id"])
    s.close()


def setup(store: RedisStore, receiver: Receiver, watches: tuple[str, ...] = ("wa", "wb")) -> str:
    sid = store.create_stream({"source": "lavfi:x"}, "wh" + uuid.uuid4().hex[:10])["id"]
    for i, w in enumerate(watches):
        store.put_watch(sid, {"id": w, "created": float(i), "secret": receiver.secret,
                              "spec": {"question": "q", "webhook": {"url": receiver.url}}})
    return sid


def events(store: RedisStore, sid: str, plan: list[tuple[str, int]]) -> list[str]:
    return [store.add_event(sid, {"stream": sid, "watch": w, "window": i, "state": "fired", "p_yes": 0.9},
                            max_events=100, deliver_to=w) for w, i in plan]


def rounds(host, n: int, start: float, step: float) -> None:
    for k in range(n):
        asyncio.run(host.deliver_round(now=start + k * step))


def test_outage_then_every_event_in_order_with_the_same_ids(store) -> None:
    secret = new_secret()
    rx = Receiver(secret).start()
    try:
        sid = setup(store, rx)
        ids = events(store, sid, [("wa", 1), ("wb", 1), ("wa", 2), ("wa", 3), ("wb", 2)])
        host = deliverer(LOOPBACK, store)
        rx.mode = "down"
        rounds(host, 4, time.time(), 10.0)  # each round past the backoff: one failed try per watch
        tried = [r["id"] for r in rx.received]
        assert set(tried) == {ids[0], ids[1]}  # only each watch's oldest event is tried while it fails
        assert store.get_watch(sid, "wa")["delivery"]["failed"] >= 3
        rx.mode = "up"
        rounds(host, 2, time.time() + 100, 10.0)
        got = rx.delivered()
        assert all(r["verified"] for r in rx.received)
        assert [r["body"]["window"] for r in got if r["body"]["watch"] == "wa"] == [1, 2, 3]
        assert [r["body"]["window"] for r in got if r["body"]["watch"] == "wb"] == [1, 2]
        assert {r["id"] for r in got} == set(ids) and all(r["id"] == r["body"]["id"] for r in got)
        assert store.outbox(sid) == []
        d = store.get_watch(sid, "wa")["delivery"]
        assert d["delivered"] == 3 and d["attempts"] == 0 and d["failing_since"] is None
    finally:
        rx.stop()


def test_redirect_is_not_followed_and_a_failing_endpoint_is_disabled(store) -> None:
    rx = Receiver(new_secret()).start()
    try:
        sid = setup(store, rx, ("wa",))
        events(store, sid, [("wa", 1), ("wa", 2)])
        host = deliverer({**LOOPBACK, "webhook_disable_after_s": 50.0}, store)
        rx.mode = "redirect"
        t0 = time.time()
        rounds(host, 1, t0, 0)
        assert rx.elsewhere == 0 and len(rx.received) == 1
        d = store.get_watch(sid, "wa")["delivery"]
        assert d["last_error"] == "redirect not followed" and d["last_status"] == 302 and len(store.outbox(sid)) == 2
        rounds(host, 3, t0 + 30, 30.0)  # failing for more than 50 s: disabled, its events dropped
        assert store.get_watch(sid, "wa")["delivery"]["status"] == "disabled"
        rounds(host, 1, t0 + 200, 0)
        assert store.outbox(sid) == [] and rx.elsewhere == 0
    finally:
        rx.stop()


def test_pending_deliveries_survive_a_stopped_deliverer(store, redis_server) -> None:
    rx = Receiver(new_secret()).start()
    url = redis_server.url.rsplit("/", 1)[0] + "/7"
    procs: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", DELIVER_MAIN, url, json.dumps(LOOPBACK)],
                             cwd=os.path.dirname(os.path.dirname(__file__)), stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "delivering"
        return p

    try:
        sid = setup(store, rx)
        rx.mode = "down"
        ids = events(store, sid, [("wa", 1), ("wb", 1), ("wa", 2), ("wb", 2), ("wa", 3)])
        first = start()
        deadline = time.monotonic() + 60
        while len(rx.received) < 2 and time.monotonic() < deadline:  # it tried and failed
            time.sleep(0.1)
        first.send_signal(signal.SIGTERM)
        try:
            first.wait(5)
        except subprocess.TimeoutExpired:
            first.kill()
            first.wait(10)
        assert len(store.outbox(sid)) == 5 and not rx.delivered()
        rx.mode = "up"
        start()
        got = rx.wait_for(5, 60)
        assert [r["body"]["window"] for r in got if r["body"]["watch"] == "wa"] == [1, 2, 3]
        assert {r["id"] for r in got} == set(ids) and all(r["verified"] for r in rx.received)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        rx.stop()
