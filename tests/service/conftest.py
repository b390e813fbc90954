"""Fixtures of the service tests: real cache servers on loopback, throwaway TLS
certificates (`redis_process` is in tests/conftest.py). Every server a fixture starts
is stopped at teardown."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from service_fixtures import ServerThread, make_certificates, settings_for


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    """A default insecure server (`settings_for()`) shared by one test module: give each
    test its own sequence ids."""
    running = ServerThread(settings_for())
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def make_server() -> Iterator[Callable[..., ServerThread]]:
    """Factory: `make_server(**overrides)` starts a server with `settings_for(**overrides)`;
    every server it started is stopped when the test ends."""
    started: list[ServerThread] = []

    def start(**overrides) -> ServerThread:
        running = ServerThread(settings_for(**overrides))
        started.append(running)
        return running

    try:
        yield start
    finally:
        for running in reversed(started):
            running.stop()


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """CA, server (localhost, 127.0.0.1) and client certificates made with openssl:
    keys "ca.pem", "server.pem", "server.key", "client.pem", "client.key"."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not installed: run deploy/local/setup.sh")
    return make_certificates(tmp_path_factory.mktemp("certificates"))
