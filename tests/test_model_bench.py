"""The model benchmarks run end to end on `tiny` and print the JSON the issue specifies (no timing asserts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def last_json(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_prefill_bench_json() -> None:
    r = last_json(["bench/prefill.py", "--preset", "tiny", "--seconds", "4", "--frame-size", "112x112",
                   "--repeats", "1"])
    assert r["preset"] == "tiny" and set(r["settings"]) == {"full", "45%", "35%"}
    for s in r["settings"].values():
        assert set(s) == {"tokens", "prefill_s", "peak_mem_bytes", "speedup"} and s["peak_mem_bytes"] > 0
    assert r["settings"]["35%"]["tokens"] < r["settings"]["45%"]["tokens"] < r["settings"]["full"]["tokens"]
    assert r["settings"]["full"]["speedup"] == 1.0


def test_ttft_bench_json() -> None:
    r = last_json(["bench/ttft.py", "--preset", "tiny", "--minutes", "1", "2", "--frame-size", "56x56",
                   "--distinct", "2", "--budget", "400", "--repeats", "1"])
    assert r["minutes"] == [1, 2]
    for key in ("rolling_s", "reprefill_s", "uncompressed_s"):
        assert len(r[key]) == 2 and all(v > 0 for v in r[key])
    assert all(t <= 400 for t in r["context_tokens"])
    assert all(u > c for u, c in zip(r["uncompressed_tokens"], r["reprefill_tokens"]))
    assert r["positions_in_range"] and max(r["max_position"]) < r["max_position_embeddings"]


def test_refresh_bench_json() -> None:
    r = last_json(["bench/refresh.py", "--preset", "tiny", "--windows", "24", "--budget", "300", "--frame-size",
                   "56x56", "--distinct", "2", "--refresh-every", "none", "5", "--measure-every", "2"])
    assert set(r["series"]) == {"none", "5"} and r["series"]["5"]["refreshes"] >= 2
    none = r["series"]["none"]
    assert none["refreshes"] == 0 and none["evicted"][-1] > 0 and none["max_window_dev"] > 0
    assert r["refresh_s"] > 0 and r["amortised_per_window_s"]["5"] > 0
