"""The engine's front door: `StreamService` owns every stream (create, status, ask, delete) and
the actors behind them (pipeline.engine.ingest, and the elastic pools of pipeline.engine.encoder workers and
pipeline.engine.decoder actors, pipeline.engine.elastic). It runs on the head node as the named Ray actor
"<name>-<config hash>-service" (`get_or_create_service`), which the Serve app and the CLI call;
every actor it starts is named in the "omnizip" namespace (pipeline.engine.runtime), so a restarted
service finds them again, and every stream's record (with the pool members it is on) lives in
the store. Its life: started by the first replica of a Serve app (or a CLI command), it retires
older engines of the same name, and stops itself once no replica uses it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import ray

from pipeline.engine import launch, runtime
from pipeline.engine.lifecycle import EngineLife
from pipeline.engine.push import PushStreams
from pipeline.engine.realtime import RealtimeSessions
from pipeline.engine.scaler import PoolScaling
from pipeline.engine.watch_service import WatchService
from pipeline.core.config import ServiceConfig
from pipeline.core.messages import QuestionRoute, check_question
from pipeline.engine.elastic import Pool
from pipeline.engine.memory import model_kv_bytes_per_token
from pipeline.metrics import get_metrics
from pipeline.core.pool import Bounds, MemoryFull, context_bytes, least_loaded, place_by_memory
from pipeline.core.records import StreamRecord, StreamSpec, records_to_forget, smallest_context_tokens
from pipeline.errors import LimitExceeded, NameTaken, StoreUnavailable
from pipeline.core.stats import DecoderStats, EncoderStats, IngestStats, stream_status
from pipeline.store.contract import Retention, StreamNotFound, WindowSpan

log = logging.getLogger(__name__)

INGEST_STATS_TIMEOUT_S = 3.0  # an ingest actor slower than this to answer is not placed yet

__all__ = ["ServiceConfig", "StreamService", "find_service", "get_or_create_service", "shutdown_engine",
           "shutdown_service"]


class StreamService(EngineLife, PoolScaling, PushStreams, WatchService, RealtimeSessions):
    """The engine's front door. Plain class; runs as the named Ray actor "<name>-service"
    (get_or_create_service(config) -> ActorHandle); every method is async."""

    def __init__(self, config: ServiceConfig | Mapping[str, Any] | None = None) -> None:
        self.cfg = ServiceConfig.coerce(config)
        c = self.cfg
        self.names = runtime.ActorNames.of(c)
        retention = Retention(c.retention_windows, c.retention_s)
        self.store_ref = runtime.StoreRef(c.redis_url, None if c.redis_url else self.names.store(), retention)
        if c.redis_url:
            self.store = self.store_ref.connect(fail_fast=True)  # the API answers 503 within seconds
        else:  # the in-process store's actor: its handle here, its name for the actors (survives restarts)
            self.store = runtime.RemoteStore(runtime.store_actor(retention, c.detached, self.names.store()))
        grace = max(3 * c.scale_interval_s, 3.0)  # a member away longer is gone: its streams move
        self.encoders = Pool("encoder", self._bounds("encoder"),
                             lambda i: launch.start_encoder(self.names.encoder(i), c, self.store_ref), grace)
        self.decoders = Pool("decoder", self._bounds("decoder"),
                             lambda i: launch.start_decoder(self.names.decoder(i), c, self.store_ref), grace)
        self.ingest: dict[str, Any] = {}
        self.policy = c.source_policy()
        self._reattached = False
        self._reattaching = asyncio.Lock()
        self._creating = asyncio.Lock()  # limits and name checks see every earlier create
        self.known: dict[str, StreamRecord] = {}  # running streams' records: written back if the store loses them
        self._watchdog: asyncio.Task | None = None
        self._replicas: dict[str, float] = {}  # Serve replicas using this engine -> when last heard of
        self._served = False  # some replica registered: the engine ends with the last one
        self._stopping = False
        self.moves = 0  # streams moved between pool members so far

    def _bounds(self, kind: str) -> Bounds:
        low, high = self.cfg.pool_bounds(kind)
        return Bounds(low, high, self.cfg.streams_per_worker, max(1, self.cfg.queue_windows // 2), self.cfg.max_lag_s)

    def _info(self, rec: StreamRecord) -> None:
        """The stream's name as a metric label (omnizip_stream_info), for dashboards to join on."""
        get_metrics().stream_info(rec.id, rec.name)

    async def _io(self, fn: Any, *args: Any) -> Any:
        """A blocking store call off the event loop; StoreUnavailable when the store is away."""
        self._watch()
        try:
            return await runtime.store_call(fn, *args)
        except (StreamNotFound, ValueError, TypeError, KeyError):
            raise
        except Exception as exc:
            if _unreachable(exc):
                raise StoreUnavailable(f"the store is unavailable ({type(exc).__name__}); retry shortly") from None
            raise

    def _watch(self) -> None:
        """Start the background loops once, from inside the actor's event loop: the restore
        watchdog, the pools' scaler, and the check for an engine no replica uses any more."""
        if self._watchdog is None:
            loop = asyncio.get_running_loop()
            self._watchdog = loop.create_task(self._restore_loop())
            self._loops = [loop.create_task(self._scale_loop()), loop.create_task(self._lifecycle_loop()),
                           loop.create_task(self._deliver_loop())]  # webhooks (pipeline.engine.watch_service)

    async def _records(self) -> list[StreamRecord]:
        recs = [StreamRecord.from_dict(r) for r in await self._io(self.store.list_streams)]
        recs += await self._restore_missing({r.id for r in recs})
        for r in recs:  # the latest copy of each running stream's record
            if r.status in ("ended", "failed"):
                self.known.pop(r.id, None)
            elif r.id in self.known or r.id in self.ingest:
                self.known[r.id] = r
        return recs

    def _worker(self, rec: StreamRecord) -> Any:
        return self.encoders.handle(rec.worker)

    def _decoder(self, rec: StreamRecord) -> Any:
        return self.decoders.handle(rec.decoder)

    # ---- the contract ---------------------------------------------------------------------------
    async def create_stream(self, spec: Mapping[str, Any] | StreamSpec, owner: str | None = None) -> dict:
        """Register and start a stream for ``owner`` (a tenant id; None: the operator, stored as
        ""). ValueError naming the field or the source rule; NameTaken; LimitExceeded."""
        parsed = StreamSpec.parse(spec)
        owner = owner or ""
        budget = parsed.context_tokens or self.cfg.context_tokens
        if budget > self.cfg.max_context_tokens:
            raise ValueError(f"context_tokens: at most {self.cfg.max_context_tokens} (the model's range), got {budget}")
        smallest = smallest_context_tokens(parsed.size, self.cfg.system_prompt)
        if budget < smallest:  # accepted, it would hold no window: every question answers from nothing
            raise ValueError(f"context_tokens: {budget} cannot hold one window of this stream; the smallest budget "
                             f"that does is {smallest}" + ("" if parsed.size else " (or set `size` to smaller frames)"))
        from pipeline.sources.spec import classify

        kind = classify(parsed.source)  # UnsupportedSourceError (a ValueError) names the problem
        live = kind.live
        if parsed.backpressure is None:  # a finite source waits for the model rather than lose a window
            parsed = parsed.model_copy(update={"backpressure": not live})
        await self._io(self.policy.check, parsed.source)  # SourceRefused names the rule; opens nothing
        if live and str(parsed.source).lower().startswith(("rtsp:", "rtsps:")):  # UDP only where the operator allows
            self.policy.check_rtsp_transport(str((parsed.options or {}).get("rtsp_transport", "tcp")), parsed.source)
        await self._reattach()
        async with self._creating:
            await self.forget_ended()  # a key's ended streams stay bounded however many it starts
            running = [r for r in await self._records()  # this engine's (engines of other names may share a Redis)
                       if r.status not in ("ended", "failed") and r.extra.get("engine", self.cfg.name) == self.cfg.name]
            mine = [r for r in running if r.owner == owner]
            if parsed.name is not None and any(r.name == parsed.name for r in await self._records() if r.owner == owner):
                raise NameTaken(f"name: a stream named {parsed.name!r} already exists; delete it or choose another name")
            if len(running) >= self.cfg.max_streams:
                raise LimitExceeded(f"at most {self.cfg.max_streams} streams run at once; delete one first", "source", 30)
            if len(mine) >= self.cfg.max_streams_per_key:
                raise LimitExceeded(f"at most {self.cfg.max_streams_per_key} streams per API key; delete one first",
                                    "source", 30)
            if kind.kind == "push":
                self._check_push_limit(mine)
            rec = StreamRecord.from_spec(
                parsed, self.cfg.context_tokens, owner=owner,
                worker=least_loaded([r.worker for r in running], self.encoders.ready() or self.encoders.members),
                decoder=await self._place_decoder(running, budget))
            rec.extra["engine"] = self.cfg.name  # whose stream it is: a later engine of this name takes it on
            token = self._new_push(rec, kind.target) if kind.kind == "push" else None
            rec = StreamRecord.from_dict(await self._io(self.store.create_stream, rec.to_dict()))
            self.known[rec.id] = rec
        self._info(rec)
        self.ingest[rec.id] = launch.start_ingest(self.names.ingest(rec.id), rec, self.cfg, self.store_ref)
        status = await self._status(rec)
        if token is not None:  # shown this once: the record keeps only its hash
            status["ingest"] = {**status.get("ingest", {}), "token": token}
        return status

    async def _place_decoder(self, running: list[StreamRecord], tokens: int) -> int:
        """The decoder for a new stream of context budget ``tokens``: the least loaded one whose
        context memory (OMNIZIP_DECODER_MEMORY_BYTES or what it reports) still holds its KV;
        LimitExceeded naming the need and the room when none does (issue 19)."""
        health = self.decoders.health
        per_token = next((int(h["kv_bytes_per_token"]) for h in health.values() if h.get("kv_bytes_per_token")), 0) \
            or await asyncio.to_thread(model_kv_bytes_per_token, self.cfg.model, self.cfg.dtype, self.cfg.device)
        members = self.decoders.ready() or list(self.decoders.members)
        budgets = {m: self.cfg.decoder_memory_bytes or health.get(m, {}).get("memory_bytes") for m in members}
        held = [(r.decoder, context_bytes(r.settings.context_tokens, per_token)) for r in running]
        try:
            return place_by_memory(held, members, context_bytes(tokens, per_token), budgets)
        except MemoryFull as e:
            raise LimitExceeded(str(e), "context_tokens", 30) from None

    async def list_streams(self, owner: str | None = None) -> list[dict]:
        """The streams of ``owner`` (None: every stream, for the operator)."""
        await self._reattach()
        recs = [r for r in await self._records() if owner is None or r.owner == owner]
        out = await asyncio.gather(*(self._status(r) for r in recs), return_exceptions=True)
        return [s for s in out if isinstance(s, dict)]

    async def get_stream(self, stream_id: str, owner: str | None = None) -> dict:
        return await self._status(await self._record(stream_id, owner))

    async def _record(self, stream_id: str, owner: str | None = None) -> StreamRecord:
        """The stream's record; KeyError when there is none or it belongs to another tenant
        (the same answer, so a tenant cannot learn which ids exist)."""
        await self._reattach()
        if not isinstance(stream_id, str):
            raise KeyError(stream_id)
        try:
            rec = StreamRecord.from_dict(await self._io(self.store.get_stream, stream_id))
        except (StreamNotFound, ValueError):
            if stream_id not in self.known:
                raise KeyError(stream_id) from None
            await self._restore_missing(set(self.known) - {stream_id})  # the store lost it: write it back
            rec = self.known[stream_id]
        if owner is not None and rec.owner != owner:
            raise KeyError(stream_id)
        return rec

    async def _call(self, ref: Any, timeout: float = 60.0) -> Any:
        """An actor call's result, or the exception it ended with (logged), never raised."""
        try:
            return await asyncio.wait_for(ref, timeout)
        except Exception as e:
            log.warning("engine call failed: %r", e)
            return e

    async def _status(self, rec: StreamRecord) -> dict:
        ing_h = self.ingest.get(rec.id)
        ing, enc, dec, span = await asyncio.gather(
            self._call(ing_h.stats.remote(), INGEST_STATS_TIMEOUT_S) if ing_h is not None else asyncio.sleep(0),
            self._call(self._worker(rec).stats.remote(rec.id)), self._call(self._decoder(rec).stats.remote(rec.id)),
            self._call(runtime.store_call(self.store.window_span, rec.id), INGEST_STATS_TIMEOUT_S))  # holes: eviction
        if ing_h is not None and isinstance(ing, IngestStats) and ing.done and rec.ingest is not None:
            self.ingest.pop(rec.id, None)  # the source is over and its figures are in the record
            ray.kill(ing_h, no_restart=True)
        # an ingest actor that does not answer in time while the stream starts is waiting for Ray
        # to place it (no free CPU): pending; one Ray is restarting: its progress from the record
        pending = isinstance(ing, asyncio.TimeoutError) and rec.status in ("created", "starting")
        if ing_h is not None and isinstance(ing, Exception) and not pending and rec.ingest is None \
                and not isinstance(ing, ray.exceptions.ActorDiedError):
            ing = IngestStats.from_dict({**rec.extra.get("progress", {}), "status": "reconnecting"})
        return stream_status(rec, ing if isinstance(ing, IngestStats) else None,
                             enc if isinstance(enc, EncoderStats) else None,
                             dec if isinstance(dec, DecoderStats) else None, pending=pending,
                             span=span if isinstance(span, WindowSpan) else None,
                             retention=(self.cfg.retention_windows, self.cfg.retention_s is not None))

    async def delete_stream(self, stream_id: str, owner: str | None = None) -> bool:
        return await self._drop(await self._record(stream_id, owner))

    async def forget_ended(self, records: list[StreamRecord] | None = None) -> list[str]:
        """Forget the ended and failed streams past the per-key bound or the retention time
        (pipeline.core.records.records_to_forget): record, windows, state, pictures, metrics."""
        recs = await self._records() if records is None else records
        gone = records_to_forget([r for r in recs if r.extra.get("engine", self.cfg.name) == self.cfg.name],
                                 self.cfg.max_ended_per_key, self.cfg.ended_retention_s, time.time())
        by_id = {r.id: r for r in recs}
        for sid in gone:
            try:
                await self._drop(by_id[sid])
            except Exception as exc:  # the store away: the next round tries again
                log.warning("stream %s: not forgotten yet: %r", sid, exc)
        return gone

    async def _drop(self, rec: StreamRecord) -> bool:
        stream_id = rec.id
        self.known.pop(stream_id, None)
        ing = self.ingest.pop(stream_id, None)
        if ing is not None:
            await self._call(ing.stop.remote(), 10)
            ray.kill(ing, no_restart=True)
        await self._io(self.store.delete_stream, stream_id)
        await asyncio.gather(self._call(self._worker(rec).forget.remote(stream_id)),
                             self._call(self._decoder(rec).forget.remote(stream_id)))
        get_metrics().forget_stream(stream_id)
        return True

    async def route(self, ref: str, owner: str | None = None, by_name: bool = False) -> QuestionRoute:
        """Where a question about stream ``ref`` goes: ownership checked once (the id, or with
        ``by_name`` the one stream of ``owner`` with that name: the OpenAI ``model``), the decoder
        found once. The caller asks that decoder itself, so the answer's pieces come straight
        from it. KeyError (404) for an unknown stream or another tenant's; ValueError when a
        name is ambiguous."""
        try:
            rec = await self._record(ref, owner)
        except KeyError:
            if not by_name:
                raise
            named = [r for r in await self._records() if r.name == ref and (owner is None or r.owner == owner)]
            if not named:
                raise KeyError(f"no stream with id or name {ref!r}") from None
            if len(named) > 1:
                raise ValueError(f"model: {len(named)} streams are named {ref!r}; use one's id: "
                                 f"{sorted(r.id for r in named)}") from None
            rec = named[0]
        return QuestionRoute(rec.id, self._decoder(rec))

    async def ask_events(self, stream_id: str, question: str | None = None, max_tokens: int = 64,
                         owner: str | None = None, messages: list[dict] | None = None) -> AsyncIterator[Any]:
        """An answer as events (pipeline.core.messages.AnswerStart, text pieces, AnswerEnd) to
        ``question`` or to a chat's ``messages``, for callers inside the cluster (the CLI); the
        HTTP replicas :meth:`route` and ask the decoder themselves. The decoder checks the
        question and bounds the questions per stream (pipeline.engine.decoder)."""
        check_question(question, messages, max_tokens)
        route = await self.route(stream_id, owner)
        gen = route.decoder.ask.options(num_returns="streaming").remote(
            route.stream_id, question if messages is None else None, max_tokens, messages)
        async for ref in gen:
            yield await ref

    async def ask(self, stream_id: str, question: str, max_tokens: int = 64,
                  owner: str | None = None) -> AsyncIterator[str]:
        """The answer's text pieces only (the CLI's view of ``ask_events``)."""
        async for event in self.ask_events(stream_id, question, max_tokens, owner):
            if isinstance(event, str):
                yield event

    async def health(self) -> dict:
        workers: dict[str, dict] = {}
        for pool, name in ((self.encoders, self.names.encoder), (self.decoders, self.names.decoder)):
            for m in await pool.probe():
                workers[name(m.index)] = pool.health[m.index] if m.ready else {"ok": False}
        store_ok = await runtime.store_call(self.store.ping)
        # a store that answers may still lose data or refuse writes (evicting policy, OOM, MISCONF)
        problems = await self._store_problems() if store_ok else ["the store does not answer"]
        n = len(await self._io(self.store.list_streams)) if store_ok else len(self.ingest)
        pools = {p.kind: {"members": len(p.members), "ready": len(p.ready()), "low": p.bounds.low,
                          "high": p.bounds.high} for p in (self.encoders, self.decoders)}
        return {"ok": not problems and all(w.get("ok") for w in workers.values()), "streams": n,
                "degraded": bool(problems), "store_problems": problems, "workers": workers,
                "store": "redis" if self.cfg.redis_url else "memory",
                "engine": self.names.prefix, "pools": pools, "moves": self.moves}

    async def _store_problems(self) -> list[str]:
        """The store's own report (pipeline.store.contract.StreamStore.problems); never raises."""
        try:
            return list(await runtime.store_call(self.store.problems))
        except Exception as exc:  # e.g. a store that stopped answering between the two calls
            return [f"the store could not be checked ({type(exc).__name__})"]

    async def windows(self, stream_id: str, start: int = 0, owner: str | None = None,
                      limit: int | None = None) -> list[dict]:
        """The stored windows' metadata from index `start` (no payloads), at most `limit` of
        them (None: all): index, media start/end, tokens in/kept per modality, video ratio,
        whether it was compressed harder, gap flags. A negative `start` counts back from the
        newest window (-10: the last 10 indices)."""
        await self._record(stream_id, owner)
        if start < 0:
            last = await self._io(self.store.last_window_index, stream_id)
            start = 0 if last is None else max(0, last + 1 + start)
        if limit is None:
            ws = await self._io(self.store.windows, stream_id, start)
        else:
            ws = await self._io(self.store.window_page, stream_id, start, limit)
        return [{"index": w.index, "start": w.media_start, "end": w.media_end, **w.fields} for w in ws]

    async def window_viz(self, stream_id: str, index: int, owner: str | None = None) -> bytes | None:
        """The picture record of window `index` (pipeline.viz.window), None when it has none
        (never stored, or older than what the store keeps)."""
        from pipeline.viz.window import VIZ_KIND

        await self._record(stream_id, owner)
        return await self._io(self.store.get_blob, stream_id, int(index), VIZ_KIND)

    async def probe_source(self, source: str, options: Mapping[str, Any] | None = None,
                           owner: str | None = None) -> dict:
        """Open `source` under this engine's source policy, report what it carries within 5 s
        (pipeline.sources.probe), register nothing. SourceRefused / UnsupportedSourceError as create;
        LimitExceeded past max_probes_per_key / max_probes running (on threads of their own)."""
        return await self._probe_limiter().run(owner or "", source, options, self.policy)

    def _probe_limiter(self) -> Any:
        """The probes' own thread pool and bounds, made on first use."""
        from pipeline.sources.probe import ProbeLimiter

        if getattr(self, "_probes", None) is None:
            self._probes = ProbeLimiter(self.cfg.max_probes, self.cfg.max_probes_per_key)
        return self._probes

    async def window_latencies(self, stream_id: str, owner: str | None = None) -> list[float]:
        """Per-window end-to-end latencies of a live stream (window end -> in the decoder's context)."""
        rec = await self._record(stream_id, owner)
        return await self._decoder(rec).latencies.remote(stream_id)







