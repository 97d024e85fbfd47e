"""The Redis implementation of the store contract (pipeline.store.contract): the registry, each stream's
windows as a Redis stream with idempotent appends, and its compressor state, shared by every
process of the cluster and surviving restarts. Layout: see pipeline.store.contract."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from pipeline.store.contract import (Retention, Scalar, StoredState, StoredWindow, StreamExists, StreamNotFound, StreamStore,
                                     WindowOrderError, _check_blob, _check_id, _check_window)

__all__ = ["RedisStore"]


# ============================================================================================
# One atomic step: registry check, idempotent XADD, state, retention.
# KEYS: spec, windows, state. ARGV: 1 entry id, 2 media end, 3 meta JSON, 4 payload,
# 5 max_windows ("" = none), 6 max_age_s ("" = none), 7 state bytes, 8 "1" if state given, 9 index.
# Returns 1 added, 0 duplicate (retry, or already trimmed), -1 no such stream, -2 out of order.
_APPEND_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local ok = redis.pcall('XADD', KEYS[2], ARGV[1], 'end', ARGV[2], 'meta', ARGV[3], 'payload', ARGV[4])
if type(ok) == 'table' and ok.err then
  if not string.find(ok.err, 'equal or smaller') then return redis.error_reply(ok.err) end
  if #redis.call('XRANGE', KEYS[2], ARGV[1], ARGV[1]) > 0 then return 0 end
  local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
  if #first == 0 then return 0 end
  local first_ms = tonumber(string.match(first[1][1], '^(%d+)'))
  if tonumber(ARGV[9]) + 1 < first_ms then return 0 end
  return -2
end
if ARGV[8] == '1' then redis.call('HSET', KEYS[3], 'index', ARGV[9], 'data', ARGV[7]) end
if ARGV[5] ~= '' then redis.call('XTRIM', KEYS[2], 'MAXLEN', ARGV[5]) end
if ARGV[6] ~= '' then
  local cutoff = tonumber(ARGV[2]) - tonumber(ARGV[6])
  while true do
    local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
    if #first == 0 then break end
    if tonumber(first[1][2][2]) < cutoff then redis.call('XDEL', KEYS[2], first[1][1]) else break end
  end
end
return 1
"""


# One atomic step: store a window's side blob, then drop the blobs below the floor (the oldest
# retained window, raised to keep at most max_blob_windows indices below the newest blob).
# KEYS: spec, windows, blobs, blobidx. ARGV: 1 index, 2 field, 3 data, 4 max_blob_windows ("" = none).
# Returns 1 stored, -1 no such stream.
_PUT_BLOB_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[4], tonumber(ARGV[1]), ARGV[2])
local floor = nil
local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
if #first > 0 then floor = tonumber(string.match(first[1][1], '^(%d+)')) - 1 end
if ARGV[4] ~= '' then
  local top = redis.call('ZREVRANGE', KEYS[4], 0, 0, 'WITHSCORES')
  local low = tonumber(top[2]) - tonumber(ARGV[4]) + 1
  if floor == nil or low > floor then floor = low end
