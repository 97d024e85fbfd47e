"""Realtime sessions in the engine (a mixin of StreamService): the short-lived, single-use client
secrets browsers connect with, and a session's stream ("realtime:", a push stream owned by the
key) with the handles the socket then talks to directly (its ingest actor, its decoder).

Secrets live here, in the one service actor, so "single use" holds however many HTTP replicas
there are; only their SHA-256 is kept, compared by lookup of the digest (a secret is 192
random bits: nothing to learn from timing). A restarted service forgets them (they last a
minute or so); the client asks for another.
"""
from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any

from pipeline.errors import LimitExceeded

__all__ = ["MAX_SECRETS", "RealtimeSessions"]

MAX_SECRETS = 10000  # unredeemed secrets kept at once (expired ones are pruned first)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


class RealtimeSessions:
    """StreamService's realtime side; expects ``create_stream``, ``_record``, ``ingest``, ``_decoder``."""

    ingest: dict[str, Any]

    def _secrets(self) -> dict[str, tuple[str, float]]:
        if getattr(self, "_rt_secrets", None) is None:
            self._rt_secrets: dict[str, tuple[str, float]] = {}
        return self._rt_secrets

    async def realtime_secret(self, owner: str, ttl_s: float) -> dict[str, Any]:
        """A new client secret for ``owner``: {"value", "expires_at"} (unix seconds)."""
        table, now = self._secrets(), time.time()
        for k in [k for k, (_, exp) in table.items() if exp <= now]:
            del table[k]
        if len(table) >= MAX_SECRETS:
            raise LimitExceeded(f"{MAX_SECRETS} client secrets are waiting to be used; try again shortly", None, 10)
        value = "ek_" + secrets.token_urlsafe(24)
        expires = int(now + ttl_s)
        table[_digest(value)] = (owner or "", float(expires))
        return {"value": value, "expires_at": expires}

    async def realtime_redeem(self, secret: str) -> str | None:
        """The owner of ``secret`` if it is known and not expired; it is used up either way."""
        if not isinstance(secret, str) or not secret.startswith("ek_") or len(secret) > 128:
            return None
        hit = self._secrets().pop(_digest(secret), None)
        if hit is None or hit[1] <= time.time():
            return None
        return hit[0]

    async def realtime_open(self, owner: str, name: str | None = None) -> dict[str, Any]:
        """Start a session's stream for ``owner`` (LimitExceeded past the key's push streams, as
        any push stream): its status, its ingest actor and its decoder."""
        spec: dict[str, Any] = {"source": "realtime:"}
        if name:
            spec["name"] = name
        status = await self.create_stream(spec, owner=owner)  # type: ignore[attr-defined]
        status.pop("ingest", None)  # the publish token: the socket is the publisher
        rec = await self._record(status["id"], owner)  # type: ignore[attr-defined]
        return {"status": status, "ingest": self.ingest[rec.id], "decoder": self._decoder(rec)}  # type: ignore[attr-defined]
