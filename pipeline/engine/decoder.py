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

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import ray

from pipeline.core.config import ServiceConfig
from pipeline.core.messages import AnswerEnd, AnswerStart, CompressedItem, Timing, lag_of
from pipeline.metrics import get_metrics
from pipeline.core.queues import Added, StreamQueues
from pipeline.core.records import StreamRecord
from pipeline.engine.runtime import StoreRef, resolve_device, use_threads
from pipeline.core.stats import DecoderStats
from pipeline.store.contract import StreamNotFound

__all__ = ["DecoderActor"]

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    """A stream's rolling context inside a decoder."""

    ctx: Any  # omnizip.models.rolling.RollingContext
    lock: threading.Lock = field(default_factory=threading.Lock)
    last: int = -1  # newest window index in the context
    received: int = -1
    timing: Timing = Timing(0.0, 0.0, None)  # of the newest window in context
    lag_at_append: float = 0.0
    skipped: set = field(default_factory=set)  # dropped here: not to be read back from the store
    saved_drops: dict = field(default_factory=dict)  # the drop counts last written to the record
    latencies: deque = field(default_factory=lambda: deque(maxlen=2048))


class DecoderActor:
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
        self._init_lock = threading.Lock()
        threading.Thread(target=self._loop, name=f"{name}-loop", daemon=True).start()

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
            from omnizip.models import CompressedWindow
            from omnizip.models.rolling import RollingContext

            rec = StreamRecord.from_dict(self.store.get_stream(sid))
            if rec.decoder != self.index:  # a late push or question for a stream moved elsewhere
                raise StreamNotFound(f"stream {sid!r} is held by decoder {rec.decoder}, not {self.index}")
            ctx = RollingContext(self.model, budget_tokens=rec.settings.context_tokens,
                                 system_prompt=self.cfg.system_prompt)
            st = _Stream(ctx)
            stored = self.store.windows(sid)
            if stored:
                t = time.perf_counter()
                ctx.rebuild([CompressedWindow.from_bytes(w.payload) for w in stored])
                self.metrics.observe_stage("prefill", time.perf_counter() - t)
                st.last = st.received = stored[-1].index
                st.timing = Timing(stored[-1].media_start, stored[-1].media_end, stored[-1].fields.get("t0"))
                self.rebuilds += 1
                moved = rec.extra.get("moved_decoder") == self.index  # the engine moved it here: not a fault
                self.metrics.reconnect("move" if moved else "actor", sid)
                if moved:
                    try:
                        self.store.update_stream(sid, {"moved_decoder": None})
                    except Exception:  # informative only
                        pass
            with self.cond:
                self.queues.open(sid, st.last)
                self.queues.restore_drops(sid, rec.extra.get("decoder_drops") or {})
            st.saved_drops = self.queues.drops(sid)
            self.metrics.set_context_tokens(sid, ctx.n_tokens)
            self.streams[sid] = st
            return st

    def _on_drop(self, sid: str, index: int, reason: str) -> None:
        st = self.streams.get(sid)
        if st is not None:
            st.skipped.add(index)
        self.metrics.drop_window(sid, reason)

    @ray.method(concurrency_group="intake", max_task_retries=-1)
    def push(self, item: CompressedItem) -> bool:
        """Queue a compressed window under the decoder's queue policy."""
        try:
            st = self._stream(item.stream_id)
        except StreamNotFound:
            return False
        with self.cond:
            added = self.queues.add(item)
            if added == Added.OK:
                st.received = max(st.received, item.index)
            self._gauge()
            self.cond.notify()
        return added != Added.UNKNOWN

    @ray.method(concurrency_group="intake")
    def backlog(self, stream_id: str) -> int:
        """Windows of the stream waiting here (queued or being appended): what an encoder
        checks before taking more of a backpressure stream."""
        with self.cond:
            return self.queues.backlog(stream_id)

    # -- the loop: take -> run -> emit --
    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.queues.has_work():
                    self.cond.wait(0.5)
                taken = self.queues.take(1, time.time())
                self._gauge()
            for t in taken:
                item = t.window
                st = self.streams.get(item.stream_id)
                try:
                    if st is not None:
                        with st.lock:
                            self._append(item.stream_id, st, item)
                except Exception:
                    log.exception("%s: stream %s window %d not appended", self.name, item.stream_id, item.index)
                    with self.cond:
                        self.queues.drop(item.stream_id, item.index, "error")
                finally:
                    with self.cond:
                        self.queues.finish(item.stream_id)
            self._save_drops()

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
            lag = it.lag(now)
            if lag is not None:
                st.latencies.append(lag)
                st.lag_at_append = lag
                self.metrics.set_lag(sid, lag)
        with self.cond:
            st.skipped = {i for i in st.skipped if i > st.last}
        self.metrics.set_context_tokens(sid, st.ctx.n_tokens)

    def _gauge(self) -> None:
        self.metrics.set_queue_depth(f"decoder:{self.name}", self.queues.depth())

    # -- questions --
    def ask(self, stream_id: str, question: str | None = None, max_tokens: int = 64,
            messages: list[dict] | None = None) -> Iterator[AnswerStart | str | AnswerEnd]:
        """An answer as events: AnswerStart (prompt size), text pieces, AnswerEnd. Pieces come
        from an incremental detokenizer, so a piece never holds half a UTF-8 character; the
        question is ``question`` or the chat ``messages`` folded by the model's own rules."""
        from omnizip.models import IncrementalDetokenizer

        st = self._stream(stream_id)
        stop_ids = self.model.stop_ids
        detok = IncrementalDetokenizer(self.model.processor)
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
        return AnswerStart(int(p.context), int(p.question)) if p is not None else AnswerStart(st.ctx.n_tokens, 0)

    # -- control --
    def forget(self, stream_id: str) -> bool:
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
                    "node": ray.get_runtime_context().get_node_id()}

    def ping(self) -> bool:
        return True
