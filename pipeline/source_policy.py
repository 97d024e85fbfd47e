"""Which media sources the service may open, judged before anything is opened.

`SourcePolicy.check(source)` refuses (raises `SourceRefused`, naming the rule) a source that an
API client must not make the service open:

* network sources: `rtsp`, `rtsps`, `http`, `https` (HLS included) to any host except loopback,
  link-local, unspecified, multicast and reserved addresses, judged on every address the host
  resolves to and in every spelling the C library accepts (`127.1`, `2130706433`, `0x7f000001`,
  `0177.0.0.1`, `[::ffff:127.0.0.1]`, IPv4-compatible / 6to4 / Teredo / NAT64 embeddings,
  trailing dots, upper case, percent-encoding); optionally only hosts of an allow-list;
* file paths and `file://` URLs only when the operator allows `file`, confined to `file_roots`
  (symlinks and `..` resolved) when set; never `/proc`, `/sys` or `/dev` as a file;
* `lavfi:` graphs only when allowed, and then only generator graphs: every filter must be on an
  allow-list of filters that read nothing (no `movie`, `amovie`, `drawtext`, `sendcmd`, ...);
* devices (`/dev/videoN`, `v4l2:`) only when allowed;
* control characters anywhere, and every other scheme or FFmpeg protocol (`ftp`, `tcp`, `udp`,
  `concat:`, `subfile,`, `data:`, `pipe:`, `crypto:`, ...), always.

`SourcePolicy.protocol_whitelist(source)` is the fixed FFmpeg `protocol_whitelist` for the
source's scheme. `redact(text)` removes credentials from every URL in a text.
`HttpSourceOptions` is the typed, bounded subset of `pipeline.sources.SourceOptions` an HTTP
client may set. This module opens nothing (it resolves host names) and imports neither av, torch
nor ray.
"""
from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.errors import UnsupportedSourceError

__all__ = [
    "ALLOW_KINDS", "GENERATOR_FILTERS", "HttpSourceOptions", "PROCESSING_FILTERS", "SourcePolicy",
    "SourceRefused", "file_url_path", "has_control_chars", "lavfi_filters", "redact",
]

ALLOW_KINDS = frozenset({"file", "lavfi", "device", "loopback"})
NETWORK_SCHEMES = {"rtsp": 554, "rtsps": 322, "http": 80, "https": 443}
_WHITELIST = {
    "rtsp": "rtsp,rtp,udp,tcp",
    "rtsps": "rtsp,rtp,udp,tcp,tls",
    "http": "http,tcp",
    "https": "https,tls,tcp",
    "file": "file",
    "lavfi": "",  # the lavfi device opens no URL; an empty whitelist lets nothing through
    "device": "",
}
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
# What FFmpeg takes for a protocol prefix (url_find_protocol): scheme characters, then ':'
_FF_PROTOCOL = re.compile(r"^[A-Za-z0-9+.\-]+:")
_HOST_NAME = re.compile(r"^(?=.{1,253}$)[a-z0-9_]([a-z0-9_\-]{0,62})(\.[a-z0-9_]([a-z0-9_\-]{0,62}))*$")
_SPECIAL_DIRS = ("/proc", "/sys", "/dev")


class SourceRefused(UnsupportedSourceError):
    """The source policy refuses this source; nothing was opened. `rule` is a short code:
    scheme, control-char, url:invalid, host:loopback, host:link-local, host:unspecified,
    host:multicast, host:reserved, host:invalid, host:not-allowed, resolve, file:not-allowed,
    file:outside-roots, file:special, device:not-allowed, lavfi:not-allowed, lavfi:filter,
    option:not-allowed. A ValueError (and a pipeline.errors.SourceError): a client's mistake."""

    def __init__(self, rule: str, detail: str, url: str | None = None) -> None:
        self.rule, self._detail, self._url = rule, detail, url
        super().__init__(redact(f"source refused ({rule}): {detail}"),
                         None if url is None else redact(url))

    def __reduce__(self) -> tuple:  # crosses Ray (pickled) with its own arguments
        return (type(self), (self.rule, self._detail, self._url))


