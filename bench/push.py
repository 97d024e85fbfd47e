"""What a push stream (WebRTC/WHIP) costs the ingest, against pulling the same kind of video from
a file and from RTSP, in one run on one machine.

For each size (640x480 and 1280x720 at 30 fps, H.264 + a tone):
  * file: `iter_windows` over an MP4 made by ffmpeg, unpaced;
  * rtsp: `iter_windows` over tests/rtsp_server.py (GStreamer, H.264 + Opus, live) for --seconds;
  * push: a publisher in a child process (aiortc's MediaPlayer plays the same MP4 in real time
    and sends it, VP8 + Opus, ICE on loopback only) to a WebRTCReceiver + PushSource in this
    process, windowed by the same `iter_windows`; once at 30 fps, once with the publisher
    capping its frame rate at 5 fps (what the console asks of the browser).
The figure is this process's CPU seconds (all its threads: demuxing, decoding, aiortc's
decoders, window assembly) per media second; the publisher's own encoding is not counted.
Window latency (live sources): a window's emission, wall clock, minus (the first media's arrival
+ the window's end), p50/p95, the padded last window left out. Not comparable across sources
yet: an RTSP stream's timeline starts at the server's first timestamp, about a second before
its first packet arrives here (its figures come out negative), a push stream's at the first
frame's arrival.
`streams_per_node` is 2 cores / CPU per media second: the push streams a 2-core node could
window before falling behind live (the model's work not included).

    python bench/push.py [--seconds 20] [--sizes 640x480,1280x720]

Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from ingest import make_clip  # noqa: E402  (bench/ingest.py)
from pipeline.sources.windows import iter_windows  # noqa: E402


class FirstArrival:
    """A source whose first event's wall time is noted (media time 0 arrives then)."""

    def __init__(self, src: object) -> None:
        self.src = src
        self.t: float | None = None

    def __getattr__(self, name: str) -> object:
        return getattr(self.src, name)

    def events(self):  # type: ignore[no-untyped-def]
        for ev in self.src.events():  # type: ignore[attr-defined]
            if self.t is None:
                self.t = time.time()
            yield ev


def measure(src: object, live: bool, until_s: float = float("inf")) -> dict:
    """CPU per media second and, for live sources, window latency: emission minus (first
    arrival + the window's end), the last (padded) window left out, up to ``until_s``."""
    tapped = FirstArrival(src)
    cpu0, lat, media = time.process_time(), [], 0.0
    for w in iter_windows(tapped):  # type: ignore[arg-type]
        if w.end > until_s:
            break
        if not w.final and tapped.t is not None:
            lat.append(time.time() - (tapped.t + w.end))
        media = w.end
    cpu = time.process_time() - cpu0
    out = {"cpu_per_media_s": round(cpu / max(media, 1e-9), 4), "media_s": round(media, 1)}
    if live and len(lat) > 2:
        lat.sort()
        out["latency_p50_s"] = round(statistics.median(lat), 3)
        out["latency_p95_s"] = round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 3)
    return out


def from_file(clip: Path) -> dict:
    from pipeline.sources.source import Source

    with Source(str(clip)) as src:
        return measure(src, live=False)


def from_rtsp(size: str, seconds: float) -> dict:
    from redis_helpers import free_port

    w, h = size.split("x")
    port = free_port()
    server = subprocess.Popen(["/usr/bin/python3", str(ROOT / "tests" / "rtsp_server.py"), "--port", str(port),
                               "--width", w, "--height", h, "--fps", "30"], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "READY"
        from pipeline.sources.source import Source

        with Source(f"rtsp://127.0.0.1:{port}/live") as src:
            return measure(src, live=True, until_s=seconds)
    finally:
        server.terminate()
        server.wait(10)


PUBLISHER = r'''
import asyncio, sys, fractions
sys.path.insert(0, sys.argv[3])
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaPlayer, MediaStreamTrack
from push_helpers import LOOPBACK_ONLY
from pipeline.sources.ice import ice_rules, install

class Capped(MediaStreamTrack):
    kind = "video"
    def __init__(self, track, fps):
        super().__init__(); self.track, self.gap, self.last = track, 1.0 / fps, None
    async def recv(self):
        while True:
            f = await self.track.recv()
            if self.last is None or f.time - self.last >= self.gap - 1e-3:
                self.last = f.time
                return f

async def main():
    install()
    player = MediaPlayer(sys.argv[1])
    fps = float(sys.argv[2])
    with ice_rules(LOOPBACK_ONLY):
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTrack(player.video if fps >= 30 else Capped(player.video, fps))
        pc.addTrack(player.audio)
        await pc.setLocalDescription(await pc.createOffer())
    print(json.dumps(pc.localDescription.sdp), flush=True)
    answer = json.loads(await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline))
    await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
    await asyncio.sleep(float(sys.argv[4]))
    await pc.close()

import json
asyncio.run(main())
'''


def from_push(clip: Path, seconds: float, fps: float) -> dict:
    from push_helpers import LOOPBACK_ONLY

    from pipeline.sources.policy import SourcePolicy
    from pipeline.sources.push import PushSource
    from pipeline.sources.sdp import check_offer
    from pipeline.sources.webrtc import WebRTCReceiver

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    pub = subprocess.Popen([sys.executable, "-c", PUBLISHER, str(clip), str(fps), str(ROOT / "tests"), str(seconds)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    src = PushSource("whip:", wait_s=60, grace_s=1.0)
    rx = WebRTCReceiver(src, LOOPBACK_ONLY)
    try:
        assert pub.stdout is not None and pub.stdin is not None
        offer = check_offer(json.loads(pub.stdout.readline()), SourcePolicy(allow=frozenset({"loopback"})))
        answer, _ = rx.publish(offer)
        pub.stdin.write(json.dumps(answer) + "\n")
        pub.stdin.flush()
        out = measure(src, live=True)
        out["frames_decoded"], out["frames_kept"] = src.stats.frames_in, src.stats.frames_kept
        return out
    finally:
        rx.close()
        pub.kill()
        pub.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0, help="media seconds per live run")
    ap.add_argument("--sizes", default="640x480,1280x720")
    ap.add_argument("--workdir", default=None, help="where the clips are cached (default: a temp dir)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="oz-push-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cpus", "seconds": args.seconds}
    for size in args.sizes.split(","):
        clip = make_clip(work / f"clip-{size}.mp4", size, args.seconds + 10)
        row = {"file": from_file(clip), "rtsp": from_rtsp(size, args.seconds),
               "push_30fps": from_push(clip, args.seconds, 30.0), "push_5fps": from_push(clip, args.seconds, 5.0)}
        rtsp = row["rtsp"]["cpu_per_media_s"]
        row["push_over_rtsp_cpu"] = round(row["push_30fps"]["cpu_per_media_s"] / max(rtsp, 1e-9), 2)
        row["push_5fps_over_30fps_cpu"] = round(row["push_5fps"]["cpu_per_media_s"]
                                                / max(row["push_30fps"]["cpu_per_media_s"], 1e-9), 2)
        row["streams_per_node"] = {k: round(2.0 / max(row[k]["cpu_per_media_s"], 1e-9), 1)
                                   for k in ("push_30fps", "push_5fps")}
        result[size] = row
        print(json.dumps({size: row}), flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
