"""The ingest actor: one per stream, the producer of the engine's pipeline.

It reads the stream's source into 2-s AVWindows (PyAV, pipeline.windows) on a thread and hands
each to the stream's encoder worker as a RawWindow, waiting while a backpressure stream's queue
is full. The stream's status lives here while the source runs: starting -> live (-> reconnecting
-> live) -> ended | failed; the final figures go into the stream's record when it is done.
No torch import: ingestion stays light.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import ray

from pipeline.messages import RawWindow
from pipeline.metrics import get_metrics
from pipeline.queues import Added
from pipeline.records import StreamRecord
from pipeline.runtime import StoreRef
from pipeline.stats import IngestStats
from pipeline.store import StreamNotFound

__all__ = ["IngestActor"]

log = logging.getLogger(__name__)

SILENT_S = 6.0  # a live source silent for three windows is being reconnected


class IngestActor:
    """Reads one source into AVWindows and submits each to the stream's encoder worker."""

    def __init__(self, record: StreamRecord, worker: Any, store: StoreRef, policy: Any = None) -> None:
        self.rec = record
        self.policy = policy  # pipeline.source_policy.SourcePolicy: checked on open and every reconnect
        self.sid = record.id
        self.worker = worker
        self.store = store.connect()
        self.metrics = get_metrics()
        self.st = IngestStats()
        self.last_arrival: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"ingest-{self.sid}", daemon=True)
        self._thread.start()

    def _set_status(self, status: str, error: str | None = None) -> None:
        self.st.status, self.st.error = status, error
        changes: dict[str, Any] = {"status": status, "error": error}
        if status in ("ended", "failed"):  # the record keeps the final figures once this actor is gone
            changes["ingest"] = {**self.st.to_dict(), "done": True}
        try:
            self.store.update_stream(self.sid, changes)
        except StreamNotFound:
            self._stop.set()
        except Exception:  # the status in the store is informative; never fail ingestion for it
            log.exception("stream %s: could not record status %s", self.sid, status)

    def _run(self) -> None:
        from pipeline.sources import Source
        from pipeline.windows import iter_windows

        rec = self.rec
        try:
            src = Source(rec.source, rec.options, policy=self.policy)
            self.st.live = bool(src.live or rec.realtime)
            it = iter_windows(src, realtime=rec.realtime, size=rec.size)
            prev = time.time()
            for w in it:
                now = time.time()
                if self._stop.is_set():
                    break
                self._observe(w, now, prev)
                if self.st.status != "live":
                    self._set_status("live")
                self._submit(RawWindow(self.sid, w, self.st.t0, now, rec.backpressure))
                prev = time.time()
            src.close()
            if not self._stop.is_set():
                ray.get(self.worker.finish.remote(self.sid), timeout=120)
                self._set_status("ended")
        except Exception as exc:  # a failing stream never takes another down: it reports and stops
            log.warning("stream %s failed: %s", self.sid, exc)
            self._set_status("failed", f"{type(exc).__name__}: {exc}")
        finally:
            self.st.done = True

    def _observe(self, w: Any, now: float, prev: float) -> None:
        """Advance the live clock and the counters with one window."""
        st = self.st
        if st.live:
            st.t0 = now - w.end if st.t0 is None else min(st.t0, now - w.end)
            self.metrics.observe_stage("decode", max(0.0, now - (st.t0 + w.end)))
        else:
            self.metrics.observe_stage("decode", max(0.0, now - prev))
        for _ in range(w.reconnects - st.reconnects):
            self.metrics.reconnect("source", self.sid)
        st.reconnects = max(st.reconnects, w.reconnects)
        st.windows_total += 1
        st.media_s = w.end
        st.last_index = w.index
        self.last_arrival = now

    def _submit(self, item: RawWindow) -> None:
        try:
            while ray.get(self.worker.submit.remote(item), timeout=120) == Added.FULL and not self._stop.is_set():
                time.sleep(0.05)  # backpressure: the worker's queue for this stream is full
        except Exception as exc:  # the worker is gone for good: the window is lost, counted
            log.warning("stream %s: window %d not accepted by its encoder worker: %s", self.sid, item.index, exc)
            self.st.drops["error"] = self.st.drops.get("error", 0) + 1
            self.metrics.drop_window(self.sid, "error")

    def stats(self) -> IngestStats:
        st = IngestStats(**{**self.st.__dict__, "drops": dict(self.st.drops)})
        if st.status == "live" and st.live and not st.done and self.last_arrival is not None \
                and time.time() - self.last_arrival > SILENT_S:
            st.status = "reconnecting"
        return st

    def stop(self) -> bool:
        self._stop.set()
        return True
