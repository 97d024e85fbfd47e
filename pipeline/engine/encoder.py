"""The encoder worker: the model runner of the engine. A stream is on one worker at a time (its
record's ``worker``, an index into the engine's elastic pool, pipeline.core.pool); windows
of several streams are batched into one ``encode_windows`` call, each window is compressed by
its stream's compression method (omnizip.METHODS) and written to the store together with the
method's state, then sent to the stream's decoder.

One step of the loop is take -> run -> emit: the scheduler (pipeline.core.queues) hands out a
round-robin batch (dropping or flagging ``harder`` what fell behind live), the model encodes it,
and the finished windows are stored and forwarded. A restarted worker resumes each stream's
compressor from the state stored with its last window, and so does the worker a stream is
moved to (``release`` on the old one makes everything it accepted durable first).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ray

from pipeline.viz import window as window_viz
from pipeline.core.config import ServiceConfig
from pipeline.core.messages import CompressedItem, RawWindow, SubmitReply, Timing
from pipeline.metrics import get_metrics
from pipeline.core.stage import StageCore
from pipeline.core.queues import Added, StreamQueues, Taken
from pipeline.core.records import StreamRecord
from pipeline.engine.runtime import ActorNames, StoreRef, lookup, resolve_device, use_threads
from pipeline.core.stats import EncoderStats, TokenCounts
from pipeline.store.contract import StreamNotFound
from pipeline.store.writer import PendingWrite, StoreWriter

if TYPE_CHECKING:
    from omnizip.methods import CompressionMethod
    from omnizip.models import EncodedWindow

__all__ = ["EncoderWorker"]

log = logging.getLogger(__name__)



@dataclass
class _Pending:
    """An encoded window held back by the method's lookahead, with its timing."""

    enc: EncodedWindow
    timing: Timing
    raw: Any = None  # pipeline.viz.window.RawSide: what its picture needs of the raw window


@dataclass
class _Stream:
    """A stream as its encoder worker sees it."""

    method: CompressionMethod
    decoder: int
    backpressure: bool = False
    pending: list[_Pending] = field(default_factory=list)
    stats: EncoderStats = field(default_factory=EncoderStats)
    restored: bool = False  # resumed from the store: windows lost with the old worker are counted once
    ending: bool = False  # the source ended: flush the windows held back by the lookahead


_MOVED = object()  # _stream's answer for a stream whose record names another worker


