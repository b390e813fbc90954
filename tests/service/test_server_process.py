"""`minicache-server` as a process: start-up checks, health, metrics, SIGTERM drain."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from service_fixtures import free_port, kv_layers

from minicache_client import CacheClient, ClientConfig
from minicache_client.policy import load_policy
from minicache_client.proto import cache_service_pb2 as pb
from minicache_client.proto import cache_service_pb2_grpc as pb_grpc
from minicache_client.sequence_encoder import SequenceEncoder

# The console script installed beside this interpreter (the venv's bin/).
SERVER = str(Path(sys.executable).with_name("minicache-server"))


def _start(env_overrides: dict[str, str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINICACHE_")}
    env.update(env_overrides)
    return subprocess.Popen(
        [SERVER], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _health(address: str) -> str:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
        return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


def _wait_serving(address: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited early: {process.stderr.read()}")
        try:
            if _health(address) == "SERVING":
                return
        except grpc.RpcError:
            time.sleep(0.1)
    pytest.fail("server did not become SERVING within 30 s")


@contextlib.contextmanager
def _serving(address: str, env_overrides: dict[str, str]) -> Iterator[subprocess.Popen]:
    """A server process serving at `address`; at the end of the block SIGTERM, which it
    must answer with a clean exit within 15 s (killed otherwise, or on an error)."""
    process = _start({"MINICACHE_LISTEN": address, **env_overrides})
    try:
        _wait_serving(address, process)
        yield process
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _log_records(process: subprocess.Popen) -> list[dict]:
    """The JSON log lines the process wrote on stderr."""
    return [json.loads(line) for line in process.stderr.read().splitlines() if line[:1] == "{"]


def _scrape(metrics_port: int) -> dict[tuple[str, tuple], float]:
    """The samples of one scrape: (name, sorted labels) -> value."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_refuses_to_start_without_security_unless_insecure() -> None:
    process = _start({"MINICACHE_LISTEN": f"127.0.0.1:{free_port()}"})
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 2
    assert "MINICACHE_INSECURE" in stderr


def test_bad_setting_names_its_variable() -> None:
    process = _start({"MINICACHE_INSECURE": "1", "MINICACHE_DEVICE_BUDGET_BYTES": "lots"})
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 2
    assert "MINICACHE_DEVICE_BUDGET_BYTES" in stderr


def test_serves_health_metrics_and_drains_on_sigterm() -> None:
    port, metrics_port = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    settings = {
        "MINICACHE_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
        "MINICACHE_INSECURE": "1",
        "MINICACHE_GRACE_S": "2",
    }
    with _serving(address, settings) as process:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.CacheServiceStub(channel)
            stats = stub.Stats(pb.StatsRequest(), timeout=5)
            assert stats.sequences == 0
            with pytest.raises(grpc.RpcError) as missing:
                stub.Lookup(
                    pb.LookupRequest(sequence=pb.SequenceRef(model_id="m", sequence_id="s")),
                    timeout=5,
                )
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        requests = "minicache_requests_total"
        not_found = (requests, (("code", "NOT_FOUND"), ("method", "Lookup")))
        # A refusal is counted once its status went out, which can trail the client.
        deadline = time.monotonic() + 5
        while not_found not in (samples := _scrape(metrics_port)):
            assert time.monotonic() < deadline, "Lookup's NOT_FOUND never counted"
            time.sleep(0.05)
        assert samples[(requests, (("code", "OK"), ("method", "Stats")))] == 1
        assert samples[not_found] == 1
        assert samples[("minicache_misses_total", (("reason", "unknown_sequence"),))] == 1
        assert samples[("minicache_request_seconds_count", (("method", "Stats"),))] == 1
        assert samples[("minicache_sequences", ())] == 0
    records = _log_records(process)
    messages = [record["message"] for record in records]
    assert any("INSECURE MODE" in message for message in messages)
    assert "shutting down" in messages and "stopped" in messages
    listening = next(r for r in records if r["message"] == "cache server listening")
    assert listening["port"] == port and listening["tls"] is False


def test_plaintext_health_port_serves_health_only(make_server, certificates) -> None:
    """For Kubernetes' native gRPC probe, which cannot speak TLS."""
    server = make_server(
        tls_cert=str(certificates["server.pem"]),
        tls_key=str(certificates["server.key"]),
        tokens="a-token-of-sixteen-chars=tenant-a",
        insecure=False,
        health_listen="127.0.0.1:0",
    )
    health_address = f"127.0.0.1:{server.server.health_port}"
    assert _health(health_address) == "SERVING"
    with grpc.insecure_channel(health_address) as channel, pytest.raises(grpc.RpcError) as refused:
        pb_grpc.CacheServiceStub(channel).Stats(pb.StatsRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with pytest.raises(grpc.RpcError):  # the TLS port stays TLS-only
        _health(server.address)


def test_one_work_thread_serves_concurrent_puts_and_prefetches() -> None:
    # Every encode, restore and entry coding of the process shares MINICACHE_WORK_THREADS
    # threads: with one, concurrent calls of a transform policy queue on it and all
    # complete, restoring what the engine restores offline.
    address = f"127.0.0.1:{free_port()}"
    layers = kv_layers(30, 120, 3, 64, seed=7)
    offline = SequenceEncoder(
        load_policy("default"), num_layers=30, kv_heads=3, head_dim=64, dtype="float16"
    )
    for layer, (keys, values) in enumerate(layers):
        offline.put_layer(layer, keys, values, seal=True)
    with _serving(address, {"MINICACHE_INSECURE": "1", "MINICACHE_WORK_THREADS": "1"}) as process:
        config = ClientConfig(target=address, insecure=True, timeout_s=120)
        with CacheClient(config) as client, ThreadPoolExecutor(4) as pool:
            names = [f"s{index}" for index in range(4)]
            puts = [
                pool.submit(client.put, "m", name, layers, dtype="float16", policy="default")
                for name in names
            ]
            assert [put.result().tokens for put in puts] == [120] * 4
            prefetches = [
                pool.submit(lambda n=name: list(client.prefetch("m", n))) for name in names
            ]
            for prefetch in prefetches:
                for layer, keys, values in prefetch.result():
                    want_keys, want_values = offline.restore_layer(layer, 0, 120, "float16")
                    np.testing.assert_array_equal(keys, want_keys)
                    np.testing.assert_array_equal(values, want_values)
    records = _log_records(process)
    assert {"message": "work threads", "threads": 1}.items() <= next(
        r for r in records if r["message"] == "work threads"
    ).items()
