"""Push sources without Ray: a real aiortc publisher (tests/push_helpers.py) sends a camera
whose frames show their number and a tone to a real WebRTCReceiver over loopback; the
PushSource's windows must hold those frames in order, the tone, audio and video aligned; a
publisher that leaves and comes back continues the timeline with the gap flagged, and after the
grace the source ends. The offer checks and the ICE guard are tested against real sockets."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from push_helpers import LOOPBACK_ONLY, Publisher, read_stripes

pytest.importorskip("aiortc")

from pipeline.errors import PushRefused  # noqa: E402
from pipeline.sources.ice import IceRules  # noqa: E402
from pipeline.sources.policy import SourcePolicy  # noqa: E402
from pipeline.sources.push import PushSource  # noqa: E402
from pipeline.sources.sdp import MAX_OFFER_BYTES, CheckedOffer, check_offer  # noqa: E402
from pipeline.sources.webrtc import WebRTCReceiver  # noqa: E402
from pipeline.sources.windows import iter_windows  # noqa: E402

LOOPBACK = SourcePolicy(allow=frozenset({"loopback"}))


def publish(rx: WebRTCReceiver, pub: Publisher) -> str:
    answer, session = rx.publish(check_offer(pub.offer(), LOOPBACK))
    pub.answer(answer)
    return session


def dominant_hz(audio: np.ndarray, rate: int = 16000) -> float:
    spectrum = np.abs(np.fft.rfft(audio))
    return float(np.argmax(spectrum) * rate / len(audio))


def test_a_published_camera_and_tone_become_aligned_windows() -> None:
    fps = 30.0
    src = PushSource("whip:", wait_s=30, grace_s=2)
    rx = WebRTCReceiver(src, LOOPBACK_ONLY)
    pub = Publisher(fps=fps, tone_hz=440.0, bursts=True)
    try:
        publish(rx, pub)
        threading.Timer(9.0, pub.close).start()
        windows = list(iter_windows(src))
    finally:
        rx.close()
    assert len(windows) >= 4, len(windows)
    assert [w.index for w in windows] == list(range(len(windows)))
    assert windows[-1].final
    body = windows[:-2]  # the last ones hold the publisher's end and the padding
    numbers = [read_stripes(f) for w in body for f in w.frames]
    assert numbers == sorted(numbers) and numbers[-1] - numbers[0] >= 0.8 * fps * 2 * (len(body) - 1), numbers
    times = np.concatenate([w.frame_times for w in body])
    # a sample instant shows the latest frame before it: its number's time lies within 1/fps before
    video_offset = float(np.median(times - np.array(numbers) / fps)) - 0.5 / fps
    audio = np.concatenate([w.audio for w in body])
    assert 400 < dominant_hz(audio[: 16000]) < 480
    env = np.abs(audio).reshape(-1, 160).max(axis=1) > 0.2  # 10-ms bins: the tone on or off
    rises = np.flatnonzero(env[1:] & ~env[:-1]) + 1
    assert len(rises) >= 3, rises
    starts = rises * 0.01  # media seconds where a burst starts: a whole second of the publisher's clock
    audio_offset = float(np.median(starts - np.round(starts - video_offset)))
    assert abs(audio_offset - video_offset) < 0.1, (audio_offset, video_offset)
    assert src.stats.frames_in >= 2 * src.stats.frames_kept > 0  # thinned before the queue


def test_a_publisher_that_comes_back_continues_the_timeline_with_the_gap_flagged() -> None:
    src = PushSource("whip:", wait_s=30, grace_s=5)
    rx = WebRTCReceiver(src, LOOPBACK_ONLY)
    first, second = Publisher(), Publisher()
    windows: list = []
    try:
        session = publish(rx, first)
        reader = threading.Thread(target=lambda: windows.extend(iter_windows(src)), daemon=True)
        reader.start()
        time.sleep(4.5)
        assert rx.unpublish(session)
        time.sleep(2.5)  # away, within the grace
        assert not rx.unpublish(session)  # that session is over
        publish(rx, second)
        time.sleep(4.5)
        second.close()
        reader.join(30)
        assert not reader.is_alive(), "the source did not end after the grace"
    finally:
        first.close()
        rx.close()
    assert src.stats.publishers == 2 and src.reconnects == 1
    assert [w.index for w in windows] == list(range(len(windows)))
    assert any(w.reconnects == 1 for w in windows)
    back = next(w for w in windows if w.reconnects == 1)
    assert back.audio_gap or back.video_gap or back.discontinuity, back
    assert windows[-1].end >= 4.5 + 2.5 + 4.0  # the outage is on the timeline: media went on


def test_a_second_publisher_is_refused_while_one_is_connected() -> None:
    src = PushSource("whip:", wait_s=30)
    rx = WebRTCReceiver(src, LOOPBACK_ONLY)
    a, b = Publisher(), Publisher()
    try:
        publish(rx, a)
        with pytest.raises(PushRefused) as e:
            publish(rx, b)
        assert e.value.status == 409
    finally:
        a.close()
        b.close()
        rx.close()


def test_offers_are_judged_before_use() -> None:
    pub = Publisher()
    try:
        offer = pub.offer()
    finally:
        pub.close()
    with pytest.raises(PushRefused) as e:
        check_offer(b"hello", LOOPBACK)
    assert e.value.status == 400 and "not an SDP offer" in str(e.value)
    with pytest.raises(PushRefused) as e:
        check_offer(offer + "a=x:" + "y" * MAX_OFFER_BYTES + "\r\n", LOOPBACK)
    assert e.value.status == 413
    only_pcmu = "\r\n".join(ln for ln in offer.splitlines()
                            if not ln.startswith("a=rtpmap:") or "PCMU" in ln)
    with pytest.raises(PushRefused, match="no codec the service decodes"):
        check_offer(only_pcmu, LOOPBACK)
    with pytest.raises(PushRefused) as e:
        check_offer(b"v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\n", LOOPBACK)
    assert "no audio or video" in str(e.value)
    # candidates: the default policy refuses loopback, private, link-local and names; public ones pass
    extra = ["a=candidate:1 1 udp 1 127.0.0.1 9 typ host", "a=candidate:2 1 udp 1 10.1.2.3 9 typ host",
             "a=candidate:3 1 udp 1 169.254.169.254 9 typ host", "a=candidate:4 1 udp 1 abc.local 9 typ host",
             "a=candidate:5 1 udp 1 ::1 9 typ host", "a=candidate:6 1 udp 1 0x7f000001 9 typ host",
             "a=candidate:7 1 tcp 1 8.8.8.8 9 typ host tcptype passive",
             "a=candidate:8 1 udp 1 8.8.4.4 9 typ host"]
    head, _, tail = offer.partition("a=mid:")
    checked = check_offer(head + "\r\n".join(extra) + "\r\na=mid:" + tail, SourcePolicy())
    kept = [ln for ln in checked.sdp.splitlines() if ln.startswith("a=candidate:")]
    assert kept == ["a=candidate:8 1 udp 1 8.8.4.4 9 typ host"], kept  # judged only, never contacted
    assert len(checked.removed) >= 7 and checked.audio and checked.video
    with pytest.raises(PushRefused, match="neither audio nor video"):
        PushSource("whip:").attach("s", audio=False, video=False)


def _bait(policy: SourcePolicy) -> int:
    """Bytes a loopback UDP socket receives when an offer names it as the publisher's only
    candidate and the receiver runs under ``policy`` (the offer's own checks bypassed: this is
    the ICE agent's guard alone)."""
    bait = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    bait.bind(("127.0.0.1", 0))
    bait.settimeout(0.2)
    port = bait.getsockname()[1]
    pub = Publisher()
    src = PushSource("whip:", wait_s=5)
    rx = WebRTCReceiver(src, IceRules(policy, ("127.0.0.1",)))
    try:
        lines = [ln for ln in pub.offer().splitlines() if not ln.startswith("a=candidate:")]
        i = next(k for k, ln in enumerate(lines) if ln.startswith("a=mid:"))
        lines.insert(i, f"a=candidate:1 1 udp 2130706431 127.0.0.1 {port} typ host")
        sdp = "\r\n".join(lines) + "\r\n"
        rx.publish(CheckedOffer(sdp, True, True, ()))
        got, deadline = 0, time.monotonic() + 4.0
        while time.monotonic() < deadline:
            try:
                got += len(bait.recv(2048))
            except socket.timeout:
                pass
        return got
    finally:
        bait.close()
        pub.close()
        rx.close()


def test_the_ice_agent_sends_nothing_to_an_address_the_policy_refuses() -> None:
    assert _bait(SourcePolicy()) == 0  # loopback not allowed: not one packet
    assert _bait(LOOPBACK) > 0  # the control: allowed, the connectivity checks do arrive
