"""The Redis implementation of the store contract (pipeline.store.contract): the registry, each stream's
windows as a Redis stream with idempotent appends, and its compressor state, shared by every
process of the cluster and surviving restarts. Layout: see pipeline.store.contract."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from pipeline.store.contract import (Retention, Scalar, StoredState, StoredWindow, StoreRefused, StreamExists,
                                     StreamNotFound, StreamStore, WindowOrderError, WindowSpan, _check_blob, _check_blobs,
                                     _check_id, _check_window)
from pipeline.store.watch_redis import OUTBOX_SET, RedisWatches
from pipeline.store.watch_store import WATCH_KEYS

__all__ = ["RedisStore", "evicting", "refusal"]

_F = TypeVar("_F", bound=Callable[..., Any])
POLICY_RECHECK_S = 30.0  # an operator may change the policy at run time: create checks it again this often


def evicting(policy: str | None) -> bool:
    """Whether a ``maxmemory-policy`` lets Redis delete keys by itself (allkeys-*, volatile-*):
    stored windows, states and the registry would vanish without an error."""
    return bool(policy) and policy != "noeviction"


def eviction_message(policy: str) -> str:
    return (f"Redis maxmemory-policy is {policy!r}: under memory pressure it deletes keys (stored windows, "
            "stream records) without an error; set it to noeviction (`CONFIG SET maxmemory-policy noeviction` "
            "and `maxmemory-policy noeviction` in redis.conf; see docs/deploy.md)")


def refusal(exc: BaseException) -> StoreRefused | None:
    """Redis's refusal of a write as a StoreRefused naming the cause and the fix (None: some
    other error). Redis's own text stays in the logs, not in an answer."""
    from redis.exceptions import OutOfMemoryError, ReadOnlyError

    text = str(exc)
    if isinstance(exc, OutOfMemoryError) or "OOM command not allowed" in text:
        return StoreRefused("the store refuses writes: Redis reached its maxmemory limit (OOM); raise `maxmemory` "
                            "or give Redis more memory (docs/deploy.md); retry shortly")
    if "MISCONF" in text:
        return StoreRefused("the store refuses writes: Redis cannot persist to disk (MISCONF: a failed RDB save or "
                            "AOF write, e.g. a full disk); free disk space (docs/deploy.md); retry shortly")
    if isinstance(exc, ReadOnlyError) or "READONLY" in text:
        return StoreRefused("the store refuses writes: the Redis at --redis-url is a read-only replica "
                            "(READONLY); point it at the primary")
    return None


