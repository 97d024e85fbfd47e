"""The web console in a real headless Chromium (Debian's chromium + chromium-driver, driven by
selenium) against the session's Serve app: the page loads without a key, a key is entered once,
a stream created through the API appears, its kept-patch picture renders, a source is tested
and added through the page, a question's answer streams in, a wrong key shows the API's own
error. Screenshots go to ``<pytest basetemp>/console-screenshots``."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from serve_helpers import Api

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver "
                                "(scripts/apt-packages.txt)")

LIVE = ("lavfi:testsrc2=size=320x240:rate=10,trim=duration=30[out0];"
        "sine=f=440:beep_factor=4:sample_rate=16000,atrim=duration=30[out1]")
SHORT = ("lavfi:testsrc2=size=160x120:rate=10,trim=duration=4[out0];"
         "sine=f=220:sample_rate=16000,atrim=duration=4[out1]")
WAIT_S = 90.0


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "console-screenshots"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1200", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def live(serve_api: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A stream created through the API (as another client would), played in real time."""
    api = Api(str(serve_api["url"]), str(serve_api["key"]))
    st = api.create(source=LIVE, name="browser-cam", realtime=True)
    yield st
    api.delete(f"/v1/streams/{st['id']}")


def until(what: str, cond: Callable[[], Any], timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(0.25)


def text(driver: Any, element_id: str) -> str:
    return str(driver.execute_script(f"return document.getElementById('{element_id}').textContent"))


def use_key(driver: Any, key: str) -> None:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "key")
    box.clear()
    box.send_keys(key)
    driver.find_element(By.ID, "key-save").click()


def row_of(driver: Any, name: str, click: bool = False) -> list[str] | None:
    """The cells of the streams-table row named ``name`` (clicked when asked), read in one
    script: the table is redrawn every poll, so element handles go stale."""
    return driver.execute_script(
        "for (const tr of document.querySelectorAll('#streams tbody tr')) {"
        "  const cells = [...tr.cells].map((c) => c.textContent);"
        "  if (cells[0] === arguments[0]) { if (arguments[1]) tr.click(); return cells; } }"
        "return null;", name, click)


def test_console_end_to_end(browser: Any, serve_api: dict[str, Any], live: dict[str, Any], shots: Path) -> None:
    from selenium.webdriver.common.by import By

    shots.mkdir(parents=True, exist_ok=True)
    d = browser
    d.get(serve_api["url"] + "/")
    assert d.title == "OmniZip-Stream console"
    # without a key the page loads, and the API's refusal is shown in its own words
    until("the no-key error", lambda: "API key" in text(d, "error"))
    use_key(d, str(serve_api["key"]))
    assert d.execute_script("return localStorage.getItem('omnizip.apiKey')") == serve_api["key"]

    # a stream created through the API appears, with status, lag and kept share
    until("the stream in the list", lambda: row_of(d, "browser-cam"))
    until("the error banner cleared", lambda: not d.find_element(By.ID, "error").is_displayed())
    row_of(d, "browser-cam", click=True)
    until("the kept-patch picture", lambda: d.execute_script(
        "const i = document.getElementById('frames-img'); return i.complete && i.naturalWidth > 0"))
    until("the audio picture", lambda: d.execute_script(
        "const i = document.getElementById('audio-img'); return i.complete && i.naturalWidth > 0"))
    assert d.execute_script("return document.getElementById('frames-img').naturalWidth") >= 400
    cells = row_of(d, "browser-cam")
    assert cells[1] in ("starting", "live", "ended") and cells[2].endswith(" s") and cells[3].endswith("%"), cells
    until("the fourth window's picture", lambda: text(d, "window-caption").startswith("#3 "))
    until("the context budget", lambda: " / 8192 tokens" in text(d, "budget-text"))
    until("the chart", lambda: d.execute_script(
        "const c = document.getElementById('chart'); const g = c.getContext('2d');"
        "return g.getImageData(0, 0, c.width, c.height).data.some((v, i) => i % 4 === 3 && v > 0)"))
    d.save_screenshot(str(shots / "console.png"))

    # a question's answer streams in (SSE), then its summary from the `done` event
    q = d.find_element(By.ID, "question")
    q.send_keys("What is happening?")
    d.find_element(By.ID, "ask").click()
    until("the answer", lambda: text(d, "answer").strip() and "tokens" in text(d, "answer-stats"))
    assert "context tokens" in text(d, "answer-stats")
    d.save_screenshot(str(shots / "console-answer.png"))

    # test a connection, then add the stream through the page, then delete it
    d.find_element(By.ID, "add-source").send_keys(SHORT)
    d.find_element(By.ID, "probe").click()
    got = until("the probe result", lambda: text(d, "probe-result") if "ok" in text(d, "probe-result")
                or "refused" in text(d, "probe-result") else "")
    assert got.startswith("ok (lavfi)") and "160x120" in got and "16000 Hz" in got, got
    d.find_element(By.ID, "add-name").send_keys("from-the-page")
    d.find_element(By.ID, "add").click()
    until("the added stream", lambda: row_of(d, "from-the-page"))
    until("its detail", lambda: text(d, "detail-title") == "from-the-page")
    d.find_element(By.ID, "delete").click()
    until("the stream gone", lambda: row_of(d, "from-the-page") is None)

    # a refused source: the API's message, as it words it
    d.find_element(By.ID, "add-source").send_keys("ftp://example.invalid/x")
    d.find_element(By.ID, "probe").click()
    until("the refusal", lambda: "refused (scheme)" in text(d, "error"))

    # a wrong key: every call is refused, and the page says so in the API's words
    use_key(d, "wrong-key-0123456789abcdef")
    until("the wrong-key error", lambda: text(d, "error") ==
          "missing or invalid API key: send 'Authorization: Bearer <key>'")
    d.save_screenshot(str(shots / "console-wrong-key.png"))
    assert all((shots / n).stat().st_size > 10_000 for n in ("console.png", "console-answer.png"))


