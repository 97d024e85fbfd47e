"""Live ingestion against real servers on 127.0.0.1: GStreamer's RTSP server (H.264 + Opus / AAC),
ffmpeg pushing to a PyAV RTSP listener, and a server killed mid-stream and restarted."""
from __future__ import annotations

import os
import signal
import subprocess
import threading

import numpy as np
import pytest

import media_fixtures as mf
from ingest_servers import HttpServer, RtspServer, ffmpeg_push, free_port, gst_rtsp_available, have_ffmpeg
from pipeline.errors import SourceUnavailableError
from pipeline.sources.spec import Backoff
from pipeline.sources.source import Source
from pipeline.sources.windows import AVWindow, iter_windows

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]
_why = gst_rtsp_available()
needs_gst = pytest.mark.skipif(_why is not None, reason=f"GStreamer RTSP server: {_why}")

SR = 16000


def take(it, n: int) -> list[AVWindow]:
    out = []
    for w in it:
        out.append(w)
        if len(out) == n:
            break
    return out


def tone_peak_hz(x: np.ndarray) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / SR)[np.argmax(spec)])


def check_live_window(w: AVWindow, index: int, hw=(240, 320)) -> None:
    assert w.index == index and (w.start, w.end) == (2.0 * index, 2.0 * index + 2.0)
    assert w.audio.shape == (32000,) and w.audio.dtype == np.float32
    assert w.frames.shape == (4, *hw, 3) and w.frames.dtype == np.uint8
    assert w.has_audio and w.has_video
    np.testing.assert_allclose(w.frame_times, w.start + np.arange(4) * 0.5)


@pytest.fixture
def rtsp_server(request):
    servers = []

    def start(codec: str = "opus", port: int | None = None) -> RtspServer:
        s = RtspServer(port or free_port(), codec).start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.kill()


@needs_gst
@pytest.mark.parametrize("codec,transport", [("opus", "tcp"), ("aac", "tcp"), ("opus", "udp")])
def test_gstreamer_rtsp_server(rtsp_server, codec, transport):
    srv = rtsp_server(codec)
    with Source(srv.url, {"rtsp_transport": transport, "open_timeout_s": 10}) as src:
        ws = take(iter_windows(src), 2)
        assert src.live and src.reconnects == 0
    for i, w in enumerate(ws):
        check_live_window(w, i)
        assert w.reconnects == 0 and not w.discontinuity and not w.final
        assert np.all(np.diff(w.frame_pts) > 0)  # a 15 fps live pattern: a new frame each instant
        assert np.all(w.frame_pts <= w.frame_times + 1e-3) or w.index == 0
    w = ws[1]  # past any start-up offset between the two tracks
    assert not w.audio_gap and not w.video_gap
    assert abs(tone_peak_hz(w.audio) - 440) < 2
    assert not np.array_equal(w.frames[0], w.frames[-1])  # the ball moves


@pytest.mark.skipif(not have_ffmpeg(), reason="ffmpeg CLI missing")
def test_ffmpeg_pushes_to_pyav_listener():
    port = free_port()
    url = f"rtsp://127.0.0.1:{port}/live"
    pusher: dict = {}
    t = threading.Thread(target=lambda: pusher.update(p=ffmpeg_push(url, 5.0)), daemon=True)
    t.start()
    try:
        ws = list(iter_windows(url, options={"listen": True, "open_timeout_s": 15,
                                             "reconnect": {"max_attempts": 0}}))
    finally:
        t.join(15)
        if "p" in pusher:
            pusher["p"].kill()
            pusher["p"].wait()
    assert 2 <= len(ws) <= 3
    for i, w in enumerate(ws):
        check_live_window(w, i)
    assert not ws[1].video_gap and ws[0].reconnects == 0
    assert abs(tone_peak_hz(ws[1].audio) - 440) < 2
    assert ws[-1].final or not ws[-1].gap