def _writes(fn: _F) -> _F:
    """A write whose refusal by Redis (OOM, MISCONF, READONLY) raises StoreRefused (-> 503)."""
    @functools.wraps(fn)
    def wrapper(self: "RedisStore", *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except self._redis_mod.exceptions.ResponseError as exc:
            refused = refusal(exc)
            if refused is None:
                raise
            raise refused from None
    return wrapper  # type: ignore[return-value]


# ============================================================================================
# One atomic step per window, a handful of commands: idempotent XADD with its trim (NOMKSTREAM:
# an existing windows key proves the stream registered; only its first window checks the
# registry), the state, the window's side blobs, and the blobs that fell out of retention
# (exactly the one index that left, plus a sweep every 32 windows for what gaps left behind).
# KEYS: spec, windows, state, blobs. ARGV: 1 entry id, 2 media end, 3 meta JSON, 4 payload,
# 5 max_windows ("" = none), 6 max_age_s ("" = none), 7 state bytes, 8 "1" if state given,
# 9 index, 10 blobs kept (max_blob_windows, or the window retention if lower; "" = all),
# 11.. kind, data pairs of the window's blobs.
# Returns 1 added, 0 duplicate (retry, or already trimmed), -1 no such stream, -2 out of order.
_APPEND_LUA = """
local function xadd(make)
  local a = {KEYS[2]}
  if not make then a[#a + 1] = 'NOMKSTREAM' end
  if ARGV[5] ~= '' then a[#a + 1] = 'MAXLEN'; a[#a + 1] = ARGV[5] end
  for _, v in ipairs({ARGV[1], 'end', ARGV[2], 'meta', ARGV[3], 'payload', ARGV[4]}) do a[#a + 1] = v end
  return redis.pcall('XADD', unpack(a))
end
local ok = xadd(false)
if ok == false then
  if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
  ok = xadd(true)
end
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
if ARGV[6] ~= '' then
  local cutoff = tonumber(ARGV[2]) - tonumber(ARGV[6])
  while true do
    local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
    if #first == 0 then break end
    if tonumber(first[1][2][2]) < cutoff then redis.call('XDEL', KEYS[2], first[1][1]) else break end
  end
end
if #ARGV > 10 then
  local index = tonumber(ARGV[9])
  local set, old = {}, {}
  for i = 11, #ARGV, 2 do
    set[#set + 1] = ARGV[9] .. ':' .. ARGV[i]; set[#set + 1] = ARGV[i + 1]
    if ARGV[10] ~= '' then old[#old + 1] = (index - tonumber(ARGV[10])) .. ':' .. ARGV[i] end
  end
  redis.call('HSET', KEYS[4], unpack(set))
  if #old > 0 then redis.call('HDEL', KEYS[4], unpack(old)) end
  if index % 32 == 0 then
    local floor = nil
    if ARGV[10] ~= '' then floor = index - tonumber(ARGV[10]) + 1 end
    local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
    if #first > 0 then
      local f = tonumber(string.match(first[1][1], '^(%d+)')) - 1
      if floor == nil or f > floor then floor = f end
    end
    if floor ~= nil then
      local stale = {}
      for _, name in ipairs(redis.call('HKEYS', KEYS[4])) do
        local i = tonumber(string.match(name, '^(%d+):'))
        if i ~= nil and i < floor then stale[#stale + 1] = name end
      end
      for i = 1, #stale, 500 do redis.call('HDEL', KEYS[4], unpack(stale, i, math.min(i + 499, #stale))) end
    end
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


class RedisStore(RedisWatches, StreamStore):
    """Store in a real Redis (>= 6.2). Survives a Redis restart: every command is retried with
    exponential backoff on connection errors and while Redis is still loading its data, and the
    writes that a retry can repeat (create, append) are idempotent. Durability of accepted data
    across a Redis crash is Redis's own: run it with ``appendonly yes`` (``appendfsync always``
    to lose nothing acknowledged; ``everysec`` loses at most a second)."""

    REGISTRY = "omnizip:streams"

    def __init__(self, url: str, retention: Retention = Retention(), *, retries: int = 12,
                 backoff_base_s: float = 0.05, backoff_cap_s: float = 2.0,
                 socket_timeout_s: float = 5.0, fail_fast: bool = False) -> None:
        """``fail_fast``: for callers that must answer within about a second while Redis is away
        (the API, progress notes): one retry of a dropped connection, a 1-s socket timeout and
        no retry of a timeout (a paused or hung Redis costs one timeout, not retries x timeout)."""
        import redis
        from redis.backoff import ExponentialBackoff
        from redis.exceptions import BusyLoadingError, ConnectionError, TimeoutError
        from redis.retry import Retry

        self.retention = retention
        self.url = url
        self._policy_at: float | None = None  # when the eviction policy was last found safe
        errors: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, BusyLoadingError,
                                                   ConnectionResetError, ConnectionRefusedError)
        if fail_fast:
            retries, socket_timeout_s = 1, 1.0
            errors = tuple(e for e in errors if e is not TimeoutError)
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

    # --- is it safe? ----------------------------------------------------------------------
    def eviction_policy(self) -> str | None:
        """Redis's ``maxmemory-policy``: CONFIG GET, or INFO memory where CONFIG is renamed or
        not permitted (managed Redis); None when neither tells."""
        err = self._redis_mod.exceptions.ResponseError
        try:
            got = self._r.config_get("maxmemory-policy")
            value = got.get("maxmemory-policy", got.get(b"maxmemory-policy"))
        except err:
            try:
                value = self._r.info("memory").get("maxmemory_policy")
            except err:
                return None
        return value.decode() if isinstance(value, bytes) else value

    def check_policy(self) -> None:
        """StoreRefused naming the policy and the fix when Redis may evict keys (checked again
        every POLICY_RECHECK_S: an operator can change it at run time)."""
        if self._policy_at is not None and time.monotonic() - self._policy_at < POLICY_RECHECK_S:
            return
        policy = self.eviction_policy()
        if evicting(policy):
            raise StoreRefused(eviction_message(str(policy)))
        self._policy_at = time.monotonic()

    def problems(self) -> list[str]:
        """An evicting policy, and whether a write is refused now (a tiny probe key that
        expires: OOM and MISCONF refuse every write, whatever its size)."""
        out: list[str] = []
        RedisError = self._redis_mod.exceptions.RedisError
        try:
            policy = self.eviction_policy()
            if evicting(policy):
                out.append(eviction_message(str(policy)))
            self._r.set("omnizip:health", repr(time.time()), ex=60)
        except self._redis_mod.exceptions.ResponseError as exc:
            refused = refusal(exc)
            out.append(str(refused) if refused is not None else f"the store answers with an error "
                       f"({type(exc).__name__})")
        except RedisError:  # unreachable: ping says so
            pass
        return out

    # --- registry -------------------------------------------------------------------------
    @_writes
    def create_stream(self, spec: Mapping[str, Any], stream_id: str | None = None) -> dict[str, Any]:
        rec = self._new_record(spec, stream_id)
        self.check_policy()  # never register a stream in a Redis that may evict it
        key = self._k(rec["id"], "spec")
        if self._r.set(key, json.dumps(rec), nx=True):
            self._r.sadd(self.REGISTRY, rec["id"])
            return rec
        old = self.get_stream(rec["id"])
        if self._same_spec(old, rec):
            self._r.sadd(self.REGISTRY, rec["id"])  # finish a create cut short by a crash
            return old
        raise StreamExists(f"stream {rec['id']!r} already exists with a different spec")

    @staticmethod
    def _with_progress(raw: bytes, progress: bytes | None) -> dict[str, Any]:
        rec = json.loads(raw)
        if progress is not None:  # the ingest's latest note (pipeline.engine.ingest)
            rec["progress"] = json.loads(progress)
        return rec

    def get_stream(self, stream_id: str) -> dict[str, Any]:
        raw, progress = self._r.mget([self._k(stream_id, "spec"), self._k(stream_id, "progress")])
        if raw is None:
            raise StreamNotFound(f"no stream {stream_id!r}")
        return self._with_progress(raw, progress)

    def list_streams(self) -> list[dict[str, Any]]:
        ids = sorted(i.decode() for i in self._r.smembers(self.REGISTRY))
        if not ids:
            return []
        raws = self._r.mget([self._k(i, w) for i in ids for w in ("spec", "progress")])
        recs = [self._with_progress(s, p) for s, p in zip(raws[::2], raws[1::2]) if s is not None]
        return sorted(recs, key=lambda r: (r["created"], r["id"]))

    @_writes
    def note_progress(self, stream_id: str, progress: Mapping[str, Any]) -> None:
        """One SET per window: overwrite the stream's note (XX, so a deleted stream's late note
        is not written back); only the first note of a stream checks that it is registered."""
        _check_id(stream_id)
        if not self._r.set(self._k(stream_id, "progress"), json.dumps(dict(progress)), xx=True):
            self._require(stream_id)  # the first note of a stream (or one whose key was removed)
            self._r.set(self._k(stream_id, "progress"), json.dumps(dict(progress)))

    @_writes
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
            if "progress" in changes:  # the newer progress replaces the ingest's last note
                pipe.delete(self._k(stream_id, "progress"))

        self._r.transaction(step, key)
        return out["rec"]

    @_writes
    def delete_stream(self, stream_id: str) -> bool:
        keys = [self._k(stream_id, w) for w in ("spec", "windows", "state", "blobs", "blobidx", "progress", *WATCH_KEYS)]
        pipe = self._r.pipeline(transaction=True)
        pipe.delete(keys[0])
        pipe.delete(*keys[1:])
        pipe.srem(self.REGISTRY, stream_id)
        pipe.srem(OUTBOX_SET, stream_id)
        existed = pipe.execute()[0]
        return bool(existed)

    # --- windows --------------------------------------------------------------------------
    @_writes
    def append_window(self, stream_id: str, index: int, payload: bytes, *, media_start: float,
                      media_end: float, fields: Mapping[str, Scalar] | None = None,
                      state: bytes | None = None, blobs: Mapping[str, bytes] | None = None) -> bool:
        f = _check_window(index, payload, media_start, media_end, fields)
        side = _check_blobs(index, blobs)
        if state is not None and not isinstance(state, (bytes, bytearray, memoryview)):
            raise TypeError(f"state must be bytes, got {type(state).__name__}")
        meta = json.dumps({"index": index, "start": float(media_start), "end": float(media_end),
                           "fields": f})
        r = self.retention
        kept = [n for n in (r.max_blob_windows, r.max_windows) if n is not None]
        res = self._append(
            keys=[self._k(stream_id, "spec"), self._k(stream_id, "windows"),
                  self._k(stream_id, "state"), self._k(stream_id, "blobs")],
            args=[f"{index + 1}-0", repr(float(media_end)), meta, bytes(payload),
                  "" if r.max_windows is None else str(r.max_windows),
                  "" if r.max_age_s is None else repr(float(r.max_age_s)),
                  b"" if state is None else bytes(state), "0" if state is None else "1",
                  str(index), str(min(kept)) if kept else "",
                  *[x for kind, data in side.items() for x in (kind, data)]])
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

    def window_span(self, stream_id: str) -> WindowSpan:
        self._require(stream_id)
        key = self._k(stream_id, "windows")
        pipe = self._r.pipeline(transaction=False)
        pipe.xlen(key)
        pipe.xrange(key, count=1)
        pipe.xrevrange(key, count=1)
        n, first, last = pipe.execute()

        def index(entries: list) -> int | None:
            return int(entries[0][0].split(b"-")[0]) - 1 if entries else None

        return WindowSpan(int(n), index(first), index(last))

    def last_window_index(self, stream_id: str) -> int | None:
        self._require(stream_id)
        top = self._r.xrevrange(self._k(stream_id, "windows"), count=1)
        return int(top[0][0].split(b"-")[0]) - 1 if top else None

    # --- compressor state -----------------------------------------------------------------
    @_writes
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
    @_writes
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
