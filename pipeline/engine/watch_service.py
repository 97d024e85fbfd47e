"""The engine's side of watches, mixed into pipeline.engine.service.StreamService: create, list,
get and delete a stream's watches (owned like their stream: another key's stream is a KeyError,
404), the stream's events in pages, and the webhook deliverer's loop (pipeline.engine.webhooks),
which runs in the service actor so a restarted service delivers what its store still holds."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from pipeline.core.watches import WatchSpec, new_secret, new_watch_id
from pipeline.engine import runtime
from pipeline.engine.webhooks import DeliveryPolicy, due, judge, next_delivery_state, post_event, webhook_policy
from pipeline.errors import LimitExceeded
from pipeline.metrics import get_metrics

__all__ = ["WatchService", "public_watch"]

log = logging.getLogger(__name__)

DELIVER_EVERY_S = 0.5  # the deliverer looks at the outboxes this often
MAX_PARALLEL_DELIVERIES = 8


def public_watch(w: Mapping[str, Any], live: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A watch as the API shows it: its spec, its state (the decoder's live one when given) and
    its webhook's delivery status; never its secret."""
    spec = dict(w.get("spec") or {})
    state = dict(live or w.get("state") or {})
    out = {"id": w["id"], "stream_id": w.get("stream"), "created": w.get("created"), **spec,
           "state": {k: state.get(k) for k in ("state", "last_index", "last_fired", "last_answer", "evaluations",
                                                "skipped")}}
    out["state"]["state"] = out["state"]["state"] or "clear"
    if spec.get("webhook"):
        d = dict(w.get("delivery") or {})
        out["webhook"] = {"url": spec["webhook"]["url"], "status": d.get("status", "active"),
                          "delivered": int(d.get("delivered") or 0), "failed_attempts": int(d.get("failed") or 0),
                          "failing_since": d.get("failing_since"), "last_error": d.get("last_error"),
                          "last_status": d.get("last_status")}
    return out