@needs_gst
def test_server_killed_and_restarted_timeline_continues(rtsp_server):
    srv = rtsp_server("opus")
    port = srv.port
    policy = Backoff(initial_s=0.2, factor=2.0, cap_s=1.0, max_attempts=30)
    src = Source(srv.url, {"open_timeout_s": 10, "read_timeout_s": 4, "reconnect": policy})
    restart_after = 1.5
    restarter = None
    ws: list[AVWindow] = []
    with src:
        for w in iter_windows(src):
            ws.append(w)
            if w.index == 1 and restarter is None:  # kill mid-stream, bring it back later
                srv.kill()
                restarter = threading.Timer(restart_after, lambda: rtsp_server("opus", port))
                restarter.start()
            if w.reconnects >= 1 and sum(x.reconnects >= 1 and not x.gap for x in ws) >= 1:
                break
            assert len(ws) < 20, "no clean window after the reconnect"
    restarter.join()
    assert src.reconnects >= 1
    assert [w.index for w in ws] == list(range(len(ws)))  # no restart at 0, no hole in indices
    for w in ws:
        check_live_window(w, w.index)
    after = [w for w in ws if w.reconnects >= 1]
    assert any(w.audio_gap and w.video_gap for w in ws[2:])  # the outage is filled and flagged
    assert not after[-1].gap  # and the stream is back
    # the outage stays on the timeline as a jump between real frames at least as long as the
    # server was down (not shifted away), and frames keep going forward
    pts = np.concatenate([w.frame_pts for w in ws])
    assert np.all(np.diff(pts) >= 0)
    assert np.diff(np.unique(pts)).max() > restart_after - 0.2


@needs_gst
def test_reconnect_gives_up_with_typed_error(rtsp_server):
    srv = rtsp_server("aac")
    policy = {"initial_s": 0.1, "factor": 2.0, "cap_s": 0.4, "max_attempts": 3}
    ws: list[AVWindow] = []
    with pytest.raises(SourceUnavailableError, match="gave up after 3 reconnect attempts"):
        for w in iter_windows(srv.url, options={"open_timeout_s": 10, "reconnect": policy}):
            ws.append(w)
            if w.index == 0:
                srv.kill()
    assert [w.index for w in ws] == list(range(len(ws))) and len(ws) >= 1
    check_live_window(ws[0], 0)
    assert len(ws) == 1 or ws[-1].final  # what had arrived was flushed before the error


@needs_gst
def test_stalled_server_times_out_and_reconnects(rtsp_server):
    """A server that stops answering (SIGSTOP) is not waited on forever: the read timeout
    declares it lost, reconnect attempts time out until it resumes, then the stream goes on."""
    srv = rtsp_server("opus")
    pid = srv.proc.pid
    opts = {"open_timeout_s": 2, "read_timeout_s": 1.5,
            "reconnect": {"initial_s": 0.2, "factor": 2.0, "cap_s": 1.0, "max_attempts": 20}}
    ws: list[AVWindow] = []
    resume = threading.Timer(5.0, lambda: os.kill(pid, signal.SIGCONT))
    try:
        for w in iter_windows(srv.url, options=opts):
            ws.append(w)
            if w.index == 0:
                os.kill(pid, signal.SIGSTOP)
                resume.start()
            if w.reconnects >= 1 and not w.gap:
                break
            assert len(ws) < 20, "no clean window after the stall"
    finally:
        resume.join()
    assert [w.index for w in ws] == list(range(len(ws)))
    assert ws[-1].reconnects >= 1
    assert any(w.audio_gap and w.video_gap for w in ws[1:])


@pytest.fixture(scope="module")
def http_media(tmp_path_factory):
    d = tmp_path_factory.mktemp("http")
    mf.make(d, "faststart.mp4")
    (d / "hls").mkdir()
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-i", str(d / "faststart.mp4"),
                    "-c", "copy", "-f", "hls", "-hls_time", "2", "-hls_playlist_type", "vod",
                    str(d / "hls" / "index.m3u8")], check=True, timeout=60)
    srv = HttpServer(d)
    yield srv
    srv.close()


@pytest.mark.parametrize("name", ["faststart.mp4", "hls/index.m3u8"])
def test_http_media_and_hls(http_media, name):
    with Source(http_media.url(name), {"open_timeout_s": 5}) as src:
        assert src.spec.kind == ("hls" if name.endswith("m3u8") else "http")
        assert src.live is False  # a VOD: it has a duration, so it ends instead of reconnecting
        ws = list(iter_windows(src))
    assert [w.index for w in ws] == [0, 1, 2]
    for w in ws:
        check_live_window(w, w.index, hw=(48, 64))
        assert not (w.audio_gap or w.video_gap or w.final)
        assert abs(tone_peak_hz(w.audio) - 440) < 2