def has_control_chars(text: str) -> bool:
    """True if `text` holds a C0/C1 control character (CR, LF, NUL, DEL, ...) or a line separator."""
    return bool(_CONTROL.search(text))


def file_url_path(url: str) -> str:
    """The local path a `file://` URL names (percent-decoded); the one place this is derived."""
    return urllib.parse.unquote(urllib.parse.urlsplit(url).path)


# ---------------------------------------------------------------------------------------------
# redaction

_URL_IN_TEXT = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)([^\s'\"<>`]*)")
_PARAM = re.compile(r"([?&#;])([^=&#?;]*)=([^&#;]*)")
_AUTH_HEADER = re.compile(
    r"(?i:\b(?:proxy-)?authorization\s*[:=]\s*(?:(?:bearer|basic|digest|token)\s+)?)"
    r"(?!\*\*\*|(?i:bearer|basic|digest|token)\b)([^\s'\",;]{4,})")
_AUTH_BARE = re.compile(r"\b(?:Bearer|Basic)\s+(?!\*\*\*)([A-Za-z0-9._~+/\-]{8,}=*)")
_SECRET_KEYS = frozenset({
    "token", "key", "api_key", "apikey", "api-key", "access_token", "refresh_token", "id_token",
    "auth", "authorization", "password", "passwd", "pwd", "pass", "secret", "client_secret", "sig",
    "signature", "session", "sessionid", "credential", "credentials", "jwt", "bearer", "hdnts",
    "hdnea", "hdntl", "policy", "key-pair-id", "code",
})
_SECRET_PARTS = ("token", "secret", "passw", "signature", "credential", "apikey", "api_key", "auth")
_SECRET_PREFIXES = ("x-amz-", "x-goog-", "x-ms-", "x-oss-", "x-cos-")


def _secret_key(key: str) -> bool:
    k = urllib.parse.unquote(key).strip().lower()
    return (k in _SECRET_KEYS or any(p in k for p in _SECRET_PARTS)
            or k.startswith(_SECRET_PREFIXES))


def _redact_url(m: re.Match) -> str:
    scheme, rest = m.group(1), m.group(2)
    cut = len(rest)
    for ch in "?#":
        i = rest.find(ch)
        if i != -1:
            cut = min(cut, i)
    at = rest.rfind("@", 0, cut)  # the last '@' of the authority (a password may hold '/' or '@')
    if at != -1:
        rest = "***" + rest[at:]
    rest = _PARAM.sub(lambda p: p.group(0) if not _secret_key(p.group(2))
                      else f"{p.group(1)}{p.group(2)}=***", rest)
    return scheme + rest


def redact(text: Any) -> str:
    """`text` with credentials removed from every URL in it: `user:password@` becomes `***@`,
    and token-like query or fragment parameters (token, key, api_key, access_token, auth,
    password, sig, signature, secret, X-Amz-*, ...) get the value `***`; `Authorization:` /
    `Bearer` / `Basic` values too. Idempotent; never raises."""
    s = text if isinstance(text, str) else str(text)
    s = _URL_IN_TEXT.sub(_redact_url, s)
    s = _AUTH_HEADER.sub(lambda m: m.group(0)[: m.start(1) - m.start(0)] + "***", s)
    return _AUTH_BARE.sub(lambda m: m.group(0)[: m.start(1) - m.start(0)] + "***", s)


# ---------------------------------------------------------------------------------------------
# addresses

_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_V4_THIS_NET = ipaddress.ip_network("0.0.0.0/8")
_V4_RESERVED = ipaddress.ip_network("240.0.0.0/4")  # includes 255.255.255.255
_V6_COMPAT = ipaddress.ip_network("::/96")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, compatible, 6to4, Teredo, NAT64)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _V6_COMPAT:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    for net in _NAT64:
        if ip in net:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _category(ip: IPAddress) -> str | None:
    """Why an address is never a media source (loopback, link-local, ...), or None."""
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
        return _category(v4) if v4 is not None else None
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
    return None


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


def _ip_literal(host: str) -> IPAddress | None:
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host)
        except ValueError:
            return None
    return _inet_aton(host)


