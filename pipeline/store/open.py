"""Which store a URL names: the one place that knows both implementations."""

from __future__ import annotations

from typing import Any

from pipeline.store.contract import Retention, StreamStore
from pipeline.store.memory import MemoryStore

__all__ = ["open_store"]


def open_store(url: str | None, retention: Retention = Retention(), **redis_kwargs: Any) -> StreamStore:
    """The store for ``url``: None, "" or ``memory://`` -> :class:`MemoryStore`;
    ``redis://``, ``rediss://`` or ``unix://`` -> :class:`RedisStore`."""
    if not url or url == "memory://":
        if redis_kwargs:
            raise ValueError(f"options {sorted(redis_kwargs)} only apply to a Redis URL")
        return MemoryStore(retention)
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme in ("redis", "rediss", "unix"):
        from pipeline.store.redis_store import RedisStore

        return RedisStore(url, retention, **redis_kwargs)
    raise ValueError(f"store URL {url!r}: scheme must be redis://, rediss://, unix:// or "
                     "memory:// (or no URL for the in-process store)")
