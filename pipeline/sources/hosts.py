"""Address judging for network sources, apart from the policy's rules: every spelling of an IP
address the C library accepts (`inet_aton`: `127.1`, `2130706433`, `0x7f000001`, `0177.0.0.1`),
IPv4 carried inside IPv6 (mapped, compatible, 6to4, Teredo, NAT64), the category that makes an
address never a media source (loopback, link-local, ...), name resolution, host allow-list
entries, and `NetworkTarget` (where a judged source may be connected to). Used by
pipeline.sources.policy (the verdicts) and pipeline.sources.guarded_io (the pinned connections). Pure
standard library; opens nothing, only resolves names.
"""
from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

__all__ = [
    "HOST_NAME", "IPAddress", "NetworkTarget", "category", "host_entry", "in_any", "ip_literal",
    "resolve",
]

HOST_NAME = re.compile(r"^(?=.{1,253}$)[a-z0-9_]([a-z0-9_\-]{0,62})(\.[a-z0-9_]([a-z0-9_\-]{0,62}))*$")
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_V4_THIS_NET = ipaddress.ip_network("0.0.0.0/8")
_V4_RESERVED = ipaddress.ip_network("240.0.0.0/4")  # includes 255.255.255.255
_V6_COMPAT = ipaddress.ip_network("::/96")
_V6_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # IPv4-translated (RFC 2765, 6145)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, translated, compatible, 6to4, Teredo,
    NAT64): such an address is judged as that IPv4 address."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _V6_COMPAT or ip in _V6_TRANSLATED:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    for net in _NAT64:
        if ip in net:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def category(ip: IPAddress) -> str | None:
    """Why an address is not a media source an API client may name (loopback, link-local, ...,
    "private" for every other address that is not globally reachable: RFC 1918, CGNAT,
    unique-local, documentation, benchmarking, ... as Python's `is_global` has it), or None.
    "private" is the one category an operator can lift, by naming the network in the host list."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            ip = ipaddress.IPv6Address(ip.compressed.split("%", 1)[0])
        if ip.is_loopback:
            return "loopback"
        if ip.is_unspecified:
            return "unspecified"
        if ip.is_link_local:
            return "link-local"
        if ip.is_multicast:
            return "multicast"
        v4 = _embedded_v4(ip)
        if v4 is not None:
            return category(v4)
        return "private" if ip.is_site_local or not ip.is_global else None
    if ip.is_loopback:
        return "loopback"
    if ip.is_unspecified or ip in _V4_THIS_NET:  # 0.0.0.0 reaches this host on Linux
        return "unspecified"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip in _V4_RESERVED:
        return "reserved"
    return None if ip.is_global else "private"


def _inet_aton(s: str) -> ipaddress.IPv4Address | None:
    """IPv4 the way the C library's inet_aton reads it: 1 to 4 parts, each decimal, octal (0...)
    or hex (0x...), the last filling the remaining bytes (`127.1`, `2130706433`, `0x7f.1`)."""
    parts = s.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    vals = []
    for p in parts:
        try:
            if re.fullmatch(r"0[xX][0-9a-fA-F]*", p):
                vals.append(int(p[2:] or "0", 16))
            elif re.fullmatch(r"0[0-7]*", p):
                vals.append(int(p, 8))
            elif re.fullmatch(r"[1-9][0-9]*", p):
                vals.append(int(p))
            else:
                return None
        except ValueError:
            return None
    *head, last = vals
    if any(v > 255 for v in head) or last >= 256 ** (4 - len(head)):
        return None
    n = 0
    for v in head:
        n = n * 256 + v
    return ipaddress.IPv4Address((n << (8 * (4 - len(head)))) | last)


def ip_literal(host: str) -> IPAddress | None:
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host)
        except ValueError:
            return None
    return _inet_aton(host)


def resolve(host: str, port: int) -> list[IPAddress]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out: list[IPAddress] = []
    for *_, sockaddr in infos:
        a = ipaddress.ip_address(sockaddr[0])
        if a not in out:
            out.append(a)
    return out


@dataclass(frozen=True)
class NetworkTarget:
    """A network source that passed the policy: where to connect (every address was judged)."""

    scheme: str
    host: str  # as it goes on the wire (Host header, TLS server name)
    port: int
    addresses: tuple[str, ...]


def host_entry(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | str:
    """One entry of the operator's host allow-list: a network (CIDR or address), a '.suffix'
    (from '*.domain' or '.domain') or an exact name; ValueError if it is none of these."""
    e = entry.strip().lower().rstrip(".")
    try:
        return ipaddress.ip_network(e, strict=False)
    except ValueError:
        pass
    bare = e[2:] if e.startswith("*.") else e[1:] if e.startswith(".") else e
    if not HOST_NAME.match(bare):
        raise ValueError(f"not a host name or CIDR: {entry!r}")
    return "." + bare if bare != e else e


def in_any(ip: IPAddress, nets: list) -> bool:
    """True if `ip`, or the IPv4 address it carries, lies in one of `nets`."""
    cands = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        v4 = _embedded_v4(ip)
        if v4 is not None:
            cands.append(v4)
    return any(c.version == n.version and c in n for c in cands for n in nets)
