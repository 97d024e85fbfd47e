"""The decoder actor: holds each stream's rolling context (the adapter's RollingContext, a warm KV
cache), appends compressed windows as they arrive and answers questions from it.

Its loop is take -> run -> emit like the encoder's: the scheduler (pipeline.core.queues) hands out one
window at a time round-robin over streams (dropping what fell too far behind live), the window is
prefilled into its stream's context, and the stream's lag and latency are recorded. A restarted
decoder rebuilds a stream's context from the stored windows the first time the stream is touched;
windows whose push was lost are read back from the store. A stream moved here from another
decoder of the pool (pipeline.core.pool) is rebuilt the same way; the record's ``decoder`` names the
one decoder that holds a stream's context.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ray

from pipeline.core.config import ServiceConfig
from pipeline.core.messages import AnswerEnd, AnswerStart, CompressedItem, Timing, check_question, lag_of
from pipeline.metrics import get_metrics
from pipeline.core.queues import Added, StreamQueues, Taken
from pipeline.core.stage import StageCore
from pipeline.core.records import StreamRecord
from pipeline.engine.memory import default_memory_bytes, dtype_bytes, text_kv_bytes_per_token
from pipeline.engine.rebuild import FAILED_KEY, RebuildGuard, RebuildRefused, rebuild_from_store
from pipeline.engine.runtime import NAMESPACE, ActorNames, StoreRef, resolve_device, use_threads
from pipeline.engine.spoken import SpokenQuestions
from pipeline.engine.watches import WatchRunner
from pipeline.core.stats import DecoderStats
from pipeline.errors import LimitExceeded
from pipeline.store.contract import StreamNotFound

if TYPE_CHECKING:
    from omnizip.models.rolling import RollingContext

__all__ = ["DecoderActor"]

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    """A stream's rolling context inside a decoder."""

    ctx: RollingContext
    lock: threading.Lock = field(default_factory=threading.Lock)
    last: int = -1  # newest window index in the context
    received: int = -1
    timing: Timing = Timing(0.0, 0.0, None)  # of the newest window in context
    lag_at_append: float = 0.0
    skipped: set = field(default_factory=set)  # dropped here: not to be read back from the store
    saved_drops: dict = field(default_factory=dict)  # the drop counts last written to the record
    latencies: deque = field(default_factory=lambda: deque(maxlen=2048))
    asking: int = 0  # questions answered or waiting on this stream


