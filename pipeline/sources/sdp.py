"""A publisher's SDP offer judged before any WebRTC machinery sees it: its size, its form, the
media it sends and their codecs, and every ICE candidate it names (by the source policy:
the service must never send a connectivity check where the operator does not allow, so a
candidate on loopback, link-local or private space, or named by a host or mDNS name, is
removed from the offer). Pure text work: no aiortc, no sockets.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.errors import PushRefused, SourceRefused
from pipeline.sources.policy import SourcePolicy

__all__ = ["MAX_OFFER_BYTES", "CODECS", "CheckedOffer", "check_offer"]

MAX_OFFER_BYTES = 64 * 1024  # browsers' offers are 3-10 KiB; OBS's smaller
CODECS = {"audio": ("opus",), "video": ("H264", "VP8")}  # what the service decodes (aiortc)
_CANDIDATE = re.compile(r"^a=candidate:\S+ \d+ (\S+) \d+ (\S+) (\d+) typ (\S+)", re.I)


@dataclass(frozen=True)
class CheckedOffer:
    """The offer as it may be used, what it sends, and the candidates taken out of it."""

    sdp: str
    audio: bool
    video: bool
    removed: tuple[str, ...]  # "address: why" for each refused candidate


def check_offer(body: bytes | str, policy: SourcePolicy) -> CheckedOffer:
    """The offer with refused candidates removed; PushRefused 413 over the size limit, 400 naming
    what makes the offer unusable (not SDP, no media, no codec the service decodes)."""
    raw = body.encode() if isinstance(body, str) else bytes(body)
    if len(raw) > MAX_OFFER_BYTES:
        raise PushRefused(413, f"the SDP offer is {len(raw)} bytes; at most {MAX_OFFER_BYTES}", "sdp")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PushRefused(400, "the SDP offer is not UTF-8 text", "sdp") from None
    lines = text.replace("\r\n", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or lines[0].strip() != "v=0" or any(ln and not re.match(r"^[a-z]=", ln) for ln in lines):
        raise PushRefused(400, "the body is not an SDP offer (it must start with v=0 and hold only "
                          "'x=...' lines)", "sdp")
    if any("\x00" in ln for ln in lines):
        raise PushRefused(400, "the SDP offer holds NUL characters", "sdp")
    kept, removed, media = [], [], {}
    kind: str | None = None
    for ln in lines:
        if ln.startswith("m="):
            kind = ln[2:].split(" ", 1)[0].lower()
            port = (ln.split(" ") + ["", ""])[1]
            if kind in CODECS and port != "0":
                media.setdefault(kind, set())
        elif ln.startswith("a=rtpmap:") and kind in media:
            m = re.match(r"^a=rtpmap:\d+ ([^/\s]+)/", ln)
            if m:
                media[kind].add(m.group(1).lower())
        elif ln.lower().startswith("a=candidate:"):
            why = _refusal(ln, policy)
            if why is not None:
                removed.append(why)
                continue
        kept.append(ln)
    usable = {k: any(c.lower() in names for c in CODECS[k]) for k, names in media.items()}
    if not media:
        raise PushRefused(400, "the SDP offer sends no audio or video section (m=audio / m=video)", "sdp")
    if not any(usable.values()):
        offered = sorted({n for names in media.values() for n in names})
        raise PushRefused(400, f"no codec the service decodes: offered {offered[:12]}; it takes "
                          f"{', '.join(CODECS['video'])} video and {', '.join(CODECS['audio'])} audio", "sdp")
    return CheckedOffer("\r\n".join(kept) + "\r\n", usable.get("audio", False), usable.get("video", False),
                        tuple(removed))


def _refusal(line: str, policy: SourcePolicy) -> str | None:
    """Why a candidate line may not be used, or None when it may."""
    m = _CANDIDATE.match(line)
    if m is None:
        return f"{line[:60]}: not a candidate line"
    transport, address = m.group(1).lower(), m.group(2)
    if transport != "udp":
        return f"{address}: {transport} candidates are not used (UDP only)"
    try:
        policy.check_peer(address)
    except SourceRefused as e:
        return f"{address}: {e}"
    return None
