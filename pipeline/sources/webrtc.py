"""The WebRTC side of a push stream: aiortc peer connections that take a publisher's offer (WHIP,
RFC 9725), answer it, and hand every decoded frame to the stream's
:class:`pipeline.sources.push.PushSource`.

aiortc is asyncio; the ingest actor is not. :class:`WebRTCReceiver` runs one event loop on a
thread of its own and offers blocking calls (``publish``, ``unpublish``, ``close``) to the actor.
aiortc decodes on threads of its own (its decoders), so the loop only moves frames.

The network follows the source policy (pipeline.sources.ice): host candidates on the operator's
addresses, no packet to an address the policy refuses, no default STUN server (aiortc's default
is a public one: the service uses only the ICE servers the operator names). DTLS-SRTP is
aiortc's, as WebRTC requires.
"""
from __future__ import annotations

import asyncio
import logging
import re
import secrets
import threading
from collections.abc import Callable
from typing import Any

from pipeline.errors import PushRefused
from pipeline.sources.ice import IceRules, ice_rules, install
from pipeline.sources.push import PushSource
from pipeline.sources.push_settings import IceServer
from pipeline.sources.sdp import CheckedOffer

__all__ = ["WebRTCReceiver"]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 30.0  # an answered publisher not connected by then is dropped
STATS_EVERY_S = 2.0