class DecoderActor(SpokenQuestions):  # spoken questions of realtime sessions: pipeline.engine.spoken
    """Each stream's RollingContext: appends windows, answers questions."""

    def __init__(self, name: str, config: ServiceConfig, store: StoreRef) -> None:
        from omnizip.models import load_model

        use_threads(config.torch_threads)
        self.name = name
        self.index = int(name.rsplit("-", 1)[1])  # its place in the pool, as stream records name it
        self.cfg = config
        self.store = store.connect()
        self.metrics = get_metrics()
        self.device = resolve_device(config.device)
        self.model = load_model(config.model, self.device, config.dtype)
        self.queues: StreamQueues[CompressedItem] = StreamQueues(config.queue_policy("decoder"),
                                                                 on_drop=self._on_drop)
        self.streams: dict[str, _Stream] = {}
        self.cond = threading.Condition()
        self.rebuilds = 0
        self.guard = RebuildGuard(config.rebuild_attempts)
        # what its contexts may take, and what one token of context takes (admission: pipeline.core.pool)
        self.kv_per_token = text_kv_bytes_per_token(self.model.text_config, dtype_bytes(self.model.dtype, self.device))
        self.memory_bytes = config.decoder_memory_bytes or default_memory_bytes(self.device)
        self._init_lock = threading.Lock()
        self.watch = WatchRunner(self.model, self.store, self.metrics, batch=config.watch_batch,  # standing questions
                                 max_events=config.watch_events_max, max_lag_s=config.max_lag_s,
                                 context=self._watch_context)
        # take -> run -> update (pipeline.core.stage), one window at a time; drop counts saved after each step
        self.core: StageCore[CompressedItem] = StageCore(name, self.queues, self.cond, 1, self._run,
                                                         after=self._after_step, gauge=self._gauge)
        threading.Thread(target=self.core.run_forever, name=f"{name}-loop", daemon=True).start()

    # -- streams --
    def _stream(self, sid: str) -> _Stream:
        """The stream's context, rebuilt from the store when this decoder has not seen it
        (first window, or after a restart). StreamNotFound when the stream is not registered."""
        with self._init_lock:
            st = self.streams.get(sid)
            if st is not None:
                return st
            if self.queues.was_forgotten(sid):
                raise StreamNotFound(f"no stream {sid!r}")
            from omnizip.models.rolling import RollingContext

            rec = StreamRecord.from_dict(self.store.get_stream(sid))
            if rec.decoder != self.index:  # a late push or question for a stream moved elsewhere
                raise StreamNotFound(f"stream {sid!r} is held by decoder {rec.decoder}, not {self.index}")
            if rec.extra.get(FAILED_KEY):  # its context failed for good: never rebuilt again
                raise RebuildRefused(str(rec.extra[FAILED_KEY]))
            ctx = RollingContext(self.model, budget_tokens=rec.settings.context_tokens,
                                 system_prompt=self.cfg.system_prompt)
            st = _Stream(ctx)
            if self.store.last_window_index(sid) is not None:
                self._rebuild(sid, rec, st)
            with self.cond:
                self.queues.open(sid, st.last)
                self.queues.restore_drops(sid, rec.extra.get("decoder_drops") or {})
            st.saved_drops = self.queues.drops(sid)
            self.metrics.set_context_tokens(sid, ctx.n_tokens)
            self.streams[sid] = st
            self.watch.load(sid)
            return st

    def _rebuild(self, sid: str, rec: StreamRecord, st: _Stream) -> None:
        """Stream the stored windows into the new context (pipeline.engine.rebuild), the attempt
        recorded first: a stream whose rebuilds keep killing this decoder is failed instead."""
        try:
            self.guard.begin(self.store, sid, rec.extra)
        except RebuildRefused:
            self._stop_ingest(sid)
            raise
        t = time.perf_counter()
        try:
            newest = rebuild_from_store(st.ctx, self.store, sid)
        except BaseException as exc:
            self.guard.end(self.store, sid, exc)
            raise
        self.guard.end(self.store, sid)
        self.metrics.observe_stage("prefill", time.perf_counter() - t)
        if newest is None:
            return
        st.last = st.received = newest.index
        st.timing = Timing(newest.media_start, newest.media_end, newest.fields.get("t0"))
        self.rebuilds += 1
        moved = rec.extra.get("moved_decoder") == self.index  # the engine moved it here: not a fault
        self.metrics.reconnect("move" if moved else "actor", sid)
        if moved:
            try:
                self.store.update_stream(sid, {"moved_decoder": None})
            except Exception:  # informative only
                pass

    def _stop_ingest(self, sid: str) -> None:
        """A failed stream takes no more windows: its ingest actor stops (best effort)."""
        try:
            ray.get_actor(ActorNames.of(self.cfg).ingest(sid), namespace=NAMESPACE).stop.remote()
        except Exception:  # gone already, or another engine's
            pass

    def _on_drop(self, sid: str, index: int, reason: str) -> None:
        st = self.streams.get(sid)
        if st is not None:
            st.skipped.add(index)
        self.metrics.drop_window(sid, reason)

    @ray.method(concurrency_group="intake", max_task_retries=-1)
    def push(self, item: CompressedItem) -> int:
        """Queue a compressed window under the decoder's queue policy. The reply is the stream's
        backlog here after it (-1: the stream is unknown here), so the encoder learns it from the
        replies it gets anyway instead of asking before each window of a backpressure stream."""
        try:
            st = self._stream(item.stream_id)
        except StreamNotFound:
            return -1
        with self.cond:
            added = self.queues.add(item)
            if added == Added.OK:
                st.received = max(st.received, item.index)
            self._gauge()
            self.cond.notify()
            return -1 if added == Added.UNKNOWN else self.queues.backlog(item.stream_id)

    @ray.method(concurrency_group="intake")
    def backlog(self, stream_id: str) -> int:
        """Windows of the stream waiting here (queued or being appended): what an encoder
        checks before taking more of a backpressure stream."""
        with self.cond:
            return self.queues.backlog(stream_id)

    # -- the loop: take -> run -> emit --
    def _run(self, taken: list[Taken[CompressedItem]]) -> None:
        """Append each taken window to its stream's context (a failure drops that window only)."""
        for t in taken:
            item = t.window
            st = self.streams.get(item.stream_id)
            try:
                if st is not None:
                    if self.watch.has_pending(item.stream_id):  # its watches see the context of their window
                        self._flush_watches()
                    with st.lock:
                        self._append(item.stream_id, st, item)
            except Exception:
                log.exception("%s: stream %s window %d not appended", self.name, item.stream_id, item.index)
                with self.cond:
                    self.queues.drop(item.stream_id, item.index, "error")

    def _save_drops(self) -> None:
        """Drop counts go to the stream's record, so a restarted decoder continues them."""
        for sid, st in list(self.streams.items()):
            with self.cond:
                drops = self.queues.drops(sid)
            if drops != st.saved_drops:
                try:
                    self.store.update_stream(sid, {"decoder_drops": drops})
                    st.saved_drops = drops
                except Exception:  # a deleted stream, or the store away: tried again next time
                    pass

    def _append(self, sid: str, st: _Stream, item: CompressedItem) -> None:
        from omnizip.models import CompressedWindow

        if item.index <= st.last:
            return
        todo: list[CompressedItem] = []
        if item.index > st.last + 1:  # windows whose push was lost (e.g. a restart): read them back
            for w in self.store.windows(sid, st.last + 1):
                if w.index >= item.index:
                    break
                if w.index in st.skipped:
                    continue
                todo.append(CompressedItem(sid, w.index, Timing(w.media_start, w.media_end, w.fields.get("t0")),
                                           w.payload))
        for it in todo + [item]:
            t = time.perf_counter()
            st.ctx.append(CompressedWindow.from_bytes(it.payload))
            now = time.time()
            self.metrics.observe_stage("prefill", time.perf_counter() - t)
            st.last, st.timing = it.index, it.timing
            self.watch.appended(sid, it)
            lag = it.lag(now)
            if lag is not None:
                st.latencies.append(lag)
                st.lag_at_append = lag
                self.metrics.set_lag(sid, lag)
        with self.cond:
            st.skipped = {i for i in st.skipped if i > st.last}
        self.metrics.set_context_tokens(sid, st.ctx.n_tokens)

    def _after_step(self) -> None:
        """Drop counts saved; pending watch evaluations run once no window waits (so several
        streams' share one forward) or a batch is full (pipeline.engine.watches)."""
        self._save_drops()
        with self.cond:
            more = self.queues.has_work()
        if self.watch.has_pending() and (not more or len(self.watch.pending) >= self.watch.batch):
            self._flush_watches()

    def _flush_watches(self) -> None:
        with self.cond:
            _, lag = self.queues.live_load(time.time())
        try:
            self.watch.flush(lag)
        except Exception:
            log.exception("%s: watch evaluations failed", self.name)

    def _watch_context(self, sid: str) -> tuple[Any, Any] | None:
        st = self.streams.get(sid)
        return None if st is None else (st.lock, st.ctx)

    def watches_changed(self, stream_id: str) -> int:
        """A watch was added or deleted: re-read the stream's watches (if it is held here)."""
        return self.watch.load(stream_id) if stream_id in self.streams else 0

    def watch_states(self, stream_id: str) -> dict[str, dict]:
        return self.watch.states(stream_id)

    def _gauge(self) -> None:
        self.metrics.set_queue_depth(f"decoder:{self.name}", self.queues.depth())

    # -- questions --
    def ask(self, stream_id: str, question: str | None = None, max_tokens: int = 64,
            messages: list[dict] | None = None) -> Iterator[AnswerStart | str | AnswerEnd]:
        """An answer as events: AnswerStart (prompt size), text pieces, AnswerEnd. Pieces come
        from an incremental detokenizer, so a piece never holds half a UTF-8 character; the
        question is ``question`` or the chat ``messages`` folded by the model's own rules."""
        from omnizip.models import IncrementalDetokenizer

        check_question(question, messages, max_tokens)
        st = self._stream(stream_id)
        with self._admit_question(stream_id, st):
            yield from self._answer(st, question, max_tokens, messages, IncrementalDetokenizer(self.model.processor))

    @contextlib.contextmanager
    def _admit_question(self, stream_id: str, st: _Stream) -> Iterator[None]:
        """At most ``max_questions_per_stream`` questions answered or waiting on one stream; more
        get LimitExceeded (429), so a short question never queues behind an unbounded line of
        long answers. Counted here, where every question of the stream passes."""
        limit = self.cfg.max_questions_per_stream
        with self.cond:
            if st.asking >= limit:
                raise LimitExceeded(f"{limit} questions are already being answered on this stream; try again "
                                    "when one is done", "question", 2)
            st.asking += 1
        try:
            yield
        finally:
            with self.cond:
                st.asking -= 1

    def _answer(self, st: _Stream, question: str | None, max_tokens: int, messages: list[dict] | None,
                detok: Any) -> Iterator[AnswerStart | str | AnswerEnd]:
        stop_ids = self.model.stop_ids
        t0 = time.perf_counter()
        ttft, n, reason = None, 0, "length"
        with st.lock:
            tokens = st.ctx.answer(question, max_tokens, messages=messages)
            try:
                for tok in tokens:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                        yield self._start(st)
                    if tok in stop_ids:
                        reason = "stop"
                        break
                    n += 1
                    piece = detok.push(tok)
                    if piece:
                        yield piece
            finally:  # the context is cropped back to itself before another question may use it
                tokens.close()
            if ttft is None:  # not one token: the prompt was still read
                yield self._start(st)
        tail = detok.flush()
        if tail:
            yield tail
        yield AnswerEnd(n, reason)
        if ttft is not None:
            self.metrics.observe_answer(ttft, n, time.perf_counter() - t0)

    @staticmethod
    def _start(st: _Stream) -> AnswerStart:
        p = st.ctx.last_prompt_tokens
        windows = len(st.ctx.spans)
        return (AnswerStart(int(p.context), int(p.question), windows) if p is not None
                else AnswerStart(st.ctx.n_tokens, 0, windows))

    # -- control --
    def forget(self, stream_id: str) -> bool:
        """Drop a deleted stream's context, and this process's metric series of it (so they
        leave the export instead of being re-recorded at their last value)."""
        self.metrics.forget_stream(stream_id)
        self.watch.forget(stream_id)
        with self._init_lock, self.cond:
            self.queues.forget(stream_id)
            return self.streams.pop(stream_id, None) is not None

    def release(self, stream_id: str) -> bool:
        """The stream's context moved to another decoder (its record says which): unload it here
        once a question or append in progress is done; it may come back later."""
        st = self.streams.get(stream_id)
        with self._init_lock:
            if st is not None:
                with st.lock:
                    pass
            self.watch.forget(stream_id)
            with self.cond:
                self.queues.close(stream_id)
                return self.streams.pop(stream_id, None) is not None

    def stats(self, stream_id: str) -> DecoderStats:
        try:
            st = self._stream(stream_id)
        except StreamNotFound:
            return DecoderStats()
        with self.cond:
            return DecoderStats(
                known=True, windows=len(st.ctx.spans), context_tokens=st.ctx.n_tokens, last=st.last,
                received=st.received, handled=max(st.last, self.queues.high_water(stream_id)),
                queue=self.queues.depth(stream_id), max_queue=self.queues.peak(stream_id),
                busy=bool(self.queues.in_flight(stream_id)), lag_s=lag_of(st.timing.t0, st.timing.end),
                lag_at_append=st.lag_at_append, evicted=st.ctx.evicted_windows, drops=self.queues.drops(stream_id))

    def latencies(self, stream_id: str) -> list[float]:
        """Per-window end-to-end latencies (window end in media time -> in context), seconds."""
        st = self.streams.get(stream_id)
        return list(st.latencies) if st is not None else []

    def health(self) -> dict:
        """Liveness and load: streams held, live windows waiting and their worst lag behind live
        (what the pool scales on; pipeline.core.pool)."""
        with self.cond:
            waiting, lag = self.queues.live_load(time.time())
            return {"name": self.name, "streams": len(self.streams), "rebuilds": self.rebuilds, "ok": True,
                    "queue": waiting, "lag_s": lag, "device": self.device,
                    "node": ray.get_runtime_context().get_node_id(),
                    "memory_bytes": self.memory_bytes, "kv_bytes_per_token": self.kv_per_token,
                    "context_bytes": sum(st.ctx.budget_tokens for st in self.streams.values()) * self.kv_per_token}

    def ping(self) -> bool:
        return True
