"""Helpers for the HTTP tests: a JSON client with deadlines, a Server-Sent Events reader, and
polling a stream's status until a condition holds."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

TIMEOUT_S = 30.0


def tone_clip(path: Path, tone_hz: int, seconds: int = 4) -> Path:
    """A small H.264 + AAC test-pattern clip with a sine tone, written with ffmpeg."""
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y",
                    "-f", "lavfi", "-i", f"testsrc2=size=160x120:rate=10:duration={seconds}",
                    "-f", "lavfi", "-i", f"sine=f={tone_hz}:sample_rate=16000:duration={seconds}",
                    "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
                    "-c:a", "aac", "-shortest", str(path)], check=True, timeout=60)
    return path


@dataclass
class Event:
    event: str | None
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


class Api:
    """The service's routes over plain HTTP (requests), every call with a timeout."""

    def __init__(self, url: str, key: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.http = requests.Session()
        if key is not None:
            self.http.headers["Authorization"] = f"Bearer {key}"

    def get(self, path: str, **kw: Any) -> requests.Response:
        return self.http.get(self.url + path, timeout=kw.pop("timeout", TIMEOUT_S), **kw)

    def post(self, path: str, **kw: Any) -> requests.Response:
        return self.http.post(self.url + path, timeout=kw.pop("timeout", TIMEOUT_S), **kw)

    def delete(self, path: str, **kw: Any) -> requests.Response:
        return self.http.delete(self.url + path, timeout=kw.pop("timeout", TIMEOUT_S), **kw)

    def create(self, **spec: Any) -> dict[str, Any]:
        r = self.post("/v1/streams", json=spec)
        assert r.status_code == 201, r.text
        return r.json()

    def status(self, stream_id: str) -> dict[str, Any]:
        r = self.get(f"/v1/streams/{stream_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait(self, stream_id: str, cond: Callable[[dict[str, Any]], bool], timeout_s: float,
             what: str = "condition") -> dict[str, Any]:
        """Poll GET /v1/streams/{id} until ``cond(status)``; AssertionError with the last status."""
        deadline = time.monotonic() + timeout_s
        while True:
            st = self.status(stream_id)
            if cond(st):
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"stream {stream_id}: {what} not reached in {timeout_s}s; last {st}")
            time.sleep(0.25)

    def ask_sse(self, stream_id: str, question: str, max_tokens: int = 8,
                timeout_s: float = 60.0) -> list[Event]:
        r = self.post(f"/v1/streams/{stream_id}/ask", stream=True, timeout=timeout_s,
                      json={"question": question, "max_tokens": max_tokens, "stream": True})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/event-stream"), r.headers
        return list(read_sse(r, timeout_s))


def read_sse(resp: requests.Response, timeout_s: float) -> Iterator[Event]:
    """Parse an event stream (``event:``/``data:`` lines, blank line ends an event) with an
    overall deadline on top of the per-read timeout."""
    deadline = time.monotonic() + timeout_s
    event, data = None, []
    for raw in resp.iter_lines(decode_unicode=True):
        if time.monotonic() > deadline:
            resp.close()
            raise AssertionError(f"event stream still open after {timeout_s}s")
        if raw == "":
            if data:
                yield Event(event, "\n".join(data))
            event, data = None, []
        elif raw.startswith("event:"):
            event = raw[6:].strip()
        elif raw.startswith("data:"):
            data.append(raw[5:].lstrip(" "))
    if data:
        yield Event(event, "\n".join(data))


def sse_answer(events: list[Event]) -> tuple[str, dict[str, Any]]:
    """The /ask event stream's answer (its token events joined) and its final `done` summary."""
    assert events and events[-1].event == "done", [e.event for e in events]
    assert all(e.event == "token" for e in events[:-1]), [e.event for e in events]
    return "".join(e.json()["text"] for e in events[:-1]), events[-1].json()
