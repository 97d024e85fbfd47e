"""Watches evaluated in the decoder, right after a window is appended, on the stream's warm
context, which is left exactly as it was (pipeline.core.watches has the spec and the decisions).

- ``yes_no``: one forward of the question's tokens, p(yes) against p(no) from the next-token
  logits (omnizip.models.probe), no generation. Due watches of several streams run as ONE
  packed forward (``watch_batch`` at most): the decoder defers them while more windows wait,
  so windows of several streams that arrive together share it, and flushes them before the
  next append of any stream that has one pending (its context is then still the one right after
  the window).
- ``answer``: at most ``max_tokens`` (<= 32) greedy tokens through the context's own ``answer``.

A watch never delays windows past the live policy: when a live stream's window is already
behind live (``max_lag_s``), or live windows wait in the decoder's queue past half of it, its
evaluations are skipped and counted (``omnizip_watch_skipped_total``, the watch's ``skipped``);
a backpressure stream (a file) waits for them instead. Fired/cleared transitions become events
(store.add_event), with the watch's outbox entry when it has a webhook (pipeline.engine.webhooks
delivers it). The watch's state is written on each transition and every ``STATE_EVERY``
evaluations.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.core.messages import CompressedItem
from pipeline.core.watches import WatchSpec, WatchState, decide, event_body, is_due

__all__ = ["WatchRunner", "YES_NO_SUFFIX"]

log = logging.getLogger(__name__)

YES_NO_SUFFIX = " Answer yes or no."
STATE_EVERY = 10  # evaluations between state writes without a transition
SKIP_REASONS = ("behind_live", "busy")


@dataclass
class _Watch:
    id: str
    spec: WatchSpec
    state: WatchState
    webhook: bool
    since_write: int = 0


@dataclass
class _Job:
    stream: str
    watch: _Watch
    index: int
    start: float
    end: float
    t0: float | None
    backpressure: bool


class WatchRunner:
    """The decoder's watches: which are due, deferred evaluation, batched forwards, events.
    ``context(sid)`` gives the stream's (lock, RollingContext) or None when it is gone here."""

    def __init__(self, model: Any, store: Any, metrics: Any, *, batch: int, max_events: int, max_lag_s: float,
                 context: Callable[[str], tuple[Any, Any] | None]) -> None:
        from omnizip.models.probe import NO_WORDS, YES_WORDS, answer_token_ids

        import torch

        self.model, self.store, self.metrics = model, store, metrics
        self.batch, self.max_events, self.max_lag_s = int(batch), int(max_events), float(max_lag_s)
        self.context = context
        yes = answer_token_ids(model.processor, YES_WORDS)
        self.n_yes = len(yes)
        self.rows = torch.tensor(yes + answer_token_ids(model.processor, NO_WORDS))
        self.watches: dict[str, dict[str, _Watch]] = {}
        self.pending: list[_Job] = []
        self._lock = threading.Lock()  # watches and pending: the loop and the intake thread both change them
        self.forwards = 0  # yes_no forwards run (batched or not): what tests and the bench read

    # -- which watches a stream has --
    def load(self, sid: str) -> int:
        """(Re)read the stream's watches from the store, keeping the state of those still here."""
        try:
            stored = self.store.list_watches(sid)
        except KeyError:  # the stream is gone
            self.watches.pop(sid, None)
            return 0
        new: dict[str, _Watch] = {}
        with self._lock:
            old = dict(self.watches.get(sid, {}))
        for w in stored:
            try:
                spec = WatchSpec.parse({k: v for k, v in w.get("spec", {}).items()})
            except ValueError:
                log.warning("stream %s: watch %s has an unreadable spec; ignored", sid, w.get("id"))
                continue
            prev = old.get(w["id"])
            state = prev.state if prev is not None else WatchState.from_dict(w.get("state"))
            new[w["id"]] = prev if prev is not None else _Watch(w["id"], spec, state, spec.webhook is not None)
        with self._lock:
            self.watches[sid] = new
            self.pending = [j for j in self.pending if j.stream != sid or j.watch.id in new]
        return len(new)

    def forget(self, sid: str) -> None:
        with self._lock:
            self.watches.pop(sid, None)
            self.pending = [j for j in self.pending if j.stream != sid]

    # -- after each appended window --
    def appended(self, sid: str, item: CompressedItem) -> None:
        """Queue the evaluations window ``item`` makes due (run by :meth:`flush`)."""
        with self._lock:
            for w in self.watches.get(sid, {}).values():
                if is_due(w.spec, w.state, item.index) and not any(j.watch is w for j in self.pending):
                    self.pending.append(_Job(sid, w, item.index, item.timing.start, item.timing.end,
                                             item.timing.t0, bool(item.backpressure)))

    def has_pending(self, sid: str | None = None) -> bool:
        return any(sid is None or j.stream == sid for j in self.pending)

    def flush(self, waiting_lag: float = 0.0, now: float | None = None) -> int:
        """Evaluate every pending job (skipping those of live streams that cannot wait, see the
        module docstring); ``waiting_lag`` is the worst lag of live windows waiting in the
        decoder's queue. Returns the evaluations run."""
        with self._lock:
            jobs, self.pending = self.pending, []
        now = time.time() if now is None else now
        run: list[_Job] = []
        for j in jobs:
            lag = None if j.t0 is None else now - (j.t0 + j.end)
            reason = None if j.backpressure else ("behind_live" if lag is not None and lag > self.max_lag_s
                                                  else "busy" if waiting_lag > self.max_lag_s / 2 else None)
            if reason is None:
                run.append(j)
                continue
            j.watch.state.skipped += 1
            j.watch.state.last_index = j.index  # the next due window counts from here
            self.metrics.watch_skipped(reason)
        yes_no = [j for j in run if j.watch.spec.kind == "yes_no"]
        for a in range(0, len(yes_no), self.batch):
            self._yes_no(yes_no[a:a + self.batch])
        for j in run:
            if j.watch.spec.kind == "answer":
                self._answer(j)
        return len(run)

    def _contexts(self, jobs: list[_Job]) -> dict[str, tuple[Any, Any]]:
        out = {}
        for j in jobs:
            got = self.context(j.stream)
            if got is not None:
                out[j.stream] = got
        return out

    def _yes_no(self, jobs: list[_Job]) -> None:
        from omnizip.models.probe import probe_last_logits, yes_probability

        ctxs = self._contexts(jobs)
        jobs = [j for j in jobs if j.stream in ctxs]
        if not jobs:
            return
        t = time.perf_counter()
        with contextlib.ExitStack() as locks:
            for sid in sorted(ctxs):  # one order everywhere: never two locks taken the other way round
                locks.enter_context(ctxs[sid][0])
            pieces, caches = [], []
            for j in jobs:
                ctx = ctxs[j.stream][1]
                pieces.append(self.model.prompt_suffix(j.watch.spec.question + YES_NO_SUFFIX, ctx.next_position))
                caches.append(ctx.cache)
            p = yes_probability(probe_last_logits(self.model, caches, pieces, self.rows), self.n_yes).tolist()
        self.forwards += 1
        self.metrics.watch_evaluated("yes_no", time.perf_counter() - t)
        for j, pj in zip(jobs, p):
            self._decided(j, p_yes=float(pj))

    def _answer(self, j: _Job) -> None:
        got = self.context(j.stream)
        if got is None:
            return
        lock, ctx = got
        t = time.perf_counter()
        ids: list[int] = []
        with lock:
            tokens = ctx.answer(j.watch.spec.question, j.watch.spec.max_tokens)
            try:
                for tok in tokens:
                    if tok in self.model.stop_ids:
                        break
                    ids.append(tok)
            finally:
                tokens.close()
        self.metrics.watch_evaluated("answer", time.perf_counter() - t)
        self._decided(j, answer=self.model.processor.decode(ids))

    def _decided(self, j: _Job, *, p_yes: float | None = None, answer: str | None = None) -> None:
        w, now = j.watch, time.time()
        self.metrics.watch_evaluated(w.spec.kind)
        w.state, change = decide(w.spec, w.state, j.index, now, p_yes=p_yes, answer=answer)
        w.since_write += 1
        try:
            if change is not None:
                body = event_body(j.stream, w.id, j.index, j.start, j.end, change, now)
                self.store.add_event(j.stream, body, max_events=self.max_events,
                                     deliver_to=w.id if w.webhook else None)
                self.metrics.watch_event(change.state)
            if change is not None or w.since_write >= STATE_EVERY:
                self.store.set_watch_part(j.stream, w.id, "state", w.state.to_dict())
                w.since_write = 0
        except Exception:  # the store away: the state stays here and is written next time
            log.warning("stream %s watch %s: event or state not stored", j.stream, w.id, exc_info=True)

    def states(self, sid: str) -> dict[str, dict]:
        """The watches' live states here (evaluations, skipped, fired or clear)."""
        return {wid: w.state.to_dict() for wid, w in self.watches.get(sid, {}).items()}
