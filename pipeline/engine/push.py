"""Push streams in the engine (a mixin of ``StreamService``): the publish token a push stream is
created with, and a publisher's calls routed to the stream's ingest actor, which holds its
WebRTC peer (pipeline.engine.ingest, pipeline.sources.webrtc).

The token is shown once, in the create answer, and kept only as its SHA-256 in the stream's
record; a publisher's token is compared with it in constant time, and never logged. It is not
an API key: it lets its holder publish to this one stream and nothing else, so it can be pasted
into OBS or handed to a browser."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

from pipeline.core.records import StreamRecord
from pipeline.errors import LimitExceeded, PushRefused

__all__ = ["PushStreams", "is_push"]


def is_push(rec: StreamRecord) -> bool:
    return "push" in rec.extra


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class PushStreams:
    """StreamService's push side; expects ``cfg``, ``ingest``, ``_record`` and ``_call``."""

    cfg: Any
    ingest: dict[str, Any]

    @staticmethod
    def _new_push(rec: StreamRecord, protocol: str) -> str:
        """Give a new push stream its publish token (returned once; the record keeps its hash)."""
        token = secrets.token_urlsafe(32)
        rec.extra["push"] = {"protocol": protocol, "token_sha256": _digest(token)}
        return token

    def _check_push_limit(self, mine: list[StreamRecord]) -> None:
        n = sum(1 for r in mine if is_push(r))
        if n >= self.cfg.max_push_streams_per_key:
            raise LimitExceeded(f"at most {self.cfg.max_push_streams_per_key} push streams per API key run at "
                                "once; delete one first", "source", 30)

    async def _publisher_ingest(self, stream_id: str, token: str | None) -> Any:
        """The ingest actor of push stream ``stream_id`` after its token is checked: 404 for no such
        stream (KeyError), 401 for a missing or wrong token, 409 for a stream that is over."""
        rec = await self._record(stream_id)  # type: ignore[attr-defined]
        want = (rec.extra.get("push") or {}).get("token_sha256")
        if not isinstance(want, str):
            raise PushRefused(401, "this stream takes no publisher (it is not a push stream)", "authorization")
        if not token or not hmac.compare_digest(_digest(token), want):
            raise PushRefused(401, "missing or wrong publish token: send 'Authorization: Bearer <the stream's "
                              "ingest token>'", "authorization")
        handle = self.ingest.get(rec.id)
        if handle is None or rec.status in ("ended", "failed"):
            raise PushRefused(409, "the stream has ended; create a new one", "stream_id")
        return handle

    async def publish_check(self, stream_id: str, token: str | None) -> bool:
        """Whether ``token`` may publish to ``stream_id`` (WHIP OPTIONS with ICE credentials)."""
        await self._publisher_ingest(stream_id, token)
        return True

    async def publish(self, stream_id: str, token: str | None, offer: bytes) -> dict[str, str]:
        """A publisher's SDP offer for ``stream_id`` -> {"sdp": answer, "session": id}."""
        handle = await self._publisher_ingest(stream_id, token)
        return await handle.publish.remote(bytes(offer))

    async def unpublish(self, stream_id: str, token: str | None, session: str) -> bool:
        """End a publisher's session (WHIP DELETE); PushRefused 404 when there is none."""
        handle = await self._publisher_ingest(stream_id, token)
        if not await handle.unpublish.remote(session):
            raise PushRefused(404, "no such publishing session on this stream", "session")
        return True
