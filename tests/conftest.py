"""Shared fixtures: real servers started on 127.0.0.1 with free ports, stopped after."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from redis_helpers import RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session (append-only, fsync always)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_session() -> Iterator[dict[str, int]]:
    """One local Ray for the session (fractional CPUs, no dashboard, small object store). Its
    per-node metrics agent exports on a free port, flushed every second; yields that port."""
    import os
    import shutil
    import tempfile

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
    import ray

    from redis_helpers import free_port

    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths are limited
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20,
             _temp_dir=temp, _metrics_export_port=port, log_to_driver=False)
    yield {"metrics_port": port}
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)
