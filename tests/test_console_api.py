"""The console's HTTP routes (pipeline.api.console) on the session's real Serve app (tiny
model, real Redis): per-window pages, the pictures of what a window kept, the source probe
under the operator's policy, the static console without a key and nothing else opened."""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from PIL import Image

from serve_helpers import Api

CLIP = ("lavfi:testsrc2=size=320x240:rate=10,trim=duration=8[out0];"
        "sine=f=440:beep_factor=4:sample_rate=16000,atrim=duration=8[out1]")


@pytest.fixture(scope="module")
def api(serve_api: dict[str, Any]) -> Api:
    return Api(str(serve_api["url"]), str(serve_api["key"]))


@pytest.fixture(scope="module")
def other(serve_api: dict[str, Any]) -> Api:
    return Api(str(serve_api["url"]), str(serve_api["other_key"]))


@pytest.fixture(scope="module")
def played(api: Api) -> Iterator[dict[str, Any]]:
    """An 8-s synthetic clip played to its end: 4 windows stored with their pictures."""
    st = api.create(source=CLIP, name="viz-clip", omnizip={"rho_video": 0.6})
    st = api.wait(st["id"], lambda s: s["status"] in ("ended", "failed"), 120, "the end of the clip")
    assert st["status"] == "ended", st
    yield st
    api.delete(f"/v1/streams/{st['id']}")


