"""`omnizip-stream demo` and `run` as a user runs them (subprocesses), attached to the session's
Ray (demo with --ray-address, run through Ray's own RAY_ADDRESS) so the suite keeps one Ray."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import media_fixtures

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, timeout: float = 240, flag: bool = False) -> subprocess.CompletedProcess:
    """The command attached to the session's Ray: ``flag``: by --ray-address 127.0.0.1:PORT, else
    by RAY_ADDRESS (Ray's own variable, as its GCS address reads)."""
    import ray
    gcs = ray.get_runtime_context().gcs_address
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "OMNIZIP_RAY_ADDRESS")}
    if flag:
        args = (*args, "--ray-address", "127.0.0.1:" + gcs.rsplit(":", 1)[1])
    else:
        env["RAY_ADDRESS"] = gcs
    return subprocess.run([sys.executable, "-m", "pipeline.cli.main", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_demo_prints_each_window_and_an_answer(ray_session: dict) -> None:
    r = cli("demo", flag=True)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("window ")]
    assert len(lines) == 6, r.stdout
    for k, ln in enumerate(lines):
        m = re.match(rf"window +{k} .*audio +(\d+)/ *50 +video +(\d+)/ *(\d+) +kept +([\d.]+)%", ln)
        assert m, ln
        assert 0 < int(m.group(1)) < 50 and 0 < int(m.group(2)) < int(m.group(3)) and float(m.group(4)) < 100
    answer = next(ln for ln in r.stdout.splitlines() if ln.startswith("A: "))
    assert len(answer) > 3
    assert "6 windows, 6 in context, 0 dropped" in r.stdout


def test_run_a_file_prints_stats_and_answers(ray_session: dict, tmp_path: Path) -> None:
    clip = media_fixtures.make(tmp_path, "ntsc_44k_stereo.mp4")
    r = cli("run", str(clip), "--question", "What do you see?", "--max-tokens", "5", "--rho-video", "0.5",
            "--json", "--per-window")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)  # --json: stdout is one JSON object, the human text is on stderr
    assert out["status"] == "ended" and out["windows_total"] == 3 and out["windows"] == 3 and out["dropped"] == 0
    assert out["settings"]["omnizip"]["rho_video"] == 0.5
    assert out["tokens"]["video"]["kept"] < out["tokens"]["video"]["in"]
    assert out["answer"] and out["question"] == "What do you see?"
    assert "windows" in r.stderr  # the progress bar
    assert len(re.findall(r"window +\d+ \[", r.stderr)) == 3  # between the progress bar's redraws
    assert [w["index"] for w in out["per_window"]] == [0, 1, 2]


@pytest.mark.parametrize("args, message", [
    (["run", "foo://x", "-q", "hi"], "unsupported source scheme"),
    (["run", "lavfi:testsrc2", "-q", "hi", "--rho-audio", "1.5"], "rho_audio"),
])
def test_run_rejects_bad_input_clearly(ray_session: dict, args: list[str], message: str) -> None:
    r = cli(*args, timeout=120)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