def _resolve(host: str, port: int) -> list[IPAddress]:
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


# ---------------------------------------------------------------------------------------------
# lavfi

# Source filters that generate media from their options and read nothing.
GENERATOR_FILTERS = frozenset({
    "testsrc", "testsrc2", "smptebars", "smptehdbars", "rgbtestsrc", "yuvtestsrc", "pal75bars",
    "pal100bars", "colorspectrum", "colorchart", "allrgb", "allyuv", "color", "nullsrc",
    "mandelbrot", "gradients", "sierpinski", "haldclutsrc",
    "sine", "anoisesrc", "aevalsrc", "anullsrc",
})
# Plain processing filters: frames in, frames out, options are numbers or expressions.
PROCESSING_FILTERS = frozenset({
    "null", "anull", "copy", "acopy", "scale", "format", "aformat", "fps", "setpts", "asetpts",
    "settb", "asettb", "trim", "atrim", "volume", "aresample", "pan", "amix", "amerge", "apad",
    "split", "asplit", "overlay", "hstack", "vstack", "concat", "crop", "pad", "hflip", "vflip",
    "transpose", "negate", "hue", "gblur", "noise", "drawbox", "drawgrid", "setsar", "setdar",
    "fade", "afade", "lowpass", "highpass", "tpad", "geq", "lutyuv", "lutrgb", "select", "aselect",
    "rotate", "edgedetect", "showwaves", "loop", "aloop", "atempo", "channelmap", "channelsplit",
    "join", "tremolo", "vibrato", "aeval",
})
_LAVFI_FILTERS = GENERATOR_FILTERS | PROCESSING_FILTERS
# Option names that point at something outside the graph, refused even on an allowed filter.
_FILEISH_KEY = re.compile(r"file|url|path|dir|font|model|plugin|shader|sofa|bind|dump|source|graph")
_NAME = re.compile(r"^[a-z0-9_]+$")
_LABEL = re.compile(r"^[A-Za-z0-9_]+$")
_WS = " \n\t\r"


def _get_token(s: str, i: int, term: str) -> tuple[str, int]:
    """FFmpeg's av_get_token: skip leading blanks, read up to an unescaped, unquoted character of
    `term`, removing one level of backslash escaping and '...' quoting; trailing blanks dropped."""
    n = len(s)
    while i < n and s[i] in _WS:
        i += 1
    out: list[str] = []
    end = 0  # length of `out` that trailing-blank stripping may not cut into
    while i < n and s[i] not in term:
        c = s[i]
        i += 1
        if c == "\\" and i < n:
            out.append(s[i])
            i += 1
            end = len(out)
        elif c == "'":
            while i < n and s[i] != "'":
                out.append(s[i])
                i += 1
            if i < n:
                i += 1
                end = len(out)
        else:
            out.append(c)
    while len(out) > end and out[-1] in _WS:
        out.pop()
    return "".join(out), i


def _labels(g: str, i: int) -> int:
    n = len(g)
    while i < n and g[i] == "[":
        name, i = _get_token(g, i + 1, "]")
        if i >= n or g[i] != "]" or not _LABEL.match(name):
            raise SourceRefused("lavfi:filter", "malformed link label in the filter graph")
        i += 1
        while i < n and g[i] in _WS:
            i += 1
    return i


