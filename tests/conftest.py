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


@pytest.fixture(scope="session")
def serve_api(ray_session: dict[str, int], redis_server: RedisServer,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """One Ray Serve instance for the session: pipeline.api.app's app on 127.0.0.1 (a free port)
    over the real engine with the tiny model and the session's Redis. Yields its base URL, the
    Ray metrics export port, the Redis URL and two API keys (two tenants). Shut down after the
    session's tests."""
    import time

    import requests
    from ray import serve

    from pipeline.api.app import build_app
    from redis_helpers import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # its own actor names (other tests' engines differ); the operator allows the test sources
    # (lavfi graphs, files under pytest's temp dir, servers on 127.0.0.1) a default engine refuses
    config = {"model": "tiny", "device": "cpu", "redis_url": redis_server.url, "name": "httptest",
              "torch_threads": 1, "allow_sources": "file,lavfi,loopback",
              "file_roots": str(tmp_path_factory.getbasetemp()), "source_hosts": "127.0.0.1",
              # push streams: ICE host candidates on loopback only (every packet stays on this machine)
              "webrtc_addresses": "127.0.0.1", "push_grace_s": 8.0, "max_push_streams_per_key": 3}
    keys = ["test-key-alpha-0123456789", "test-key-bravo-0123456789"]
    serve.run(build_app(config, gate={"api_keys": keys, "requests_per_s": 1000.0, "request_burst": 1000}),
              name="omnizip", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:  # the replica is up; wait for the engine behind it too
        try:
            if requests.get(url + "/healthz", timeout=10).status_code == 200:
                break
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}/healthz not 200 within 120 s")
        time.sleep(0.5)
    from pipeline.core.config import ServiceConfig
    from pipeline.engine.runtime import ActorNames
    yield {"url": url, "metrics_port": ray_session["metrics_port"], "redis_url": redis_server.url,
           "service": ActorNames.of(ServiceConfig.coerce(config)).prefix, "config": config, "key": keys[0],
           "other_key": keys[1]}
    serve.shutdown()
    from pipeline.engine.service import shutdown_engine
    shutdown_engine(config)  # the engine stops itself once its replicas are gone; this makes sure
