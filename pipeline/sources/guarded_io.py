"""The policy-checking I/O of a source under a restricting `SourcePolicy` (http(s), HLS and
file sources): `GuardedOpener` is PyAV's io_open, so every URL FFmpeg wants to open - the
source, each playlist, segment and key, each redirect hop - is judged by the policy first and
opened here; `HttpReader` is the small read-only HTTP(S) client it uses, following redirects by
hand (each hop judged) over connections pinned to the addresses just judged (no DNS rebinding).
Its own module so that pipeline.sources.source keeps to opening and decoding. Logs as
`pipeline.sources.source` (the source's log), with redacted URLs only.
"""
from __future__ import annotations

import base64
import ctypes
import errno
import http.client
import logging
import re
import socket
import ssl
import threading
import urllib.parse
from typing import TYPE_CHECKING, Any

from pipeline.sources.hosts import NetworkTarget
from pipeline.sources.policy import MEDIA_FORMATS, SourcePolicy, file_url_path
from pipeline.errors import SourceRefused
from pipeline.redact import has_control_chars, redact

if TYPE_CHECKING:
    from pipeline.sources.source import Source

__all__ = ["GuardedOpener", "HttpReader"]

log = logging.getLogger("pipeline.sources.source")

_AVIO_FLAG_WRITE = 2
_MAX_REDIRECTS = 5
_SKIP_FORWARD = 512 * 1024  # bytes a forward seek reads through instead of a new request
_USER_AGENT = "OmniZip-Stream"
_HEAD = 4096  # bytes of the source kept to name a refused container format


