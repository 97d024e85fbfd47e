"""How the service receives push streams, as plain data (no aiortc, no av): the ICE servers it
offers and uses, the addresses of its host candidates, the address it announces behind a 1:1
NAT, and how long a push stream waits for a publisher. Built from the engine's settings
(``ServiceConfig.push_settings``) and handed to each push stream's ingest actor."""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

__all__ = ["IceServer", "PushSettings", "parse_addresses", "parse_ice_servers"]

_ICE_URL = re.compile(r"^(stun|stuns|turn|turns):[A-Za-z0-9.\-\[\]:]+(\?transport=(udp|tcp))?$")


@dataclass(frozen=True)
class IceServer:
    """A STUN or TURN server the operator names (``OMNIZIP_ICE_SERVERS``): offered to publishers
    in ``Link: rel="ice-server"`` headers and used by the service's own ICE agent."""

    url: str
    username: str = ""
    credential: str = ""

    def link(self) -> str:
        """The WHIP ``Link`` header value for this server (RFC 9725 section 4.6)."""
        extra = ""
        if self.username:
            user = self.username.replace('"', "")
            cred = self.credential.replace('"', "")
            extra = f'; username="{user}"; credential="{cred}"; credential-type="password"'
        return f'<{self.url}>; rel="ice-server"{extra}'


@dataclass(frozen=True)
class PushSettings:
    """What a push stream's ingest actor needs to receive a publisher."""

    addresses: tuple[str, ...] = ()  # host candidates' addresses; empty: the node's own
    announce: str = ""  # replaces the host candidates' address in answers (1:1 NAT)
    servers: tuple[IceServer, ...] = ()
    grace_s: float = 30.0  # a publisher that left may come back this long
    wait_s: float = 600.0  # for the first publisher


def parse_addresses(raw: str, name: str) -> tuple[str, ...]:
    """A comma list of IP addresses; ValueError naming ``name`` and the bad entry."""
    out = []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        try:
            out.append(str(ipaddress.ip_address(part)))
        except ValueError:
            raise ValueError(f"{name}: {part[:80]!r} is not an IP address") from None
    return tuple(out)


def parse_ice_servers(urls: str, username: str = "", credential: str = "") -> tuple[IceServer, ...]:
    """``stun:host:port,turn:host:port?transport=udp`` -> servers (the TURN ones with the
    credentials); ValueError naming a malformed entry."""
    out = []
    for u in (p.strip() for p in urls.split(",")):
        if not u:
            continue
        if not _ICE_URL.match(u):
            raise ValueError(f"OMNIZIP_ICE_SERVERS: {u[:80]!r} is not a stun:, stuns:, turn: or turns: URL")
        turn = u.startswith("turn")
        out.append(IceServer(u, username if turn else "", credential if turn else ""))
    return tuple(out)
