"""Real services for the service tests: redis-server processes, cache servers running
in a background event loop, throwaway TLS certificates (openssl), and KV samples."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import redis
from prometheus_client.parser import text_string_to_metric_families

from minicache_server.service.server import CacheServer, start_server
from minicache_server.settings import ServerSettings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisProcess:
    """A redis-server on a fixed free port, without persistence; stop and start again
    on the same port to play an outage."""

    def __init__(self, workdir: Path, password: str = "") -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (Debian package redis-server)")
        self.binary = binary
        self.workdir = workdir
        self.password = password
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, password=self.password or None, socket_timeout=5
        )

    def start(self) -> RedisProcess:
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
        ]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return self
            except redis.RedisError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not start within 10 s")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


class ServerThread:
    """A cache server on its own asyncio loop in a daemon thread."""

    def __init__(self, settings: ServerSettings) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: CacheServer = self.call(start_server(settings))
        self.port = self.server.port
        self.address = f"127.0.0.1:{self.port}"

    @property
    def store(self):
        return self.server.store

    def call(self, coroutine, timeout: float = 30):
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self, grace_s: float = 0) -> None:
        try:
            self.call(self.server.stop(grace_s))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)


def settings_for(**overrides) -> ServerSettings:
    base = ServerSettings(listen="127.0.0.1:0", metrics_listen="", insecure=True, log_format="text")
    return replace(base, **overrides)


def make_certificates(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    )
    (directory / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
        )
        extra = ["-extfile", "server.ext"] if name == "server" else []
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            f"{name}.pem",
            *extra,
        )
    return {
        name: directory / name
        for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")
    }


def kv_layers(
    num_layers: int = 6,
    tokens: int = 64,
    kv_heads: int = 2,
    head_dim: int = 16,
    dtype=np.float16,
    seed: int = 0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random KV, `[kv_heads, tokens, head_dim]` per layer, with a shared component so
    adjacent layers merge with some similarity (like real KV, unlike pure noise)."""
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal((kv_heads, tokens, head_dim))
    layers = []
    for _ in range(num_layers):
        keys = shared + 0.5 * rng.standard_normal(shared.shape)
        values = rng.standard_normal(shared.shape)
        layers.append((keys.astype(dtype), values.astype(dtype)))
    return layers


def scrape_tier_bytes(metrics_port: int) -> dict[str, float]:
    """`minicache_tier_bytes` by tier, from one GET /metrics parsed by prometheus-client."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        sample.labels["tier"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "minicache_tier_bytes"
        for sample in family.samples
    }
