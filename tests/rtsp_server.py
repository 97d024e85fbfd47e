"""A live RTSP test server (GStreamer's gst-rtsp-server) for the ingestion tests.

Run with Debian's interpreter, where python3-gi lives (not the project venv):

    /usr/bin/python3 tests/rtsp_server.py --port 8554 --codec opus

It serves rtsp://127.0.0.1:PORT/live: a live test pattern (H.264) with a live sine tone
(Opus or AAC), and prints READY once it listens. Stopped by a signal.
"""
from __future__ import annotations

import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

AUDIO = {
    "opus": "opusenc bitrate=32000 ! rtpopuspay name=pay1 pt=97",
    "aac": "avenc_aac bitrate=64000 ! rtpmp4gpay name=pay1 pt=97",
}


def launch_line(codec: str, width: int, height: int, fps: int) -> str:
    """The media pipeline: both sources are live, so timestamps follow the wall clock."""
    video = (
        f"videotestsrc is-live=true pattern=ball ! video/x-raw,width={width},height={height},"
        f"framerate={fps}/1 ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={fps} "
        "! rtph264pay name=pay0 pt=96 config-interval=1"
    )
    audio = (
        "audiotestsrc is-live=true wave=sine freq=440 volume=0.3 ! audioconvert ! audioresample "
        f"! audio/x-raw,rate=48000,channels=2 ! {AUDIO[codec]}"
    )
    return f"( {video} {audio} )"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--codec", choices=sorted(AUDIO), default="opus")
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--fps", type=int, default=15)
    args = ap.parse_args()

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(launch_line(args.codec, args.width, args.height, args.fps))
    factory.set_shared(True)
    server.get_mount_points().add_factory("/live", factory)
    if server.attach(None) == 0:
        sys.exit(f"rtsp_server: cannot listen on 127.0.0.1:{args.port}")

    loop = GLib.MainLoop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, sig, loop.quit)
    print("READY", flush=True)
    loop.run()


if __name__ == "__main__":
    main()
