"""Watches in the store, kept with their stream and removed with it: each watch's spec (written
once), its evaluation state (written by the decoder) and its delivery state (written by the
webhook deliverer) apart, so neither writer overwrites the other's; each stream's event log
(bounded); and its outbox, the events still to be POSTed to a webhook, in order, so a
restarted service still delivers them.

``WatchStoreContract`` is the contract (mixed into pipeline.store.contract's StreamStore by both
stores); ``MemoryWatches`` keeps it in dicts for the in-process store, pipeline.store.watch_redis
in Redis. Event ids are ``<ms>-<seq>`` (a Redis stream id): increasing per stream, what SSE's
``Last-Event-ID`` names and what a webhook's ``webhook-id`` is.

Redis layout (beside pipeline.store.contract's, same hash tag):
- ``omnizip:{id}:watches``     hash watch id -> spec JSON
- ``omnizip:{id}:wstate``      hash watch id -> evaluation state JSON (the decoder's)
- ``omnizip:{id}:wdelivery``   hash watch id -> delivery state JSON (the deliverer's)
- ``omnizip:{id}:events``      Redis stream (MAXLEN ~ bound), field ``e`` = the event JSON
- ``omnizip:{id}:outbox``      Redis stream, the same ids as the events: ``w`` watch, ``e`` event
- ``omnizip:outbox``           set of stream ids whose outbox may hold entries
"""

from __future__ import annotations

import json
import re
import threading
import time
from abc import abstractmethod
from typing import Any

__all__ = ["EVENT_ID", "WATCH_KEYS", "MemoryWatches", "WatchStoreContract", "event_key"]

EVENT_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
WATCH_KEYS = ("watches", "wstate", "wdelivery", "events", "outbox")  # a stream's keys of this module
PARTS = ("state", "delivery")


def event_key(event_id: str) -> tuple[int, int]:
    """An event id as a sortable pair; ValueError naming the form for anything else."""
    if not isinstance(event_id, str) or not EVENT_ID.match(event_id):
        raise ValueError(f"an event id is <ms>-<seq> (e.g. 1712345678901-0), got {str(event_id)[:40]!r}")
    ms, seq = event_id.split("-")
    return int(ms), int(seq)


