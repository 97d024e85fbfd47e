"""A real multi-node Ray cluster on this machine: a head and N worker nodes, each its own
``ray start --block`` process tree with its own ports and temporary directory, every address
127.0.0.1. Killing a worker node's processes (SIGKILL, no goodbye) is a node loss as Ray sees it.

    with LocalCluster(workers=2, worker_cpus=1) as c:
        c.address                       # "127.0.0.1:PORT": ray.init(address=...), --ray-address
        c.node_ids()                    # {"head": id, "worker-0": id, "worker-1": id} (alive ones)
        c.actor_nodes()                 # {actor name: node id} in namespace "omnizip"
        c.kill_worker(0)                # SIGKILL that node's raylet and all its children
        c.add_worker()                  # one more node; returns its index

The head has no CPUs by default (``head_cpus=0``), so only actors that ask for no CPU (or for the
head's own ``node:__internal_head__`` resource) run there and model actors land on worker nodes.
Node-failure detection is tuned (GCS health checks every ``health_period_ms``, ``health_failures``
misses in a row) so a killed node is declared dead in ~2-3 s instead of Ray's default ~15 s, while
a node that is only slow (a crowded machine) keeps Ray's 10-s answer time per check.

Queries (node ids, actors' nodes) run in a short Python subprocess that attaches as a driver, so the
calling process never joins the cluster (a test's own local Ray stays separate).

Run by hand, it keeps a cluster up until Ctrl-C (to try ``omnizip-stream serve --ray-address``):

    python bench/local_cluster.py up --workers 2 --worker-cpus 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LocalCluster", "free_port"]

HOST = "127.0.0.1"
WORKER_PORTS = 40  # worker processes a node may run at once (each takes one port of its range)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _port_range(n: int, taken: set[int]) -> int:
    """The first of ``n`` consecutive ports none of which is bound now nor in ``taken``."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((HOST, 0))
            base = s.getsockname()[1]
        if base + n > 65000 or any(p in taken for p in range(base, base + n)):
            continue
        ok = True
        for p in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind((HOST, p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError(f"no {n} consecutive free ports found")


@dataclass
class _Node:
    name: str
    proc: subprocess.Popen
    temp: str
    ports: dict[str, int]
    log: Any
    role: list[str]
    attempts: int = 1
    killed: bool = False
    seen: set = field(default_factory=set)  # every (pid, start time) found in its tree so far


class LocalCluster:
    """A head and ``workers`` worker nodes, each a ``ray start --block`` process tree on 127.0.0.1."""

    def __init__(self, workers: int = 2, head_cpus: float = 0, worker_cpus: float = 1,
                 object_store_mb: int = 80, env: Mapping[str, str] | None = None,
                 health_period_ms: int = 500, health_failures: int = 4, health_timeout_ms: int = 10000,
                 start_timeout_s: float = 120.0) -> None:
        self.n_workers, self.head_cpus, self.worker_cpus = workers, head_cpus, worker_cpus
        self.object_store = int(object_store_mb) * 2**20
        self.start_timeout_s = start_timeout_s
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                    # the GCS checks each raylet every period; `failures` failed checks in a row and
                    # the node is dead. A killed raylet refuses at once: dead in ~period x failures
                    # (2 s). A live one slowed down by a crowded machine has `timeout` to answer each
                    # check (Ray's default 10 s), so it is not declared dead for being slow
                    "RAY_health_check_initial_delay_ms": "1000",
                    "RAY_health_check_period_ms": str(health_period_ms),
                    "RAY_health_check_timeout_ms": str(health_timeout_ms),
                    "RAY_health_check_failure_threshold": str(health_failures),
                    **(env or {})}
        self.env.pop("RAY_ADDRESS", None)
        self.root = tempfile.mkdtemp(prefix="rlc", dir="/tmp")  # short: Ray's socket paths are limited
        self.head: _Node | None = None
        self.workers: list[_Node] = []
        self._taken: set[int] = set()
        self._port = 0

    # ---- life -------------------------------------------------------------------------------------
    def __enter__(self) -> "LocalCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def address(self) -> str:
        """The head's GCS address, host:port (``ray.init(address=...)``, ``--ray-address``)."""
        return f"{HOST}:{self._port}"

    def start(self) -> "LocalCluster":
        """Start the head, then the worker nodes (at once), and wait until Ray counts them all alive."""
        self._port = self._take(1)
        self.head = self._spawn("head", ["--head", "--port", str(self._port), "--include-dashboard=false",
                                         "--dashboard-port", str(self._take(1)),  # its API server runs anyway
                                         "--num-cpus", _num(self.head_cpus),
                                         "--ray-client-server-port", str(self._take(1))])
        self._wait_alive(1)
        for _ in range(self.n_workers):
            self.workers.append(self._spawn_worker())
        self._wait_alive(1 + len(self.workers))
        return self

    def add_worker(self, num_cpus: float | None = None, timeout_s: float | None = None) -> int:
        """One more worker node (``num_cpus``: the others' by default); its index once it is alive."""
        self.workers.append(self._spawn_worker(num_cpus))
        self._wait_alive(1 + sum(not w.killed for w in self.workers), timeout_s)
        return len(self.workers) - 1

    def kill_worker(self, i: int) -> float:
        """SIGKILL every process of worker node ``i`` (its ``ray start``, raylet, agents, workers; read from /proc):
        frozen first so none of them can tell the others; returns the wall time of the kill."""
        node = self.workers[i]
        procs = self._tree(node)
        _signal(procs, signal.SIGSTOP)
        t = time.time()
        _signal(procs, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.proc.wait(timeout=10)
        _wait_gone(procs, 10)
        node.killed = True
        return t

    def stop(self) -> None:
        """Every process of every node gone (SIGTERM, then SIGKILL after a grace period), the
        temporary directories removed."""
        nodes = [w for w in self.workers if not w.killed] + ([self.head] if self.head else [])
        procs: list[Proc] = []
        for n in nodes:
            procs += self._tree(n)
        procs += [p for p in _by_cmdline(self.root) if p not in procs]
        _signal(procs, signal.SIGTERM)
        alive = _wait_gone(procs, 5)  # a disposable cluster: a short grace, then SIGKILL
        left = alive + [p for p in _by_cmdline(self.root) if p not in alive]
        _signal(left, signal.SIGKILL)
        _wait_gone(left, 10)
        for n in nodes:  # our own children: reaped
            with contextlib.suppress(subprocess.TimeoutExpired):
                n.proc.wait(timeout=5)
        for n in nodes + [w for w in self.workers if w.killed]:
            with contextlib.suppress(Exception):
                n.log.close()
            n.killed = True
        self.head, self.workers = None, []
        shutil.rmtree(self.root, ignore_errors=True)

    # ---- questions --------------------------------------------------------------------------------
    def node_ids(self, timeout_s: float = 60.0) -> dict[str, str]:
        """The alive nodes' Ray ids: {"head": id, "worker-0": id, ...} (a killed node is absent)."""
        by_port = self.query("nodes", timeout_s=timeout_s)
        out = {}
        for n in ([self.head] if self.head else []) + self.workers:
            nid = by_port.get(str(n.ports["node-manager"]))
            if nid is not None:
                out[n.name] = nid
        return out

    def actor_nodes(self, namespace: str = "omnizip", timeout_s: float = 60.0) -> dict[str, str | None]:
        """{actor name: node id} of the named actors alive in ``namespace``; None for an actor that
        did not answer within a few seconds (restarting, or pending placement)."""
        return self.query("actors", namespace, timeout_s=timeout_s)

    def query(self, what: str, *args: str, timeout_s: float = 60.0) -> Any:
        """This module's ``query`` command run as a driver subprocess; its JSON answer."""
        self._remember()
        r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "query", self.address, what, *args],
                           env=self.env, capture_output=True, text=True, timeout=timeout_s)
        if r.returncode != 0:
            raise RuntimeError(f"query {what} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    # ---- helpers ----------------------------------------------------------------------------------
    def _take(self, n: int) -> int:
        base = _port_range(n, self._taken)
        self._taken.update(range(base, base + n))
        return base

    def _spawn_worker(self, num_cpus: float | None = None) -> _Node:
        cpus = self.worker_cpus if num_cpus is None else num_cpus
        return self._spawn(f"worker-{len(self.workers)}", ["--address", self.address, "--num-cpus", _num(cpus)])

    def _spawn(self, name: str, role: list[str]) -> _Node:
        temp = tempfile.mkdtemp(prefix=name[0] + name[-1], dir=self.root)
        ports = {"node-manager": self._take(1), "object-manager": self._take(1),
                 "dashboard-agent-listen": self._take(1), "dashboard-agent-grpc": self._take(1),
                 "runtime-env-agent": self._take(1), "metrics-export": self._take(1),
                 "min-worker": self._take(WORKER_PORTS)}
        cmd = [shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray", "start", *role, "--block",
               "--node-ip-address", HOST, "--temp-dir", temp,
               "--object-store-memory", str(self.object_store), "--disable-usage-stats",
               "--node-manager-port", str(ports["node-manager"]),
               "--object-manager-port", str(ports["object-manager"]),
               "--dashboard-agent-listen-port", str(ports["dashboard-agent-listen"]),
               "--dashboard-agent-grpc-port", str(ports["dashboard-agent-grpc"]),
               "--runtime-env-agent-port", str(ports["runtime-env-agent"]),
               "--metrics-export-port", str(ports["metrics-export"]),
               "--min-worker-port", str(ports["min-worker"]),
               "--max-worker-port", str(ports["min-worker"] + WORKER_PORTS - 1)]
        log = open(os.path.join(self.root, f"{name}.log"), "ab")
        # its own session, so a Ctrl-C at the terminal reaches the caller only
        proc = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        return _Node(name, proc, temp, ports, log, role)

    def _tree(self, node: _Node) -> list[Proc]:
        """The node's processes alive now: its ``ray start`` and every descendant, any process whose
        command line names the node's temporary directory, and any seen in its tree before (Ray's
        agents and workers rename themselves, and an orphan leaves the tree)."""
        now = set(_descendants(node.proc.pid)) | set(_by_cmdline(node.temp))
        node.seen |= now
        return [p for p in node.seen if _alive(p)]

    def _remember(self) -> None:
        for n in [self.head, *self.workers]:
            if n is not None and not n.killed:
                self._tree(n)

    def _log_tail(self, node: _Node, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            node.log.flush()
            with open(os.path.join(self.root, f"{node.name}.log"), errors="replace") as f:
                return " | ".join(ln.strip() for ln in f.read().splitlines()[-lines:] if ln.strip())
        return "(no log)"

    def _wait_alive(self, n: int, timeout_s: float | None = None) -> None:
        """Until Ray counts ``n`` alive nodes. A node whose ``ray start`` exits on the way (Ray gives
        a raylet 30 s to register, which a crowded machine can miss) is started again, once;
        RuntimeError with its log's last lines when it fails twice."""
        timeout_s = timeout_s or self.start_timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            for node in [self.head, *self.workers]:
                if node is not None and not node.killed and node.proc.poll() is not None:
                    if node.attempts >= 2:
                        raise RuntimeError(f"{node.name}: ray start exited with {node.proc.returncode}: "
                                           + self._log_tail(node))
                    self._restart(node)
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{n} alive nodes not seen within {timeout_s:.0f} s")
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                if self.query("wait", str(n), str(min(10.0, max(1.0, left))), timeout_s=left + 30) >= n:
                    self._remember()
                    return
            time.sleep(0.5)

    def _restart(self, node: _Node) -> None:
        """``node`` again, in a fresh temporary directory with fresh ports, after its processes."""
        procs = self._tree(node)
        _signal(procs, signal.SIGKILL)
        _wait_gone(procs, 10)
        with contextlib.suppress(Exception):
            node.log.write(f"\n---- {node.name} exited with {node.proc.returncode} while starting: again ----\n"
                           .encode())
            node.log.close()
        shutil.rmtree(node.temp, ignore_errors=True)
        fresh = self._spawn(node.name, node.role)
        fresh.attempts = node.attempts + 1
        if node is self.head:
            self.head = fresh
        else:
            self.workers[self.workers.index(node)] = fresh


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# ---- processes, from /proc (Linux; no dependency) ------------------------------------------------
#: a process as (pid, start time in clock ticks since boot): a reused pid is another process
Proc = tuple[int, int]


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a process, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": the name may hold spaces
        return rest[0], int(rest[1]), int(rest[19])
    except (OSError, IndexError, ValueError):
        return None


def _procs() -> dict[Proc, int]:
    """Every live process -> its parent pid."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _stat(int(d))
            if st is not None and st[0] not in ("Z", "X"):
                out[(int(d), st[2])] = st[1]
    return out


def _alive(p: Proc) -> bool:
    st = _stat(p[0])
    return st is not None and st[0] not in ("Z", "X") and st[2] == p[1]  # a zombie has ended


def _descendants(pid: int) -> list[Proc]:
    """``pid`` (when alive) and every live process below it."""
    procs = _procs()
    children: dict[int, list[Proc]] = {}
    for p, ppid in procs.items():
        children.setdefault(ppid, []).append(p)
    out = [p for p in procs if p[0] == pid]
    todo = list(out)
    while todo:
        for c in children.get(todo.pop()[0], []):
            out.append(c)
            todo.append(c)
    return out


def _by_cmdline(fragment: str) -> list[Proc]:
    """Live processes whose command line holds ``fragment``."""
    out = []
    for p in _procs():
        try:
            with open(f"/proc/{p[0]}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if p[0] != os.getpid() and any(fragment in a for a in args):
            out.append(p)
    return out


def _signal(procs: list[Proc], sig: int) -> None:
    for p in procs:
        if _alive(p):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p[0], sig)


def _wait_gone(procs: list[Proc], timeout_s: float) -> list[Proc]:
    """Wait until none of ``procs`` is alive; the ones still alive after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [p for p in procs if _alive(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


# ---- the driver side of queries (run as a subprocess) ------------------------------------------------
def _query(address: str, what: str, args: list[str]) -> Any:
    import logging

    import ray

    ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False,
             namespace=args[0] if what == "actors" else None)
    try:
        if what == "wait":  # until n nodes are alive (or the time is up): how many are
            n, deadline = int(args[0]), time.monotonic() + float(args[1])
            while True:
                alive = sum(1 for x in ray.nodes() if x["Alive"])
                if alive >= n or time.monotonic() > deadline:
                    return alive
                time.sleep(0.25)
        if what == "nodes":  # node-manager port -> node id, alive nodes only
            return {str(x["NodeManagerPort"]): x["NodeID"] for x in ray.nodes() if x["Alive"]}
        if what == "actors":
            names = sorted(ray.util.list_named_actors())
            refs = {}
            for name in names:
                with contextlib.suppress(Exception):
                    h = ray.get_actor(name)
                    refs[name] = h.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id())
            out: dict[str, str | None] = {name: None for name in names}
            deadline = time.monotonic() + 5.0
            pending = list(refs.values())
            while pending and time.monotonic() < deadline:
                _, pending = ray.wait(pending, num_returns=len(pending), timeout=deadline - time.monotonic())
            for name, ref in refs.items():
                if ref not in pending:
                    with contextlib.suppress(Exception):
                        out[name] = ray.get(ref, timeout=1)
            return out
        raise SystemExit(f"unknown query {what!r}")
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a cluster and keep it until Ctrl-C")
    up.add_argument("--workers", type=int, default=2)
    up.add_argument("--worker-cpus", type=float, default=1)
    up.add_argument("--head-cpus", type=float, default=0)
    q = sub.add_parser("query", help="(internal) answer one question as a driver; JSON on stdout")
    q.add_argument("address")
    q.add_argument("what", choices=["wait", "nodes", "actors"])
    q.add_argument("args", nargs="*")
    a = ap.parse_args(argv)
    if a.cmd == "query":
        print(json.dumps(_query(a.address, a.what, a.args)), flush=True)
        return 0
    with LocalCluster(a.workers, head_cpus=a.head_cpus, worker_cpus=a.worker_cpus) as c:
        print(f"cluster up: --ray-address {c.address}  nodes {json.dumps(c.node_ids())}", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main())
