"""pytest fixtures: a real ``redis-server`` (and a 3-master Redis Cluster) on 127.0.0.1.

Without ``redis-server`` on PATH the fixtures fail with the install command,
so a CI that forgot it goes red; ``KVTIER_SKIP_REDIS=1`` turns that into a skip.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from kvtier.testing.redis_proc import (RedisClusterProcess, RedisNotInstalled, RedisProcess,
                                   redis_binary)


def require_redis(*binaries: str) -> None:
    """Fail (or skip, with KVTIER_SKIP_REDIS=1) unless the Redis binaries are on PATH."""
    for name in binaries or ("redis-server",):
        try:
            redis_binary(name)
        except RedisNotInstalled as exc:
            if os.environ.get("KVTIER_SKIP_REDIS") == "1":
                pytest.skip(f"{exc} (KVTIER_SKIP_REDIS=1)")
            pytest.fail(f"{exc}; or set KVTIER_SKIP_REDIS=1 to skip the Redis tests",
                        pytrace=False)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    """A fresh, empty redis-server for one test: ``.url``, ``.port``, ``.stop()``, ``.start()``."""
    require_redis()
    server = RedisProcess(tmp_path / "redis")
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcess]:
    """A Redis Cluster of 3 masters shared by a module's tests: ``.url``, ``.nodes``."""
    require_redis("redis-server", "redis-cli")
    cluster = RedisClusterProcess(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
