"""The engine's Ray actors, split like vLLM: a producer per stream, a scheduler with bounded
queues, a pool of model runners, and the decoding engine.

    IngestActor (one per stream)  --submit(window)-->  EncoderWorker (pool; a stream is pinned to one)
        PyAV -> AVWindow                                  per-stream bounded queue, round-robin batches,
                                                          one `encode_windows` call per batch, the
                                                          stream's StreamCompressor, store write
    --push(compressed bytes)-->  DecoderActor (each stream's RollingContext = warm KV cache)
                                  per-stream bounded queue, incremental prefill, answers

State that must survive a restart goes through the store (pipeline.store): every compressed
window is written with the stream's compressor state in one atomic step, so a restarted encoder
worker resumes the StreamCompressor and a restarted decoder rebuilds its context from the stored
windows. Actors learn a stream's settings from its store record the first time they see it,
which is also how they recover after a restart (Ray re-runs ``__init__`` with the same args).

Behind live (``behind_policy``): a full queue always drops its oldest window (``queue_full``:
memory never grows); a window whose lag exceeds ``max_lag_s`` while newer ones wait is dropped
(``drop_oldest``, reason ``behind_live``) or compressed with a stricter OmniZipConfig
(``compress_harder``). Every drop is counted in the stream's status and in metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import ray

from pipeline.metrics import get_metrics
from pipeline.store import Retention, StreamNotFound, StreamStore, open_store

log = logging.getLogger(__name__)

POLICIES = ("drop_oldest", "compress_harder")
STORE_ACTOR = "omnizip-store"
NAMESPACE = "omnizip"


# ---- the store, shared by every actor ------------------------------------------------------------
@dataclass(frozen=True)
class StoreRef:
    """How an actor reaches the store: a Redis URL, or the handle of the actor hosting the
    in-process MemoryStore (so every actor sees the same one)."""

    url: str | None = None
    handle: Any = None
    retention: Retention = Retention()

    def connect(self) -> StreamStore:
        if self.url:
            return open_store(self.url, self.retention)
        if self.handle is None:
            raise ValueError("StoreRef needs a Redis URL or a store actor handle")
        return RemoteStore(self.handle)


class RemoteStore:
    """A MemoryStore living in a Ray actor, called synchronously (same contract as StreamStore;
    exceptions come back as the store's own types)."""

    def __init__(self, handle: Any) -> None:
        self._h = handle

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._h, name)
        return lambda *a, **k: ray.get(method.remote(*a, **k))

    def iter_windows(self, stream_id: str, start: int = 0, batch: int = 32) -> Iterator[Any]:
        return iter(self.windows(stream_id, start))

    def close(self) -> None:
        pass


def store_actor(retention: Retention, detached: bool = True, name: str = STORE_ACTOR) -> Any:
    """The named actor hosting the in-process store (created once, found again after restarts)."""
    from pipeline.store import MemoryStore

    opts: dict[str, Any] = dict(name=name, namespace=NAMESPACE, get_if_exists=True, num_cpus=0,
                                max_concurrency=16)
    if detached:
        opts["lifetime"] = "detached"
    return ray.remote(MemoryStore).options(**opts).remote(retention)


# ---- messages ------------------------------------------------------------------------------------
@dataclass
class WindowIn:
    """One AVWindow on its way to an encoder worker, with the stream's live clock."""

    stream_id: str
    window: Any  # pipeline.windows.AVWindow
    t0: float | None  # wall time of media time 0 (live / realtime sources), None otherwise
    arrived: float  # wall time the window left ingestion
    backpressure: bool = False  # a file that can wait: never dropped, ingestion waits instead


@dataclass
class WindowOut:
    """One compressed window on its way to the decoder (payload = CompressedWindow.to_bytes)."""

    stream_id: str
    index: int
    end: float
    payload: bytes
    t0: float | None
    backpressure: bool = False  # a file's window: the decoder queues it rather than drop it