class EncoderWorker:
    """Encodes and compresses windows of the streams pinned to it, several streams per batch."""

    def __init__(self, name: str, config: ServiceConfig, store: StoreRef) -> None:
        from omnizip.models import load_model

        use_threads(config.torch_threads)
        self.name = name
        self.index = int(name.rsplit("-", 1)[1])  # its place in the pool, as stream records name it
        self.cfg = config
        self.names = ActorNames.of(config)
        self._decoders: dict[int, Any] = {}  # pool index -> handle, looked up by name
        self._backlogs: dict[str, Any] = {}  # stream -> the decoder's latest answer about its backlog (ObjectRef)
        self.store = store.connect()
        self.metrics = get_metrics()
        self.device = resolve_device(config.device)
        self.model = load_model(config.model, self.device, config.dtype)
        self.queues: StreamQueues[RawWindow] = StreamQueues(config.queue_policy("encoder"),
                                                            on_drop=lambda sid, i, why: self.metrics.drop_window(sid, why))
        self.streams: dict[str, _Stream] = {}
        self.cond = threading.Condition()
        self.batches = 0
        self.incarnation = uuid.uuid4().hex  # a restarted worker is another incarnation
        self.writer = StoreWriter(self.store, config.store_buffer_windows, self._on_durable, self._on_unstored,
                                  lambda sid: self.metrics.reconnect("redis", sid))
        # take -> run -> update (pipeline.core.stage); ended streams' held-back windows flushed after each take
        self.core: StageCore[RawWindow] = StageCore(name, self.queues, self.cond, config.max_batch, self._run_batch,
                                                    before=self._flush_ended, gauge=self._gauge,
                                                    wake=lambda: any(s.ending for s in self.streams.values()))
        threading.Thread(target=self.core.run_forever, name=f"{name}-loop", daemon=True).start()

    # -- intake --
    @ray.method(concurrency_group="intake", max_task_retries=0)
    def submit(self, item: RawWindow, expect: str | None = None) -> SubmitReply:
        """Queue a window under the stream's queue policy (pipeline.core.queues). ``expect``: the
        incarnation the producer last spoke to; another one (this worker restarted) answers
        RESTARTED without queueing, so the producer resends, in order, what was not durable.
        Not retried by Ray: a producer must learn that its worker died. A backpressure stream
        is also told FULL while its decoder holds a full queue of its windows, so a slow decoder
        holds back the file instead of queueing without bound."""
        if item.backpressure and self._decoder_full(item.stream_id):
            return self._reply(item.stream_id, Added.FULL)
        with self.cond:
            st = self._stream(item.stream_id)
            if st is None:
                return SubmitReply(Added.UNKNOWN, self.incarnation, -1)
            if st is _MOVED:
                return SubmitReply(SubmitReply.MOVED, self.incarnation, -1)
            if expect is not None and expect != self.incarnation:
                return self._reply(item.stream_id, SubmitReply.RESTARTED)
            if st.restored:  # windows the producer could not resend: never compressed, counted here
                st.restored = False
                for lost in range(self.queues.high_water(item.stream_id) + 1, item.index):
                    self.queues.drop(item.stream_id, lost, "error")
            added = self.queues.add(item)
            if added == Added.DUPLICATE:  # refused as seen before: a producer numbering from an old
                st.stats.duplicates += 1  # point loses these windows; counted, shown in the status
                log.warning("%s: stream %s window %d refused as a duplicate", self.name, item.stream_id, item.index)
            self._gauge()
            self.cond.notify()
        return self._reply(item.stream_id, added)

    def _reply(self, sid: str, added: str) -> SubmitReply:
        st = self.streams.get(sid)
        return SubmitReply(str(getattr(added, "value", added)), self.incarnation,
                           st.stats.durable if st is not None else -1)

    def _decoder_full(self, sid: str) -> bool:
        """Whether the stream's decoder holds a full queue of its windows, from the decoder's
        latest answer (the reply to the last push, or a backlog query made only while it was
        full): never a synchronous call to the decoder per window. An answer not back yet means
        the decoder has not taken the last window: full, for now."""
        st = self.streams.get(sid)
        ref = self._backlogs.get(sid)
        if st is None or ref is None:
            return False
        if not ray.wait([ref], timeout=0)[0]:
            return True
        try:
            backlog = ray.get(ref)  # ready: read locally, no call to the decoder
        except Exception:  # a decoder being restarted or moved: let the window through (it will be queued)
            self._decoders.pop(st.decoder, None)
            self._backlogs.pop(sid, None)
            return False
        if backlog < self.cfg.queue_windows:
            return False
        try:  # ask again, without waiting: the next submit reads the answer
            self._backlogs[sid] = self._decoder(st.decoder).backlog.remote(sid)
        except Exception:
            self._backlogs.pop(sid, None)
        return True

    @ray.method(concurrency_group="intake", max_task_retries=-1)
    def finish(self, stream_id: str, expect: str | None = None) -> SubmitReply:
        """The stream's source ended: windows held back by its lookahead are flushed after its
        queue. Answered like ``submit``: RESTARTED (another incarnation than ``expect``: resend
        what is not durable, then finish again), MOVED, UNKNOWN, or OK."""
        with self.cond:
            st = self._stream(stream_id)
            if st is None:
                return SubmitReply(Added.UNKNOWN, self.incarnation, -1)
            if st is _MOVED:
                return SubmitReply(SubmitReply.MOVED, self.incarnation, -1)
            if expect is not None and expect != self.incarnation:
                return self._reply(stream_id, SubmitReply.RESTARTED)
            st.ending = True
            self.cond.notify()
        return self._reply(stream_id, Added.OK)

    def _stream(self, sid: str) -> Any:
        """The stream's state; first sight (a new stream, a restarted worker, a stream moved here)
        loads its settings and the method's state from the store. None when the store does not
        know the stream; ``_MOVED`` when its record names another worker."""
        st = self.streams.get(sid)
        if st is not None or self.queues.was_forgotten(sid):
            return st
        from omnizip.codec import decode
        from omnizip.models import EncodedWindow

        try:
            rec = StreamRecord.from_dict(self.store.get_stream(sid))
        except StreamNotFound:
            return None
        if rec.worker != self.index:
            return _MOVED
        s = rec.settings
        st = _Stream(s.method_spec().build(), rec.decoder, rec.backpressure)
        st.stats.decoder = rec.decoder
        saved = self.store.load_state(sid)
        done_through = -1
        if saved is not None:  # a restarted worker: continue where the last one stopped
            state = decode(saved.data)
            st.method.load_state_dict(state["compressor"])
            st.pending = [_Pending(EncodedWindow(**p["enc"]), Timing(**p["timing"])) for p in state["pending"]]
            done_through = st.stats.last_pushed = st.stats.durable = int(state["last_pushed"])
            last = self.store.last_window_index(sid)
            st.stats.last_stored = -1 if last is None else int(last)
            st.stats.harder = int(state["harder"])
            st.stats.tokens = TokenCounts(**state["tokens"])
            st.restored = True
            self._count_resume(sid, rec)
        self.queues.open(sid, done_through)
        if saved is not None:
            self.queues.restore_drops(sid, state["drops"])
        self.streams[sid] = st
        return st

    def _count_resume(self, sid: str, rec: StreamRecord) -> None:
        """A stream resumed from the store: after a restart (omnizip_reconnects{component="actor"}),
        or moved here by the engine (not a fault: counted as component="move")."""
        if rec.extra.get("moved_worker") == self.index:
            self.metrics.reconnect("move", sid)
            try:
                self.store.update_stream(sid, {"moved_worker": None})
            except Exception:  # informative only
                pass
        else:
            self.metrics.reconnect("actor", sid)

    # -- the loop: take -> run -> emit --
    def _run_batch(self, batch: list[Taken[RawWindow]]) -> None:
        t = time.perf_counter()
        # a missing track is empty, not silence or black: audio-only and video-only sources
        wins = [(w.audio if w.has_audio else None, w.frames if w.has_video else None)
                for w in (b.window.window for b in batch)]
        encoded = self.model.encode_windows(wins, [b.window.index for b in batch])
        dt = time.perf_counter() - t
        self.batches += 1
        self.metrics.observe_batch(len(batch))
        for b, enc in zip(batch, encoded):
            self.metrics.observe_stage("encode", dt)
            item = b.window
            st = self.streams.get(item.stream_id)
            if st is None:
                continue  # deleted meanwhile
            try:
                self._compress(item, st, enc, b.harder)
            except StreamNotFound:
                continue
            except Exception as exc:
                log.exception("%s: stream %s window %d failed: %s", self.name, item.stream_id, item.index, exc)
                self.queues.drop(item.stream_id, item.index, "error")

    def _compress(self, item: RawWindow, st: _Stream, enc: Any, harder: bool) -> None:
        t = time.perf_counter()
        outs = st.method.push(enc.audio, enc.audio_scores, enc.video, harder=harder)
        st.pending.append(_Pending(enc, item.timing, window_viz.raw_side(item.window, int(enc.video.shape[0]))))
        if item.window.final:
            outs += st.method.flush()
        st.stats.last_pushed = item.index
        self.metrics.observe_stage("compress", time.perf_counter() - t)
        self._emit(item.stream_id, st, outs, pushed=item.index)

    def _flush_ended(self) -> None:
        with self.cond:
            ended = [(sid, st) for sid, st in self.streams.items()
                     if st.ending and not self.queues.depth(sid) and not self.queues.in_flight(sid)]
            for _, st in ended:
                st.ending = False
        for sid, st in ended:
            try:
                self._emit(sid, st, st.method.flush(), pushed=None)
            except StreamNotFound:
                continue
            except Exception:
                log.exception("%s: flushing stream %s failed", self.name, sid)
                self.queues.drop(sid, st.stats.last_pushed, "error")

    def _emit(self, sid: str, st: _Stream, outs: list, pushed: int | None) -> None:
        """Count, store (with the method's state after them) and send on the finished windows."""
        from omnizip.codec import encode
        from omnizip.models import compress_with

        done = []
        for o in outs:
            p = st.pending.pop(0)
            cw = compress_with(p.enc, o)
            st.stats.tokens.add(cw)
            st.stats.harder += int(o.harder)
            self.metrics.record_window(sid, {"audio": cw.audio_in, "video": cw.video_in},
                                       {"audio": cw.audio_kept, "video": cw.video_kept})
            extra, picture = window_viz.window_record(p.enc, o, p.raw, p.timing)  # flags; stored with it
            done.append((cw, p.timing, bool(o.harder), extra, picture))
        state = encode(self._state(sid, st))  # after these windows: travels with their store write
        if not done:
            if pushed is not None:
                self.writer.write(PendingWrite(sid, pushed, None, state=state, covers=pushed))
            return
        for k, (cw, timing, harder, extra, picture) in enumerate(done):
            fields = {"audio_in": cw.audio_in, "audio_kept": cw.audio_kept, "video_in": cw.video_in,
                      "video_kept": cw.video_kept, "harder": harder, "t0": timing.t0, **extra}
            payload = cw.to_bytes()
            last = k == len(done) - 1  # the state written with it covers every window pushed so far
            self.writer.write(PendingWrite(sid, cw.index, payload, timing.start, timing.end, fields,
                                           state if last else None, st.stats.last_pushed if last else None,
                                           None if picture is None else {window_viz.VIZ_KIND: picture}))
            st.stats.last_stored = cw.index
            try:
                reply = self._decoder(st.decoder).push.remote(CompressedItem(sid, cw.index, timing, payload, st.backpressure))
                if st.backpressure:
                    self._backlogs[sid] = reply  # the decoder's backlog rides on the reply
            except Exception:  # the decoder left the pool: the one the stream moves to reads the store
                self._decoders.pop(st.decoder, None)

    def _decoder(self, index: int) -> Any:
        """Decoder ``index`` of the engine's pool, looked up by name once (ValueError while gone)."""
        h = self._decoders.get(index)
        if h is None:
            h = self._decoders[index] = lookup(self.names.decoder(index))
        return h

    def _on_durable(self, sid: str, covers: int) -> None:
        with self.cond:
            st = self.streams.get(sid)
            if st is not None:
                st.stats.durable = max(st.stats.durable, covers)

    def _on_unstored(self, sid: str, index: int) -> None:
        log.error("%s: stream %s window %d dropped from the store buffer (store away too long)", self.name, sid, index)
        with self.cond:
            self.queues.drop(sid, index, "unstored")

    def _state(self, sid: str, st: _Stream) -> dict:
        return {"compressor": st.method.state_dict(), "last_pushed": st.stats.last_pushed, "harder": st.stats.harder,
                "tokens": dataclasses.asdict(st.stats.tokens), "drops": self.queues.drops(sid),
                "pending": [{"enc": {f.name: getattr(p.enc, f.name) for f in dataclasses.fields(p.enc)},
                             "timing": dataclasses.asdict(p.timing)} for p in st.pending]}

    def _gauge(self) -> None:
        self.metrics.set_queue_depth(f"encoder:{self.name}", self.queues.depth())

    # -- control --
    def redirect(self, stream_id: str, decoder: int) -> bool:
        """The stream's context moved to decoder ``decoder``: send its next windows there."""
        with self.cond:
            st = self.streams.get(stream_id)
            if st is None:
                return False
            st.decoder = st.stats.decoder = int(decoder)
            self._backlogs.pop(stream_id, None)  # the old decoder's answer says nothing of the new one
        return True

    def release(self, stream_id: str, timeout_s: float = 30.0) -> int:
        """Hand the stream over (its record already names the worker it moves to): windows still
        queued are dropped uncounted (the producer holds them until durable and resends them to
        the new worker), the batch in flight finishes, the store writes land; then the stream is
        unloaded here. Returns the newest index whose effects are durable."""
        deadline = time.monotonic() + timeout_s
        with self.cond:
            st = self.streams.get(stream_id)
            if st is None:
                return -1
            self.queues.clear(stream_id)
            while self.queues.in_flight(stream_id) and time.monotonic() < deadline:
                self.cond.wait(0.05)
        while self.writer.waiting(stream_id) and time.monotonic() < deadline:
            time.sleep(0.05)
        with self.cond:
            self.queues.close(stream_id)
            self.streams.pop(stream_id, None)
            self._backlogs.pop(stream_id, None)
        return st.stats.durable

    def forget(self, stream_id: str) -> bool:
        """Drop everything of a deleted stream (queue, compressor)."""
        self.writer.forget(stream_id)
        self.metrics.forget_stream(stream_id)  # this process's series of it (no re-recording)
        with self.cond:
            self.queues.forget(stream_id)
            self._backlogs.pop(stream_id, None)
            return self.streams.pop(stream_id, None) is not None

    def stats(self, stream_id: str) -> EncoderStats:
        with self.cond:
            st = self.streams.get(stream_id)
            if st is None:
                return EncoderStats()
            return dataclasses.replace(st.stats, known=True, queue=self.queues.depth(stream_id),
                                       unwritten=self.writer.waiting(stream_id),
                                       busy=self.queues.in_flight(stream_id), ending=st.ending,
                                       tokens=dataclasses.replace(st.stats.tokens), drops=self.queues.drops(stream_id))

    def health(self) -> dict:
        """Liveness and load: streams held, live windows waiting and their worst lag behind live
        (what the pool scales on; pipeline.core.pool)."""
        with self.cond:
            waiting, lag = self.queues.live_load(time.time())
            return {"name": self.name, "streams": len(self.streams), "batches": self.batches,
                    "queue": waiting, "lag_s": lag, "ok": True, "device": self.device,
                    "node": ray.get_runtime_context().get_node_id()}

    def ping(self) -> bool:
        return True
