"""`omnizip-stream` as a user runs it (subprocesses): every refusal before Ray is one line on
stderr, exit code 2, in under a second; --version; one settings object for flags, OMNIZIP_*
variables and --config files, every variable documented; a real run prints only JSON under
--json, forwards the actors' logs at --log-level debug and leaves no Ray directory behind; viz
draws a clip without Ray."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLIP = ("lavfi:testsrc2=size=160x120:rate=10,trim=duration=4[out0];"
        "sine=f=440:beep_factor=4:sample_rate=16000,atrim=duration=4[out1]")


def env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("OMNIZIP_") and k != "RAY_ADDRESS"}
    return {**e, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", **extra}


def cli(*args: str, timeout: float = 60, **extra: str) -> tuple[subprocess.CompletedProcess, float]:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pipeline.cli.main", *args], cwd=ROOT, env=env(**extra),
                       capture_output=True, text=True, timeout=timeout)
    return r, time.perf_counter() - t


@pytest.fixture(scope="module")
def bad_config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cfg")
    (d / "typo.toml").write_text('modle = "tiny"\n')
    (d / "broken.toml").write_text("model = [\n")
    (d / "checkpoint").mkdir()
    (d / "checkpoint" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (d / "clip.mp4").mkdir()
    return {"typo": d / "typo.toml", "broken": d / "broken.toml", "llama": d / "checkpoint", "dir": d / "clip.mp4"}


FAILURES = [
    # (args, environment, words in the one line)
    (["run", "foo://x", "-q", "hi"], {}, "unsupported source scheme 'foo'"),
    (["run", "/no/such/clip.mp4", "-q", "hi"], {}, "no such file"),
    (["run", "{dir}", "-q", "hi"], {}, "is a directory"),
    (["run", "concat:a.mp4|b.mp4", "-q", "hi"], {}, "refused (scheme)"),
    (["run", CLIP, "-q", "hi", "--model", "huge"], {}, "model 'huge': not a preset"),
    (["run", CLIP, "-q", "hi", "--model", "{llama}"], {}, "holds a 'llama' model"),
    (["run", CLIP, "-q", "hi"], {"OMNIZIP_MODEL": "/nope"}, "model '/nope'"),
    (["run", CLIP, "-q", "hi", "--rho-audio", "1.5"], {}, "--rho-audio: OmniZipConfig.rho_audio must be in [0, 1]"),
    (["run", CLIP, "-q", "hi", "--rho-video", "x"], {}, "argument --rho-video: invalid float value"),
    (["run", CLIP, "-q", "hi", "--method", "zip"], {}, "--method 'zip'"),
    (["run", CLIP, "-q", "hi", "--context-tokens", "5"], {}, "--context-tokens"),
    (["run", CLIP, "-q", "hi", "--lookahead", "100"], {}, "--lookahead"),
    (["run", CLIP, "-q", "hi", "--dtype", "int3"], {}, "--dtype 'int3'"),
    (["run", CLIP, "-q", "hi", "--redis-url", "http://x"], {}, "--redis-url"),
    (["run", CLIP], {}, "required: --question"),
    (["run", CLIP, "-q", "hi"], {"OMNIZIP_MAX_BATCH": "zero"}, "OMNIZIP_MAX_BATCH: Input should be a valid integer"),
    (["run", CLIP, "-q", "hi"], {"OMNIZIP_ALLOW_SOURCES": "ftp"}, "OMNIZIP_ALLOW_SOURCES"),
    (["run", CLIP, "-q", "hi", "--config", "{typo}"], {}, "unknown setting 'modle' (--config)"),
    (["run", CLIP, "-q", "hi", "--config", "{broken}"], {}, "--config broken.toml"),
    (["run", CLIP, "-q", "hi", "--config", "/no/such.toml"], {}, "no such file"),
    (["run", CLIP, "-q", "hi", "--log-level", "loud"], {}, "argument --log-level"),
    (["serve", "--model", "huge"], {}, "model 'huge'"),
    (["serve", "--port", "70000"], {}, "--port: Input should be less than or equal to 65535"),
    (["serve", "--host", "0.0.0.0"], {}, "refusing to listen on 0.0.0.0 without an API key"),
    (["serve", "--api-key", "short"], {}, "API key #1: must be 16-256"),
    (["serve"], {"OMNIZIP_API_KEYS": "x y"}, "API key #1"),
    (["serve", "--port", "{busy}"], {}, "cannot listen on 127.0.0.1"),
    (["serve"], {"OMNIZIP_REQUESTS_PER_S": "-1"}, "OMNIZIP_REQUESTS_PER_S"),
    (["serve", "--ray-address", "head-without-port"], {}, "--ray-address: must be host:port"),
    (["serve"], {"OMNIZIP_RAY_ADDRESS": "http://head:6379"}, "OMNIZIP_RAY_ADDRESS: must be host:port"),
    (["serve", "--ray-address", "127.0.0.1:{closed}"], {}, "nothing answers there (Connection refused)"),
    (["run", CLIP, "-q", "hi", "--ray-address", "ray://127.0.0.1:{closed}"], {}, "nothing answers there"),
    (["demo"], {"RAY_ADDRESS": "127.0.0.1:{closed}"}, "RAY_ADDRESS 127.0.0.1:"),
    (["viz", CLIP, "-o", "out.gif"], {}, "must end in .png or .mp4"),
    (["viz", CLIP, "-o", "/no/such/dir/out.png"], {}, "no directory"),
    (["viz", "rtmp://x/y", "-o", "out.png"], {}, "unsupported source scheme"),
]


@pytest.mark.parametrize("args, extra, words", FAILURES, ids=[" ".join(a[:1] + a[-2:])[:60] for a, _, _ in FAILURES])
def test_refusals_are_one_line_rc2_under_a_second(args: list[str], extra: dict, words: str,
                                                  bad_config: dict[str, Path]) -> None:
    import socket

    with socket.socket() as busy, socket.socket() as closed:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        closed.bind(("127.0.0.1", 0))  # bound, not listening: a connection is refused
        subs = {**{k: str(v) for k, v in bad_config.items()}, "busy": str(busy.getsockname()[1]),
                "closed": str(closed.getsockname()[1])}
        argv = [a.format(**subs) if "{" in a and "}" in a else a for a in args]
        extra = {k: v.format(**subs) for k, v in extra.items()}
        best = None
        for _ in range(3):  # the best of three: a busy machine's hiccup is not the CLI's time
            r, took = cli(*argv, **extra)
            best = took if best is None else min(best, took)
            if best < 1.0:
                break
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and words in lines[0], r.stderr
    assert r.stdout == ""
    assert best < 1.0, f"took {best:.2f} s"
    print(f"{' '.join(args)[:70]}: {best:.2f} s")


def test_ray_address_check_tells_a_ray_head_from_other_listeners(ray_session: dict) -> None:
    """A Ray head (the session's GCS) passes, in milliseconds; a listener that is not gRPC, or
    that never answers, is refused in one line before ray.init could wait minutes on it."""
    import socket
    import threading

    import ray

    from pipeline.cli.checks import check_ray_address
    from pipeline.cli.checks import SettingsError

    port = ray.get_runtime_context().gcs_address.rsplit(":", 1)[1]
    t = time.perf_counter()
    check_ray_address(f"127.0.0.1:{port}")
    assert time.perf_counter() - t < 0.5
    with socket.socket() as http, socket.socket() as mute:
        http.bind(("127.0.0.1", 0))
        http.listen()
        mute.bind(("127.0.0.1", 0))
        mute.listen()

        def answer() -> None:  # an HTTP/1 server: a status line for whatever comes
            conn, _ = http.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

        threading.Thread(target=answer, daemon=True).start()
        with pytest.raises(SettingsError, match="not a Ray cluster"):
            check_ray_address(f"127.0.0.1:{http.getsockname()[1]}")
        with pytest.raises(SettingsError, match="nothing answers there within 0.5 s"):
            check_ray_address(f"127.0.0.1:{mute.getsockname()[1]}", timeout_s=0.5)
    for bad in ("auto", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", "http://h:1", "ray://h", "h:1:2"):
        with pytest.raises(SettingsError, match="must be host:port"):
            check_ray_address(bad)


def test_version() -> None:
    r, _ = cli("--version")
    assert r.returncode == 0 and re.fullmatch(r"omnizip-stream \d+\.\d+\.\d+\S*\n", r.stdout), r.stdout


def test_names_mirrored_for_speed_match_the_library() -> None:
    from omnizip import METHODS
    from omnizip.models import PRESETS, _DTYPES
    from pipeline.cli.checks import DTYPE_NAMES, METHOD_NAMES, PRESET_NAMES

    assert set(PRESET_NAMES) == set(PRESETS) and set(METHOD_NAMES) == set(METHODS)
    assert set(DTYPE_NAMES) == set(_DTYPES)


def test_settings_flags_over_environment_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.cli.checks import SettingsError
    from pipeline.cli.settings import load_settings

    for k in [k for k in os.environ if k.startswith("OMNIZIP_")]:
        monkeypatch.delenv(k)
    (tmp_path / "a.toml").write_text('model = "small"\nport = 9001\nmax_batch = 3\nhost = "::1"\n'
                                     'api_keys = ["from-the-file-0123456789"]\n')
    (tmp_path / "a.json").write_text(json.dumps({"model": "3b", "retention-windows": 10}))
    (tmp_path / "a.yaml").write_text("model: 7b\ninsecure: true\n")
    monkeypatch.setenv("OMNIZIP_PORT", "9002")
    monkeypatch.setenv("OMNIZIP_DTYPE", "")
    s = load_settings({"port": None, "host": "127.0.0.1"}, tmp_path / "a.toml")
    assert (s.model, s.port, s.max_batch, s.host, s.dtype) == ("small", 9002, 3, "127.0.0.1", None)
    assert s.api_keys == ["from-the-file-0123456789"] and s.service_config().max_batch == 3
    assert load_settings({"port": 9003}, tmp_path / "a.toml").port == 9003
    assert load_settings({}, tmp_path / "a.json").retention_windows == 10
    assert load_settings({}, tmp_path / "a.yaml").insecure is True
    monkeypatch.setenv("OMNIZIP_API_KEYS", "env-key-one-0123456789, env-key-two-0123456789")
    assert load_settings({}).api_keys == ["env-key-one-0123456789", "env-key-two-0123456789"]
    assert load_settings({}).gate()["api_keys"] == ["env-key-one-0123456789", "env-key-two-0123456789"]
    monkeypatch.setenv("OMNIZIP_RETENTION_WINDOWS", "")
    assert load_settings({}).retention_windows is None
    with pytest.raises(SettingsError, match="--max-batch: must be an integer >= 1"):
        load_settings({"max_batch": 0})
    with pytest.raises(SettingsError, match="OMNIZIP_BEHIND_POLICY"):
        monkeypatch.setenv("OMNIZIP_BEHIND_POLICY", "panic")
        load_settings({})


def test_every_variable_is_documented_in_one_table() -> None:
    from pipeline.cli.settings import Settings

    doc = (ROOT / "docs" / "configuration.md").read_text()
    rows = set(re.findall(r"^\| `(OMNIZIP_[A-Z0-9_]+)` \|", doc, re.M))
    assert {f"OMNIZIP_{n.upper()}" for n in Settings.model_fields} <= rows
    used = set()
    for p in [*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("omnizip/**/*.py"), *ROOT.glob("deploy/*"),
              *ROOT.glob("bench/*.py")]:
        used |= set(re.findall(r"OMNIZIP_[A-Z0-9_]*[A-Z0-9]", p.read_text(errors="ignore")))
    assert used - rows == set(), used - rows
    assert "docs/configuration.md" in (ROOT / "README.md").read_text()


def test_a_local_run_prints_only_json_forwards_actor_logs_and_cleans_up() -> None:
    """No RAY_ADDRESS: the command starts its own Ray, in /tmp/ray-oz<pid>-*, removed at exit."""
    p = subprocess.Popen([sys.executable, "-m", "pipeline.cli.main", "run", CLIP, "-q", "What is it?", "--max-tokens", "4",
                          "--json", "--no-progress", "--per-window", "--log-level", "debug"],
                         cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pattern, seen = f"/tmp/ray-oz{p.pid}-*", False
    deadline = time.monotonic() + 240
    while p.poll() is None and time.monotonic() < deadline:
        seen = seen or bool(glob.glob(pattern))
        time.sleep(0.2)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err[-3000:]
    doc = json.loads(out)  # the whole of stdout is one JSON object
    assert doc["status"] == "ended" and doc["answer"] and len(doc["per_window"]) == 2
    assert "window   0" in err and "Q: What is it?" in err  # the human text went to stderr
    assert re.search(r"\(EncoderWorker pid=\d+\).*DEBUG pipeline\.store\.writer: .*window \d+ stored .*side data: viz",
                     err), err[-3000:]
    assert seen and not glob.glob(pattern)


def test_viz_draws_a_clip_without_ray(tmp_path: Path) -> None:
    from PIL import Image

    r, _ = cli("viz", CLIP, "-o", str(tmp_path / "kept.png"), "--rho-video", "0.5", "--json", timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["windows"] == 2 and res["tokens"]["video"]["kept"] < res["tokens"]["video"]["in"]
    img = Image.open(tmp_path / "kept.png")
    assert img.width >= 2 * 160 and img.height > 2 * 120
    r, _ = cli("viz", CLIP, "-o", str(tmp_path / "kept.mp4"), timeout=240)
    assert r.returncode == 0 and "wrote" in r.stdout and "2 windows" in r.stdout, r.stderr[-3000:]
    import av

    with av.open(str(tmp_path / "kept.mp4")) as c:
        v = c.streams.video[0]
        frames = sum(1 for _ in c.decode(v))
        assert frames == 8 and v.codec_context.name == "h264" and c.streams.audio


def listeners(port: int) -> list[str]:
    """The local addresses listening on TCP ``port`` (from /proc/net/tcp and tcp6)."""
    import ipaddress

    out = []
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.split(":")
            if state == "0A" and int(hexport, 16) == port:
                raw = bytes.fromhex(addr)
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # little-endian words
                out.append(str(ipaddress.ip_address(raw[:width])))
    return out


def test_serve_answers_the_console_and_cleans_up_on_sigterm() -> None:
    import signal
    import socket

    import requests

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        metrics_port = sock.getsockname()[1]
    p = subprocess.Popen([sys.executable, "-m", "pipeline.cli.main", "serve", "--port", str(port), "--json",
                          "--api-key", "cli-test-key-0123456789", "--metrics-port", str(metrics_port)],
                         cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()  # one JSON line once it listens
        assert line, p.stderr.read()[-3000:]
        info = json.loads(line)
        assert info["url"] == f"http://127.0.0.1:{port}" and info["api_keys"] == 1
        assert glob.glob(f"/tmp/ray-oz{p.pid}-*")
        page = requests.get(info["console"], timeout=60)
        assert page.status_code == 200 and "OmniZip-Stream console" in page.text
        assert requests.get(info["url"] + "/v1/streams", timeout=60).status_code == 401
        # the command's own Ray exports metrics on the port asked for (Ray binds its agent on every
        # interface here: docs/deploy.md says who may reach it)
        deadline = time.monotonic() + 60
        while not listeners(metrics_port) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert listeners(metrics_port), metrics_port
        assert requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).status_code == 200
    finally:
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    assert out == "" and not glob.glob(f"/tmp/ray-oz{p.pid}-*")