def stricter(cfg: Any) -> Any:
    """A harder OmniZipConfig for a window of a stream that fell behind: discard more of both."""
    rho_a = min(0.9, cfg.rho_audio + 0.3)
    rho_v = min(0.95, cfg.rho_video + 0.2)
    return dataclasses.replace(cfg, rho_audio=rho_a, rho_video=rho_v, contextual_ratio=min(cfg.contextual_ratio, rho_a),
                               max_ratio=max(cfg.max_ratio, rho_v), min_ratio=min(cfg.min_ratio, rho_v))


def lag_of(t0: float | None, end: float, now: float | None = None) -> float | None:
    """Seconds the window ending at media time `end` is behind live (None for unpaced files)."""
    if t0 is None:
        return None
    return (time.time() if now is None else now) - (t0 + end)


def _use_threads(n: int | None) -> None:
    if n:
        import torch
        torch.set_num_threads(int(n))


# ---- ingest ----------------------------------------------------------------------------------------
class IngestActor:
    """Reads one source into AVWindows (PyAV) and hands each to the stream's encoder worker.

    The stream's status lives here: starting -> live (-> reconnecting -> live) -> ended | failed.
    """

    def __init__(self, stream_id: str, record: dict, worker: Any, store: StoreRef) -> None:
        self.sid = stream_id
        self.rec = record
        self.worker = worker
        self.store = store.connect()
        self.metrics = get_metrics()
        self.status = "starting"
        self.error: str | None = None
        self.windows_total = 0
        self.reconnects = 0
        self.media_s = 0.0
        self.t0: float | None = None
        self.live = False
        self.last_arrival: float | None = None
        self.last_index: int | None = None
        self.done = False
        self.dropped = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"ingest-{stream_id}", daemon=True)
        self._thread.start()

    def _set_status(self, status: str, error: str | None = None) -> None:
        self.status, self.error = status, error
        changes: dict[str, Any] = {"status": status, "error": error}
        if status in ("ended", "failed"):  # the record keeps the final figures once this actor is gone
            changes["ingest"] = {**self.stats(), "done": True}
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
            src = Source(rec["source"], rec.get("options"))
            self.live = bool(src.live or rec.get("realtime"))
            size = tuple(rec["size"]) if rec.get("size") else None
            it = iter_windows(src, realtime=rec.get("realtime"), size=size)
            prev = time.time()
            for w in it:
                now = time.time()
                if self._stop.is_set():
                    break
                if self.live:
                    self.t0 = now - w.end if self.t0 is None else min(self.t0, now - w.end)
                    self.metrics.observe_stage("decode", max(0.0, now - (self.t0 + w.end)))
                else:
                    self.metrics.observe_stage("decode", max(0.0, now - prev))
                if w.reconnects > self.reconnects:
                    for _ in range(w.reconnects - self.reconnects):
                        self.metrics.reconnect("source", self.sid)
                    self.reconnects = w.reconnects
                self.windows_total += 1
                self.media_s = w.end
                self.last_index = w.index
                self.last_arrival = now
                if self.status != "live":
                    self._set_status("live")
                self._submit(WindowIn(self.sid, w, self.t0, now, bool(rec.get("backpressure"))))
                prev = time.time()
            src.close()
            if not self._stop.is_set():
                ray.get(self.worker.finish.remote(self.sid), timeout=120)
                self._set_status("ended")
        except Exception as exc:  # a failing stream never takes another down: it reports and stops
            log.warning("stream %s failed: %s", self.sid, exc)
            self._set_status("failed", f"{type(exc).__name__}: {exc}")
        finally:
            self.done = True

    def _submit(self, item: WindowIn) -> None:
        try:
            while ray.get(self.worker.submit.remote(item), timeout=120) == "full" and not self._stop.is_set():
                time.sleep(0.05)  # backpressure: the worker's queue for this stream is full
        except Exception as exc:  # the worker is gone for good: the window is lost, counted
            log.warning("stream %s: window %d not accepted by its encoder worker: %s", self.sid,
                        item.window.index, exc)
            self.dropped["error"] += 1
            self.metrics.drop_window(self.sid, "error")

    def stats(self) -> dict:
        status = self.status
        if status == "live" and self.live and not self.done and self.last_arrival is not None \
                and time.time() - self.last_arrival > 6.0:
            status = "reconnecting"  # a live source silent for three windows is being reconnected
        return {"status": status, "error": self.error, "windows_total": self.windows_total,
                "reconnects": self.reconnects, "media_s": self.media_s, "t0": self.t0, "live": self.live,
                "last_index": self.last_index, "done": self.done, "dropped": dict(self.dropped)}

    def stop(self) -> bool:
        self._stop.set()
        return True


