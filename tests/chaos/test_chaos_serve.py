"""The chaos suite's HTTP fault: the Serve replica killed (SIGKILL) while a stream plays. The
replica holds no stream and no model, so the stream loses nothing; the API answers again within
10 s (Serve starts a new replica) and questions are answered."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import requests

from serve_helpers import Api

LAVFI = ("lavfi:testsrc2=size=160x120:rate=10,trim=duration=16[out0];"
         "sine=f=550:sample_rate=16000,atrim=duration=16[out1]")


def replica_pids() -> list[int]:
    import ray
    pids = []
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["name"].startswith("SERVE_REPLICA::omnizip#"):
            h = ray.get_actor(a["name"], namespace=a["namespace"])
            pids.append(int(ray.get(h.__ray_call__.remote(lambda self: os.getpid()), timeout=30)))
    return pids


def test_serve_replica_kill_loses_nothing(serve_api: dict[str, Any]) -> None:
    api = Api(str(serve_api["url"]), str(serve_api["key"]))
    sid = api.create(source=LAVFI, realtime=True, name="chaos-replica")["id"]
    try:
        api.wait(sid, lambda s: s["windows"] >= 2, 60, "two windows")
        pids = replica_pids()
        assert pids
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        t = time.monotonic()
        while True:
            try:
                if requests.get(f"{serve_api['url']}/v1/streams/{sid}", timeout=5,
                                headers={"Authorization": f"Bearer {serve_api['key']}"}).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() - t < 60.0, "the API did not answer again within 60 s"  # only a hang
            time.sleep(0.2)
        st = api.wait(sid, lambda s: s["status"] in ("ended", "failed"), 60, "the end")
        assert st["status"] == "ended" and st["windows"] == 8 and st["dropped"] == 0, st
        r = api.post(f"/v1/streams/{sid}/ask", json={"question": "What happens?", "max_tokens": 4})
        assert r.status_code == 200, r.text
    finally:
        api.delete(f"/v1/streams/{sid}")