def test_send_my_camera_publishes_the_browsers_camera(serve_api: dict[str, Any], shots: Path) -> None:
    """Chromium's fake camera (a moving pattern) and microphone (a beep) go to a new push stream
    over WHIP from the console's "Send my camera" panel: windows arrive with moving frames and
    non-silent audio, the kept-patch picture shows, Stop ends the publishing session. ICE stays on
    loopback: the service offers 127.0.0.1 only (the test engine's OMNIZIP_WEBRTC_ADDRESSES), and
    Chromium's mDNS names (which would be announced by multicast) are switched off."""
    import numpy as np
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1200",
                "--no-first-run", "--disable-extensions", "--disable-background-networking", "--disable-component-update",
                "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                "--allow-loopback-in-peer-connection", "--disable-features=WebRtcHideLocalIpsWithMdns"):
        opts.add_argument(arg)
    d = webdriver.Chrome(service=Service(DRIVER), options=opts)
    api = Api(str(serve_api["url"]), str(serve_api["key"]))
    shots.mkdir(parents=True, exist_ok=True)
    sid = None
    try:
        d.set_page_load_timeout(60)
        d.get(serve_api["url"] + "/")
        use_key(d, str(serve_api["key"]))
        d.find_element(By.ID, "cam-name").send_keys("my-browser-cam")
        d.find_element(By.ID, "cam-start").click()
        until("the camera publishing", lambda: "sending to stream" in text(d, "cam-state")
              or "connection: connected" in text(d, "cam-state") or text(d, "error").strip(), 60)
        assert not text(d, "error").strip(), text(d, "error")
        sid = next(s["id"] for s in api.get("/v1/streams").json()["streams"] if s.get("name") == "my-browser-cam")
        st = api.wait(sid, lambda s: s["windows"] >= 3, WAIT_S, "three windows from the browser")
        assert st["ingest"]["connected"] and st["tokens"]["video"]["in"] > 0, st
        until("the kept-patch picture", lambda: d.execute_script(
            "const i = document.getElementById('frames-img'); return i.complete && i.naturalWidth > 0"))
        d.save_screenshot(str(shots / "console-camera.png"))
        import ray

        from pipeline.engine.service import find_service
        from pipeline.viz import window as window_viz

        svc = find_service(serve_api["config"])
        recs = [window_viz.decode_record(ray.get(svc.window_viz.remote(sid, i))) for i in (1, 2)]
        thumbs = np.concatenate([r["thumb"] for r in recs]).astype(np.float32)
        assert np.abs(np.diff(thumbs, axis=0)).mean() > 1.0, "the frames do not move"
        envelope = np.concatenate([np.asarray(r["envelope"], np.float32) for r in recs])
        assert envelope.max() > 0.01, "the audio is silent"
        d.find_element(By.ID, "cam-stop").click()
        until("stopped", lambda: text(d, "cam-state") == "stopped")
        api.wait(sid, lambda s: not s["ingest"]["connected"], 30, "the publisher gone")
    finally:
        d.quit()
        if sid is not None:
            api.delete(f"/v1/streams/{sid}")
