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
