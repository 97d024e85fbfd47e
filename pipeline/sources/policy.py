"""Which media sources the service may open, judged before anything is opened.

`SourcePolicy.check(source)` refuses (raises `SourceRefused`, naming the rule) a source that an
API client must not make the service open:

* network sources: `rtsp`, `rtsps`, `http`, `https` (HLS included) to any public host: never
  loopback (unless allowed), link-local, unspecified, multicast or reserved addresses, nor
  private / CGNAT / unique-local / other non-global ones unless inside a network (CIDR) the
  operator names in `hosts`; judged on every address the host
  resolves to and in every spelling the C library accepts (`127.1`, `2130706433`, `0x7f000001`,
  `0177.0.0.1`, `[::ffff:127.0.0.1]`, `[::ffff:0:127.0.0.1]`, IPv4-compatible / 6to4 /
  Teredo / NAT64 embeddings judged as the IPv4 address they carry,
  trailing dots, upper case, percent-encoding); optionally only hosts of an allow-list;
* file paths and `file://` URLs only when the operator allows `file`, confined to `file_roots`
  (symlinks and `..` resolved) when set; never `/proc`, `/sys` or `/dev` as a file;
* `lavfi:` graphs only when allowed, and then only generator graphs: every filter must be on an
  allow-list of filters that read nothing (no `movie`, `amovie`, `drawtext`, `sendcmd`, ...);
* devices (`/dev/videoN`, `v4l2:`) only when allowed;
* control characters anywhere, and every other scheme or FFmpeg protocol (`ftp`, `tcp`, `udp`,
  `concat:`, `subfile,`, `data:`, `pipe:`, `crypto:`, ...), always.

`SourcePolicy.protocol_whitelist(source)` is the fixed FFmpeg `protocol_whitelist` for the
source's scheme; `MEDIA_FORMATS` the demuxers (FFmpeg `format_whitelist`) a guarded source may
use; RTSP runs over TCP only unless `rtsp_udp`. `redact(text)` removes credentials from every URL in a text.
`HttpSourceOptions` is the typed, bounded subset of `pipeline.sources.source.SourceOptions` an HTTP
client may set. This module opens nothing (it resolves host names) and imports neither av, torch
nor ray.

This module holds the rules (`SourcePolicy`, what kind a source is, the whitelists); its parts
live beside it and are re-exported here: `pipeline.redact` (redaction), `pipeline.errors`
(the refusal and the control-character rule), `pipeline.sources.hosts` (address spellings,
categories, resolution, `NetworkTarget`), `pipeline.sources.lavfi` (the filter-graph parser and
allow-lists) and `pipeline.sources.options` (`HttpSourceOptions`).
"""
from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.sources.hosts import (
    HOST_NAME,
    IPAddress,
    NetworkTarget,
    category,
    host_entry,
    in_any,
    ip_literal,
    resolve,
)
from pipeline.sources.lavfi import lavfi_filters
from pipeline.errors import SourceRefused
from pipeline.redact import has_control_chars

__all__ = ["ALLOW_KINDS", "MEDIA_FORMATS", "SourcePolicy", "file_url_path"]

ALLOW_KINDS = frozenset({"file", "lavfi", "device", "loopback", "whip"})  # whip: push sources, on unless
#   OMNIZIP_PUSH_SOURCES=0 (accepted in the list for operators who name every kind they allow)
NETWORK_SCHEMES = {"rtsp": 554, "rtsps": 322, "http": 80, "https": 443}
_WHITELIST = {
    "rtsp": "rtsp,tcp",  # TCP interleaved: the media comes on the connection that was judged
    "rtsps": "rtsp,tcp,tls",
    "http": "http,tcp",
    "https": "https,tls,tcp",
    "file": "file",
    "lavfi": "",  # the lavfi device opens no URL; an empty whitelist lets nothing through
    "device": "",
}
_WHITELIST_RTSP_UDP = {"rtsp": "rtsp,rtp,udp,tcp", "rtsps": "rtsp,rtp,udp,tcp,tls"}
# Demuxers a guarded (http(s)/HLS/file) source may be read with: container formats that carry
# their media inside and open no URL named in the media. `hls` is here because its playlist,
# segments and keys are opened through the guarded opener (its segments' demuxers must be here
# too); concat/ffconcat, dash, imf, sdp, rtp, image2 (patterns), mov's drefs (forced off) and
# every other format that names other URLs are refused by FFmpeg before it reads their header.
MEDIA_FORMATS = (
    "mpegts", "mov", "matroska", "flv", "live_flv", "avi", "mpeg", "ogg", "asf", "nut", "mxf",
    "ivf", "mpjpeg", "h264", "hevc", "mjpeg", "m4v", "mpegvideo", "wav", "w64", "aiff", "caf",
    "mp3", "aac", "ac3", "eac3", "flac", "amr", "webvtt", "hls",
)
_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
# What FFmpeg takes for a protocol prefix (url_find_protocol): scheme characters, then ':'
_FF_PROTOCOL = re.compile(r"^[A-Za-z0-9+.\-]+:")
_SPECIAL_DIRS = ("/proc", "/sys", "/dev")