def err(r: requests.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()["error"]
    assert body["code"] in (status, "invalid_api_key") and body["message"], body
    return body


def png(r: requests.Response) -> Image.Image:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png" and r.content[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(r.content))


def test_window_pages(api: Api, played: dict[str, Any]) -> None:
    sid = played["id"]
    r = api.get(f"/v1/streams/{sid}/windows")
    assert r.status_code == 200, r.text
    page = r.json()
    ws = page["windows"]
    assert [w["index"] for w in ws] == [0, 1, 2, 3], json.dumps(api.status(sid))
    assert page["has_more"] is False and page["next_after"] == 3
    for w in ws:
        assert w["end"] - w["start"] == pytest.approx(2.0)
        assert w["audio"]["in"] == 50 and 0 < w["audio"]["kept"] <= 50
        assert w["video"]["in"] > 0 and 0 < w["video"]["kept"] < w["video"]["in"]
        assert 0 < w["video_ratio"] <= 1 and 0 < w["kept_share"] < 1
        assert set(w["flags"]) == {"harder", "audio_gap", "video_gap", "discontinuity", "final"}
    tot = played["tokens"]
    assert sum(w["video"]["kept"] for w in ws) == tot["video"]["kept"]
    assert sum(w["audio"]["in"] for w in ws) == tot["audio"]["in"]
    first = api.get(f"/v1/streams/{sid}/windows", params={"limit": 2}).json()
    assert [w["index"] for w in first["windows"]] == [0, 1] and first["has_more"] is True
    rest = api.get(f"/v1/streams/{sid}/windows", params={"after": first["next_after"], "limit": 2}).json()
    assert [w["index"] for w in rest["windows"]] == [2, 3] and rest["has_more"] is False
    none = api.get(f"/v1/streams/{sid}/windows", params={"after": 3}).json()
    assert none["windows"] == [] and none["next_after"] == 3
    tail = api.get(f"/v1/streams/{sid}/windows", params={"tail": 1}).json()
    assert [w["index"] for w in tail["windows"]] == [3]
    for bad in ({"limit": 0}, {"limit": 501}, {"after": -2}, {"tail": 0}, {"after": "x"}):
        assert err(api.get(f"/v1/streams/{sid}/windows", params=bad), 422)["param"] == f"query.{next(iter(bad))}"


def test_pictures_of_a_window(api: Api, played: dict[str, Any]) -> None:
    sid = played["id"]
    frames = png(api.get(f"/v1/streams/{sid}/windows/1/frames.png"))
    assert frames.width > 2 * frames.height and frames.height >= 100  # two frames side by side
    px = frames.convert("RGB").getcolors(1 << 20)
    assert px and len(px) > 50  # a picture, not a blank placeholder
    audio = png(api.get(f"/v1/streams/{sid}/windows/1/audio.png"))
    assert audio.width == 500 and audio.height > 50
    body = err(api.get(f"/v1/streams/{sid}/windows/99/frames.png"), 404)
    assert body["param"] == "index" and "99" in body["message"]
    assert err(api.get(f"/v1/streams/{sid}/windows/x/audio.png"), 422)["param"] == "path.index"


def test_other_keys_and_no_key_see_nothing(api: Api, other: Api, serve_api: dict[str, Any],
                                          played: dict[str, Any]) -> None:
    sid = played["id"]
    for path in (f"/v1/streams/{sid}/windows", f"/v1/streams/{sid}/windows/0/frames.png",
                 f"/v1/streams/{sid}/windows/0/audio.png"):
        assert err(other.get(path), 404)["type"] == "not_found"
        assert err(requests.get(serve_api["url"] + path, timeout=30), 401)["type"] == "authentication_error"
    assert err(requests.post(serve_api["url"] + "/v1/sources/probe", json={"source": CLIP}, timeout=30), 401)


def test_probe_reports_what_a_source_carries(api: Api, tmp_path_factory: pytest.TempPathFactory) -> None:
    before = {s["id"] for s in api.get("/v1/streams").json()["streams"]}
    t = time.monotonic()
    r = api.post("/v1/sources/probe", json={"source": CLIP})
    assert r.status_code == 200, r.text
    p = r.json()
    assert time.monotonic() - t < 30.0  # only a hang: the probe's own 5-s deadline is elapsed_s
    assert p["ok"] is True and p["format"] == "lavfi" and p["elapsed_s"] < 5
    assert p["video"]["width"] == 320 and p["video"]["height"] == 240 and p["video"]["fps"] == 10
    assert p["audio"]["sample_rate"] == 16000 and p["audio"]["channels"] == 1 and p["audio"]["codec"]
    missing = api.post("/v1/sources/probe", json={"source": str(tmp_path_factory.getbasetemp() / "none.mp4")}).json()
    assert missing["ok"] is False and missing["error"] == "no media source could be read there"  # uniform (issue 18)
    assert {s["id"] for s in api.get("/v1/streams").json()["streams"]} == before  # nothing registered


@pytest.mark.parametrize("source, rule", [("/etc/passwd", "file:outside-roots"), ("ftp://127.0.0.1/x", "scheme"),
                                          ("rtsp://127.0.0.2:554/x", "host:not-allowed"),
                                          ("lavfi:movie=/etc/passwd", "lavfi")])
def test_probe_refuses_what_the_policy_refuses(api: Api, source: str, rule: str) -> None:
    body = err(api.post("/v1/sources/probe", json={"source": source}), 400)
    assert rule in body["message"] and body["param"] == "source"


def test_probe_validation(api: Api) -> None:
    assert err(api.post("/v1/sources/probe", json={}), 422)["param"] == "source"
    assert err(api.post("/v1/sources/probe", json={"source": "a\nb"}), 422)["param"] == "source"
    assert err(api.post("/v1/sources/probe", json={"source": CLIP, "options": {"ffmpeg": 1}}), 422)
    assert err(api.post("/v1/sources/probe", json={"source": CLIP, "extra": 1}), 422)["param"] == "extra"


def test_console_files_load_without_a_key_and_nothing_else_opens(serve_api: dict[str, Any]) -> None:
    from pipeline.api.gate import OPEN_PATHS
    from pipeline.api.console import CONSOLE_FILES

    assert OPEN_PATHS == {"/healthz", *CONSOLE_FILES}
    url = serve_api["url"]
    for path, kind in (("/", "text/html"), ("/console/console.js", "text/javascript"),
                       ("/console/console.css", "text/css")):
        r = requests.get(url + path, timeout=30)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), (path, r.status_code)
        assert "script-src 'self'" in r.headers["content-security-policy"]
    page = requests.get(url + "/", timeout=30).text
    assert "console/console.js" in page and not re.search(r'(src|href)="(https?:)?//', page)  # no CDN
    for path in ("/console/nope.js", "/console/", "/console/../pipeline/api/app.py", "/index.html", "/v1",
                 "/console/console.js/x", "//console/console.js"):
        assert requests.get(url + path, timeout=30).status_code == 401, path
    keyed = requests.get(url + "/console/nope.js", headers={"Authorization": f"Bearer {serve_api['key']}"}, timeout=30)
    assert keyed.status_code == 404