class WebRTCReceiver:
    """Publishers of one push stream, one at a time (the source refuses a second with 409)."""

    def __init__(self, source: PushSource, rules: IceRules, servers: tuple[IceServer, ...] = (),
                 announce: str = "", on_stats: Callable[[dict[str, int]], None] | None = None,
                 on_failure: Callable[[str], None] | None = None) -> None:
        install()
        self.source, self.rules, self.servers, self.announce = source, rules, servers, announce.strip()
        self._on_stats, self._on_failure = on_stats, on_failure
        self._pcs: dict[str, Any] = {}
        self._pending: str | None = None  # a session being answered (one at a time)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="webrtc", daemon=True)
        self._thread.start()
        self._stats_task = asyncio.run_coroutine_threadsafe(self._stats_loop(), self._loop)

    # -- blocking calls (any thread) -------------------------------------------------------
    def publish(self, offer: CheckedOffer, timeout_s: float = 20.0) -> tuple[str, str]:
        """(answer SDP, session id) for a checked offer; PushRefused naming what went wrong."""
        return asyncio.run_coroutine_threadsafe(self._publish(offer), self._loop).result(timeout_s)

    def unpublish(self, session: str, timeout_s: float = 10.0) -> bool:
        """End the publishing session (WHIP DELETE); False when there is no such session."""
        return asyncio.run_coroutine_threadsafe(self._end(session, "stopped"), self._loop).result(timeout_s)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            fut = asyncio.run_coroutine_threadsafe(self._close_all(), self._loop)
            fut.result(10.0)
        except Exception as exc:
            log.debug("webrtc: closing: %r", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)

    # -- on the loop -----------------------------------------------------------------------
    async def _publish(self, offer: CheckedOffer) -> tuple[str, str]:
        from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription

        if self.source.session is not None or self._pending is not None:
            raise PushRefused(409, "a publisher is already connected to this stream; stop it (DELETE its "
                              "session) or wait until it leaves", "stream_id")
        session = self._pending = secrets.token_hex(16)
        config = RTCConfiguration(iceServers=[RTCIceServer(s.url, s.username or None, s.credential or None)
                                              for s in self.servers])  # [] : never aiortc's public default
        pc = RTCPeerConnection(config)
        self._pcs[session] = pc
        try:
            @pc.on("track")
            def _track(track: Any) -> None:
                asyncio.ensure_future(self._pump(session, track))

            @pc.on("connectionstatechange")
            async def _state() -> None:
                if pc.connectionState == "failed":
                    self._failed("dtls" if pc.iceConnectionState in ("connected", "completed") else "ice")
                    await self._end(session, "failed")
                elif pc.connectionState == "closed":
                    await self._end(session, "closed")

            with ice_rules(self.rules):
                try:
                    await pc.setRemoteDescription(RTCSessionDescription(offer.sdp, "offer"))
                    answer = await pc.createAnswer()
                except (ValueError, KeyError, IndexError, AttributeError) as exc:
                    raise PushRefused(400, f"the SDP offer cannot be used: {str(exc)[:200]}", "sdp") from None
                await pc.setLocalDescription(answer)
            # only an answered offer is a publisher: a refused one leaves the stream as it was
            self.source.attach(session, audio=offer.audio, video=offer.video)
            asyncio.ensure_future(self._connect_deadline(session, pc))
            return self._announced(pc.localDescription.sdp), session
        except BaseException:
            self._failed("offer")
            await self._end(session, "refused")
            raise
        finally:
            self._pending = None

    def _announced(self, sdp: str) -> str:
        """The answer with its host candidates' address replaced by the announced one (1:1 NAT)."""
        if not self.announce:
            return sdp
        return re.sub(r"^(a=candidate:\S+ \d+ udp \d+ )(\S+)( \d+ typ host)", rf"\g<1>{self.announce}\g<3>",
                      sdp, flags=re.M | re.I)

    async def _pump(self, session: str, track: Any) -> None:
        """Frames of one track into the source until the track ends."""
        from aiortc.mediastreams import MediaStreamError

        feed = self.source.video if track.kind == "video" else self.source.audio
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            except Exception as exc:  # a broken frame from the publisher's decoder: the track goes on
                self.source.decode_errors += 1
                log.debug("webrtc: %s frame: %r", track.kind, exc)
                continue
            feed(session, frame)

    async def _connect_deadline(self, session: str, pc: Any) -> None:
        await asyncio.sleep(CONNECT_TIMEOUT_S)
        if self._pcs.get(session) is pc and pc.connectionState not in ("connected",):
            log.info("webrtc: session %s did not connect within %g s", session[:8], CONNECT_TIMEOUT_S)
            self._failed("ice")
            await self._end(session, "timeout")

    async def _end(self, session: str, why: str) -> bool:
        pc = self._pcs.pop(session, None)
        left = self.source.detach(session)
        if pc is not None:
            log.info("webrtc: session %s ended (%s)", session[:8], why)
            await pc.close()
        return pc is not None or left

    async def _close_all(self) -> None:
        for session in list(self._pcs):
            await self._end(session, "closing")
        for task in asyncio.all_tasks():  # the stats loop, connect deadlines, track pumps
            if task is not asyncio.current_task():
                task.cancel()

    def _failed(self, stage: str) -> None:
        if self._on_failure is not None:
            self._on_failure(stage)

    async def _stats_loop(self) -> None:
        """Transport and RTP figures of the connected publisher, as deltas, every few seconds."""
        last = {"packets": 0, "bytes": 0, "lost": 0}
        current: Any = None
        while True:
            await asyncio.sleep(STATS_EVERY_S)
            if self._on_stats is None:
                continue
            pc = next(iter(self._pcs.values()), None)
            if pc is not current:  # a new session counts from zero
                current, last = pc, {"packets": 0, "bytes": 0, "lost": 0}
            now = {"packets": 0, "bytes": 0, "lost": 0}
            if pc is not None:
                try:
                    report = await pc.getStats()
                except Exception:
                    continue
                for st in report.values():
                    if st.type == "transport":
                        now["packets"] += int(st.packetsReceived)
                        now["bytes"] += int(st.bytesReceived)
                    elif st.type == "inbound-rtp":
                        now["lost"] += max(0, int(st.packetsLost))
            delta = {k: max(0, now[k] - last[k]) for k in now}
            last = now
            try:
                self._on_stats(delta)
            except Exception as exc:
                log.debug("webrtc: stats callback: %r", exc)