class GuardedOpener:
    """PyAV io_open for a source under a restricting policy: every URL FFmpeg opens (the source
    itself, HLS playlists, segments and keys) comes here, is judged, and is opened by us."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.refused: SourceRefused | None = None  # the first refusal; the source stops on it
        self.first: Any = None  # what the latest open of the source itself returned
        self._files: list[Any] = []
        self._lock = threading.Lock()

    def __call__(self, url: str, flags: int, options: dict) -> Any:
        try:
            f = self._open(url, flags)
        except SourceRefused as e:
            if self.refused is None:  # FFmpeg may skip a failed segment: remember, stop later
                self.refused = e
            log.warning("%s: refused to open %s: %s", self.source.url, redact(url), e)
            raise
        with self._lock:
            if not self._files:
                self.first = f
            self._files.append(f)
        return f

    def _open(self, url: str, flags: int) -> Any:
        src = self.source
        if flags & _AVIO_FLAG_WRITE:
            raise SourceRefused("scheme", "a source is never written to", url)
        if has_control_chars(url):
            raise SourceRefused("control-char", "control characters in a URL the source refers to")
        o = src.options
        if src.spec.kind in ("http", "hls"):
            scheme = urllib.parse.urlsplit(url).scheme.lower() if "://" in url else ""
            if scheme not in ("http", "https"):
                raise SourceRefused("scheme", f"an http(s) source may only reach http(s), not "
                                    f"{(scheme or url.split(':', 1)[0] if ':' in url else 'file')!r}", url)
            return HttpReader(url, src.policy, o.open_timeout_s, o.read_timeout_s)
        # a file source: plain paths (or file: URLs) inside what the policy allows, nothing else
        if url.startswith("file://"):
            path = file_url_path(url)
        elif url.startswith("file:"):
            path = url[len("file:"):]
        elif re.match(r"^[A-Za-z0-9+.\-]+:", url) or url.startswith("subfile,"):
            raise SourceRefused("scheme", "a file source may only refer to local files", url)
        else:
            path = url
        real = src.policy.check_file(path, url)
        return open(real, "rb")

    def format_refused(self) -> SourceRefused:
        """The refusal of a source FFmpeg would read with a demuxer off `MEDIA_FORMATS` (its
        format_whitelist stopped it before the header was read): names the format when FFmpeg's
        prober, run on the bytes already read, can tell it."""
        first, head = self.first, b""
        if isinstance(first, HttpReader):
            head = first.head
        elif self.source.spec.kind == "file":
            try:
                with open(self.source.policy.check_file(self.source.spec.target), "rb") as f:
                    head = f.read(_HEAD)
            except (OSError, SourceRefused):
                pass
        name = probe_format_name(head, urllib.parse.urlsplit(self.source.spec.url).path)
        what = f"container format {name!r}" if name else "its container format"
        return SourceRefused("format", f"{what} is not read from API sources (formats that name other "
                             f"files or URLs, such as concat/ffconcat playlists, are refused); allowed: "
                             f"{', '.join(MEDIA_FORMATS)}", self.source.spec.url)

    def close_all(self) -> None:
        with self._lock:
            files, self._files = self._files, []
        for f in files:
            try:
                f.close()
            except Exception:
                pass


class _ProbeData(ctypes.Structure):
    _fields_ = [("filename", ctypes.c_char_p), ("buf", ctypes.c_void_p), ("buf_size", ctypes.c_int),
                ("mime_type", ctypes.c_char_p)]


def probe_format_name(head: bytes, filename: str = "") -> str | None:
    """The demuxer FFmpeg's prober (av_probe_input_format3 of the libavformat PyAV loaded) picks
    for these first bytes: only the name, for an error message; no demuxer runs. None when it
    cannot tell (or the library is not found)."""
    if not head:
        return None
    try:
        lib = next(line.split()[-1] for line in open("/proc/self/maps") if "libavformat" in line)
        fn = ctypes.CDLL(lib).av_probe_input_format3
    except (OSError, StopIteration, AttributeError):
        return None
    fn.restype = ctypes.POINTER(ctypes.c_char_p)  # AVInputFormat starts with `const char *name`
    fn.argtypes = [ctypes.POINTER(_ProbeData), ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    buf = ctypes.create_string_buffer(head + bytes(64), len(head) + 64)  # AVPROBE_PADDING_SIZE zeros
    pd = _ProbeData(filename.encode(errors="replace"), ctypes.cast(buf, ctypes.c_void_p), len(head), None)
    score = ctypes.c_int(0)
    found = fn(ctypes.byref(pd), 1, ctypes.byref(score))
    return found[0].decode(errors="replace") if found and found[0] else None


def _connect_any(addresses: tuple[str, ...], port: int, timeout: float | None) -> socket.socket:
    err: OSError | None = None
    for a in addresses:
        try:
            return socket.create_connection((a, port), timeout)
        except OSError as e:
            err = e
    raise err if err is not None else OSError(errno.EHOSTUNREACH, "no address to connect to")


class _PinnedHTTP(http.client.HTTPConnection):
    """HTTP to the addresses the policy judged, never to a fresh lookup (no DNS rebinding)."""

    def __init__(self, target: NetworkTarget, timeout: float) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self.addresses = target.addresses

    def connect(self) -> None:
        self.sock = _connect_any(self.addresses, self.port, self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, target: NetworkTarget, timeout: float, context: ssl.SSLContext) -> None:
        super().__init__(target.host, target.port, timeout=timeout, context=context)
        self.addresses = target.addresses

    def connect(self) -> None:
        sock = _connect_any(self.addresses, self.port, self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _tls_context(verify: bool) -> ssl.SSLContext:
    if verify:
        return ssl.create_default_context()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _origin(url: str) -> tuple[str, str, int | None]:
    p = urllib.parse.urlsplit(url)
    return p.scheme.lower(), (p.hostname or ""), p.port


class HttpReader:
    """A read-only file over HTTP(S) for PyAV: GET with redirects followed by hand (each hop
    judged by the policy), connections pinned to the judged addresses, Range requests for seeks
    when the server offers them, Basic credentials from the URL sent to its own origin only."""

    def __init__(self, url: str, policy: SourcePolicy, open_timeout: float, read_timeout: float) -> None:
        self.url, self.policy = url, policy
        self.open_timeout, self.read_timeout = open_timeout, read_timeout
        self.pos = 0
        self.size: int | None = None
        self.head = b""  # the first bytes read (to name a refused format)
        self._ranges = False
        self._conn: http.client.HTTPConnection | None = None
        self._resp: http.client.HTTPResponse | None = None
        self._get(0)

    def _get(self, offset: int) -> None:
        url, origin = self.url, _origin(self.url)
        p = urllib.parse.urlsplit(self.url)
        auth = None
        if p.username is not None:
            cred = f"{urllib.parse.unquote(p.username)}:{urllib.parse.unquote(p.password or '')}"
            auth = "Basic " + base64.b64encode(cred.encode()).decode()
        for _ in range(_MAX_REDIRECTS + 1):
            target = self.policy.check_network(url)  # SourceRefused: nothing is sent there
            conn: http.client.HTTPConnection = (
                _PinnedHTTPS(target, self.open_timeout, _tls_context(self.policy.tls_verify))
                if target.scheme == "https" else _PinnedHTTP(target, self.open_timeout))
            q = urllib.parse.urlsplit(url)
            path = (q.path or "/") + (f"?{q.query}" if q.query else "")
            # like FFmpeg: always ask for a range, so a 206 tells the server can seek
            headers = {"User-Agent": _USER_AGENT, "Accept": "*/*", "Connection": "close",
                       "Range": f"bytes={offset}-"}
            if auth and _origin(url) == origin:
                headers["Authorization"] = auth
            try:
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
            except http.client.HTTPException as e:  # its text is what the remote side sent: never shown
                conn.close()
                raise OSError(errno.EPROTO, f"not an HTTP answer ({type(e).__name__})") from None
            except BaseException:
                conn.close()
                raise
            if resp.status in (301, 302, 303, 307, 308):
                loc = resp.getheader("Location", "").strip()
                conn.close()
                if not loc:
                    raise OSError(errno.EIO, f"HTTP {resp.status} without a Location")
                url = urllib.parse.urljoin(url, loc)
                continue
            if resp.status == 404:
                conn.close()
                raise FileNotFoundError(errno.ENOENT, "HTTP 404 Not Found")
            if resp.status not in (200, 206) or (offset and resp.status != 206):
                conn.close()
                raise OSError(errno.EIO, f"HTTP {resp.status}")  # no reason phrase: the remote's text
            if conn.sock is not None:
                conn.sock.settimeout(self.read_timeout)
            self._conn, self._resp, self.pos = conn, resp, offset
            length = resp.getheader("Content-Length")
            crange = resp.getheader("Content-Range", "")
            if "/" in crange and crange.rsplit("/", 1)[1].strip().isdigit():
                self.size = int(crange.rsplit("/", 1)[1])
            elif length and length.isdigit():
                self.size = offset + int(length)
            if offset == 0:
                self._ranges = (resp.status == 206
                                or resp.getheader("Accept-Ranges", "").strip().lower() == "bytes")
            return
        raise OSError(errno.EIO, f"more than {_MAX_REDIRECTS} redirects")

    # -- the file interface PyAV uses ------------------------------------------------------
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._ranges and self.size is not None

    def read(self, n: int = -1) -> bytes:
        if self._resp is None:
            return b""
        try:
            data = self._resp.read1(n if n and n > 0 else 65536)
        except http.client.HTTPException as e:
            raise OSError(errno.EIO, f"HTTP read failed ({type(e).__name__})") from None
        if self.pos < _HEAD:
            self.head = (self.head + data)[:_HEAD] if self.pos == len(self.head) else self.head
        self.pos += len(data)
        return data

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 1:
            offset += self.pos
        elif whence == 2:
            if self.size is None:
                raise OSError(errno.ESPIPE, "size unknown")
            offset += self.size
        if offset == self.pos:
            return self.pos
        if not self.seekable() or offset < 0:
            raise OSError(errno.ESPIPE, "not seekable")
        if self._resp is not None and 0 < offset - self.pos <= _SKIP_FORWARD:
            while self.pos < offset:  # a short hop forward: read through, no new request
                if not self.read(min(65536, offset - self.pos)):
                    break
            if self.pos == offset:
                return self.pos
        self._close()
        if self.size is not None and offset >= self.size:
            self.pos = offset  # at or past the end: reads give EOF
            return self.pos
        self._get(offset)
        return self.pos

    def _close(self) -> None:
        conn, self._conn, self._resp = self._conn, None, None
        if conn is not None:
            conn.close()

    def close(self) -> None:
        self._close()
