"""Real servers for the live ingestion tests, all on 127.0.0.1: GStreamer's RTSP server (run with
Debian's python3, where python3-gi lives), an ffmpeg RTSP pusher, and a silent TCP listener."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SYSTEM_PYTHON = "/usr/bin/python3"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gst_rtsp_available() -> str | None:
    """None if the GStreamer RTSP server can run here, else why not."""
    if not os.path.exists(SYSTEM_PYTHON):
        return f"{SYSTEM_PYTHON} missing"
    r = subprocess.run([SYSTEM_PYTHON, "-c", "import gi; gi.require_version('GstRtspServer', '1.0'); "
                        "from gi.repository import GstRtspServer"], capture_output=True, text=True)
    return None if r.returncode == 0 else "python3-gi / gir1.2-gst-rtsp-server-1.0 not installed"


class RtspServer:
    """tests/rtsp_server.py in a subprocess; start() waits until it prints READY."""

    def __init__(self, port: int, codec: str = "opus") -> None:
        self.port, self.codec = port, codec
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/live"

    def start(self, timeout: float = 20.0) -> "RtspServer":
        self.proc = subprocess.Popen(
            [SYSTEM_PYTHON, str(HERE / "rtsp_server.py"), "--port", str(self.port), "--codec", self.codec],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready = threading.Event()
        threading.Thread(target=lambda: self.proc.stdout.readline().startswith("READY") and ready.set(),
                         daemon=True).start()
        if not ready.wait(timeout):
            err = self.kill()
            raise RuntimeError(f"RTSP server on port {self.port} did not start: {err}")
        return self

    def kill(self) -> str:
        """SIGKILL (an abrupt death, as a crashing camera); returns its stderr."""
        if self.proc is None:
            return ""
        p, self.proc = self.proc, None
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGKILL)
        _, err = p.communicate(timeout=10)
        return err or ""


def ffmpeg_push(url: str, seconds: float, *, tries_for: float = 10.0) -> subprocess.Popen:
    """ffmpeg pushing a live test pattern with a tone (H.264 + AAC) to an RTSP listener.

    The listener may not be up yet: retry until ffmpeg stays connected."""
    cmd = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-re",
           "-f", "lavfi", "-i", f"testsrc2=size=320x240:rate=25:duration={seconds}",
           "-f", "lavfi", "-i", f"sine=f=440:sample_rate=44100:duration={seconds}",
           "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-g", "25",
           "-c:a", "aac", "-f", "rtsp", "-rtsp_transport", "tcp", url]
    deadline = time.monotonic() + tries_for
    while True:
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            p.wait(0.7)
        except subprocess.TimeoutExpired:
            return p  # still running: connected and pushing
        if time.monotonic() > deadline:
            raise RuntimeError(f"ffmpeg could not push to {url}: {p.stderr.read()}")
        time.sleep(0.2)


class SilentTcpServer:
    """Accepts TCP connections and never answers: a host that hangs."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._stop = False
        self._t = threading.Thread(target=self._accept, daemon=True)
        self._t.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            with contextlib.suppress(OSError):
                self.conns.append(self.sock.accept()[0])

    def close(self) -> None:
        self._stop = True
        self._t.join(2)
        for c in self.conns:
            c.close()
        self.sock.close()


class HttpServer:
    """A static HTTP server for a directory (http.server on a thread)."""

    def __init__(self, directory: Path) -> None:
        import functools
        from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

        class Quiet(SimpleHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
        self.port = self.httpd.server_address[1]
        self._t = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._t.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def have_ffmpeg() -> bool:
    return shutil.which("ffmpeg") is not None


class RecordingTcpListener:
    """Accepts TCP connections on `host` and records each with the first bytes it sent: a target
    that must never be reached. `wait_quiet()` gives pending connections time to show up."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.seen: list[bytes] = []
        self._stop = False
        self._t = threading.Thread(target=self._accept, daemon=True)
        self._t.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.05)
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            c.settimeout(0.3)
            data = b""
            with contextlib.suppress(OSError):
                data = c.recv(4096)
            self.seen.append(data)
            c.close()

    def wait_quiet(self, seconds: float = 0.3) -> list[bytes]:
        time.sleep(seconds)
        return list(self.seen)

    def close(self) -> None:
        self._stop = True
        self._t.join(2)
        self.sock.close()


class RoutedHttpServer:
    """A static HTTP server for a directory on `host` (any 127/8 address) that serves byte ranges
    (`Range: bytes=N-`, as FFmpeg asks) and answers chosen paths with a redirect:
    `redirects = {"/path": "Location value"}` (302). `requests` lists the paths asked for."""

    def __init__(self, directory: Path, host: str = "127.0.0.1",
                 redirects: dict[str, str] | None = None) -> None:
        import functools
        from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

        routes = dict(redirects or {})
        self.requests: list[str] = []
        requests = self.requests

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                requests.append(self.path)
                if self.path in routes:
                    self.send_response(302)
                    self.send_header("Location", routes[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                rng = self.headers.get("Range", "")
                path = Path(self.translate_path(self.path))
                if rng.startswith("bytes=") and rng.endswith("-") and path.is_file():
                    data = path.read_bytes()  # small test files: serve the range from memory
                    start = int(rng[len("bytes="):-1] or 0)
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                    self.send_header("Content-Length", str(len(data) - start))
                    self.end_headers()
                    self.wfile.write(data[start:])
                    return
                super().do_GET()

        self.httpd = ThreadingHTTPServer((host, 0), functools.partial(Handler, directory=str(directory)))
        self.host, self.port = host, self.httpd.server_address[1]
        self._t = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._t.start()

    def url(self, name: str) -> str:
        return f"http://{self.host}:{self.port}/{name.lstrip('/')}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