def _check_watch_id(watch_id: str) -> str:
    if not isinstance(watch_id, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", watch_id):
        raise ValueError(f"watch id must be 1-64 letters, digits, '_' or '-', got {str(watch_id)[:80]!r}")
    return watch_id


class WatchStoreContract:
    """What both stores keep of watches (see the module's docstring)."""

    @abstractmethod
    def put_watch(self, stream_id: str, watch: dict[str, Any]) -> None:
        """Register ``watch`` (a JSON-able spec with its ``id``) on a registered stream
        (StreamNotFound otherwise); replacing one of the same id."""

    @abstractmethod
    def list_watches(self, stream_id: str) -> list[dict[str, Any]]:
        """The stream's watches, oldest first, each its spec plus ``state`` and ``delivery``."""

    def get_watch(self, stream_id: str, watch_id: str) -> dict[str, Any] | None:
        return next((w for w in self.list_watches(stream_id) if w.get("id") == watch_id), None)

    @abstractmethod
    def delete_watch(self, stream_id: str, watch_id: str) -> bool:
        """Remove a watch, its states and its pending deliveries; False if there was none."""

    @abstractmethod
    def set_watch_part(self, stream_id: str, watch_id: str, part: str, data: dict[str, Any]) -> bool:
        """Replace the watch's ``state`` or ``delivery``; False (nothing written) when the watch is
        gone, so a late write never brings a deleted watch back."""

    @abstractmethod
    def add_event(self, stream_id: str, event: dict[str, Any], *, max_events: int,
                  deliver_to: str | None = None) -> str | None:
        """Append an event to the stream's log (at most about ``max_events`` kept) and, when
        ``deliver_to`` names its watch, to the outbox, in one step. Returns the event id; None
        when the stream is gone."""

    @abstractmethod
    def events(self, stream_id: str, after: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """At most ``limit`` events with an id after ``after`` (None: from the oldest kept), in
        order, each with its ``id``. StreamNotFound when the stream is not registered."""

    @abstractmethod
    def outbox(self, stream_id: str, limit: int = 100) -> list[dict[str, Any]]:
        """The oldest pending deliveries: ``{"id", "watch", "event"}`` in event order."""

    @abstractmethod
    def outbox_done(self, stream_id: str, event_id: str) -> None:
        """A delivery finished (delivered, or given up): it leaves the outbox."""

    @abstractmethod
    def outbox_streams(self) -> list[str]:
        """Streams whose outbox may hold deliveries (a superset; emptied ones leave it)."""


def _merge(spec: dict[str, Any], parts: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
    return {**spec, "state": parts.get("state") or {}, "delivery": parts.get("delivery") or {}}


class MemoryWatches(WatchStoreContract):
    """The contract in dicts, for pipeline.store.memory.MemoryStore (which provides ``_lock`` and
    ``_rec``); ``_forget_watches`` is called from its delete_stream."""

    _lock: threading.RLock

    def _rec(self, stream_id: str) -> dict[str, Any]:  # provided by MemoryStore
        raise NotImplementedError

    def _w(self) -> dict[str, dict[str, Any]]:
        if not hasattr(self, "_watch_data"):
            self._watch_data: dict[str, dict[str, Any]] = {}
            self._event_clock = (0, 0)
        return self._watch_data

    def _of(self, stream_id: str) -> dict[str, Any]:
        self._rec(stream_id)
        return self._w().setdefault(stream_id, {"watches": {}, "parts": {}, "events": [], "outbox": []})

    def _forget_watches(self, stream_id: str) -> None:
        with self._lock:
            self._w().pop(stream_id, None)

    def put_watch(self, stream_id: str, watch: dict[str, Any]) -> None:
        wid = _check_watch_id(watch.get("id"))
        with self._lock:
            self._of(stream_id)["watches"][wid] = json.loads(json.dumps(watch))

    def list_watches(self, stream_id: str) -> list[dict[str, Any]]:
        with self._lock:
            d = self._of(stream_id)
            out = [_merge(w, d["parts"].get(wid, {})) for wid, w in d["watches"].items()]
            return json.loads(json.dumps(sorted(out, key=lambda w: (w.get("created", 0), w["id"]))))

    def delete_watch(self, stream_id: str, watch_id: str) -> bool:
        with self._lock:
            d = self._of(stream_id)
            d["parts"].pop(watch_id, None)
            d["outbox"] = [o for o in d["outbox"] if o["watch"] != watch_id]
            return d["watches"].pop(watch_id, None) is not None

    def set_watch_part(self, stream_id: str, watch_id: str, part: str, data: dict[str, Any]) -> bool:
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        with self._lock:
            try:
                d = self._of(stream_id)
            except KeyError:
                return False
            if watch_id not in d["watches"]:
                return False
            d["parts"].setdefault(watch_id, {})[part] = json.loads(json.dumps(data))
            return True

    def _next_id(self) -> str:
        ms = int(time.time() * 1000)
        last_ms, last_seq = self._event_clock
        self._event_clock = (ms, 0) if ms > last_ms else (last_ms, last_seq + 1)
        return f"{self._event_clock[0]}-{self._event_clock[1]}"

    def add_event(self, stream_id: str, event: dict[str, Any], *, max_events: int,
                  deliver_to: str | None = None) -> str | None:
        with self._lock:
            self._w()
            try:
                d = self._of(stream_id)
            except KeyError:
                return None
            eid = self._next_id()
            body = {**json.loads(json.dumps(event)), "id": eid}
            d["events"].append(body)
            if len(d["events"]) > max_events:
                del d["events"][: len(d["events"]) - max_events]
            if deliver_to is not None:
                d["outbox"].append({"id": eid, "watch": deliver_to, "event": body})
            return eid

    def events(self, stream_id: str, after: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        low = event_key(after) if after is not None else (-1, -1)
        with self._lock:
            d = self._of(stream_id)
            return json.loads(json.dumps([e for e in d["events"] if event_key(e["id"]) > low][:limit]))

    def outbox(self, stream_id: str, limit: int = 100) -> list[dict[str, Any]]:
        with self._lock:
            try:
                d = self._of(stream_id)
            except KeyError:
                return []
            return json.loads(json.dumps(d["outbox"][:limit]))

    def outbox_done(self, stream_id: str, event_id: str) -> None:
        with self._lock:
            d = self._w().get(stream_id)
            if d is not None:
                d["outbox"] = [o for o in d["outbox"] if o["id"] != event_id]

    def outbox_streams(self) -> list[str]:
        with self._lock:
            return [sid for sid, d in self._w().items() if d["outbox"]]
