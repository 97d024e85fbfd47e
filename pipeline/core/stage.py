"""One stage's step, shared by the encoder workers and the decoders, without Ray: *take* a batch
from the stage's scheduler (pipeline.core.queues), *run* it (the model), *update* the scheduler
(every taken window finished; a failed batch's windows counted as `error` drops). The shape of
vLLM's ``EngineCore.step`` (schedule -> execute -> update); the actors only supply ``run``."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from pipeline.core.queues import QueuedWindow, StreamQueues, Taken

__all__ = ["StageCore"]

W = TypeVar("W", bound=QueuedWindow)

log = logging.getLogger(__name__)


class StageCore(Generic[W]):
    """The take -> run -> update loop of one stage over its ``queues``, guarded by ``cond`` (the
    actor's lock, shared with its intake). ``run(batch)`` executes a batch and handles what it
    can per window; an exception out of it drops the whole batch as `error`. ``before()`` runs
    after each take (the encoder flushes ended streams there), ``after()`` after each step (the
    decoder saves its drop counts), ``wake()`` ends a wait without queued work."""

    def __init__(self, name: str, queues: StreamQueues[W], cond: threading.Condition, max_batch: int,
                 run: Callable[[list[Taken[W]]], None], *, before: Callable[[], None] | None = None,
                 after: Callable[[], None] | None = None, wake: Callable[[], bool] | None = None,
                 gauge: Callable[[], None] | None = None) -> None:
        self.name, self.queues, self.cond, self.max_batch = name, queues, cond, max(1, int(max_batch))
        self._run, self._before, self._after = run, before, after
        self._wake = wake or (lambda: False)
        self._gauge = gauge or (lambda: None)
        self.steps = 0

    def take(self, now: float, wait_s: float = 0.5) -> list[Taken[W]]:
        """Schedule: wait (at most ``wait_s`` at a time) for work, then take a batch."""
        with self.cond:
            while not self.queues.has_work() and not self._wake():
                self.cond.wait(wait_s)
            batch = self.queues.take(self.max_batch, now)
            self._gauge()
        return batch

    def step(self, now: float | None = None) -> int:
        """One step: take, run, update. Returns the windows taken."""
        batch = self.take(time.time() if now is None else now)
        if self._before is not None:
            self._before()
        if batch:
            try:
                self._run(batch)
            except Exception:
                log.exception("%s: batch of %d failed", self.name, len(batch))
                with self.cond:
                    for t in batch:
                        self.queues.drop(t.window.stream_id, t.window.index, "error")
            finally:
                with self.cond:
                    for t in batch:
                        self.queues.finish(t.window.stream_id)
                    self.cond.notify_all()
        if self._after is not None:
            self._after()
        self.steps += 1
        return len(batch)

    def run_forever(self) -> None:
        while True:
            self.step()
