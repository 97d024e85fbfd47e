"""A webhook receiver on 127.0.0.1 (a free port) that verifies every request's Standard
Webhooks signature with the `standardwebhooks` library, and a deliverer host for tests."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook, WebhookVerificationError


class Receiver:
    """Records (webhook-id, body, verified) of each POST; ``mode`` picks the answer: "up" 204,
    "down" 503, "redirect" 302 to /elsewhere on itself (whose hits are counted apart)."""

    def __init__(self, secret: str, port: int = 0) -> None:
        self.secret, self.mode = secret, "up"
        self.received: list[dict[str, Any]] = []
        self.elsewhere = 0
        self.lock = threading.Lock()
        self.port = port
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> "Receiver":
        me = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.path.startswith("/elsewhere"):
                    with me.lock:
                        me.elsewhere += 1
                    self.send_response(204)
                    self.end_headers()
                    return
                try:
                    Webhook(me.secret).verify(body, dict(self.headers))
                    ok = True
                except WebhookVerificationError:
                    ok = False
                with me.lock:
                    me.received.append({"id": self.headers.get("webhook-id"), "body": json.loads(body),
                                        "verified": ok, "mode": me.mode})
                    mode = me.mode
                if mode == "redirect":
                    self.send_response(302)
                    self.send_header("Location", f"http://127.0.0.1:{me.port}/elsewhere")
                else:
                    self.send_response(204 if mode == "up" else 503)
                self.send_header("content-length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def delivered(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.received if r["mode"] == "up"]

    def wait_for(self, n: int, timeout_s: float = 60.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while len({r["id"] for r in self.delivered()}) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.delivered())} of {n} deliveries within {timeout_s} s: "
                                     f"{self.received[-3:]}")
            time.sleep(0.1)
        return self.delivered()


def deliverer(config: dict[str, Any], store: Any) -> Any:
    """The service's webhook deliverer (pipeline.engine.watch_service.WatchService) over a store."""
    from pipeline.core.config import ServiceConfig
    from pipeline.engine.watch_service import WatchService

    class Host(WatchService):
        def __init__(self) -> None:
            self.cfg, self.store, self._stopping = ServiceConfig.coerce(config), store, False

    return Host()


#: a deliverer process: ``python -c DELIVER_MAIN <redis url> <config JSON>`` delivers until killed
DELIVER_MAIN = """
import asyncio, json, sys
sys.path.insert(0, 'tests')
from webhook_helpers import deliverer
from pipeline.store.redis_store import RedisStore
host = deliverer(json.loads(sys.argv[2]), RedisStore(sys.argv[1]))
print('delivering', flush=True)
asyncio.run(host._deliver_loop())
"""
