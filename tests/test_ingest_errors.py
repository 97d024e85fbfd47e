"""Bad sources fail fast with typed errors and clear messages; nothing hangs (bounded by the
configured open timeout; pytest-timeout is the backstop)."""
from __future__ import annotations

import pytest

import media_fixtures as mf
from ingest_servers import SilentTcpServer, free_port
from pipeline.errors import (
    NotMediaError,
    SourceError,
    SourceTimeoutError,
    SourceUnavailableError,
    UnsupportedSourceError,
)
from pipeline.sources.spec import Backoff, SourceOptions, classify
from pipeline.sources.source import open_source
from pipeline.sources.windows import iter_windows

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("url", ["foo://camera/1", "srtp://127.0.0.1:1/x", "lavfi:", ""])
def test_unknown_scheme_or_empty(url):
    with pytest.raises(UnsupportedSourceError) as e:
        list(iter_windows(url))
    assert isinstance(e.value, SourceError) and isinstance(e.value, ValueError)
    if "://" in url:
        assert url.split("://")[0] in str(e.value) and "rtsp://" in str(e.value)


def test_not_a_string():
    with pytest.raises(UnsupportedSourceError, match="URL or path"):
        classify(42)


@pytest.mark.parametrize("url,kind,live", [
    ("rtsp://cam.local/stream", "rtsp", True), ("RTSPS://cam:322/s", "rtsp", True),
    ("https://example.org/live/index.m3u8", "hls", None), ("http://h/x.mp4", "http", None),
    ("/dev/video0", "v4l2", True), ("v4l2:/dev/video2", "v4l2", True),
    ("lavfi:testsrc2", "lavfi", False), ("clip.mkv", "file", False), ("file:///a%20b.ts", "file", False),
])
def test_classify(url, kind, live):
    spec = classify(url)
    assert (spec.kind, spec.live) == (kind, live)
    if url.startswith("file://"):
        assert spec.target == "/a b.ts"


def test_file_that_is_not_media(tmp_path):
    with pytest.raises(NotMediaError, match="not a media"):
        open_source(mf.make(tmp_path, "not_media.bin"))
    txt = tmp_path / "notes.txt"  # ffmpeg would "play" a .txt as ANSI art
    txt.write_text("hello\n" * 100)
    with pytest.raises(NotMediaError, match="text file"):
        open_source(txt)


def test_missing_file_and_missing_device(tmp_path):
    with pytest.raises(SourceUnavailableError, match="no such file"):
        open_source(tmp_path / "nope.mp4")
    with pytest.raises(SourceUnavailableError, match="no such video device"):
        list(iter_windows("/dev/video97"))


def test_unknown_lavfi_filter():
    with pytest.raises(SourceUnavailableError, match="nosuchfilter"):
        open_source("lavfi:nosuchfilter")


@pytest.mark.parametrize("scheme", ["rtsp", "http"])
def test_refused_connection(scheme):
    with pytest.raises(SourceUnavailableError, match="refused") as e:
        open_source(f"{scheme}://127.0.0.1:{free_port()}/live", {"open_timeout_s": 3})
    assert not isinstance(e.value, SourceTimeoutError)


@pytest.mark.parametrize("url", ["rtsp://127.0.0.1:{p}/live", "rtsps://127.0.0.1:{p}/live",
                                 "http://127.0.0.1:{p}/clip.mp4"])
def test_host_that_never_answers_times_out(url):
    srv = SilentTcpServer()
    try:
        with pytest.raises(SourceTimeoutError, match="no answer within 1.5 s"):
            open_source(url.format(p=srv.port), {"open_timeout_s": 1.5})
    finally:
        srv.close()


def test_listener_nobody_pushes_to_times_out():
    with pytest.raises(SourceTimeoutError):
        open_source(f"rtsp://127.0.0.1:{free_port()}/live", {"listen": True, "open_timeout_s": 1})


def test_bad_options():
    with pytest.raises(ValueError, match="unknown source option"):
        SourceOptions.coerce({"open_timout_s": 3})
    with pytest.raises(ValueError, match="rtsp_transport"):
        open_source("rtsp://127.0.0.1:1/x", {"rtsp_transport": "sctp"})
    with pytest.raises(UnsupportedSourceError, match="audio_device"):
        open_source("lavfi:testsrc2", {"audio_device": "hw:1"})
    with pytest.raises(ValueError, match="window_s \\* fps"):
        list(iter_windows("lavfi:testsrc2", window_s=1.0, fps=2.5))


def test_backoff_is_capped_exponential():
    b = Backoff(initial_s=0.5, factor=2.0, cap_s=3.0)
    assert [b.delay(i) for i in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert SourceOptions.coerce({"reconnect": {"max_attempts": 2}}).reconnect.max_attempts == 2