end
if floor ~= nil then
  local old = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', '(' .. floor)
  for i = 1, #old, 500 do
    redis.call('HDEL', KEYS[3], unpack(old, i, math.min(i + 499, #old)))
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. floor)
end
return 1
"""


class RedisStore(StreamStore):
    """Store in a real Redis (>= 6.2). Survives a Redis restart: every command is retried with
    exponential backoff on connection errors and while Redis is still loading its data, and the
    writes that a retry can repeat (create, append) are idempotent. Durability of accepted data
    across a Redis crash is Redis's own: run it with ``appendonly yes`` (``appendfsync always``
    to lose nothing acknowledged; ``everysec`` loses at most a second)."""

    REGISTRY = "omnizip:streams"

    def __init__(self, url: str, retention: Retention = Retention(), *, retries: int = 12,
                 backoff_base_s: float = 0.05, backoff_cap_s: float = 2.0,
                 socket_timeout_s: float = 5.0) -> None:
        import redis
        from redis.backoff import ExponentialBackoff
        from redis.exceptions import BusyLoadingError, ConnectionError, TimeoutError
        from redis.retry import Retry

        self.retention = retention
        self.url = url
        errors = (ConnectionError, TimeoutError, BusyLoadingError, ConnectionResetError,
                  ConnectionRefusedError)
        self._r = redis.Redis.from_url(
            url,
            retry=Retry(ExponentialBackoff(cap=backoff_cap_s, base=backoff_base_s), retries,
                        supported_errors=errors),
            retry_on_error=list(errors),
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            health_check_interval=10,
        )
        self._append = self._r.register_script(_APPEND_LUA)
        self._put_blob = self._r.register_script(_PUT_BLOB_LUA)
        self._redis_mod = redis

    @staticmethod
    def _k(stream_id: str, what: str) -> str:
        return f"omnizip:{{{_check_id(stream_id)}}}:{what}"

    def ping(self) -> bool:
        try:
            return bool(self._r.ping())
        except self._redis_mod.exceptions.RedisError:
            return False

    def close(self) -> None:
        self._r.close()

    # --- registry -------------------------------------------------------------------------
    def create_stream(self, spec: Mapping[str, Any], stream_id: str | None = None) -> dict[str, Any]:
        rec = self._new_record(spec, stream_id)
        key = self._k(rec["id"], "spec")
        if self._r.set(key, json.dumps(rec), nx=True):
            self._r.sadd(self.REGISTRY, rec["id"])
            return rec
        old = self.get_stream(rec["id"])
        if self._same_spec(old, rec):
            self._r.sadd(self.REGISTRY, rec["id"])  # finish a create cut short by a crash
            return old
        raise StreamExists(f"stream {rec['id']!r} already exists with a different spec")

    def get_stream(self, stream_id: str) -> dict[str, Any]:
        raw = self._r.get(self._k(stream_id, "spec"))
        if raw is None:
            raise StreamNotFound(f"no stream {stream_id!r}")
        return json.loads(raw)

    def list_streams(self) -> list[dict[str, Any]]:
        ids = sorted(i.decode() for i in self._r.smembers(self.REGISTRY))
        if not ids:
            return []
        raws = self._r.mget([self._k(i, "spec") for i in ids])
        recs = [json.loads(r) for r in raws if r is not None]
        return sorted(recs, key=lambda r: (r["created"], r["id"]))

    def update_stream(self, stream_id: str, changes: Mapping[str, Any]) -> dict[str, Any]:
        key = self._k(stream_id, "spec")
        out: dict[str, Any] = {}

        def step(pipe: Any) -> None:
            raw = pipe.get(key)
            if raw is None:
                raise StreamNotFound(f"no stream {stream_id!r}")
            out["rec"] = self._merged(json.loads(raw), changes)
            pipe.multi()
            pipe.set(key, json.dumps(out["rec"]))

        self._r.transaction(step, key)
        return out["rec"]

    def delete_stream(self, stream_id: str) -> bool:
        keys = [self._k(stream_id, w) for w in ("spec", "windows", "state", "blobs", "blobidx")]
        pipe = self._r.pipeline(transaction=True)
        pipe.delete(keys[0])
        pipe.delete(*keys[1:])
        pipe.srem(self.REGISTRY, stream_id)
        existed = pipe.execute()[0]
        return bool(existed)

    # --- windows --------------------------------------------------------------------------
    def append_window(self, stream_id: str, index: int, payload: bytes, *, media_start: float,
                      media_end: float, fields: Mapping[str, Scalar] | None = None,
                      state: bytes | None = None) -> bool:
        f = _check_window(index, payload, media_start, media_end, fields)
        if state is not None and not isinstance(state, (bytes, bytearray, memoryview)):
            raise TypeError(f"state must be bytes, got {type(state).__name__}")
        meta = json.dumps({"index": index, "start": float(media_start), "end": float(media_end),
                           "fields": f})
        r = self.retention
        res = self._append(
            keys=[self._k(stream_id, "spec"), self._k(stream_id, "windows"),
                  self._k(stream_id, "state")],
            args=[f"{index + 1}-0", repr(float(media_end)), meta, bytes(payload),
                  "" if r.max_windows is None else str(r.max_windows),
                  "" if r.max_age_s is None else repr(float(r.max_age_s)),
                  b"" if state is None else bytes(state), "0" if state is None else "1",
                  str(index)])
        if res == -1:
            raise StreamNotFound(f"no stream {stream_id!r}")
        if res == -2:
            last = self.last_window_index(stream_id)
            raise WindowOrderError(f"stream {stream_id!r}: window {index} arrives after "
                                   f"window {last}")
        return res == 1

    @staticmethod
    def _decode_entry(entry: tuple[bytes, dict[bytes, bytes]]) -> StoredWindow:
        _, fields = entry
        meta = json.loads(fields[b"meta"])
        return StoredWindow(meta["index"], meta["start"], meta["end"], fields[b"payload"],
                            meta["fields"])

    def _require(self, stream_id: str) -> None:
        if not self._r.exists(self._k(stream_id, "spec")):
            raise StreamNotFound(f"no stream {stream_id!r}")

    def iter_windows(self, stream_id: str, start: int = 0, batch: int = 32) -> Iterator[StoredWindow]:
        self._require(stream_id)
        key = self._k(stream_id, "windows")
        lo = f"{max(start, 0) + 1}-0"
        while True:
            entries = self._r.xrange(key, min=lo, max="+", count=batch)
            for e in entries:
                yield self._decode_entry(e)
            if len(entries) < batch:
                return
            lo = "(" + entries[-1][0].decode()

    def window_count(self, stream_id: str) -> int:
        self._require(stream_id)
        return int(self._r.xlen(self._k(stream_id, "windows")))

    def last_window_index(self, stream_id: str) -> int | None:
        self._require(stream_id)
        top = self._r.xrevrange(self._k(stream_id, "windows"), count=1)
        return int(top[0][0].split(b"-")[0]) - 1 if top else None

    # --- compressor state -----------------------------------------------------------------
    def save_state(self, stream_id: str, index: int, data: bytes) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"state data must be bytes, got {type(data).__name__}")
        self._require(stream_id)
        self._r.hset(self._k(stream_id, "state"), mapping={"index": int(index), "data": bytes(data)})

    def load_state(self, stream_id: str) -> StoredState | None:
        self._require(stream_id)
        got = self._r.hmget(self._k(stream_id, "state"), ["index", "data"])
        if got[0] is None:
            return None
        return StoredState(int(got[0]), got[1])

    # --- side blobs -----------------------------------------------------------------------
    def put_blob(self, stream_id: str, index: int, kind: str, data: bytes) -> None:
        name = _check_blob(index, kind)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"blob data must be bytes, got {type(data).__name__}")
        n = self.retention.max_blob_windows
        res = self._put_blob(keys=[self._k(stream_id, w) for w in ("spec", "windows", "blobs", "blobidx")],
                             args=[str(index), name, bytes(data), "" if n is None else str(n)])
        if res == -1:
            raise StreamNotFound(f"no stream {stream_id!r}")

    def get_blob(self, stream_id: str, index: int, kind: str) -> bytes | None:
        name = _check_blob(index, kind)
        self._require(stream_id)
        return self._r.hget(self._k(stream_id, "blobs"), name)
