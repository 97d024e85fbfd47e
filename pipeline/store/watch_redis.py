"""Watches in Redis (the contract and layout of pipeline.store.watch_store), mixed into
pipeline.store.redis_store.RedisStore, which provides ``_r`` (the client), ``_k`` (a stream's key)
and ``_require``; its delete_stream removes ``WATCH_KEYS`` with the stream's other keys.

An event is one script: XADD to the stream's event log with an approximate MAXLEN (bounded, a
radix-tree node trimmed at a time) and, for a watch with a webhook, XADD of the same id to the
outbox, which is never trimmed: a pending delivery leaves it only when delivered or given up."""

from __future__ import annotations

import json
from typing import Any

from pipeline.store.watch_store import PARTS, WatchStoreContract, _check_watch_id, event_key

__all__ = ["RedisWatches", "OUTBOX_SET"]

OUTBOX_SET = "omnizip:outbox"

# KEYS: spec, events, outbox, outbox set. ARGV: 1 event JSON, 2 max events, 3 watch id ("" = no
# delivery), 4 stream id. Returns the event id, or false when the stream is gone.
_EVENT_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'e', ARGV[1])
if ARGV[3] ~= '' then
  redis.call('XADD', KEYS[3], id, 'w', ARGV[3], 'e', ARGV[1])
  redis.call('SADD', KEYS[4], ARGV[4])
end
return id
"""

# KEYS: watches, part hash. ARGV: 1 watch id, 2 data. 1 written, 0 the watch is gone.
_PART_LUA = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"""

# KEYS: outbox, outbox set. ARGV: 1 entry id, 2 stream id. Drops the entry; the stream leaves the
# set when its outbox is empty (in the same step, so a concurrent add is never lost from it).
_DONE_LUA = """
redis.call('XDEL', KEYS[1], ARGV[1])
if redis.call('XLEN', KEYS[1]) == 0 then redis.call('SREM', KEYS[2], ARGV[2]) end
return 1
"""


def _with_id(entry_id: bytes, raw: bytes) -> dict[str, Any]:
    return {**json.loads(raw), "id": entry_id.decode()}


class RedisWatches(WatchStoreContract):
    """The watch contract over RedisStore's client."""

    _r: Any

    def _k(self, stream_id: str, what: str) -> str:  # provided by RedisStore
        raise NotImplementedError

    def _require(self, stream_id: str) -> None:  # provided by RedisStore
        raise NotImplementedError

    def _script(self, name: str, source: str) -> Any:
        scripts = self.__dict__.setdefault("_watch_scripts", {})
        if name not in scripts:
            scripts[name] = self._r.register_script(source)
        return scripts[name]

    def put_watch(self, stream_id: str, watch: dict[str, Any]) -> None:
        wid = _check_watch_id(watch.get("id"))
        self._require(stream_id)
        self._r.hset(self._k(stream_id, "watches"), wid, json.dumps(watch))

    def list_watches(self, stream_id: str) -> list[dict[str, Any]]:
        self._require(stream_id)
        pipe = self._r.pipeline(transaction=False)
        for what in ("watches", "wstate", "wdelivery"):
            pipe.hgetall(self._k(stream_id, what))
        specs, states, deliveries = pipe.execute()
        out = []
        for wid, raw in specs.items():
            out.append({**json.loads(raw), "state": json.loads(states.get(wid, b"{}")),
                        "delivery": json.loads(deliveries.get(wid, b"{}"))})
        return sorted(out, key=lambda w: (w.get("created", 0), w["id"]))

    def delete_watch(self, stream_id: str, watch_id: str) -> bool:
        self._require(stream_id)
        pipe = self._r.pipeline(transaction=True)
        pipe.hdel(self._k(stream_id, "watches"), watch_id)
        pipe.hdel(self._k(stream_id, "wstate"), watch_id)
        pipe.hdel(self._k(stream_id, "wdelivery"), watch_id)
        existed = bool(pipe.execute()[0])
        for entry in self.outbox(stream_id, 10_000):  # its pending deliveries go with it
            if entry["watch"] == watch_id:
                self.outbox_done(stream_id, entry["id"])
        return existed

    def set_watch_part(self, stream_id: str, watch_id: str, part: str, data: dict[str, Any]) -> bool:
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        what = "wstate" if part == "state" else "wdelivery"
        return bool(self._script("part", _PART_LUA)(
            keys=[self._k(stream_id, "watches"), self._k(stream_id, what)], args=[watch_id, json.dumps(data)]))

    def add_event(self, stream_id: str, event: dict[str, Any], *, max_events: int,
                  deliver_to: str | None = None) -> str | None:
        eid = self._script("event", _EVENT_LUA)(
            keys=[self._k(stream_id, "spec"), self._k(stream_id, "events"), self._k(stream_id, "outbox"), OUTBOX_SET],
            args=[json.dumps(event), str(int(max_events)), deliver_to or "", stream_id])
        return eid.decode() if isinstance(eid, bytes) else eid

    def events(self, stream_id: str, after: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        self._require(stream_id)
        low = "-" if after is None else "(" + "-".join(str(x) for x in event_key(after))
        return [_with_id(i, f[b"e"]) for i, f in self._r.xrange(self._k(stream_id, "events"), low, "+", count=limit)]

    def outbox(self, stream_id: str, limit: int = 100) -> list[dict[str, Any]]:
        entries = self._r.xrange(self._k(stream_id, "outbox"), "-", "+", count=limit)
        return [{"id": i.decode(), "watch": f[b"w"].decode(), "event": _with_id(i, f[b"e"])} for i, f in entries]

    def outbox_done(self, stream_id: str, event_id: str) -> None:
        event_key(event_id)
        self._script("done", _DONE_LUA)(keys=[self._k(stream_id, "outbox"), OUTBOX_SET], args=[event_id, stream_id])

    def outbox_streams(self) -> list[str]:
        return sorted(i.decode() for i in self._r.smembers(OUTBOX_SET))
