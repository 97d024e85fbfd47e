"""The engine's life, as part of the engine (pipeline.engine.service.StreamService): taking
running streams on at start (its own after a restart, an older engine's after a redeploy),
writing back records a store lost, the Serve replicas' leases, retiring and shutting down. A
mixin over the service's state (cfg, names, store, pools, known, ingest), kept apart so the
service's contract reads on its own."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import ray

from pipeline.core.pool import least_loaded
from pipeline.core.records import StreamRecord
from pipeline.core.stats import EncoderStats
from pipeline.engine import launch, runtime
from pipeline.store.contract import StreamExists

if TYPE_CHECKING:
    from pipeline.core.config import ServiceConfig
    from pipeline.engine.elastic import Pool

log = logging.getLogger("pipeline.engine.service")

REPLICA_LEASE_S = 35.0  # a Serve replica not heard of for this long is gone (it renews every health check)
UNUSED_GRACE_S = 5.0  # the engine stops this long after its last replica left

__all__ = ["EngineLife", "REPLICA_LEASE_S", "UNUSED_GRACE_S"]


class EngineLife:
    """Start-up take-over, record write-back, replica leases, retire and shutdown."""

    cfg: ServiceConfig
    names: runtime.ActorNames
    encoders: Pool
    decoders: Pool
    known: dict[str, StreamRecord]
    ingest: dict[str, Any]

    async def _reattach(self) -> None:
        """Once, before the first request is served: retire older engines of the same name (a
        redeploy with another config), then take every running stream on: a restarted service
        finds its streams' ingest actors again; a stream without one (an older engine's, or one
        whose actor is gone) is placed on this engine's pools and its ingestion resumed from the
        store."""
        if self._reattached:
            return
        async with self._reattaching:
            if self._reattached:
                return
            await self._retire_others()
            for rec in await self._records():
                if rec.id in self.ingest or rec.status in ("ended", "failed") or rec.extra.get("engine") != self.cfg.name:
                    continue  # over, or another engine's (engines of other names may share a Redis)
                try:
                    self.ingest[rec.id] = runtime.lookup(self.names.ingest(rec.id))
                except ValueError:
                    await self._adopt(rec)
            self._reattached = True

    async def _adopt(self, rec: StreamRecord) -> None:
        """Run a stream this engine did not start: on its pools' least-loaded members, its ingest
        resuming from the store (a file at the first window not yet durable, a live source anew)."""
        running = [r for r in self.known.values() if r.id != rec.id]
        changes: dict[str, Any] = {}
        if rec.worker not in self.encoders.members:
            changes["worker"] = least_loaded([r.worker for r in running], self.encoders.ready() or self.encoders.members)
        if rec.decoder not in self.decoders.members:
            changes["decoder"] = least_loaded([r.decoder for r in running], self.decoders.ready() or self.decoders.members)
        if changes:
            rec = StreamRecord.from_dict(await self._io(self.store.update_stream, rec.id, changes))
        log.warning("stream %s: taken over by engine %s", rec.id, self.names.prefix)
        self.known[rec.id] = rec
        self._info(rec)
        self.ingest[rec.id] = launch.start_ingest(self.names.ingest(rec.id), rec, self.cfg, self.store_ref)

    async def _retire_others(self) -> None:
        """Drain and stop every other engine of this config's name (older deployments)."""
        named = await asyncio.to_thread(ray.util.list_named_actors, True)
        others = [a["name"] for a in named
                  if a.get("namespace") == runtime.NAMESPACE and self.names.is_other_engine(a["name"])]
        for name in others:
            try:
                old = runtime.lookup(name)
            except ValueError:
                continue
            log.warning("engine %s replaces %s: draining it", self.names.prefix, name)
            try:
                await asyncio.wait_for(old.retire.remote(), 90)
            except Exception as exc:
                log.warning("retiring %s: %r", name, exc)
            try:
                ray.kill(old, no_restart=True)
            except Exception:
                pass

    async def _lifecycle_loop(self) -> None:
        """Once replicas have used this engine and none is left for UNUSED_GRACE_S (the Serve app
        was deleted or shut down), stop every actor of the engine and then this one."""
        idle_since = None
        while not self._stopping:
            await asyncio.sleep(1.0)
            if not self._unused():
                idle_since = None
                continue
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since >= UNUSED_GRACE_S:
                log.warning("no Serve replica uses engine %s any more: stopping it", self.names.prefix)
                await self.shutdown()
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    async def _restore_loop(self) -> None:
        """Every 2 s: a running stream the store no longer knows (Redis restarted empty) has its
        record written back, so its actors' buffered writes land again; a deleted one is gone
        from ``known`` already. Nothing is orphaned: the engine holds every running stream."""
        rounds = 0
        while True:
            await asyncio.sleep(2.0)
            rounds += 1
            try:
                await self._restore_missing({r["id"] for r in await runtime.store_call(self.store.list_streams)})
                if rounds % 30 == 0:  # every minute: ended streams past their bound or retention go
                    await self.forget_ended()
            except Exception as exc:  # the store is away: next round
                log.debug("restore watchdog: %s", exc)

    async def _restore_missing(self, present: set[str]) -> list[StreamRecord]:
        """Write back the records of running streams the store does not have; the ones written."""
        restored = []
        for sid, rec in list(self.known.items()):
            if sid not in present and sid in self.known:
                log.warning("stream %s: the store lost its record; writing it back", sid)
                try:
                    await runtime.store_call(self.store.create_stream, rec.to_dict(), sid)
                except StreamExists:  # written back meanwhile (the watchdog or another call)
                    continue
                restored.append(rec)
        return restored

    async def register_replica(self, replica_id: str) -> bool:
        """A Serve replica uses this engine (called at its start and by its health checks): the
        engine runs while some replica has been heard of within REPLICA_LEASE_S."""
        self._replicas[str(replica_id)] = time.monotonic()
        self._served = True
        self._watch()
        await self._reattach()
        return True

    async def release_replica(self, replica_id: str) -> bool:
        """A Serve replica shut down (``serve shutdown``, a redeploy, a downscale)."""
        self._replicas.pop(str(replica_id), None)
        return True

    def _unused(self) -> bool:
        """Replicas have used this engine and none has been heard of within the lease."""
        now = time.monotonic()
        return self._served and not any(now - t < REPLICA_LEASE_S for t in self._replicas.values())

    async def retire(self, drain_s: float = 30.0) -> None:
        """Stop this engine for a newer one of the same name: ingestion stops, accepted windows
        are made durable, every actor stops, the streams and the store stay (the new engine
        takes the streams on from the store)."""
        await self.shutdown(drain_s, keep_store=True)

    async def shutdown(self, drain_s: float = 10.0, keep_store: bool = False) -> None:
        """Stop every stream's ingestion, let the windows already accepted reach the context and
        the store (at most ``drain_s`` seconds), then stop every actor of this service (the
        store's data stays; the in-process store's actor too when ``keep_store`` or another
        engine of the same name uses it)."""
        if self._stopping:
            return
        self._stopping = True
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
        for pool in (self.encoders, self.decoders):
            for i in list(pool.members):
                pool.stop(i)
        store = self.store_ref.handle
        if store is not None and not keep_store and not await asyncio.to_thread(self._others_alive):
            ray.kill(store, no_restart=True)

    def _others_alive(self) -> bool:
        return any(a.get("namespace") == runtime.NAMESPACE and self.names.is_other_engine(a["name"])
                   for a in ray.util.list_named_actors(all_namespaces=True))
