"""Fixtures shared by every test folder: a real redis-server. The service tests'
helpers (tests/service/service_fixtures.py: cache servers on loopback, Redis) are
importable from every folder as `service_fixtures`."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "service"))

from service_fixtures import RedisProcess


@pytest.fixture
def redis_process(tmp_path: Path) -> Iterator[RedisProcess]:
    """A started redis-server without persistence, on a free port, killed at teardown."""
    if shutil.which("redis-server") is None:
        pytest.fail(
            "redis-server is not installed: run deploy/local/setup.sh (or apt-get install "
            "redis-server); CI installs it, so these tests are never skipped"
        )
    process = RedisProcess(tmp_path).start()
    try:
        yield process
    finally:
        process.stop()
