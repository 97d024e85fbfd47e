"""Multi-node for real, on this machine: a Ray head and two worker nodes, each its own `ray start`
process tree (bench/local_cluster.py), and `omnizip-stream serve --ray-address` attached to it as a
user would run it. Streams spread over both worker nodes; one node is killed (SIGKILL of every one
of its processes) mid-stream: every stream goes on, a file loses no window, and the streams that
were on the lost node have windows in their context again within 15 s. Stopping `serve` (SIGTERM)
leaves the cluster up with no actor of ours and no Serve application in it.

This module talks to its cluster only through subprocesses and HTTP: the pytest process never
joins it (the session's own local Ray, tests/conftest.py, is another cluster).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from redis_helpers import RedisServer, free_port
from serve_helpers import Api

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from local_cluster import LocalCluster  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

WINDOW_S = 2.0
FILE_WINDOWS = 20  # 40 s in real time: the node is lost while every stream runs
RECOVERY_LIMIT_S = 90.0  # only a hang: the recovery time is a figure printed (README), not asserted
MODEL_PARTS = ("-encoder-", "-decoder-")


def clip(directory: Path, seconds: int, tone: int) -> Path:
    path = directory / f"clip{seconds}-{tone}.mp4"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    f"testsrc2=size=160x120:rate=10:duration={seconds}", "-f", "lavfi", "-i",
                    f"sine=f={tone}:sample_rate=16000:duration={seconds}", "-c:v", "libx264", "-preset", "ultrafast",
                    "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(path)], check=True, timeout=120)
    return path


def live(tone: int) -> str:
    return f"lavfi:testsrc2=size=160x120:rate=10[out0];sine=f={tone}:sample_rate=16000[out1]"


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMNIZIP_", "RAY_"))}
    return {**env, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", **extra}


def part(name: str) -> str | None:
    return next((p for p in ("-encoder-", "-decoder-", "-ingest-", "-service", "-store") if p in name), None)


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("multinode")
    for tone in (440, 660):
        clip(d, int(FILE_WINDOWS * WINDOW_S), tone)
    return d


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    t = time.monotonic()
    with LocalCluster(workers=2, worker_cpus=1) as c:
        print(f"\ncluster: head + 2 worker nodes up in {time.monotonic() - t:.1f} s at {c.address}")
        yield c


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("mn-redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def served(cluster: LocalCluster, redis: RedisServer, media: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`omnizip-stream serve --ray-address` as a subprocess: two encoder workers and two decoders
    (SPREAD: one of each per worker node), the test's Redis, file and lavfi sources allowed.
    Small CPU requests, so one worker node can host the whole engine after the other is lost."""
    port = free_port()
    logs = tmp_path_factory.mktemp("mn-serve")
    env = base_env(OMNIZIP_ENCODER_WORKERS="2", OMNIZIP_DECODER_ACTORS="2", OMNIZIP_ALLOW_SOURCES="file,lavfi",
                   OMNIZIP_FILE_ROOTS=str(media), OMNIZIP_REDIS_URL=redis.url, OMNIZIP_NAME="multinode",
                   OMNIZIP_TORCH_THREADS="1", OMNIZIP_CPUS_PER_ACTOR="0.15", OMNIZIP_INGEST_CPUS="0.05")
    out, err = open(logs / "stdout", "w+"), open(logs / "stderr", "w+")
    t = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli.main", "serve", "--ray-address", cluster.address,
                             "--port", str(port), "--json"], cwd=ROOT, env=env, stdout=out, stderr=err, text=True)
    info: dict[str, Any] = {"proc": proc, "stderr": logs / "stderr"}
    try:
        while not (logs / "stdout").read_text().strip():
            assert proc.poll() is None, f"serve exited {proc.returncode}: {(logs / 'stderr').read_text()[-3000:]}"
            assert time.monotonic() - t < 180, "serve did not listen within 180 s"
            time.sleep(0.25)
        info.update(json.loads((logs / "stdout").read_text().splitlines()[0]))
        assert info["ray_address"] == cluster.address
        deadline = time.monotonic() + 180
        while True:  # the engine behind the replica is up
            try:
                if requests.get(info["url"] + "/healthz", timeout=10).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "healthz not 200 within 180 s"
            time.sleep(0.5)
        print(f"serve attached and healthy in {time.monotonic() - t:.1f} s")
        yield info
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
        out.close()
        err.close()


