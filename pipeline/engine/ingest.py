"""The ingest actor: one per stream, the producer of the engine's pipeline, supervised by Ray.

It reads the stream's source into 2-s AVWindows (PyAV, pipeline.sources.windows) on a thread and hands
each to the stream's encoder worker as a RawWindow, waiting while a backpressure stream's queue
is full. The stream's status lives here while the source runs: starting -> live (-> reconnecting
-> live) -> ended | failed; its progress is written to the stream's record with every window.

No accepted window is lost to a crash:
- this actor restarts on death (Ray re-runs ``__init__``): it reloads its progress from the
  record and resumes a finite source at the first window not yet durable in the store
  (decoded but not resent, unpaced), a live source by reconnecting, its windows numbered on from
  where the stream was and the first one flagged as a discontinuity;
- it keeps every window it sent until the encoder reports it durable (stored, or held in the
  stored method state); when the encoder is a new incarnation (it restarted), those windows are
  resent in order before anything new.
The stream's encoder worker is the one its record names (``worker``, an index into the engine's
pool, pipeline.core.pool): when the engine moves the stream (a worker joined, left or was lost) this
actor is told, or finds out from a ``moved`` reply or a dead worker, and re-reads the record; the
new worker continues from the store like a restarted one.
A stream is ``failed`` only when its source fails by its own reconnect policy. No torch import.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from typing import Any

import ray

from pipeline.core.messages import RawWindow, SubmitReply
from pipeline.metrics import get_metrics
from pipeline.core.queues import Added
from pipeline.core.records import StreamRecord
from pipeline.engine.runtime import ActorNames, StoreRef, lookup
from pipeline.core.stats import IngestStats
from pipeline.engine.realtime_ingest import RealtimeIngest
from pipeline.sources.push_settings import PushSettings

__all__ = ["IngestActor"]

log = logging.getLogger(__name__)

SILENT_S = 6.0  # a live source silent for three windows is being reconnected
WORKER_WAIT_S = 120.0  # how long a window waits for a restarting encoder before it is counted lost


class IngestActor(RealtimeIngest):  # a realtime session's media: pipeline.engine.realtime_ingest
    """Reads one source into AVWindows and submits each to the stream's encoder worker."""

    def __init__(self, record: StreamRecord, names: ActorNames, store: StoreRef, policy: Any = None,
                 retain: int = 32, push: PushSettings | None = None) -> None:
        self.sid = record.id
        self.names = names
        self.store = store.connect(fail_fast=True)  # progress is informative: never stall the source on it
        self.policy = policy  # pipeline.sources.policy.SourcePolicy: checked on open and every reconnect
        self.metrics = get_metrics()
        self.rec = self._latest(record)
        self.st = IngestStats.from_dict(self.rec.extra.get("progress"))  # a restarted actor continues
        self._live_recorded = False  # the record says "live" (written once, then progress notes only)
        self.st.status, self.st.done = ("starting" if self.st.windows_total == 0 else "reconnecting"), False
        self.resume_at = 0  # set by _resume on the thread, once the store has told where the stream is
        self.worker_index = self.rec.worker
        self.worker: Any = None  # resolved by name on first use (pipeline.engine.runtime.lookup)
        self.retained: deque[RawWindow] = deque(maxlen=max(4, int(retain)))
        self.incarnation: str | None = None
        self.last_arrival: float | None = None
        self._session_reconnects = 0  # reconnects of this actor's own Source (the record holds the total)
        self._stop = threading.Event()
        self.push: Any = None  # a push stream's PushSource and its WebRTC receiver, ready before the thread
        self.receiver: Any = None
        if push is not None:
            self._start_push(push)
        self._thread = threading.Thread(target=self._run, name=f"ingest-{self.sid}", daemon=True)
        self._thread.start()

    def _latest(self, record: StreamRecord) -> StreamRecord:
        try:
            return StreamRecord.from_dict(self.store.get_stream(self.sid))
        except Exception:  # the store is away: the record we were started with
            return record

    def _resume(self) -> None:
        """Where this incarnation continues: after the newest durable window, read from the store
        (waiting for it while it is away: a guess of 'nothing yet' would number a live source
        from 0 again, and the encoder would refuse those windows as duplicates). The progress is
        read again too: the store may have been away when the actor started."""
        self.resume_at = durable_through(self.store, self.sid, self._stop) + 1
        rec = self._latest(self.rec)
        if rec is not self.rec:
            self.rec = rec
            st = IngestStats.from_dict(rec.extra.get("progress"))
            st.status = "starting" if st.windows_total == 0 else "reconnecting"
            self.st = st
        if self.resume_at > 0 and not _live_source(self.rec.source):  # a file's windows read but not
            self.st.windows_total = min(self.st.windows_total, self.resume_at)  # durable are read again

    # -- status --
    def _set_status(self, status: str, error: str | None = None) -> None:
        self.st.status, self.st.error = status, error
        changes: dict[str, Any] = {"status": status, "error": error, "progress": self.st.to_dict()}
        if status in ("ended", "failed"):  # the record keeps the final figures once this actor is gone
            changes["ingest"] = {**self.st.to_dict(), "done": True}
            changes["ended_at"] = time.time()  # the ended-streams retention counts from here
        self._record(changes)

    def _note_progress(self) -> None:
        try:
            self.store.note_progress(self.sid, self.st.to_dict())
        except Exception:  # informative only, as _record
            log.debug("stream %s: could not note its progress", self.sid)

    def _record(self, changes: dict[str, Any]) -> bool:
        try:
            self.store.update_stream(self.sid, changes)
            return True
        except Exception:  # the store away or emptied (the service writes the registry back); a
            # deleted stream's actor is stopped by the service. Informative only: never fail for it.
            log.warning("stream %s: could not record its progress", self.sid)
            return False

    # -- the source --
    def _run(self) -> None:
        from pipeline.sources.source import Source
        from pipeline.sources.windows import iter_windows

        try:
            self._resume()
            if self._stop.is_set():
                return
            rec = self.rec
            src = self.push if self.push is not None else Source(rec.source, rec.options, policy=self.policy)
            src.open()
            self.st.live = bool(src.live or rec.realtime)
            self.st.duration_s = src.duration_s()  # a file read again counts its errors again; live adds
            errors0 = self.st.decode_errors if src.live else 0
            resumed = self.resume_at > 0
            if resumed and self.st.live:  # the live clock starts again: lag_s is behind live now, not
                self.st.t0 = None  # behind a clock that still counts the outage
            # a finite source fast-forwards to where the stream was; a live one starts afresh and
            # its windows are numbered on from there
            skip = self.resume_at if (resumed and not src.live) else 0
            shift = self.resume_at if (resumed and src.live) else 0
            prev = time.time()
            for w in iter_windows(src, realtime=rec.realtime, size=rec.size, skip_windows=skip):
                if self._stop.is_set():
                    break
                if shift:
                    w = _shifted(w, shift, first=w.index == 0)
                now = time.time()
                self.st.decode_errors = errors0 + src.decode_errors
                self._observe(w, now, prev)
                if self.st.status != "live" or not self._live_recorded:  # the record says live once
                    self.st.status = "live"
                    self._live_recorded = self._record({"status": "live", "error": None,
                                                        "progress": self.st.to_dict()})
                else:  # then each window's progress is one blind write beside the record
                    self._note_progress()
                self._submit(RawWindow(self.sid, w, self.st.t0, now, rec.backpressure))
                prev = time.time()
            src.close()
            self.st.decode_errors = errors0 + src.decode_errors
            if not self._stop.is_set():
                self._finish()
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
            t0 = now - w.end
            st.t0 = t0 if st.t0 is None else min(st.t0, t0)
            self.metrics.observe_stage("decode", max(0.0, now - (st.t0 + w.end)))
        else:
            self.metrics.observe_stage("decode", max(0.0, now - prev))
        new_reconnects = w.reconnects - self._session_reconnects
        for _ in range(max(0, new_reconnects)):
            self.metrics.reconnect("source", self.sid)
        st.reconnects += max(0, new_reconnects)
        self._session_reconnects = max(self._session_reconnects, w.reconnects)
        st.windows_total += 1
        st.media_s = w.end
        st.last_index = w.index
        self.last_arrival = now

    # -- the hand-over --
    def _submit(self, item: RawWindow) -> None:
        """Send one window; after an encoder restart or a move, first resend what it had not made durable."""
        self.retained.append(item)
        reply = self._resend_if_new(self._send(item))
        if reply is None:  # the encoder did not come back in time: the window is lost, counted
            self.st.drops["error"] = self.st.drops.get("error", 0) + 1
            self.metrics.drop_window(self.sid, "error")
            return
        self._settle(reply)

    def _resend_if_new(self, reply: SubmitReply | None) -> SubmitReply | None:
        """While the encoder answers RESTARTED (a new incarnation: restarted, or the worker the
        stream moved to), resend, in order, the retained windows after its durable point."""
        while reply is not None and reply.added == SubmitReply.RESTARTED:
            self.incarnation = reply.incarnation
            log.warning("stream %s: new encoder incarnation; resending windows after %d", self.sid,
                        reply.durable_through)
            pending = [w for w in self.retained if w.index > reply.durable_through]
            reply = SubmitReply(Added.OK, reply.incarnation, reply.durable_through)
            for old in pending:
                reply = self._send(old)
                if reply is None or reply.added == SubmitReply.RESTARTED:
                    break
        return reply

    def _settle(self, reply: SubmitReply) -> None:
        self.incarnation = reply.incarnation
        while self.retained and self.retained[0].index <= reply.durable_through:
            self.retained.popleft()

    def _send(self, item: RawWindow) -> SubmitReply | None:
        """One submit, waiting while the stream's queue is full (backpressure) or its encoder is
        restarting or being changed; None if no encoder takes it within WORKER_WAIT_S."""
        deadline = time.monotonic() + WORKER_WAIT_S
        while not self._stop.is_set():
            try:
                reply = ray.get(self._worker().submit.remote(item, self.incarnation), timeout=60)
            except Exception as exc:  # the encoder died or left: Ray restarts it, or the engine moves
                # the stream; keep the window meanwhile and ask the record where the stream is now
                if time.monotonic() > deadline:
                    log.warning("stream %s: window %d: encoder unavailable: %s", self.sid, item.index, exc)
                    return None
                time.sleep(0.5)
                self._follow_record()
                continue
            if reply.added == Added.FULL:
                time.sleep(0.05)
                continue
            if reply.added == SubmitReply.MOVED:  # handed to another worker: the record says which
                time.sleep(0.1)
                self._follow_record()
                continue
            return reply
        return None

    def _worker(self) -> Any:
        if self.worker is None:
            self.worker = lookup(self.names.encoder(self.worker_index))  # ValueError while it is gone
        return self.worker

    def _follow_record(self) -> None:
        """Re-read which worker the stream's record names (the engine moved it, or the old one is gone)."""
        try:
            self.retarget(StreamRecord.from_dict(self.store.get_stream(self.sid)).worker)
        except Exception:  # the store is away: try the same worker again
            pass

    def _finish(self) -> None:
        """Tell the stream's worker the source ended (its lookahead is flushed), after resending
        what a restarted or new worker lacks; follows a move."""
        deadline = time.monotonic() + WORKER_WAIT_S
        while time.monotonic() < deadline and not self._stop.is_set():
            try:
                reply = ray.get(self._worker().finish.remote(self.sid, self.incarnation), timeout=60)
            except Exception:
                time.sleep(0.5)
                self._follow_record()
                continue
            if reply.added == SubmitReply.RESTARTED:
                reply = self._resend_if_new(reply)
                if reply is not None:
                    self._settle(reply)
                continue
            if reply.added == SubmitReply.MOVED:
                time.sleep(0.1)
                self._follow_record()
                continue
            return
        if not self._stop.is_set():
            raise TimeoutError(f"no encoder worker took the end of stream {self.sid}")

    def retarget(self, worker_index: int) -> bool:
        """The engine moved the stream to pool member ``worker_index``: windows go there from the
        next one on (it answers ``restarted``, so what was not durable is resent first)."""
        if worker_index != self.worker_index:
            self.worker_index, self.worker = int(worker_index), None
        return True

    # -- a push stream's publisher (pipeline.sources.push, pipeline.sources.webrtc) --
    def _start_push(self, settings: PushSettings) -> None:
        if (self.rec.extra.get("push") or {}).get("protocol") == "realtime":  # a socket appends, no WebRTC
            self._start_realtime(settings)
            return
        from pipeline.sources.ice import IceRules
        from pipeline.sources.push import PushSource
        from pipeline.sources.webrtc import WebRTCReceiver

        self.push = PushSource(self.rec.source, self.rec.options, wait_s=settings.wait_s, grace_s=settings.grace_s)
        self._pushed = {"decoded": 0, "kept": 0, "dropped": 0}
        self.receiver = WebRTCReceiver(self.push, IceRules(self.policy, settings.addresses), settings.servers,
                                       settings.announce, on_stats=self._push_stats, on_failure=self.metrics.push_failure)

    def publish(self, offer: bytes) -> dict[str, str]:
        """A publisher's SDP offer -> {"sdp": answer, "session": id}; PushRefused (413, 400
        naming the problem, 409 while another publisher is connected or the stream is over)."""
        from pipeline.errors import PushRefused
        from pipeline.sources.sdp import check_offer

        if self.receiver is None:
            raise PushRefused(400, "this stream is not a push stream", "stream_id")
        if self.st.done or self._stop.is_set():
            raise PushRefused(409, "the stream has ended; create a new one", "stream_id")
        checked = check_offer(offer, self.policy)
        if checked.removed:
            log.info("stream %s: offer candidates refused: %s", self.sid, "; ".join(checked.removed)[:500])
        answer, session = self.receiver.publish(checked)
        self.metrics.push_publisher(self.sid, True)
        return {"sdp": answer, "session": session}

    def unpublish(self, session: str) -> bool:
        """End the publisher's session (WHIP DELETE); False when it is not this stream's."""
        return self.receiver is not None and isinstance(session, str) and self.receiver.unpublish(session)

    def _push_stats(self, transport: dict[str, int]) -> None:
        p = self.push.stats
        self.metrics.push_received(self.sid, transport["packets"], transport["bytes"], transport["lost"])
        self.metrics.push_publisher(self.sid, p.connected)
        now = {"decoded": p.frames_in, "kept": p.frames_kept, "dropped": p.frames_dropped}
        for outcome, n in now.items():
            self.metrics.push_frames(self.sid, outcome, max(0, n - self._pushed[outcome]))
        self._pushed = now

    # -- queries --
    def stats(self) -> IngestStats:
        st = dataclasses.replace(self.st, drops=dict(self.st.drops))
        if self.push is not None:
            st.push = self.push.stats.to_dict()
        if st.status == "live" and st.live and not st.done and self.last_arrival is not None \
                and time.time() - self.last_arrival > SILENT_S:
            st.status = "reconnecting"
        return st

    def stop(self) -> bool:
        self._stop.set()
        if self.push is not None:
            self.push.stop()
            if self.receiver is not None:
                self.receiver.close()
        return True