# ---- encoder workers -----------------------------------------------------------------------------
@dataclass
class _EncStream:
    """A stream as one encoder worker sees it."""

    cfg: Any
    lookahead: int
    decoder: int
    sc: Any
    pending: list = field(default_factory=list)  # EncodedWindows held back by the lookahead
    last_pushed: int = -1
    queue: deque = field(default_factory=deque)
    counters: Counter = field(default_factory=Counter)  # tokens, drops, harder
    busy: int = 0
    restored: bool = False  # resumed from the store: windows lost with the old worker are counted once
    ending: bool = False  # the source ended: flush the windows held back by the lookahead


class EncoderWorker:
    """Encodes and compresses windows of the streams pinned to it, several streams per batch."""

    def __init__(self, name: str, config: Any, decoders: list, store: StoreRef) -> None:
        from omnizip.models import load_model

        _use_threads(config.torch_threads)
        self.name = name
        self.cfg = config
        self.decoders = decoders
        self.store = store.connect()
        self.metrics = get_metrics()
        self.model = load_model(config.model, config.device, config.dtype)
        self.streams: dict[str, _EncStream] = {}
        self.forgotten: deque[str] = deque(maxlen=1024)
        self.cond = threading.Condition()
        self.batches = 0
        self._stop = False
        threading.Thread(target=self._loop, name=f"{name}-loop", daemon=True).start()

    # -- intake (the scheduler's side) --
    @ray.method(concurrency_group="intake", max_task_retries=-1)
    def submit(self, item: WindowIn) -> str:
        """Queue a window: "ok"; "full" when the stream's queue is full and the stream asked for
        backpressure (nothing queued: try again); otherwise a full queue drops its oldest window
        (counted); "unknown" when the store does not know the stream. A backpressure stream is
        also told "full" while its decoder already holds a full queue of its windows, so a slow
        decoder holds back the file instead of queueing without bound."""
        if item.backpressure and self._decoder_full(item.stream_id):
            return "full"
        with self.cond:
            st = self._stream(item.stream_id)
            if st is None:
                return "unknown"
            idx = item.window.index
            if idx <= st.last_pushed or any(q.window.index == idx for q in st.queue):
                return "ok"  # a retried submit of a window already taken
            if len(st.queue) >= self.cfg.queue_windows and item.backpressure:
                return "full"
            if st.restored:  # windows queued in the worker that died: never compressed, counted here
                st.restored = False
                for _ in range(max(0, idx - st.last_pushed - 1)):
                    self._drop(item.stream_id, st, "error")
            if len(st.queue) >= self.cfg.queue_windows:
                st.queue.popleft()
                self._drop(item.stream_id, st, "queue_full")
            st.queue.append(item)
            if len(st.queue) > 1 and st.queue[-2].window.index > idx:  # arrived out of order
                st.queue = deque(sorted(st.queue, key=lambda q: q.window.index))
            self.metrics.set_queue_depth(f"encoder:{self.name}", sum(len(s.queue) for s in self.streams.values()))
            self.cond.notify()
        return "ok"

    def _decoder_full(self, sid: str) -> bool:
        st = self.streams.get(sid)
        if st is None:
            return False
        try:
            backlog = ray.get(self.decoders[st.decoder].backlog.remote(sid), timeout=30)
        except Exception:  # a decoder being restarted: let the window through (it will be queued)
            return False
        return backlog >= self.cfg.queue_windows

    @ray.method(concurrency_group="intake", max_task_retries=-1)
    def finish(self, stream_id: str) -> bool:
        """The stream's source ended: windows held back by its lookahead are flushed after its queue."""
        with self.cond:
            st = self._stream(stream_id)
            if st is None:
                return False
            st.ending = True
            self.cond.notify()
        return True

    def _drop(self, sid: str, st: _EncStream, reason: str) -> None:
        st.counters[f"dropped_{reason}"] += 1
        self.metrics.drop_window(sid, reason)

    def _stream(self, sid: str) -> _EncStream | None:
        """The stream's state; first sight (or a restarted worker) loads settings and the
        compressor state from the store. None when the store does not know the stream."""
        st = self.streams.get(sid)
        if st is not None or sid in self.forgotten:
            return st
        from omnizip import OmniZipConfig, StreamCompressor
        from omnizip.models import EncodedWindow
        from pipeline import codec  # torch: imported by model actors only, not by ingestion

        try:
            rec = self.store.get_stream(sid)
        except StreamNotFound:
            return None
        cfg = OmniZipConfig.from_dict(rec["settings"]["omnizip"])
        look = int(rec["settings"].get("lookahead", 0))
        st = _EncStream(cfg, look, int(rec.get("decoder", 0)), StreamCompressor(cfg, lookahead=look))
        saved = self.store.load_state(sid)
        if saved is not None:  # a restarted worker: continue where the last one stopped
            state = codec.decode(saved.data)
            st.sc.load_state_dict(state["compressor"])
            st.pending = [(EncodedWindow(**p["enc"]), p["start"], p["end"], p["t0"]) for p in state["pending"]]
            st.last_pushed = int(state["last_pushed"])
            st.counters.update(state.get("counters", {}))
            st.restored = True
            self.metrics.reconnect("actor", sid)
        self.streams[sid] = st
        return st

    # -- the batch loop (the model runner's side) --
    def _take(self) -> list[tuple[WindowIn, bool]]:
        """Up to max_batch windows, round-robin over streams (in order within a stream); each
        with whether it must be compressed harder. Windows too far behind live are dropped."""
        with self.cond:
            while not self._stop and not any(s.queue or s.ending for s in self.streams.values()):
                self.cond.wait(0.5)
            out: list[tuple[WindowIn, bool]] = []
            now = time.time()
            progress = True
            while len(out) < self.cfg.max_batch and progress:
                progress = False
                for sid, st in self.streams.items():
                    if not st.queue or len(out) >= self.cfg.max_batch:
                        continue
                    item = st.queue.popleft()
                    progress = True
                    lag = lag_of(item.t0, item.window.end, now)
                    backlog = len(st.queue) >= max(1, self.cfg.queue_windows // 2)
                    behind = (not item.backpressure and bool(st.queue)
                              and (backlog or (lag is not None and lag > self.cfg.max_lag_s)))
                    if behind and self.cfg.behind_policy == "drop_oldest":
                        self._drop(sid, st, "behind_live")
                        continue
                    st.busy += 1
                    out.append((item, behind))
            self.metrics.set_queue_depth(f"encoder:{self.name}", sum(len(s.queue) for s in self.streams.values()))
            return out

    def _loop(self) -> None:
        while not self._stop:
            batch = self._take()
            self._flush_ended()
            if not batch:
                continue
            try:
                self._run_batch(batch)
            except Exception:
                log.exception("%s: batch failed", self.name)
                for item, _ in batch:
                    st = self.streams.get(item.stream_id)
                    if st is not None:
                        self._drop(item.stream_id, st, "error")
            finally:
                with self.cond:
                    for item, _ in batch:
                        st = self.streams.get(item.stream_id)
                        if st is not None:
                            st.busy -= 1

    def _flush_ended(self) -> None:
        from omnizip.models import compress_with

        with self.cond:
            ended = [(sid, st) for sid, st in self.streams.items() if st.ending and not st.queue and not st.busy]
            for _, st in ended:
                st.ending = False
                st.busy += 1
        for sid, st in ended:
            try:
                done, times = [], {}
                for o in st.sc.flush():
                    e, start, end, t0 = st.pending.pop(0)
                    times[e.index] = (start, end, t0)
                    done.append(compress_with(e, o))
                self._emit(sid, st, done, times, False, True, None)
            except StreamNotFound:
                continue
            except Exception:
                log.exception("%s: flushing stream %s failed", self.name, sid)
                self._drop(sid, st, "error")
            finally:
                with self.cond:
                    st.busy -= 1

    def _run_batch(self, batch: list[tuple[WindowIn, bool]]) -> None:
        t = time.perf_counter()
        wins = [(it.window.audio, it.window.frames if it.window.has_video else None) for it, _ in batch]
        encoded = self.model.encode_windows(wins, [it.window.index for it, _ in batch])
        dt = time.perf_counter() - t
        self.batches += 1
        self.metrics.observe_batch(len(batch))
        for (item, harder), enc in zip(batch, encoded):
            self.metrics.observe_stage("encode", dt)
            st = self.streams.get(item.stream_id)
            if st is None:
                continue  # deleted meanwhile
            try:
                self._compress_and_store(item, st, enc, harder)
            except StreamNotFound:
                continue
            except Exception as exc:
                log.exception("%s: stream %s window %d failed: %s", self.name, item.stream_id, item.window.index, exc)
                self._drop(item.stream_id, st, "error")

    def _compress_and_store(self, item: WindowIn, st: _EncStream, enc: Any, harder: bool) -> None:
        from omnizip import compress_clip
        from omnizip.models import compress_encoded, compress_with
        from pipeline import codec

        sid, w = item.stream_id, item.window
        t = time.perf_counter()
        harder = harder and st.lookahead == 0 and not st.pending
        times = {w.index: (w.start, w.end, item.t0)}
        if harder:  # a stricter config for this window only; the stream's compressor state is untouched
            out = compress_clip(enc.audio, enc.audio_scores, enc.video, [enc.n_audio], [enc.video.shape[0]],
                                stricter(st.cfg))
            ratio = out.video_ratios[0] if out.video_ratios else 0.0
            done = [compress_encoded(enc, out.audio_keep, out.audio, out.video_keep, ratio)]
            st.counters["harder"] += 1
        else:
            outs = st.sc.push(enc.audio, enc.audio_scores, enc.video)
            st.pending.append((enc, w.start, w.end, item.t0))
            if w.final:
                outs += st.sc.flush()
            done = []
            for o in outs:
                e, start, end, t0 = st.pending.pop(0)
                times[e.index] = (start, end, t0)
                done.append(compress_with(e, o))
        st.last_pushed = w.index
        self.metrics.observe_stage("compress", time.perf_counter() - t)
        self._emit(sid, st, done, times, harder, item.backpressure, w.index)

    def _emit(self, sid: str, st: _EncStream, done: list, times: dict, harder: bool, backpressure: bool,
              pushed: int | None) -> None:
        """Count, store (with the compressor state after them) and send on the finished windows."""
        from pipeline import codec

        for cw in done:
            for key in ("audio_in", "audio_kept", "video_in", "video_kept"):
                st.counters[key] += getattr(cw, key)
            self.metrics.record_window(sid, {"audio": cw.audio_in, "video": cw.video_in},
                                       {"audio": cw.audio_kept, "video": cw.video_kept})
        state = codec.encode(self._state(st))  # after this window: travels with its store write
        if not done:
            if pushed is not None:
                self.store.save_state(sid, pushed, state)
            return
        for k, cw in enumerate(done):
            start, end, t0 = times[cw.index]
            fields = {"audio_in": cw.audio_in, "audio_kept": cw.audio_kept, "video_in": cw.video_in,
                      "video_kept": cw.video_kept, "harder": harder, "t0": t0}
            payload = cw.to_bytes()
            self._store_window(sid, cw.index, payload, start, end, fields, state if k == len(done) - 1 else None)
            st.counters["last_stored"] = cw.index
            self.decoders[st.decoder].push.remote(WindowOut(sid, cw.index, end, payload, t0, backpressure))

    @staticmethod
    def _state(st: _EncStream) -> dict:
        return {"compressor": st.sc.state_dict(), "last_pushed": st.last_pushed, "counters": dict(st.counters),
                "pending": [{"enc": _enc_dict(e), "start": a, "end": b, "t0": t0} for e, a, b, t0 in st.pending]}

    def _store_window(self, sid: str, index: int, payload: bytes, start: float, end: float, fields: dict,
                      state: bytes | None) -> None:
        """Append to the store; a store outage longer than the client's own retries is waited out."""
        deadline = time.monotonic() + 120
        failed = False
        while True:
            try:
                self.store.append_window(sid, index, payload, media_start=start, media_end=end, fields=fields,
                                         state=state)
                if failed:
                    self.metrics.reconnect("redis", sid)
                return
            except (StreamNotFound, ValueError, TypeError):
                raise
            except Exception as exc:
                if time.monotonic() > deadline or sid in self.forgotten:
                    raise
                failed = True
                log.warning("%s: store append failed (%s); retrying", self.name, exc)
                time.sleep(0.5)

    # -- control --
    def forget(self, stream_id: str) -> bool:
        """Drop everything of a deleted stream (queue, compressor)."""
        with self.cond:
            self.forgotten.append(stream_id)
            return self.streams.pop(stream_id, None) is not None

    def stats(self, stream_id: str | None = None) -> dict:
        with self.cond:
            if stream_id is not None:
                st = self.streams.get(stream_id)
                if st is None:
                    return {"known": False}
                return {"known": True, "queue": len(st.queue), "busy": st.busy, "ending": st.ending, "last_pushed": st.last_pushed,
                        "decoder": st.decoder, **dict(st.counters)}
            return {"name": self.name, "streams": len(self.streams), "batches": self.batches,
                    "queue": sum(len(s.queue) for s in self.streams.values()), "ok": True}

    def ping(self) -> bool:
        return True


def _enc_dict(e: Any) -> dict:
    return {f.name: getattr(e, f.name) for f in dataclasses.fields(e)}


# ---- decoder ---------------------------------------------------------------------------------------
@dataclass
class _DecStream:
    """A stream's rolling context inside a decoder."""

    ctx: Any
    lock: threading.Lock = field(default_factory=threading.Lock)
    queue: deque = field(default_factory=deque)
    last: int = -1  # newest window index in the context
    handled: int = -1  # newest window index appended or dropped here
    skipped: set = field(default_factory=set)  # dropped here: not to be fetched back from the store
    t0: float | None = None
    end: float = 0.0  # media end of the newest window in context
    lag_at_append: float = 0.0
    dropped: Counter = field(default_factory=Counter)
    latencies: deque = field(default_factory=lambda: deque(maxlen=2048))
    received: int = -1
    busy: bool = False
    max_queue: int = 0  # the longest this stream's queue has been (backpressure keeps it bounded)


class DecoderActor:
    """Holds each stream's RollingContext (the adapter's KV cache), appends windows as they
    arrive, answers questions. A restarted decoder rebuilds a stream's context from the store
    the first time the stream is touched."""

    def __init__(self, name: str, config: Any, store: StoreRef) -> None:
        from omnizip.models import load_model

        _use_threads(config.torch_threads)
        self.name = name
        self.cfg = config
        self.store = store.connect()
        self.metrics = get_metrics()
        self.model = load_model(config.model, config.device, config.dtype)
        self.streams: dict[str, _DecStream] = {}
        self.forgotten: deque[str] = deque(maxlen=1024)
        self.cond = threading.Condition()
        self.rebuilds = 0
        self._init_lock = threading.Lock()
        threading.Thread(target=self._loop, name=f"{name}-loop", daemon=True).start()

    # -- streams --
    def _stream(self, sid: str) -> _DecStream:
        """The stream's context, rebuilt from the store when this decoder has not seen it
        (first window, or after a restart). StreamNotFound when the stream is not registered."""
        with self._init_lock:
            st = self.streams.get(sid)
            if st is not None:
                return st
            if sid in self.forgotten:
                raise StreamNotFound(f"no stream {sid!r}")
            from omnizip.models import CompressedWindow
            from omnizip.models.rolling import RollingContext

            rec = self.store.get_stream(sid)
            budget = int(rec["settings"]["context_tokens"])
            ctx = RollingContext(self.model, budget_tokens=budget, system_prompt=self.cfg.system_prompt)
            st = _DecStream(ctx)
            stored = self.store.windows(sid)
            if stored:
                t = time.perf_counter()
                ctx.rebuild([CompressedWindow.from_bytes(w.payload) for w in stored])
                self.metrics.observe_stage("prefill", time.perf_counter() - t)
                st.last = st.received = st.handled = stored[-1].index
                st.end = stored[-1].media_end
                st.t0 = stored[-1].fields.get("t0")
                self.rebuilds += 1
                self.metrics.reconnect("actor", sid)
            self.metrics.set_context_tokens(sid, ctx.n_tokens)
            self.streams[sid] = st
            return st

    @ray.method(concurrency_group="intake", max_task_retries=-1)
    def push(self, item: WindowOut) -> bool:
        """Queue a compressed window; a full queue drops its oldest (counted)."""
        try:
            st = self._stream(item.stream_id)
        except StreamNotFound:
            return False
        with self.cond:
            if item.index <= st.last or any(q.index == item.index for q in st.queue):
                return True  # a retried push
            st.received = max(st.received, item.index)
            if len(st.queue) >= self.cfg.queue_windows and not item.backpressure:
                old = st.queue.popleft()
                self._drop(item.stream_id, st, old.index, "queue_full")
            st.queue.append(item)
            st.max_queue = max(st.max_queue, len(st.queue))
            self.metrics.set_queue_depth(f"decoder:{self.name}", sum(len(s.queue) for s in self.streams.values()))
            self.cond.notify()
        return True

    @ray.method(concurrency_group="intake")
    def backlog(self, stream_id: str) -> int:
        """Windows of the stream waiting here (queued or being appended): what an encoder
        checks before taking more of a backpressure stream."""
        st = self.streams.get(stream_id)
        return 0 if st is None else len(st.queue) + int(st.busy)

    def _drop(self, sid: str, st: _DecStream, index: int, reason: str) -> None:
        st.dropped[reason] += 1
        st.skipped.add(index)
        st.handled = max(st.handled, index)
        self.metrics.drop_window(sid, reason)

    def _next(self) -> tuple[str, _DecStream, WindowOut] | None:
        with self.cond:
            while not any(s.queue for s in self.streams.values()):
                self.cond.wait(0.5)
            now = time.time()
            for sid, st in list(self.streams.items()):
                while st.queue:
                    item = st.queue.popleft()
                    lag = lag_of(item.t0, item.end, now)
                    if (self.cfg.behind_policy == "drop_oldest" and lag is not None and lag > self.cfg.max_lag_s
                            and st.queue and not item.backpressure):
                        self._drop(sid, st, item.index, "behind_live")
                        continue
                    st.busy = True
                    # rotate so the next stream goes first next time (round robin)
                    self.streams.pop(sid)
                    self.streams[sid] = st
                    self.metrics.set_queue_depth(f"decoder:{self.name}",
                                                 sum(len(s.queue) for s in self.streams.values()))
                    return sid, st, item
            return None

    def _loop(self) -> None:
        while True:
            got = self._next()
            if got is None:
                continue
            sid, st, item = got
            try:
                with st.lock:
                    if self.cfg.decoder_delay_s:
                        time.sleep(self.cfg.decoder_delay_s)  # an artificially slow decoder (tests, bench)
                    self._append(sid, st, item)
            except Exception:
                log.exception("%s: stream %s window %d not appended", self.name, sid, item.index)
                with self.cond:
                    self._drop(sid, st, item.index, "error")
            finally:
                st.busy = False

    def _append(self, sid: str, st: _DecStream, item: WindowOut) -> None:
        from omnizip.models import CompressedWindow

        if item.index <= st.last:
            return
        todo: list[tuple[int, bytes, float, float | None]] = []
        if item.index > st.last + 1:  # fetch windows whose push was lost (e.g. a restart) from the store
            for w in self.store.windows(sid, st.last + 1):
                if w.index >= item.index:
                    break
                if w.index not in st.skipped:
                    todo.append((w.index, w.payload, w.media_end, w.fields.get("t0")))
        todo.append((item.index, item.payload, item.end, item.t0))
        for index, payload, end, t0 in todo:
            t = time.perf_counter()
            st.ctx.append(CompressedWindow.from_bytes(payload))
            now = time.time()
            self.metrics.observe_stage("prefill", time.perf_counter() - t)
            st.last, st.end, st.t0 = index, end, t0
            st.handled = max(st.handled, index)
            lag = lag_of(t0, end, now)
            if lag is not None:
                st.latencies.append(lag)
                st.lag_at_append = lag
                self.metrics.set_lag(sid, lag)
        st.skipped = {i for i in st.skipped if i > st.last}
        self.metrics.set_context_tokens(sid, st.ctx.n_tokens)

    # -- questions --
    def ask(self, stream_id: str, question: str, max_tokens: int = 64) -> Iterator[str]:
        """Text pieces of the answer, one per generated token (stop tokens are not sent)."""
        st = self._stream(stream_id)
        stop_ids = self.model.stop_ids
        t0 = time.perf_counter()
        ttft, n = None, 0
        with st.lock:
            for tok in st.ctx.answer(question, max_tokens):
                n += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
                if tok in stop_ids:
                    break
                yield self.model.processor.decode([tok], skip_special_tokens=False)
        total = time.perf_counter() - t0
        if ttft is not None:
            self.metrics.observe_answer(ttft, n, total)

    # -- control --
    def forget(self, stream_id: str) -> bool:
        with self._init_lock, self.cond:
            self.forgotten.append(stream_id)
            return self.streams.pop(stream_id, None) is not None

    def stats(self, stream_id: str | None = None) -> dict:
        if stream_id is not None:
            try:
                st = self._stream(stream_id)
            except StreamNotFound:
                return {"known": False}
            with self.cond:
                lag = lag_of(st.t0, st.end)
                return {"known": True, "windows": len(st.ctx.spans), "context_tokens": st.ctx.n_tokens,
                        "last": st.last, "received": st.received, "handled": st.handled, "queue": len(st.queue),
                        "max_queue": st.max_queue, "busy": st.busy,
                        "lag_s": lag, "lag_at_append": st.lag_at_append, "dropped": dict(st.dropped),
                        "evicted": st.ctx.evicted_windows}
        return {"name": self.name, "streams": len(self.streams), "rebuilds": self.rebuilds, "ok": True}

    def latencies(self, stream_id: str) -> list[float]:
        """Per-window end-to-end latencies (window end in media time -> in context), seconds."""
        st = self.streams.get(stream_id)
        return list(st.latencies) if st is not None else []

    def ping(self) -> bool:
        return True


# ---- creating the actors -------------------------------------------------------------------------

def _resources(config: Any) -> dict[str, Any]:
    """num_gpus when the model runs on CUDA and the cluster has GPUs, else a fraction of a CPU."""
    if str(config.device).startswith("cuda") and ray.cluster_resources().get("GPU", 0) > 0:
        return {"num_gpus": config.gpus_per_actor, "num_cpus": 0}
    return {"num_cpus": config.cpus_per_actor}


def _named(name: str, config: Any) -> dict[str, Any]:
    opts: dict[str, Any] = {"name": name, "namespace": NAMESPACE, "get_if_exists": True}
    if config.detached:
        opts["lifetime"] = "detached"
    return opts


def start_decoder(name: str, config: Any, store: StoreRef) -> Any:
    cls = ray.remote(concurrency_groups={"intake": 1})(DecoderActor)
    return cls.options(**_named(name, config), **_resources(config), max_concurrency=16, max_restarts=-1,
                       max_task_retries=-1).remote(name, config, store)


def start_encoder(name: str, config: Any, decoders: list, store: StoreRef) -> Any:
    cls = ray.remote(concurrency_groups={"intake": 1})(EncoderWorker)
    return cls.options(**_named(name, config), **_resources(config), max_concurrency=8, max_restarts=-1,
                       max_task_retries=-1).remote(name, config, decoders, store)


def start_ingest(name: str, stream_id: str, record: dict, worker: Any, config: Any, store: StoreRef) -> Any:
    return ray.remote(IngestActor).options(**_named(name, config), num_cpus=config.ingest_cpus,
                                           max_restarts=0).remote(stream_id, record, worker, store)