class Timeline(threading.Thread):
    """One stream's status polled over HTTP until stopped: (wall time, windows in context, status)."""

    def __init__(self, url: str, sid: str) -> None:
        super().__init__(daemon=True)
        self.url, self.sid = url, sid
        self.points: list[tuple[float, int, str]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        api = Api(self.url)
        while not self.stop.is_set():
            try:
                st = api.get(f"/v1/streams/{self.sid}", timeout=20)
                if st.status_code == 200:
                    s = st.json()
                    self.points.append((time.time(), int(s["windows"]), s["status"]))
            except requests.RequestException:
                pass
            self.stop.wait(0.25)

    def high(self) -> int:
        return max((w for _, w, _ in self.points), default=0)

    def increases(self) -> list[float]:
        """When the window count first reached each new high (a restarted decoder reports less
        until it has rebuilt the context: not a new window)."""
        out, top = [], -1
        for t, w, _ in list(self.points):
            if w > top:
                if top >= 0:
                    out.append(t)
                top = w
        return out

    def recovery(self, t_kill: float) -> float | None:
        """Seconds from the kill to the end of the longest wait for a window that ended after it:
        the stall the loss caused (a window already in flight may land just after the kill)."""
        inc = self.increases()
        gaps = [(b - a, b) for a, b in zip(inc, inc[1:]) if b > t_kill and a >= t_kill - 3 * WINDOW_S]
        if not gaps:
            return None
        return max(gaps)[1] - t_kill


def stored_indices(api: Api, sid: str) -> list[int]:
    out, after = [], -1
    while True:
        page = api.get(f"/v1/streams/{sid}/windows", params={"after": after, "limit": 500}).json()
        out += [w["index"] for w in page["windows"]]
        if not page["has_more"]:
            return out
        after = page["next_after"]


def diagnosis(api: Api, streams: dict[str, str], lines: dict[str, Timeline], served: dict[str, Any]) -> str:
    out = []
    for name, sid in streams.items():
        try:
            st = api.status(sid)
            st = {k: st.get(k) for k in ("status", "error", "windows", "windows_total", "lag_s", "drops")}
        except Exception as e:  # the API itself is down
            st = repr(e)
        out.append(f"{name}: high {lines[name].high()}, last points {lines[name].points[-3:]}, status {st}")
    return "; ".join(out) + " | serve stderr: " + served["stderr"].read_text()[-4000:]


def until(pred: Any, timeout_s: float, what: str, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = pred()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what} not within {timeout_s} s"
        time.sleep(every)


def test_streams_spread_over_two_nodes_survive_losing_one(served: dict[str, Any], cluster: LocalCluster,
                                                          media: Path) -> None:
    api = Api(served["url"])
    nodes = cluster.node_ids()
    workers = {nodes["worker-0"], nodes["worker-1"]}
    files = sorted(media.glob("clip*.mp4"))
    specs = [{"source": str(f), "realtime": True, "name": f"file-{k}"} for k, f in enumerate(files)]
    specs += [{"source": live(220 + 110 * k), "realtime": True, "name": f"live-{k}"} for k in range(2)]
    streams = {s["name"]: api.create(**s)["id"] for s in specs}
    lines = {name: Timeline(served["url"], sid) for name, sid in streams.items()}
    for tl in lines.values():
        tl.start()
    try:
        until(lambda: all(tl.high() >= 3 for tl in lines.values()), 120, "3 windows in every stream's context")
        placed = cluster.actor_nodes()
        model = {n: nid for n, nid in placed.items() if part(n) in MODEL_PARTS}
        ingest = {n: nid for n, nid in placed.items() if part(n) == "-ingest-"}
        print("placement:", {n: [k for k, v in nodes.items() if v == nid] for n, nid in placed.items()})
        assert len(model) == 4 and len(ingest) == len(streams), placed
        assert {nid for n, nid in model.items() if "-encoder-" in n} == workers, "encoders not on both worker nodes"
        assert {nid for n, nid in model.items() if "-decoder-" in n} == workers, "decoders not on both worker nodes"
        assert set(ingest.values()) <= workers, "an ingest actor off the worker nodes"
        assert all(nid == nodes["head"] for n, nid in placed.items() if part(n) in ("-service", "-store")), placed

        # lose the worker node carrying more ingest actors (file streams first): its streams move
        def load(w: str) -> tuple[int, int]:
            on = [n for n, nid in ingest.items() if nid == nodes[w]]
            return sum(streams[f"file-{k}"] in n for n in on for k in range(len(files))), len(on)
        victim = max(("worker-0", "worker-1"), key=load)
        lost = nodes[victim]
        hit = {name for name, sid in streams.items() if any(sid in n and nid == lost for n, nid in ingest.items())}
        before = {name: tl.high() for name, tl in lines.items()}
        t_kill = cluster.kill_worker(int(victim[-1]))
        print(f"killed {victim} at windows {before}; ingest on it: {sorted(hit)}; model actors on it: "
              f"{sorted(n.split('-', 2)[-1] for n, nid in model.items() if nid == lost)}")

        # every stream goes on: two new windows past the kill, each
        try:
            until(lambda: all(tl.high() >= before[n] + 2 for n, tl in lines.items()), 60,
                  "two new windows in every stream after the node loss")
        except AssertionError as e:
            raise AssertionError(f"{e}: {diagnosis(api, streams, lines, served)}") from None
        rec = {name: tl.recovery(t_kill) for name, tl in lines.items()}
        print("recovery after the node loss (kill -> next window in context), s:",
              {n: None if r is None else round(r, 1) for n, r in rec.items()})
        worst = max(r for r in rec.values() if r is not None)
        print(f"recovery: {worst:.1f} s at worst (limit {RECOVERY_LIMIT_S:.0f} s)")
        assert all(r is not None for r in rec.values()), rec
        assert worst < RECOVERY_LIMIT_S, rec

        # the engine lives on the surviving worker node only, nothing on the lost one
        after = cluster.actor_nodes()
        assert lost not in after.values(), after
        assert {nid for n, nid in after.items() if part(n) in MODEL_PARTS + ("-ingest-",)} <= workers - {lost}

        # files: every window, once, nothing dropped
        for k in range(len(files)):
            sid = streams[f"file-{k}"]
            st = api.wait(sid, lambda s: s["status"] == "ended", 150, "the file's end")
            assert st["windows_total"] == FILE_WINDOWS and st["dropped"] == 0, st
            assert not any(st["drops"].values()), st["drops"]
            assert stored_indices(api, sid) == list(range(FILE_WINDOWS)), sid
        for k in range(2):  # the live streams are still live
            assert api.status(streams[f"live-{k}"])["status"] == "live"
    finally:
        for tl in lines.values():
            tl.stop.set()


def test_sigterm_leaves_the_cluster_without_our_actors_or_app(served: dict[str, Any], cluster: LocalCluster) -> None:
    proc = served["proc"]
    assert proc.poll() is None
    assert cluster.actor_nodes(), "no engine actors to begin with"
    assert any(n.startswith("SERVE_REPLICA::omnizip#") for n in cluster.actor_nodes("serve"))
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=120)
    took = time.monotonic() - t
    err = served["stderr"].read_text()
    assert rc == 0, err[-3000:]
    print(f"serve stopped in {took:.1f} s after SIGTERM")
    assert "head" in cluster.node_ids()  # the cluster stays
    # ray.kill returns before the GCS has dropped the actor's name: allow it a few seconds
    until(lambda: cluster.actor_nodes() == {}, 20, "no actor left in namespace omnizip", every=1)
    until(lambda: cluster.actor_nodes("serve") == {}, 20, "no Serve actor (controller, proxy, replica) left",
          every=1)