def _options(filt: str, args: str) -> None:
    """Split a filter's arguments as FFmpeg does (key=value or positional values, ':'-separated,
    a second level of escaping) and refuse option names or values that point outside the graph."""
    j, n = 0, len(args)
    while j < n:
        k = j
        while k < n and args[k] in _WS:
            k += 1
        ks = k
        while k < n and (args[k].isascii() and (args[k].isalnum() or args[k] in "-_/.")):
            k += 1
        key = args[ks:k]
        m = k
        while m < n and args[m] in _WS:
            m += 1
        if m < n and args[m] == "=":
            j = m + 1
            if not re.fullmatch(r"[A-Za-z0-9_]+", key) or _FILEISH_KEY.search(key.lower()):
                raise SourceRefused("lavfi:filter", f"option {key!r} of filter {filt!r} is not allowed")
        value, j = _get_token(args, j, ":")
        if "://" in value or re.match(r"^(file|https?|rtsps?|tcp|udp|pipe|concat|data):", value, re.I):
            raise SourceRefused("lavfi:filter", f"filter {filt!r} is given a URL")
        if j < n and args[j] == ":":
            j += 1


def lavfi_filters(graph: str) -> list[str]:
    """The filter names of a lavfi graph, parsed the way libavfilter parses it; raises
    SourceRefused("lavfi:filter") if it is malformed or a filter or option is not allowed."""
    g, i, n = graph, 0, len(graph)
    names: list[str] = []
    while True:
        while i < n and g[i] in _WS:
            i += 1
        i = _labels(g, i)
        raw_start = i
        name, i = _get_token(g, i, "=,;[")
        raw = g[raw_start:i]
        if "\\" in raw or "'" in raw:
            raise SourceRefused("lavfi:filter", "quoted or escaped filter names are not allowed")
        base = name.split("@", 1)[0]
        if "@" in name and not _LABEL.match(name.split("@", 1)[1]):
            raise SourceRefused("lavfi:filter", "malformed filter instance name")
        if not _NAME.match(base):
            raise SourceRefused("lavfi:filter", f"malformed filter name {base!r}")
        if base not in _LAVFI_FILTERS:
            raise SourceRefused("lavfi:filter", f"filter {base!r} is not on the allow-list of generator "
                                "and processing filters")
        names.append(base)
        if i < n and g[i] == "=":
            args, i = _get_token(g, i + 1, "[],;")
            _options(base, args)
        i = _labels(g, i)
        while i < n and g[i] in _WS:
            i += 1
        if i >= n:
            return names
        if g[i] not in ",;":
            raise SourceRefused("lavfi:filter", f"cannot parse the filter graph at {g[i:i + 12]!r}")
        i += 1


# ---------------------------------------------------------------------------------------------
# the policy

def _split_list(value: str, seps: str) -> list[str]:
    return [p.strip() for p in re.split("[" + re.escape(seps) + "]", value) if p.strip()]