class WatchService:
    """Watch routes of the engine; the host class provides cfg, store, _io, _record, _records, _decoder."""

    cfg: Any
    store: Any

    def _watch_policy(self) -> Any:
        if getattr(self, "_wh_policy", None) is None:
            self._wh_policy = webhook_policy(self.cfg)
        return self._wh_policy

    async def create_watch(self, stream_id: str, spec: Mapping[str, Any], owner: str | None = None) -> dict:
        """Register a watch on ``owner``'s stream: ValueError naming the field; WebhookRefused
        (400) naming the rule; LimitExceeded (429) past the per-stream or per-key limit. The
        answer holds ``webhook.secret``, shown here only."""
        rec = await self._record(stream_id, owner)
        parsed = WatchSpec.parse(dict(spec))
        if parsed.webhook is not None:  # judged now and again at every delivery
            await asyncio.to_thread(judge, self._watch_policy(), parsed.webhook.url)
        if getattr(self, "_watch_lock", None) is None:
            self._watch_lock = asyncio.Lock()
        async with self._watch_lock:  # limits see every earlier create
            mine = await self._io(self.store.list_watches, rec.id)
            if len(mine) >= self.cfg.max_watches_per_stream:
                raise LimitExceeded(f"at most {self.cfg.max_watches_per_stream} watches per stream; delete one first",
                                    "watches", 30)
            others = [r for r in await self._records() if r.owner == rec.owner and r.id != rec.id
                      and r.status not in ("ended", "failed")]
            total = len(mine)
            for r in others:
                total += len(await self._io(self.store.list_watches, r.id))
            if total >= self.cfg.max_watches_per_key:
                raise LimitExceeded(f"at most {self.cfg.max_watches_per_key} watches per API key; delete one first",
                                    "watches", 30)
            watch = {"id": new_watch_id(), "stream": rec.id, "created": time.time(),
                     "spec": parsed.model_dump(exclude={"webhook"}) | (
                         {"webhook": {"url": parsed.webhook.url}} if parsed.webhook else {"webhook": None})}
            if parsed.webhook is not None:
                watch["secret"] = new_secret()
            await self._io(self.store.put_watch, rec.id, watch)
        await self._tell_decoder(rec)
        out = public_watch(watch)
        if parsed.webhook is not None:
            out["webhook"]["secret"] = watch["secret"]
        return out

    async def _tell_decoder(self, rec: Any) -> None:
        """The stream's decoder re-reads its watches (a decoder that does not hold the stream
        now reads them when it first does)."""
        try:
            await asyncio.wait_for(self._decoder(rec).watches_changed.remote(rec.id), 10)
        except Exception as exc:
            log.warning("stream %s: decoder not told of a watch change: %r", rec.id, exc)

    async def _live_states(self, rec: Any) -> dict[str, dict]:
        try:
            return await asyncio.wait_for(self._decoder(rec).watch_states.remote(rec.id), 3)
        except Exception:
            return {}

    async def list_watches(self, stream_id: str, owner: str | None = None) -> list[dict]:
        rec = await self._record(stream_id, owner)
        live = await self._live_states(rec)
        return [public_watch(w, live.get(w["id"])) for w in await self._io(self.store.list_watches, rec.id)]

    async def get_watch(self, stream_id: str, watch_id: str, owner: str | None = None) -> dict:
        for w in await self.list_watches(stream_id, owner):
            if w["id"] == watch_id:
                return w
        raise KeyError(f"no watch {watch_id!r} on stream {stream_id!r}")

    async def delete_watch(self, stream_id: str, watch_id: str, owner: str | None = None) -> bool:
        rec = await self._record(stream_id, owner)
        if not await self._io(self.store.delete_watch, rec.id, watch_id):
            raise KeyError(f"no watch {watch_id!r} on stream {stream_id!r}")
        await self._tell_decoder(rec)
        return True

    async def watch_events(self, stream_id: str, after: str | None = None, limit: int = 100,
                           owner: str | None = None) -> list[dict]:
        """Events of ``owner``'s stream after event id ``after`` (None: the oldest kept)."""
        rec = await self._record(stream_id, owner)
        return await self._io(self.store.events, rec.id, after, int(limit))

    # ---- the webhook deliverer --------------------------------------------------------------
    async def _deliver_loop(self) -> None:
        """Every DELIVER_EVERY_S: each stream's outbox, the oldest event of each watch first."""
        while not getattr(self, "_stopping", False):
            try:
                await self.deliver_round()
            except Exception as exc:  # the store away: next round
                log.debug("webhook round failed: %r", exc)
            await asyncio.sleep(DELIVER_EVERY_S)

    async def deliver_round(self, now: float | None = None) -> int:
        """One pass over every outbox; returns the deliveries that succeeded."""
        pending = 0
        jobs = []
        for sid in await runtime.store_call(self.store.outbox_streams):
            entries = await runtime.store_call(self.store.outbox, sid, 1000)
            pending += len(entries)
            if not entries:
                continue
            watches = {w["id"]: w for w in await runtime.store_call(self.store.list_watches, sid)}
            by_watch: dict[str, list[dict]] = {}
            for e in entries:
                by_watch.setdefault(e["watch"], []).append(e)
            for wid, queue in by_watch.items():
                jobs.append(self._deliver_watch(sid, watches.get(wid), queue, now))
        get_metrics().set_webhook_pending(pending)
        sem = asyncio.Semaphore(MAX_PARALLEL_DELIVERIES)

        async def bounded(job: Any) -> int:
            async with sem:
                return await job

        return sum(await asyncio.gather(*(bounded(j) for j in jobs)))

    async def _deliver_watch(self, sid: str, watch: dict | None, queue: list[dict], now: float | None) -> int:
        """This watch's pending events in order, until one fails (the rest wait behind it)."""
        metrics, done = get_metrics(), 0
        spec = (watch or {}).get("spec") or {}
        if watch is None or not spec.get("webhook") or watch.get("delivery", {}).get("status") == "disabled":
            for e in queue:  # its watch is gone or disabled: nothing will deliver these
                await runtime.store_call(self.store.outbox_done, sid, e["id"])
                metrics.webhook_delivery("dropped")
            return 0
        state = dict(watch.get("delivery") or {})
        p = DeliveryPolicy(self.cfg.webhook_retry_s, self.cfg.webhook_retry_max_s, self.cfg.webhook_disable_after_s)
        for e in queue:
            t = time.time() if now is None else now
            if not due(state, t):
                break
            attempt = await asyncio.to_thread(post_event, self._watch_policy(), spec["webhook"]["url"],
                                              watch["secret"], e["event"], self.cfg.webhook_timeout_s)
            state = next_delivery_state(state, attempt, t, p)
            if attempt.ok:
                await runtime.store_call(self.store.outbox_done, sid, e["id"])
                done += 1
            metrics.webhook_delivery("delivered" if attempt.ok else
                   "refused" if (attempt.error or "").startswith("refused") else "failed")
            if not await runtime.store_call(self.store.set_watch_part, sid, watch["id"], "delivery", state):
                break  # the watch was deleted meanwhile
            if not attempt.ok:
                if state["status"] == "disabled":
                    log.warning("stream %s watch %s: webhook disabled after failing since %s", sid, watch["id"],
                                state["failing_since"])
                break
        return done
