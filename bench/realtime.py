"""The realtime path's own cost: end of speech -> first text delta over /v1/realtime (server VAD,
silero-vad, espeak-ng speech appended in real time) against the same stream's time to first
token over HTTP (POST /ask, SSE), and a text turn over the socket against the same question over
HTTP; then a long session with audio and images appended in real time: the turn latency at its
last minute over its first. Real Serve app, engine and model preset (random weights), in-process
store, everything on 127.0.0.1. Prints one JSON object last.

    python bench/realtime.py --preset tiny --turns 20 --minutes 10
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from realtime_helpers import append_realtime, b64, client, silence, speech, until  # noqa: E402

KEY = "bench-key-0123456789abcdef"
QUESTION = "What is happening in the video right now?"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))], 4) if xs else float("nan")


def summary(xs: list[float]) -> dict[str, float]:
    return {"p50_s": pct(xs, 0.5), "p95_s": pct(xs, 0.95), "n": len(xs)}


def http_ttft(url: str, sid: str) -> float:
    t0 = time.monotonic()
    with requests.post(f"{url}/v1/streams/{sid}/ask", json={"question": QUESTION, "max_tokens": 16, "stream": True},
                       headers={"Authorization": f"Bearer {KEY}"}, stream=True, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith(b"event: token"):
                return time.monotonic() - t0
    raise RuntimeError("no token over HTTP")


class Reader:
    """Reads every event as it comes (a client that stops reading stalls its keepalive pongs)."""

    def __init__(self, conn) -> None:
        self.q: asyncio.Queue = asyncio.Queue()
        self.task = asyncio.create_task(self._run(conn))

    async def _run(self, conn) -> None:
        while True:
            self.q.put_nowait(await conn.recv())

    async def recv(self):
        return await asyncio.wait_for(self.q.get(), 120)

    async def until(self, kind: str):
        while True:
            ev = await self.recv()
            if ev.type == kind:
                return ev


async def text_turn(conn, text: str = QUESTION, reader: "Reader | None" = None) -> float:
    wait = (lambda k: reader.until(k)) if reader is not None else (lambda k: until(conn, k))
    await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": text}]})
    t0 = time.monotonic()
    await conn.response.create(response={"max_output_tokens": 16})
    await wait("response.output_text.delta")
    dt = time.monotonic() - t0
    await wait("response.done")
    return dt


async def spoken_turns(conn, n: int, said: bytes) -> tuple[list[float], list[float]]:
    """(speech_stopped received -> first delta, last append before it -> first delta) per turn."""
    from_stop, from_append = [], []
    for _ in range(n):
        sent: list[float] = []
        sender = asyncio.create_task(append_realtime(conn, said + silence(1.2), sent=sent))
        await until(conn, "input_audio_buffer.speech_stopped")
        t_stop = time.monotonic()
        last = max(t for t in sent if t <= t_stop)
        await until(conn, "response.output_text.delta")
        t = time.monotonic()
        from_stop.append(t - t_stop)
        from_append.append(t - last)
        await until(conn, "response.done")
        await sender
    return from_stop, from_append


async def long_session(url: str, minutes: float, probes: int) -> dict[str, object]:
    """Audio and an image every 0.5 s appended in real time; text turns at minute 1 and at the end."""
    async with client(url, KEY).realtime.connect(model="bench") as conn:
        sid = (await until(conn, "session.created")).session.id
        await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
        await until(conn, "session.updated")
        stop = asyncio.Event()

        async def feed() -> None:
            while not stop.is_set():
                await append_realtime(conn, silence(0.2) + tone_bytes(1.8), images_every_s=0.5)
                await conn.input_audio_buffer.clear()

        # the socket's events are read by the turns only; the feeder sends, and its echoes
        # (item added/done, cleared) are skipped by `until`
        reader = Reader(conn)
        task = asyncio.create_task(feed())
        t0 = time.monotonic()
        at: dict[str, list[float]] = {}
        for label, when in (("minute_1", 60.0), ("last_minute", minutes * 60.0)):
            await asyncio.sleep(max(0.0, t0 + when - time.monotonic()))
            at[label] = [await text_turn(conn, reader=reader) for _ in range(probes)]
        stop.set()
        await task
        reader.task.cancel()
        st = requests.get(f"{url}/v1/streams/{sid}", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    p1, pn = statistics.median(at["minute_1"]), statistics.median(at["last_minute"])
    return {"minutes": minutes, "minute_1": summary(at["minute_1"]), "last_minute": summary(at["last_minute"]),
            "ratio_last_over_first": round(pn / p1, 3), "windows": st.get("windows"),
            "context_tokens": st.get("context_tokens")}


def tone_bytes(seconds: float) -> bytes:
    from realtime_helpers import tone

    return tone(seconds)


async def bench_preset(url: str, turns: int) -> dict[str, object]:
    said = speech(QUESTION)
    async with client(url, KEY).realtime.connect(model="bench") as conn:
        sid = (await until(conn, "session.created")).session.id
        await append_realtime(conn, silence(4.0))  # a couple of windows in context first
        for _ in range(2):  # warm-up (first calls load code paths)
            await text_turn(conn)
            await asyncio.to_thread(http_ttft, url, sid)
        stop, app = await spoken_turns(conn, turns, said)
        rt_text = [await text_turn(conn) for _ in range(turns)]
        http = [await asyncio.to_thread(http_ttft, url, sid) for _ in range(turns)]
    return {"spoken_end_of_speech_to_first_delta": summary(stop), "spoken_last_append_to_first_delta": summary(app),
            "text_turn_over_socket": summary(rt_text), "http_ttft_same_question": summary(http),
            "socket_overhead_p50_s": round(pct(rt_text, 0.5) - pct(http, 0.5), 4)}


def start(preset: str):
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from pipeline.api.app import build_app
    from redis_helpers import free_port

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = {"model": preset, "device": "cpu", "name": f"rtbench{preset}", "torch_threads": 1}
    serve.run(build_app(config, gate={"api_keys": [KEY], "requests_per_s": 1000.0, "request_burst": 1000}),
              name="omnizip", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/healthz", timeout=10).status_code == 200:
                return url, config
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError("the service did not come up")


def stop_all(config) -> None:
    import ray
    from ray import serve

    from pipeline.engine.service import shutdown_engine

    serve.shutdown()
    shutdown_engine(config)
    ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", action="append", help="model preset(s); default tiny and small")
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--minutes", type=float, default=10.0, help="the long session's length (tiny)")
    ap.add_argument("--probes", type=int, default=5, help="text turns at minute 1 and at the last minute")
    ap.add_argument("--no-turns", action="store_true", help="only the long session")
    args = ap.parse_args()
    out: dict[str, object] = {"turns": args.turns}
    for preset in args.preset or ["tiny", "small"]:
        url, config = start(preset)
        try:
            if not args.no_turns:
                out[preset] = asyncio.run(bench_preset(url, args.turns))
                print(json.dumps({preset: out[preset]}), file=sys.stderr)
            if preset == "tiny" and args.minutes > 1:
                out["long_session_tiny"] = asyncio.run(long_session(url, args.minutes, args.probes))
        finally:
            stop_all(config)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