def file_url_path(url: str) -> str:
    """The local path a `file://` URL names (percent-decoded); the one place this is derived."""
    return urllib.parse.unquote(urllib.parse.urlsplit(url).path)


# ---------------------------------------------------------------------------------------------
# the policy

def _split_list(value: str, seps: str) -> list[str]:
    return [p.strip() for p in re.split("[" + re.escape(seps) + "]", value) if p.strip()]


@dataclass(frozen=True)
class SourcePolicy:
    """What an API client's source may be. The default refuses files, lavfi, devices, loopback
    and every address that is not globally reachable (private, CGNAT, unique-local, ...: those
    only inside a network the operator names in `hosts`), and allows rtsp/rtsps/http/https to
    any public unicast host, RTSP over TCP only (`rtsp_udp` lets a client ask for UDP)."""

    allow: frozenset[str] = frozenset()  # subset of {"file", "lavfi", "device", "loopback"}
    file_roots: tuple[str, ...] = ()  # file sources must resolve inside one of these
    hosts: tuple[str, ...] = ()  # if set, network sources must match a name or CIDR here
    tls_verify: bool = True  # https fetched by the guarded reader verifies certificates
    rtsp_udp: bool = False  # a client may ask for RTSP over UDP (the server names where RTP goes)
    push: bool = True  # push sources (whip:): a publisher connects in; its ICE candidates are judged
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
        rules = tuple(host_entry(h) for h in hosts)
        object.__setattr__(self, "allow", allow)
        object.__setattr__(self, "file_roots", roots)
        object.__setattr__(self, "hosts", hosts)
        object.__setattr__(self, "_host_rules", rules)

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "SourcePolicy":
        """From OMNIZIP_ALLOW_SOURCES (comma list of file, lavfi, device, loopback),
        OMNIZIP_FILE_ROOTS (absolute directories, separated by os.pathsep or commas),
        OMNIZIP_SOURCE_HOSTS (comma list of host names, *.domain suffixes or CIDRs; a CIDR
        also lets private addresses inside it through), OMNIZIP_TLS_VERIFY (1/0) and
        OMNIZIP_RTSP_UDP (1/0, default 0). A bad value raises ValueError naming the variable."""
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
                host_entry(h)
            except ValueError as e:
                raise ValueError(f"OMNIZIP_SOURCE_HOSTS: {e}") from None
        kw["hosts"] = tuple(hosts)
        tv = env.get("OMNIZIP_TLS_VERIFY", "1").strip().lower()
        if tv not in ("1", "0", "true", "false", "yes", "no", "on", "off", ""):
            raise ValueError(f"OMNIZIP_TLS_VERIFY: expected 1 or 0, not {tv!r}")
        kw["tls_verify"] = tv in ("1", "true", "yes", "on", "")
        ru = env.get("OMNIZIP_RTSP_UDP", "0").strip().lower()
        if ru not in ("1", "0", "true", "false", "yes", "no", "on", "off", ""):
            raise ValueError(f"OMNIZIP_RTSP_UDP: expected 1 or 0, not {ru!r}")
        kw["rtsp_udp"] = ru in ("1", "true", "yes", "on")
        pu = env.get("OMNIZIP_PUSH_SOURCES", "1").strip().lower()
        if pu not in ("1", "0", "true", "false", "yes", "no", "on", "off", ""):
            raise ValueError(f"OMNIZIP_PUSH_SOURCES: expected 1 or 0, not {pu!r}")
        kw["push"] = pu in ("1", "true", "yes", "on", "") or "whip" in allow
        return cls(**kw)

    @classmethod
    def permissive(cls) -> "SourcePolicy":
        """Everything allowed (the operator's CLI and tests of ingestion): any host (not even
        resolved), file, lavfi graph or device; still no control characters and no other schemes
        or FFmpeg protocols. Sources opened under it use FFmpeg's own I/O (see pipeline.sources.source)."""
        return cls(allow=ALLOW_KINDS, unrestricted=True, rtsp_udp=True)

    # -- checks ----------------------------------------------------------------------------
    def check(self, source: Any) -> None:
        """Raise SourceRefused if `source` may not be opened. Resolves network host names;
        opens nothing (file paths are resolved with realpath only)."""
        kind, s = _kind_of(source)
        if kind == "push":
            if not (self.push or self.unrestricted):
                raise SourceRefused("push:not-allowed", "push sources are not enabled on this service", s)
            return
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
        literal = ip_literal(name)
        if literal is None and not HOST_NAME.match(name):
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
            addrs = resolve(raw_host, port)
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

    def check_peer(self, address: str) -> None:
        """Judge a WebRTC peer's address (an ICE candidate of a publisher's offer, or the source
        of its connectivity checks) before the service sends it a packet: an IP literal only
        (an mDNS ``.local`` name or any host name is never resolved), by the same address rules
        as network sources (loopback only if allowed; link-local, multicast, reserved never;
        private only inside a CIDR of ``hosts``). The host allow-list of names does not apply:
        publishers authenticate with their token, wherever they are."""
        if has_control_chars(address):
            raise SourceRefused("control-char", "control characters in a candidate address")
        ip = ip_literal(address.strip().strip("[]"))
        if ip is None:
            raise SourceRefused("host:invalid", f"candidate address {address[:80]!r} is not an IP address "
                                "(host names and mDNS .local names are not resolved)")
        self._judge(ip, str(ip), f"candidate {ip}")

    def _judge(self, ip: IPAddress, host: str, url: str) -> None:
        cat = category(ip)
        if cat is None or self.unrestricted:
            return
        if cat == "loopback" and "loopback" in self.allow:
            return
        if cat == "private" and in_any(ip, [r for r in self._host_rules if not isinstance(r, str)]):
            return  # the operator named this network (a camera subnet) in OMNIZIP_SOURCE_HOSTS
        shown = host if str(ip) == host else f"{host} ({ip})"
        if cat == "private":
            raise SourceRefused("host:private", f"{shown}: private or non-public address; the operator "
                                "allows such networks by naming them (CIDR) in OMNIZIP_SOURCE_HOSTS", url)
        raise SourceRefused(f"host:{cat}", f"{shown}: {cat} address", url)

    def _match_hosts(self, name: str, addrs: list[IPAddress], url: str) -> None:
        for rule in self._host_rules:
            if isinstance(rule, str):
                if name == rule or rule.startswith(".") and name.endswith(rule):
                    return
        nets = [r for r in self._host_rules if not isinstance(r, str)]
        if nets and all(in_any(a, nets) for a in addrs):
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
        """The fixed FFmpeg protocol_whitelist for the source's scheme: rtsp 'rtsp,tcp' (+tls for
        rtsps; 'rtsp,rtp,udp,tcp' only where `rtsp_udp` is on), http 'http,tcp', https
        'https,tls,tcp' (HLS playlists included), file 'file', lavfi and devices '' (they open
        no URL)."""
        kind, _ = _kind_of(source)
        if self.rtsp_udp and kind in _WHITELIST_RTSP_UDP:
            return _WHITELIST_RTSP_UDP[kind]
        return _WHITELIST["file" if kind == "file-url" else kind]

    def check_rtsp_transport(self, transport: str, url: str) -> None:
        """RTSP over UDP lets the server name where the service sends RTP/RTCP (`source=` and
        `server_port` of its SETUP reply): only where the operator turned it on."""
        if transport == "udp" and not self.rtsp_udp and not self.unrestricted:
            raise SourceRefused("rtsp:udp", "RTSP over UDP is not enabled on this service (the operator's "
                                "OMNIZIP_RTSP_UDP); use rtsp_transport 'tcp'", url)

def _inside(path: str, root: str) -> bool:
    root = root.rstrip("/") or "/"
    return path == root or path.startswith(root if root == "/" else root + "/")


def _kind_of(source: Any) -> tuple[str, str]:
    """(kind, source string): kind is a network scheme, 'file', 'file-url', 'lavfi' or 'device'.
    Mirrors pipeline.sources.source.classify, and refuses every other scheme or FFmpeg protocol."""
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
    if s.lower() in ("whip:", "realtime:"):  # realtime: a /v1/realtime session (pipeline.api.realtime)
        return "push", s
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
