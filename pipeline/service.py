"""The engine's front door: `StreamService` owns every stream (create, status, ask, delete) and
the actors behind them (pipeline.ingest, pipeline.encoder, pipeline.decoder). It runs as the named
Ray actor "<name>-service" (`get_or_create_service`), which the Serve app and the CLI call; every
actor it starts is named in the "omnizip" namespace (pipeline.runtime), so a restarted service
finds them again, and every stream's record lives in the store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import ray

from pipeline import runtime
from pipeline.config import ServiceConfig
from pipeline.records import StreamRecord, StreamSpec
from pipeline.stats import DecoderStats, EncoderStats, IngestStats, stream_status
from pipeline.store import Retention, StreamNotFound

log = logging.getLogger(__name__)

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
        self.store = self.store_ref.connect()
        self.decoders = [runtime.start_decoder(self.names.decoder(i), c, self.store_ref)
                         for i in range(c.decoder_actors)]
        self.workers = [runtime.start_encoder(self.names.encoder(i), c, self.decoders, self.store_ref)
                        for i in range(c.encoder_workers)]
        self.ingest: dict[str, Any] = {}
        self._reattached = False

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
        """A blocking store call off the event loop."""
        return await asyncio.to_thread(fn, *args)

    async def _records(self) -> list[StreamRecord]:
        return [StreamRecord.from_dict(r) for r in await self._io(self.store.list_streams)]

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
    async def create_stream(self, spec: Mapping[str, Any] | StreamSpec) -> dict:
        """Register and start a stream; ValueError naming the field on a bad spec."""
        parsed = StreamSpec.parse(spec)
        from pipeline.sources import classify

        classify(parsed.source)  # UnsupportedSourceError (a ValueError) names the problem
        running = [r for r in await self._records() if r.status not in ("ended", "failed")]
        rec = StreamRecord.from_spec(parsed, self.cfg.context_tokens,
                                     worker=self._least_loaded(len(self.workers), [r.worker for r in running]),
                                     decoder=self._least_loaded(len(self.decoders), [r.decoder for r in running]))
        rec = StreamRecord.from_dict(await self._io(self.store.create_stream, rec.to_dict()))
        self.ingest[rec.id] = runtime.start_ingest(self.names.ingest(rec.id), rec, self._worker(rec), self.cfg,
                                                   self.store_ref)
        return await self.get_stream(rec.id)

    async def list_streams(self) -> list[dict]:
        await self._reattach()
        out = await asyncio.gather(*(self._status(r) for r in await self._records()), return_exceptions=True)
        return [s for s in out if isinstance(s, dict)]

    async def get_stream(self, stream_id: str) -> dict:
        return await self._status(await self._record(stream_id))

    async def _record(self, stream_id: str) -> StreamRecord:
        await self._reattach()
        if not isinstance(stream_id, str):
            raise KeyError(stream_id)
        try:
            return StreamRecord.from_dict(await self._io(self.store.get_stream, stream_id))
        except (StreamNotFound, ValueError):
            raise KeyError(stream_id) from None

    async def _call(self, ref: Any, timeout: float = 60.0) -> Any:
        try:
            return await asyncio.wait_for(ref, timeout)
        except Exception as e:
            log.warning("engine call failed: %s", e)
            return None

    async def _status(self, rec: StreamRecord) -> dict:
        ing_h = self.ingest.get(rec.id)
        ing, enc, dec = await asyncio.gather(
            self._call(ing_h.stats.remote(), 10) if ing_h is not None else asyncio.sleep(0),
            self._call(self._worker(rec).stats.remote(rec.id)), self._call(self._decoder(rec).stats.remote(rec.id)))
        if ing_h is not None and isinstance(ing, IngestStats) and ing.done and rec.ingest is not None:
            self.ingest.pop(rec.id, None)  # the source is over and its figures are in the record
            ray.kill(ing_h, no_restart=True)
        return stream_status(rec, ing if isinstance(ing, IngestStats) else None,
                             enc if isinstance(enc, EncoderStats) else None,
                             dec if isinstance(dec, DecoderStats) else None)

    async def delete_stream(self, stream_id: str) -> bool:
        rec = await self._record(stream_id)
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

    async def ask(self, stream_id: str, question: str, max_tokens: int = 64) -> AsyncIterator[str]:
        """Text pieces of the answer, one per generated token."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError("question: must be a non-empty string")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= 4096:
            raise ValueError(f"max_tokens: must be an integer in [1, 4096], got {max_tokens!r}")
        rec = await self._record(stream_id)
        gen = self._decoder(rec).ask.options(num_returns="streaming").remote(stream_id, question, max_tokens)
        async for ref in gen:
            yield await ref

    async def health(self) -> dict:
        names = [self.names.encoder(i) for i in range(len(self.workers))] + \
                [self.names.decoder(i) for i in range(len(self.decoders))]
        stats = await asyncio.gather(*(self._call(a.health.remote(), 10) for a in self.workers + self.decoders))
        store_ok = await self._io(self.store.ping)
        workers = {n: (s if s else {"ok": False}) for n, s in zip(names, stats)}
        n = len(await self._io(self.store.list_streams)) if store_ok else len(self.ingest)
        return {"ok": bool(store_ok) and all(w.get("ok") for w in workers.values()), "streams": n,
                "workers": workers, "store": "redis" if self.cfg.redis_url else "memory"}

    async def windows(self, stream_id: str, start: int = 0) -> list[dict]:
        """The stored windows' metadata from index `start` (no payloads): index, media start/end,
        tokens in/kept per modality, whether it was compressed harder."""
        await self._record(stream_id)
        ws = await self._io(self.store.windows, stream_id, start)
        return [{"index": w.index, "start": w.media_start, "end": w.media_end, **w.fields} for w in ws]

    async def window_latencies(self, stream_id: str) -> list[float]:
        """Per-window end-to-end latencies of a live stream (window end -> in the decoder's context)."""
        rec = await self._record(stream_id)
        return await self._decoder(rec).latencies.remote(stream_id)

    async def shutdown(self) -> None:
        """Stop every stream's ingestion and every actor of this service (the store's data stays)."""
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