def _unreachable(exc: BaseException) -> bool:
    """A connection-level failure of the store (not a refusal of the request)."""
    try:
        import redis

        if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)):
            return True
    except ImportError:
        pass
    return isinstance(exc, (ConnectionError, TimeoutError, OSError))


def get_or_create_service(config: ServiceConfig | Mapping[str, Any] | None = None) -> Any:
    """The service actor of this exact config, "<name>-<config hash>-service" in namespace
    "omnizip", on the head node (created if missing). A changed config is another engine: on its
    first request it retires the older engines of the same name and takes their streams on."""
    cfg = ServiceConfig.coerce(config)
    opts: dict[str, Any] = dict(name=runtime.ActorNames.of(cfg).service(), namespace=runtime.NAMESPACE,
                                get_if_exists=True, num_cpus=0, max_restarts=-1, max_concurrency=1000,
                                **runtime.ON_HEAD)
    if cfg.detached:
        opts["lifetime"] = "detached"
    return ray.remote(StreamService).options(**opts).remote(cfg)


def find_service(config: ServiceConfig | Mapping[str, Any] | None = None) -> Any:
    """The running service actor of this config, or None (nothing is created)."""
    try:
        return runtime.lookup(runtime.ActorNames.of(ServiceConfig.coerce(config)).service())
    except ValueError:
        return None


def shutdown_service(handle: Any, timeout_s: float = 60.0) -> None:
    """Stop a service actor's streams and actors, then the service actor itself."""
    try:
        ray.get(handle.shutdown.remote(), timeout=timeout_s)
    finally:
        ray.kill(handle, no_restart=True)


def shutdown_engine(config: ServiceConfig | Mapping[str, Any] | None = None, timeout_s: float = 60.0) -> bool:
    """Stop the engine of this config (its streams' ingestion drained, every actor stopped; the
    store's data stays). False when no such engine runs. What `serve` does on exit when it
    attached to a cluster that outlives it."""
    handle = find_service(config)
    if handle is None:
        return False
    shutdown_service(handle, timeout_s)
    return True
