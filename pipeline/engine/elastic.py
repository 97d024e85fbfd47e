"""An elastic pool of model actors (encoder workers or decoders) as the service drives it: the
members by index (their names say it: "<engine>-encoder-3"), their last health, starting one
and stopping one. The decisions are pipeline.core.pool's; moving a stream is the service's (it owns
the records and the ingest actors).

A member that was up and stops answering is *restarting* for ``grace_s`` (Ray restarts a dead
actor on any node that can host it, a lost node's included): its streams wait for it. After
that it is *gone*: its streams move to the members that are up, continuing from the store. A new
member is *starting* until it first answers (placing it may wait for a node an autoscaler adds);
it gets no stream until then, and one that never answers within ``start_grace_s`` is given up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import ray

from pipeline.core.pool import Bounds, Member

__all__ = ["Pool"]

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 3.0


class Pool:
    """One kind of model actor, ``low`` to ``high`` of them."""

    def __init__(self, kind: str, bounds: Bounds, start: Callable[[int], Any], grace_s: float,
                 start_grace_s: float = 600.0) -> None:
        self.kind = kind
        self.bounds = bounds
        self._start = start
        self.grace_s = grace_s
        self.start_grace_s = start_grace_s
        self.members: dict[int, Any] = {}
        self._was_up: set[int] = set()  # members that have answered at least once
        self.health: dict[int, dict] = {}  # the last answer of each member that answered
        self._unready_since: dict[int, float] = {}
        self._calm_since: float | None = None
        for i in range(bounds.low):
            self.grow()

    # -- membership --
    def grow(self) -> int:
        """Start a member at the lowest free index (Ray places it when resources allow: an
        autoscaler may add a node for it first)."""
        i = next(k for k in range(len(self.members) + 1) if k not in self.members)
        self.members[i] = self._start(i)
        self._unready_since[i] = time.monotonic()
        log.info("%s pool: member %d starting (%d members)", self.kind, i, len(self.members))
        return i

    def stop(self, i: int) -> None:
        """Stop member ``i`` for good (its streams have moved)."""
        h = self.members.pop(i, None)
        self.health.pop(i, None)
        self._unready_since.pop(i, None)
        self._was_up.discard(i)
        if h is not None:
            log.info("%s pool: member %d stopped (%d members)", self.kind, i, len(self.members))
            try:
                ray.kill(h, no_restart=True)
            except Exception:
                pass

    def handle(self, i: int) -> Any:
        """Member ``i``, or the lowest member when the pool has no ``i`` (a record of an older engine)."""
        return self.members.get(i) if i in self.members else self.members[min(self.members)]

    # -- health --
    async def probe(self) -> list[Member]:
        """Ask every member's health (at most HEALTH_TIMEOUT_S): the pool as pipeline.core.pool sees it."""
        idx = sorted(self.members)
        answers = await asyncio.gather(*(asyncio.wait_for(self.members[i].health.remote(), HEALTH_TIMEOUT_S)
                                         for i in idx), return_exceptions=True)
        now = time.monotonic()
        out = []
        for i, a in zip(idx, answers):
            ok = isinstance(a, dict) and a.get("ok")
            if ok:
                self.health[i] = a
                self._unready_since.pop(i, None)
                self._was_up.add(i)
            else:
                self._unready_since.setdefault(i, now)
            h = self.health.get(i, {})
            out.append(Member(i, bool(ok), int(h.get("queue", 0)), float(h.get("lag_s", 0.0))))
        return out

    def ready(self) -> list[int]:
        return sorted(i for i in self.members if i not in self._unready_since)

    def gone(self) -> list[int]:
        """Members that were up and have not answered for longer than the grace period, and
        members that never answered within the start grace period."""
        now = time.monotonic()
        return sorted(i for i, t in self._unready_since.items()
                      if now - t > (self.grace_s if i in self._was_up else self.start_grace_s))

    def restarting(self) -> list[int]:
        """Members that were up and are silent, still within their grace period: their streams wait."""
        gone = set(self.gone())
        return sorted(i for i in self._unready_since if i in self._was_up and i not in gone)

    def starting(self) -> list[int]:
        """Members that have not answered yet since they were started (placing or loading)."""
        gone = set(self.gone())
        return sorted(i for i in self._unready_since if i not in self._was_up and i not in gone)

    def calm_for(self, wants_fewer: bool) -> float:
        """How long the pool has wanted fewer members without a break (0 when it does not)."""
        now = time.monotonic()
        if not wants_fewer:
            self._calm_since = None
            return 0.0
        if self._calm_since is None:
            self._calm_since = now
        return now - self._calm_since