def _host_entry(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | str:
    e = entry.strip().lower().rstrip(".")
    try:
        return ipaddress.ip_network(e, strict=False)
    except ValueError:
        pass
    bare = e[2:] if e.startswith("*.") else e[1:] if e.startswith(".") else e
    if not _HOST_NAME.match(bare):
        raise ValueError(f"not a host name or CIDR: {entry!r}")
    return "." + bare if bare != e else e


@dataclass(frozen=True)
class SourcePolicy:
    """What an API client's source may be. The default refuses files, lavfi, devices and loopback
    and allows rtsp/rtsps/http/https to any other unicast host (private ranges included)."""

    allow: frozenset[str] = frozenset()  # subset of {"file", "lavfi", "device", "loopback"}
    file_roots: tuple[str, ...] = ()  # file sources must resolve inside one of these
    hosts: tuple[str, ...] = ()  # if set, network sources must match a name or CIDR here
    tls_verify: bool = True  # https fetched by the guarded reader verifies certificates
    unrestricted: bool = False  # permissive(): only the sanity rules (schemes, control chars)
    _host_rules: tuple = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        allow = frozenset(str(a).strip().lower() for a in self.allow)
        bad = sorted(allow - ALLOW_KINDS)
        if bad:
            raise ValueError(f"unknown source kind(s) {bad} in allow; known: {sorted(ALLOW_KINDS)}")
        roots = tuple(str(r) for r in self.file_roots)
        for r in roots:
            if not os.path.isabs(r) or has_control_chars(r):
                raise ValueError(f"file roots must be absolute paths, not {r!r}")
        hosts = tuple(str(h).strip() for h in self.hosts)
        rules = tuple(_host_entry(h) for h in hosts)
        object.__setattr__(self, "allow", allow)
        object.__setattr__(self, "file_roots", roots)
        object.__setattr__(self, "hosts", hosts)
        object.__setattr__(self, "_host_rules", rules)

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "SourcePolicy":
        """From OMNIZIP_ALLOW_SOURCES (comma list of file, lavfi, device, loopback),
        OMNIZIP_FILE_ROOTS (absolute directories, separated by os.pathsep or commas),
        OMNIZIP_SOURCE_HOSTS (comma list of host names, *.domain suffixes or CIDRs) and
        OMNIZIP_TLS_VERIFY (1/0). A bad value raises ValueError naming the variable."""
        env = os.environ if environ is None else environ
        kw: dict[str, Any] = {}
        raw = env.get("OMNIZIP_ALLOW_SOURCES", "")
        allow = {a.lower() for a in _split_list(raw, ",")}
        if allow - ALLOW_KINDS:
            raise ValueError(f"OMNIZIP_ALLOW_SOURCES: unknown kind(s) {sorted(allow - ALLOW_KINDS)}; "
                             f"known: {sorted(ALLOW_KINDS)}")
        kw["allow"] = frozenset(allow)
        roots = _split_list(env.get("OMNIZIP_FILE_ROOTS", ""), os.pathsep + ",")
        for r in roots:
            if not os.path.isabs(r) or has_control_chars(r):
                raise ValueError(f"OMNIZIP_FILE_ROOTS: {r!r} is not an absolute path")
        kw["file_roots"] = tuple(roots)
        hosts = _split_list(env.get("OMNIZIP_SOURCE_HOSTS", ""), ",")
        for h in hosts:
            try:
                _host_entry(h)
            except ValueError as e:
                raise ValueError(f"OMNIZIP_SOURCE_HOSTS: {e}") from None
        kw["hosts"] = tuple(hosts)
        tv = env.get("OMNIZIP_TLS_VERIFY", "1").strip().lower()
        if tv not in ("1", "0", "true", "false", "yes", "no", "on", "off", ""):
            raise ValueError(f"OMNIZIP_TLS_VERIFY: expected 1 or 0, not {tv!r}")
        kw["tls_verify"] = tv in ("1", "true", "yes", "on", "")
        return cls(**kw)

    @classmethod
    def permissive(cls) -> "SourcePolicy":
        """Everything allowed (the operator's CLI and tests of ingestion): any host (not even
        resolved), file, lavfi graph or device; still no control characters and no other schemes
        or FFmpeg protocols. Sources opened under it use FFmpeg's own I/O (see pipeline.sources)."""
        return cls(allow=ALLOW_KINDS, unrestricted=True)

    # -- checks ----------------------------------------------------------------------------
    def check(self, source: Any) -> None:
        """Raise SourceRefused if `source` may not be opened. Resolves network host names;
        opens nothing (file paths are resolved with realpath only)."""
        kind, s = _kind_of(source)
        if self.unrestricted:
            if kind == "file-url" and has_control_chars(file_url_path(s)):
                raise SourceRefused("control-char", "control characters in the path")
            return
        if kind in NETWORK_SCHEMES:
            self.check_network(s)
        elif kind == "file":
            self.check_file(s)
        elif kind == "file-url":
            parts = urllib.parse.urlsplit(s)
            if parts.netloc.lower() not in ("", "localhost"):
                raise SourceRefused("url:invalid", "a file:// URL names no host", s)
            self.check_file(file_url_path(s), s)
        elif kind == "lavfi":
            self.check_lavfi(s[len("lavfi:"):], s)
        else:  # device
            self.check_device(s[len("v4l2:"):] if s.startswith("v4l2:") else s, s)

    def check_network(self, url: str) -> NetworkTarget:
        """Judge an rtsp/rtsps/http/https URL; returns where to connect (every address the host
        resolves to, all judged). Used again for each redirect and HLS segment."""
        if has_control_chars(url):
            raise SourceRefused("control-char", "control characters in the URL")
        try:
            parts = urllib.parse.urlsplit(url)
            scheme = parts.scheme.lower()
            raw_host = parts.hostname or ""
            port = parts.port
        except ValueError as e:
            raise SourceRefused("url:invalid", f"malformed URL ({e})", url) from None
        if scheme not in NETWORK_SCHEMES:
            raise SourceRefused("scheme", f"scheme {scheme!r} is not one of {sorted(NETWORK_SCHEMES)}", url)
        port = NETWORK_SCHEMES[scheme] if port is None else port
        if not 0 < port < 65536:
            raise SourceRefused("url:invalid", f"port {port} out of range", url)
        host = urllib.parse.unquote(raw_host).lower()
        if not host:
            raise SourceRefused("url:invalid", "the URL names no host", url)
        if has_control_chars(host):
            raise SourceRefused("control-char", "control characters in the host", url)
        if not host.isascii():
            raise SourceRefused("host:invalid", "non-ASCII host name (use its punycode form)", url)
        name = host.rstrip(".") if ":" not in host else host
        literal = _ip_literal(name)
        if literal is None and not _HOST_NAME.match(name):
            raise SourceRefused("host:invalid", f"malformed host {host!r}", url)
        if not self.unrestricted and "loopback" not in self.allow and (
                name == "localhost" or name.endswith(".localhost")):
            raise SourceRefused("host:loopback", f"{host} is this machine", url)
        if literal is not None:
            self._judge(literal, host, url)
        if "%" in raw_host and (literal is None or ":" not in name):
            # percent-encoding FFmpeg would not decode: judged above, but never connected to
            raise SourceRefused("host:invalid", f"percent-encoded host {host!r}", url)
        try:
            addrs = _resolve(raw_host, port)
        except (OSError, UnicodeError) as e:
            raise SourceRefused("resolve", f"cannot resolve {host} ({e})", url) from None
        if not addrs:
            raise SourceRefused("resolve", f"{host} resolves to no address", url)
        for a in addrs:
            self._judge(a, host, url)
        if self._host_rules and not self.unrestricted:
            self._match_hosts(name, ([literal] if literal is not None else []) + addrs, url)
        wire = raw_host if ":" not in raw_host else raw_host.split("%", 1)[0]
        return NetworkTarget(scheme, wire, port, tuple(str(a) for a in addrs))

    def _judge(self, ip: IPAddress, host: str, url: str) -> None:
        cat = _category(ip)
        if cat is None or self.unrestricted:
            return
        if cat == "loopback" and "loopback" in self.allow:
            return
        shown = host if str(ip) == host else f"{host} ({ip})"
        raise SourceRefused(f"host:{cat}", f"{shown}: {cat} address", url)

    def _match_hosts(self, name: str, addrs: list[IPAddress], url: str) -> None:
        for rule in self._host_rules:
            if isinstance(rule, str):
                if name == rule or rule.startswith(".") and name.endswith(rule):
                    return
        nets = [r for r in self._host_rules if not isinstance(r, str)]
        if nets and all(_in_any(a, nets) for a in addrs):
            return
        raise SourceRefused("host:not-allowed", f"{name} is not on the operator's host allow-list", url)

    def check_file(self, path: str, url: str | None = None) -> str:
        """Judge a local path; returns its real path (symlinks and '..' resolved)."""
        shown = url if url is not None else path
        if has_control_chars(path):
            raise SourceRefused("control-char", "control characters in the path")
        if not self.unrestricted and "file" not in self.allow:
            raise SourceRefused("file:not-allowed", "file sources are not enabled on this service", shown)
        if not path:
            raise SourceRefused("url:invalid", "empty path", shown)
        real = os.path.realpath(path)
        if self.unrestricted:
            return real
        if self.file_roots:
            if not any(_inside(real, os.path.realpath(r)) for r in self.file_roots):
                raise SourceRefused("file:outside-roots", "the path is outside the allowed directories", shown)
        elif any(_inside(real, d) for d in _SPECIAL_DIRS):
            raise SourceRefused("file:special", "/proc, /sys and /dev hold no media files", shown)
        return real

    def check_lavfi(self, graph: str, url: str | None = None) -> None:
        """Judge a lavfi filter graph: only allowed filters, no option that reads or binds."""
        shown = url if url is not None else f"lavfi:{graph}"
        if has_control_chars(graph):
            raise SourceRefused("control-char", "control characters in the filter graph")
        if not self.unrestricted and "lavfi" not in self.allow:
            raise SourceRefused("lavfi:not-allowed", "lavfi test sources are not enabled on this service", shown)
        if not graph.strip():
            raise SourceRefused("lavfi:filter", "empty filter graph", shown)
        if not self.unrestricted:
            lavfi_filters(graph)

    def check_device(self, path: str, url: str | None = None) -> None:
        """Judge a capture device (/dev/videoN, v4l2:PATH)."""
        shown = url if url is not None else path
        if has_control_chars(path):
            raise SourceRefused("control-char", "control characters in the device")
        if not self.unrestricted and "device" not in self.allow:
            raise SourceRefused("device:not-allowed", "capture devices are not enabled on this service", shown)
        if not self.unrestricted and not _inside(os.path.realpath(path), "/dev"):
            raise SourceRefused("device:not-allowed", "a device must be under /dev", shown)

    def check_audio_device(self, spec: str) -> None:
        """Judge a paired audio input: 'lavfi:GRAPH' as a lavfi source, 'alsa:'/'pulse:' as a device."""
        if has_control_chars(spec):
            raise SourceRefused("control-char", "control characters in audio_device")
        fmt, _, target = spec.partition(":")
        if fmt == "lavfi":
            self.check_lavfi(target, spec)
        elif not self.unrestricted and "device" not in self.allow:
            raise SourceRefused("device:not-allowed", "capture devices are not enabled on this service", spec)

    @staticmethod
    def kind(source: Any) -> str:
        """What a source is, as the policy sees it: 'rtsp', 'rtsps', 'http', 'https', 'file',
        'file-url', 'lavfi' or 'device'. Raises SourceRefused for control characters and for
        every other scheme or FFmpeg protocol, whatever the policy."""
        return _kind_of(source)[0]

    def protocol_whitelist(self, source: Any) -> str:
        """The fixed FFmpeg protocol_whitelist for the source's scheme: rtsp 'rtsp,rtp,udp,tcp'
        (+tls for rtsps), http 'http,tcp', https 'https,tls,tcp' (HLS playlists included), file
        'file', lavfi and devices '' (they open no URL)."""
        kind, _ = _kind_of(source)
        return _WHITELIST["file" if kind == "file-url" else kind]


def _in_any(ip: IPAddress, nets: list) -> bool:
    cands = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        v4 = _embedded_v4(ip)
        if v4 is not None:
            cands.append(v4)
    return any(c.version == n.version and c in n for c in cands for n in nets)


def _inside(path: str, root: str) -> bool:
    root = root.rstrip("/") or "/"
    return path == root or path.startswith(root if root == "/" else root + "/")


def _kind_of(source: Any) -> tuple[str, str]:
    """(kind, source string): kind is a network scheme, 'file', 'file-url', 'lavfi' or 'device'.
    Mirrors pipeline.sources.classify, and refuses every other scheme or FFmpeg protocol."""
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        raise SourceRefused("url:invalid", f"a source must be a string, not {type(source).__name__}")
    if has_control_chars(source):
        raise SourceRefused("control-char", "control characters (CR, LF, NUL, ...) in the source")
    s = source.strip()
    if not s:
        raise SourceRefused("url:invalid", "empty source")
    if s.startswith("lavfi:"):
        return "lavfi", s
    if s.startswith("v4l2:"):
        return "device", s
    m = _URL_SCHEME.match(s)
    if m:
        scheme = m.group(1).lower()
        if scheme in NETWORK_SCHEMES:
            return scheme, s
        if scheme == "file":
            return "file-url", s
        raise SourceRefused("scheme", f"scheme {scheme!r} is not allowed; allowed: rtsp://, rtsps://, "
                            "http(s):// (media or HLS), file paths or file://, lavfi:, v4l2:", s)
    if re.match(r"^/dev/video\d+$", s):
        return "device", s
    if _FF_PROTOCOL.match(s) or s.startswith("subfile,"):
        proto = re.split(r"[:,]", s, maxsplit=1)[0]
        raise SourceRefused("scheme", f"FFmpeg protocol {proto!r} is not allowed", s)
    return "file", s


# ---------------------------------------------------------------------------------------------
# typed options for HTTP clients

def _reject_control(value: Any, where: str = "options") -> None:
    if isinstance(value, str):
        if has_control_chars(value):
            raise ValueError(f"control characters are not allowed in {where}")
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _reject_control(k, where)
            _reject_control(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for v in value:
            _reject_control(v, where)


class HttpSourceOptions(BaseModel):
    """Source options an HTTP client may set: explicit, typed and bounded. No raw FFmpeg
    options, no paired audio device, no RTSP listen mode (those stay with the operator)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    rtsp_transport: Literal["tcp", "udp"] = "tcp"
    open_timeout_s: float = Field(8.0, gt=0, le=300, allow_inf_nan=False)
    read_timeout_s: float = Field(8.0, gt=0, le=300, allow_inf_nan=False)
    reconnect: bool = True
    max_reconnects: Optional[int] = Field(None, ge=0, le=10_000)  # None: keep trying (live)
    reconnect_delay_s: float = Field(0.5, ge=0.05, le=60, allow_inf_nan=False)
    reconnect_max_delay_s: float = Field(10.0, ge=0.05, le=300, allow_inf_nan=False)
    live: Optional[bool] = None  # None: decided from the source
    audio: bool = True
    video: bool = True

    @model_validator(mode="before")
    @classmethod
    def _no_control_chars(cls, data: Any) -> Any:
        _reject_control(data)
        return data

    @model_validator(mode="after")
    def _delays(self) -> "HttpSourceOptions":
        if self.reconnect_max_delay_s < self.reconnect_delay_s:
            raise ValueError("reconnect_max_delay_s must be >= reconnect_delay_s")
        return self

    def to_source_options(self) -> dict[str, Any]:
        """A plain dict that pipeline.sources.SourceOptions.coerce accepts (JSON-serialisable)."""
        out: dict[str, Any] = {
            "rtsp_transport": self.rtsp_transport,
            "open_timeout_s": float(self.open_timeout_s),
            "read_timeout_s": float(self.read_timeout_s),
            "reconnect": {
                "initial_s": float(self.reconnect_delay_s),
                "cap_s": float(self.reconnect_max_delay_s),
                "max_attempts": (self.max_reconnects if self.reconnect else 0),
            },
            "audio": self.audio,
            "video": self.video,
        }
        if self.live is not None:
            out["live"] = self.live
        assert all(math.isfinite(out[k]) for k in ("open_timeout_s", "read_timeout_s"))
        return out
