"""Fixtures shared by every test folder: a real redis-server, a real local Redis
Cluster. The service tests' helpers (tests/service/service_fixtures.py: cache servers on
loopback, Redis) and the local Redis Cluster (deploy/local/redis_cluster.py, which the
local cluster runner uses too) are importable from every folder as `service_fixtures`
and `redis_cluster`."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "service"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy" / "local"))

from redis_cluster import RedisCluster
from service_fixtures import RedisProcess


def require_redis(*binaries: str) -> None:
    """Fail (never skip) the test when a Redis binary is missing."""
    missing = [binary for binary in binaries if shutil.which(binary) is None]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed: run deploy/local/setup.sh (or apt-get "
            "install redis-server); CI installs it, so these tests are never skipped"
        )


@pytest.fixture
def redis_process(tmp_path: Path) -> Iterator[RedisProcess]:
    """A started redis-server without persistence, on a free port, killed at teardown."""
    require_redis("redis-server")
    process = RedisProcess(tmp_path).start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A Redis Cluster of 3 masters without replicas, shared by one test module (give
    each test its own key prefix); every node killed at teardown."""
    require_redis("redis-server", "redis-cli")
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"), masters=3).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def make_redis_cluster(tmp_path: Path) -> Iterator[Callable[..., RedisCluster]]:
    """Factory: `make_redis_cluster(**options)` starts a `RedisCluster(directory,
    **options)` (replicas, TLS, users); every cluster it started is killed at teardown."""
    require_redis("redis-server", "redis-cli")
    started: list[RedisCluster] = []

    def start(**options) -> RedisCluster:
        cluster = RedisCluster(tmp_path / f"redis-cluster-{len(started)}", **options)
        started.append(cluster)
        return cluster.start()

    try:
        yield start
    finally:
        for cluster in started:
            cluster.stop()