def durable_through(store: Any, sid: str, stop: threading.Event, first_wait_s: float = 0.2,
                    max_wait_s: float = 5.0) -> int:
    """Newest window index already in the store (a window, or the compressor state), -1 if
    none. A failed read is retried with backoff until the store answers or ``stop`` is set
    (then -1: the actor is being stopped and numbers nothing)."""
    wait, warned = first_wait_s, False
    while True:
        try:
            last = store.last_window_index(sid)
            state = store.load_state(sid)
            return max(-1 if last is None else int(last), -1 if state is None else int(state.index))
        except Exception as exc:
            if not warned:
                log.warning("stream %s: cannot read where the stream is (%s); waiting for the store", sid,
                            type(exc).__name__)
                warned = True
        if stop.wait(wait):
            return -1
        wait = min(2 * wait, max_wait_s)


def _live_source(source: str) -> bool:
    """Whether the source cannot be read again from the start (a camera, a live URL)."""
    from pipeline.sources.spec import classify

    try:
        return bool(classify(source).live)
    except Exception:
        return True


def _shifted(w: Any, by: int, first: bool) -> Any:
    """A live window renumbered ``by`` windows on (a restarted ingest continues the timeline);
    the first one after the restart is flagged: the outage is a hole in the stream."""
    span = w.end - w.start
    return dataclasses.replace(w, index=w.index + by, start=w.start + by * span, end=w.end + by * span,
                               frame_times=w.frame_times + by * span, frame_pts=w.frame_pts + by * span,
                               discontinuity=w.discontinuity or first)
