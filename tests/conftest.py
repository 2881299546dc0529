"""Shared fixtures: one real Redis-compatible server per test run, and local clusters of real processes."""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Iterator

import pytest
import redis

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fovea import codegen  # noqa: E402

codegen.require()

from fovea.cluster import Cluster  # noqa: E402
from fovea.redis_server import RedisServer  # noqa: E402


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), appendonly=False).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A clean database on the shared server."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    client.close()
    return redis_server.url


@pytest.fixture
def cluster(tmp_path: pathlib.Path, redis_url: str) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "cluster", redis_url=redis_url)
    yield c
    c.stop()
