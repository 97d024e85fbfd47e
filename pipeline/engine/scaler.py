"""The elastic pools' rounds, as part of the engine (pipeline.engine.service.StreamService):
pipeline.core.pool decides the target size and the moves, pipeline.engine.elastic holds the
actors, and this mixin carries the moves out (record first, then the old member hands over, then
the producer is pointed at the new one). A mixin over the service's state (cfg, store, pools,
known, ingest), kept apart so the service's contract reads on its own."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from pipeline.core.pool import rebalance, target_size
from pipeline.core.records import StreamRecord
from pipeline.metrics import get_metrics

if TYPE_CHECKING:
    from pipeline.core.config import ServiceConfig
    from pipeline.engine.elastic import Pool

log = logging.getLogger("pipeline.engine.service")

__all__ = ["PoolScaling"]


class PoolScaling:
    """Scaling rounds and stream moves of the engine's encoder and decoder pools."""

    cfg: ServiceConfig
    encoders: Pool
    decoders: Pool
    known: dict[str, StreamRecord]
    ingest: dict[str, Any]
    moves: int
    _stopping: bool

    async def _scale_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.cfg.scale_interval_s)
            try:
                await self.rescale()
            except Exception as exc:  # the store away, an actor call failing: next round
                log.warning("scaling round failed: %r", exc)

    async def rescale(self) -> list[dict]:
        """One scaling round over both pools: grow by one member when the load asks for it,
        shrink by one after ``scale_down_after_s`` of calm, and move streams so every stream is on
        a member that is up and the members' shares differ by at most one (a member that joined
        gets streams, one that left or stayed away past its grace gives them up). The moves done."""
        await self._records()  # refresh `known`: the running streams and where each one is
        moved: list[dict] = []
        for pool, field in ((self.encoders, "worker"), (self.decoders, "decoder")):
            members = await pool.probe()
            target = target_size(pool.bounds, members, len(self.known))
            gone = pool.gone()
            leaving = None
            if target > len(members):
                pool.grow()
            elif pool.calm_for(target < len(members)) >= self.cfg.scale_down_after_s:
                leaving = max(gone) if gone else max(pool.members)
            homes = [i for i in pool.ready() if i != leaving]
            waiting = set(pool.restarting())  # their streams wait for them to come back
            where = {r.id: getattr(r, field) for r in self.known.values() if getattr(r, field) not in waiting}
            for mv in rebalance(where, homes) if homes else []:
                if await self._move(field, mv.stream_id, mv.src, mv.dst):
                    moved.append({"stream": mv.stream_id, "pool": pool.kind, "from": mv.src, "to": mv.dst})
            for i in ([leaving] if leaving is not None else []) + gone:
                if i in pool.members and not any(getattr(r, field) == i for r in self.known.values()):
                    if i in gone:
                        log.warning("%s pool: member %d did not answer in time; stopping it", pool.kind, i)
                    pool.stop(i)
                    pool.calm_for(False)
            get_metrics().set_pool(pool.kind, len(pool.ready()), len(pool.starting()), len(pool.restarting()),
                                   pool.bounds.low, pool.bounds.high)
        return moved

    async def _move(self, field: str, sid: str, src: int, dst: int) -> bool:
        """Move a stream's encoding (``worker``) or context (``decoder``) from member ``src`` to
        ``dst``: the record names the new member first (so late calls to the old one are turned
        away), the old one hands over what it holds, then the producer is pointed at the new one,
        which continues from the store."""
        pool = self.encoders if field == "worker" else self.decoders
        try:
            # moved_<field>: the member that loads it knows it is a planned move, not a restart
            rec = StreamRecord.from_dict(await self._io(self.store.update_stream, sid, {field: dst, f"moved_{field}": dst}))
        except Exception as exc:
            log.warning("stream %s: not moved: %r", sid, exc)
            return False
        log.info("stream %s: %s %d -> %d", sid, pool.kind, src, dst)
        self.known[sid] = rec
        old = pool.members.get(src) if src in pool.ready() else None
        if field == "worker":
            if old is not None:
                await self._call(old.release.remote(sid), 40)
            ing = self.ingest.get(sid)
            if ing is not None:
                await self._call(ing.retarget.remote(dst), 10)
        else:
            await self._call(self._worker(rec).redirect.remote(sid, dst), 10)
            if old is not None:
                await self._call(old.release.remote(sid), 10)
        self.moves += 1
        get_metrics().stream_moved(pool.kind)
        return True
