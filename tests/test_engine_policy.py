"""Queue policies through Ray with the in-process store hosted in a Ray actor: an unpaced file
without backpressure through tiny queues loses windows (counted in the status and in Ray's
metrics) and is compressed harder, a file with backpressure loses nothing, and a killed encoder
worker resumes the stream's compressor from the store. The policies themselves are unit-tested
without Ray in test_queues.py."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from test_engine_service import actor, answer, ended, healthy, lavfi, wait

CONFIG = {"name": "eng-mem", "queue_windows": 2, "max_batch": 1, "allow_sources": "lavfi",
          "behind_policy": "compress_harder"}


@pytest.fixture(scope="module")
def svc(ray_session: dict) -> Iterator[Any]:
    from pipeline.engine.service import get_or_create_service, shutdown_service
    # one window per encoder call, queues of 2: an unpaced file outruns the encoder
    handle = get_or_create_service(CONFIG)
    assert healthy(handle)["ok"]
    yield handle
    shutdown_service(handle)


def store() -> Any:
    from pipeline.engine.runtime import RemoteStore
    return RemoteStore(actor(CONFIG, "store"))


def metric_lines(port: int, name: str, sid: str) -> list[str]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return [ln for ln in text.splitlines() if ln.startswith(name) and f'stream="{sid}"' in ln]


def test_overrun_drops_and_harder_compression_are_counted(svc: Any, ray_session: dict) -> None:
    import ray
    # backpressure off: files wait for the model by default
    sid = ray.get(svc.create_stream.remote({"source": lavfi(40), "realtime": False, "backpressure": False}))["id"]
    st = wait(svc, sid, ended, 120, "the end")
    assert st["status"] == "ended" and st["windows_total"] == 20
    assert st["dropped"] > 0 and st["dropped"] == sum(st["drops"].values())
    assert st["windows"] + st["dropped"] == st["windows_total"]  # every window is in context or counted
    assert st["compressed_harder"] > 0
    ws = store().windows(sid)
    hard = [w.fields for w in ws if w.fields["harder"]]
    normal = [w.fields for w in ws if not w.fields["harder"]]
    assert hard and normal
    kept = lambda fs: sum(f["audio_kept"] + f["video_kept"] for f in fs) / sum(f["audio_in"] + f["video_in"] for f in fs)  # noqa: E731
    assert kept(hard) < kept(normal)
    assert answer(svc, sid)
    # the drops reach Prometheus through Ray's per-node metrics agent
    deadline = time.monotonic() + 60
    while not metric_lines(ray_session["metrics_port"], "ray_omnizip_dropped_windows_total", sid):
        assert time.monotonic() < deadline, "no omnizip_dropped_windows_total series for the stream"
        time.sleep(1)
    lines = metric_lines(ray_session["metrics_port"], "ray_omnizip_dropped_windows_total", sid)
    assert sum(float(ln.rsplit(" ", 1)[1]) for ln in lines) > 0
    ray.get(svc.delete_stream.remote(sid))


def test_backpressure_file_loses_nothing_and_queues_stay_bounded(svc: Any) -> None:
    import ray
    # 15 unpaced windows through queues of 2 and one-window batches: without backpressure the
    # encoder would drop (see the test above); with it, ingestion waits and nothing is lost.
    sid = ray.get(svc.create_stream.remote({"source": lavfi(30), "backpressure": True}))["id"]
    st = wait(svc, sid, ended, 180, "the end")
    assert st["status"] == "ended" and st["dropped"] == 0 and st["compressed_harder"] == 0
    assert st["windows"] == st["windows_total"] == 15
    assert [w.index for w in store().windows(sid)] == list(range(15))
    decoder = actor(CONFIG, "decoder")
    peak = ray.get(decoder.stats.remote(sid)).max_queue
    # queue_windows = 2: at most the decoder's own 2, the encoder's 2 and one batch in flight.
    assert 1 <= peak <= 5, peak
    ray.get(svc.delete_stream.remote(sid))


def test_killed_encoder_worker_resumes_the_compressor(svc: Any) -> None:
    import ray
    sid = ray.get(svc.create_stream.remote({"source": lavfi(12), "realtime": True}))["id"]
    wait(svc, sid, lambda st: st["windows"] >= 2, 60, "two windows")
    ray.kill(actor(CONFIG, "encoder"), no_restart=False)
    st = wait(svc, sid, ended, 120, "the end")
    assert st["status"] == "ended" and st["windows_total"] == 6
    ws = store().windows(sid)
    idx = [w.index for w in ws]
    assert idx == sorted(set(idx)) and len(ws) + st["dropped"] == 6
    assert st["windows"] == len(ws)
    # the resumed compressor's counters continue the old ones (restored from the store's state)
    assert st["tokens"]["audio"]["in"] == sum(w.fields["audio_in"] for w in ws)
    assert st["tokens"]["video"]["kept"] == sum(w.fields["video_kept"] for w in ws)
    ray.get(svc.delete_stream.remote(sid))


def test_lookahead_stream_is_complete_and_in_order(svc: Any) -> None:
    import ray
    sid = ray.get(svc.create_stream.remote({"source": lavfi(10), "backpressure": True, "lookahead": 2}))["id"]
    st = wait(svc, sid, ended, 120, "the end")
    assert st["status"] == "ended" and st["dropped"] == 0
    ws = store().windows(sid)
    assert [w.index for w in ws] == list(range(5)) == list(range(st["windows"]))
    assert [w.media_end for w in ws] == pytest.approx([2.0, 4.0, 6.0, 8.0, 10.0])
    assert st["tokens"]["audio"]["in"] == 5 * 50 and 0 < st["tokens"]["video"]["kept"] < st["tokens"]["video"]["in"]
    ray.get(svc.delete_stream.remote(sid))
