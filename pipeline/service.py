"""The engine's front door: `StreamService` owns every stream (create, status, ask, delete) and
the actors behind them (pipeline.ingest, pipeline.encoder, pipeline.decoder). It runs as the named
Ray actor "<name>-service" (`get_or_create_service`), which the Serve app and the CLI call; every
actor it starts is named in the "omnizip" namespace (pipeline.runtime), so a restarted service
finds them again, and every stream's record lives in the store.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import ray

from pipeline import runtime
from pipeline.config import ServiceConfig
from pipeline.records import StreamRecord, StreamSpec
from pipeline.refusals import LimitExceeded, NameTaken, StoreUnavailable
from pipeline.stats import DecoderStats, EncoderStats, IngestStats, stream_status
from pipeline.store import Retention, StreamExists, StreamNotFound

log = logging.getLogger(__name__)

INGEST_STATS_TIMEOUT_S = 3.0  # an ingest actor slower than this to answer is not placed yet

__all__ = ["ServiceConfig", "StreamService", "get_or_create_service", "shutdown_service"]


class StreamService:
    """The engine's front door. Plain class; runs as the named Ray actor "<name>-service"
    (get_or_create_service(config) -> ActorHandle); every method is async."""

    def __init__(self, config: ServiceConfig | Mapping[str, Any] | None = None) -> None:
        self.cfg = ServiceConfig.coerce(config)
        c = self.cfg
        self.names = runtime.ActorNames(c.name)
        retention = Retention(c.retention_windows, c.retention_s)
        handle = None if c.redis_url else runtime.store_actor(retention, c.detached, self.names.store())
        self.store_ref = runtime.StoreRef(c.redis_url, handle, retention)
        self.store = self.store_ref.connect(fail_fast=True)  # the API answers 503 within seconds
        self.decoders = [runtime.start_decoder(self.names.decoder(i), c, self.store_ref)
                         for i in range(c.decoder_actors)]
        self.workers = [runtime.start_encoder(self.names.encoder(i), c, self.decoders, self.store_ref)
                        for i in range(c.encoder_workers)]
        self.ingest: dict[str, Any] = {}
        self.policy = c.source_policy()
        self._reattached = False
        self._creating = asyncio.Lock()  # limits and name checks see every earlier create
        self._asking: dict[str, int] = {}  # questions answered or waiting, per stream
        self.known: dict[str, StreamRecord] = {}  # running streams' records: written back if the store loses them
        self._watchdog: asyncio.Task | None = None

    async def _reattach(self) -> None:
        """Once: a restarted service finds the ingest actors of its streams again."""
        if self._reattached:
            return
        self._reattached = True
        for rec in await self._records():
            if rec.id in self.ingest:
                continue
            try:
                self.ingest[rec.id] = ray.get_actor(self.names.ingest(rec.id), namespace=runtime.NAMESPACE)
            except ValueError:
                pass

    async def _io(self, fn: Any, *args: Any) -> Any:
        """A blocking store call off the event loop; StoreUnavailable when the store is away."""
        self._watch()
        try:
            return await asyncio.to_thread(fn, *args)
        except (StreamNotFound, ValueError, TypeError, KeyError):
            raise
        except Exception as exc:
            if _unreachable(exc):
                raise StoreUnavailable(f"the store is unavailable ({type(exc).__name__}); retry shortly") from None
            raise

    def _watch(self) -> None:
        """Start the watchdog once, from inside the actor's event loop."""
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._restore_loop())

    async def _restore_loop(self) -> None:
        """Every 2 s: a running stream the store no longer knows (Redis restarted empty) has its
        record written back, so its actors' buffered writes land again; a deleted one is gone
        from ``known`` already. Nothing is orphaned: the engine holds every running stream."""
        while True:
            await asyncio.sleep(2.0)
            try:
                await self._restore_missing({r["id"] for r in await asyncio.to_thread(self.store.list_streams)})
            except Exception as exc:  # the store is away: next round
                log.debug("restore watchdog: %s", exc)

    async def _restore_missing(self, present: set[str]) -> list[StreamRecord]:
        """Write back the records of running streams the store does not have; the ones written."""
        restored = []
        for sid, rec in list(self.known.items()):
            if sid not in present and sid in self.known:
                log.warning("stream %s: the store lost its record; writing it back", sid)
                try:
                    await asyncio.to_thread(self.store.create_stream, rec.to_dict(), sid)
                except StreamExists:  # written back meanwhile (the watchdog or another call)
                    continue
                restored.append(rec)
        return restored

    async def _records(self) -> list[StreamRecord]:
        recs = [StreamRecord.from_dict(r) for r in await self._io(self.store.list_streams)]
        recs += await self._restore_missing({r.id for r in recs})
        for r in recs:  # the latest copy of each running stream's record
            if r.status in ("ended", "failed"):
                self.known.pop(r.id, None)
            elif r.id in self.known or r.id in self.ingest:
                self.known[r.id] = r
        return recs

    @staticmethod
    def _least_loaded(n: int, assigned: list[int]) -> int:
        load = [0] * n
        for i in assigned:
            if 0 <= i < n:
                load[i] += 1
        return min(range(n), key=lambda i: load[i])

    def _worker(self, rec: StreamRecord) -> Any:
        return self.workers[rec.worker % len(self.workers)]

    def _decoder(self, rec: StreamRecord) -> Any:
        return self.decoders[rec.decoder % len(self.decoders)]

    # ---- the contract ---------------------------------------------------------------------------
    async def create_stream(self, spec: Mapping[str, Any] | StreamSpec, owner: str | None = None) -> dict:
        """Register and start a stream for ``owner`` (a tenant id; None: the operator, stored as
        ""). ValueError naming the field or the source rule; NameTaken; LimitExceeded."""
        parsed = StreamSpec.parse(spec)
        owner = owner or ""
        budget = parsed.context_tokens or self.cfg.context_tokens
        if budget > self.cfg.max_context_tokens:
            raise ValueError(f"context_tokens: at most {self.cfg.max_context_tokens} (the model's range), got {budget}")
        from pipeline.sources import classify

        live = classify(parsed.source).live  # UnsupportedSourceError (a ValueError) names the problem
        if parsed.backpressure is None:  # a finite source waits for the model rather than lose a window
            parsed = parsed.model_copy(update={"backpressure": not live})
        await self._io(self.policy.check, parsed.source)  # SourceRefused names the rule; opens nothing
        async with self._creating:
            running = [r for r in await self._records() if r.status not in ("ended", "failed")]
            mine = [r for r in running if r.owner == owner]
            if parsed.name is not None and any(r.name == parsed.name for r in await self._records() if r.owner == owner):
                raise NameTaken(f"name: a stream named {parsed.name!r} already exists; delete it or choose another name")
            if len(running) >= self.cfg.max_streams:
                raise LimitExceeded(f"at most {self.cfg.max_streams} streams run at once; delete one first", "source", 30)
            if len(mine) >= self.cfg.max_streams_per_key:
                raise LimitExceeded(f"at most {self.cfg.max_streams_per_key} streams per API key; delete one first",
                                    "source", 30)
            rec = StreamRecord.from_spec(parsed, self.cfg.context_tokens, owner=owner,
                                         worker=self._least_loaded(len(self.workers), [r.worker for r in running]),
                                         decoder=self._least_loaded(len(self.decoders), [r.decoder for r in running]))
            rec = StreamRecord.from_dict(await self._io(self.store.create_stream, rec.to_dict()))
            self.known[rec.id] = rec
        self.ingest[rec.id] = runtime.start_ingest(self.names.ingest(rec.id), rec, self._worker(rec), self.cfg,
                                                   self.store_ref)
        return await self._status(rec)

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
        ing, enc, dec = await asyncio.gather(
            self._call(ing_h.stats.remote(), INGEST_STATS_TIMEOUT_S) if ing_h is not None else asyncio.sleep(0),
            self._call(self._worker(rec).stats.remote(rec.id)), self._call(self._decoder(rec).stats.remote(rec.id)))
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
                             dec if isinstance(dec, DecoderStats) else None, pending=pending)

    async def delete_stream(self, stream_id: str, owner: str | None = None) -> bool:
        rec = await self._record(stream_id, owner)
        self.known.pop(stream_id, None)
        ing = self.ingest.pop(stream_id, None)
        if ing is not None:
            await self._call(ing.stop.remote(), 10)
            ray.kill(ing, no_restart=True)
        await self._io(self.store.delete_stream, stream_id)
        await asyncio.gather(self._call(self._worker(rec).forget.remote(stream_id)),
                             self._call(self._decoder(rec).forget.remote(stream_id)))
        from pipeline.metrics import get_metrics
        get_metrics().forget_stream(stream_id)
        return True

    async def ask_events(self, stream_id: str, question: str | None = None, max_tokens: int = 64,
                         owner: str | None = None, messages: list[dict] | None = None) -> AsyncIterator[Any]:
        """An answer as events (pipeline.messages.AnswerStart, text pieces, AnswerEnd) to
        ``question`` or to a chat's ``messages``. At most ``max_questions_per_stream`` questions
        are answered or waiting on one stream; more get LimitExceeded, so a short question never
        queues behind an unbounded line of long answers."""
        if messages is None and (not isinstance(question, str) or not question.strip()):
            raise ValueError("question: must be a non-empty string")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= 4096:
            raise ValueError(f"max_tokens: must be an integer in [1, 4096], got {max_tokens!r}")
        rec = await self._record(stream_id, owner)
        if self._asking.get(stream_id, 0) >= self.cfg.max_questions_per_stream:
            raise LimitExceeded(f"{self.cfg.max_questions_per_stream} questions are already being answered on "
                                "this stream; try again when one is done", "question", 2)
        self._asking[stream_id] = self._asking.get(stream_id, 0) + 1
        try:
            gen = self._decoder(rec).ask.options(num_returns="streaming").remote(
                stream_id, question if messages is None else None, max_tokens, messages)
            async for ref in gen:
                yield await ref
        finally:
            left = self._asking.get(stream_id, 1) - 1
            if left > 0:
                self._asking[stream_id] = left
            else:
                self._asking.pop(stream_id, None)

    async def ask(self, stream_id: str, question: str, max_tokens: int = 64,
                  owner: str | None = None) -> AsyncIterator[str]:
        """The answer's text pieces only (the CLI's view of ``ask_events``)."""
        async for event in self.ask_events(stream_id, question, max_tokens, owner):
            if isinstance(event, str):
                yield event

    async def health(self) -> dict:
        names = [self.names.encoder(i) for i in range(len(self.workers))] + \
                [self.names.decoder(i) for i in range(len(self.decoders))]
        stats = await asyncio.gather(*(self._call(a.health.remote(), 10) for a in self.workers + self.decoders))
        store_ok = await asyncio.to_thread(self.store.ping)
        workers = {n: (s if isinstance(s, dict) else {"ok": False}) for n, s in zip(names, stats)}
        n = len(await self._io(self.store.list_streams)) if store_ok else len(self.ingest)
        return {"ok": bool(store_ok) and all(w.get("ok") for w in workers.values()), "streams": n,
                "degraded": not store_ok, "workers": workers, "store": "redis" if self.cfg.redis_url else "memory"}

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
        """The picture record of window `index` (pipeline.window_viz), None when it has none
        (never stored, or older than what the store keeps)."""
        from pipeline.window_viz import VIZ_KIND

        await self._record(stream_id, owner)
        return await self._io(self.store.get_blob, stream_id, int(index), VIZ_KIND)

    async def probe_source(self, source: str, options: Mapping[str, Any] | None = None,
                           owner: str | None = None) -> dict:
        """Open `source` under this engine's source policy, report what it carries within 5 s
        (pipeline.probe), register nothing. SourceRefused / UnsupportedSourceError as create."""
        from pipeline.probe import probe_source

        return await asyncio.to_thread(probe_source, source, options, self.policy)

    async def window_latencies(self, stream_id: str, owner: str | None = None) -> list[float]:
        """Per-window end-to-end latencies of a live stream (window end -> in the decoder's context)."""
        rec = await self._record(stream_id, owner)
        return await self._decoder(rec).latencies.remote(stream_id)

    async def shutdown(self, drain_s: float = 10.0) -> None:
        """Stop every stream's ingestion, let the windows already accepted reach the context and
        the store (at most ``drain_s`` seconds), then stop every actor of this service (the
        store's data stays)."""
        await asyncio.gather(*(self._call(h.stop.remote(), 5) for h in self.ingest.values()))
        deadline = time.monotonic() + drain_s
        for rec in list(self.known.values()):
            while time.monotonic() < deadline:
                enc = await self._call(self._worker(rec).stats.remote(rec.id), 5)
                if not isinstance(enc, EncoderStats) or not (enc.queue or enc.busy or enc.unwritten):
                    break
                await asyncio.sleep(0.2)
        for h in list(self.ingest.values()):
            try:
                ray.kill(h, no_restart=True)
            except Exception:
                pass
        self.ingest.clear()
        for h in self.workers + self.decoders:
            ray.kill(h, no_restart=True)
        if self.store_ref.handle is not None:
            ray.kill(self.store_ref.handle, no_restart=True)


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
    """The named service actor "<config.name>-service" in namespace "omnizip" (created if missing;
    an existing one is returned as is, whatever its config)."""
    cfg = ServiceConfig.coerce(config)
    opts: dict[str, Any] = dict(name=runtime.ActorNames(cfg.name).service(), namespace=runtime.NAMESPACE,
                                get_if_exists=True, num_cpus=0, max_restarts=-1, max_concurrency=1000)
    if cfg.detached:
        opts["lifetime"] = "detached"
    return ray.remote(StreamService).options(**opts).remote(cfg)


def shutdown_service(handle: Any, timeout_s: float = 60.0) -> None:
    """Stop a service actor's streams and actors, then the service actor itself."""
    try:
        ray.get(handle.shutdown.remote(), timeout=timeout_s)
    finally:
        ray.kill(handle, no_restart=True)
