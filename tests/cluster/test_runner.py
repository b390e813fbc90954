"""The local cluster runner itself (deploy/local/cluster.py), without the model: a small
cluster comes up healthy with TLS and tokens, describes itself as the contract says,
answers `status` from another process and leaves no process behind on `down`; a node
that cannot start stops everything started before it; a Redis Cluster overflow tier."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
from drill_cluster import Cluster

from minicache_client import CacheClient, UnauthenticatedError
from minicache_client.channel import ClientConfig

pytestmark = pytest.mark.redis

CLUSTER_PY = Path(__file__).resolve().parents[2] / "deploy" / "local" / "cluster.py"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CLUSTER_PY), *args], capture_output=True, text=True, timeout=120
    )


def gone(pids: list[int]) -> bool:
    return not any(
        psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in pids
    )


def test_up_status_down(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, servers=2, workers=0, device_budget="1MiB", net="127.0.86")
    with cluster:
        info = json.loads((tmp_path / "cluster.json").read_text())
        assert {key: info[key] for key in ("ca", "cache_token_file", "worker_token_file")} == {
            key: cluster.describe()[key] for key in ("ca", "cache_token_file", "worker_token_file")
        }
        assert [s["target"] for s in info["cache_servers"]] == [
            "127.0.86.11:50051",
            "127.0.86.12:50051",
        ]
        assert info["redis"]["mode"] == "single"
        assert info["redis"]["url"] == "rediss://127.0.86.2:6379/0"
        pids = [*info["redis"]["pids"], *(s["pid"] for s in info["cache_servers"])]
        status = run_cli("status", "--state-dir", str(tmp_path), "--json")
        assert status.returncode == 0, status.stdout + status.stderr
        assert {n["name"]: n["health"] for n in json.loads(status.stdout)["nodes"]} == {
            "redis": "SERVING",
            "cache-server-0": "SERVING",
            "cache-server-1": "SERVING",
        }
        # TLS with the CA, a token required: the first token is an SDK client's.
        target = info["cache_servers"][0]["target"]
        with CacheClient(cluster.cache_client_config(target)) as cache:
            kv = [(np.ones((2, 600, 64), np.float16), np.zeros((2, 600, 64), np.float16))] * 8
            cache.put("m", "s", kv, dtype="float16", policy="none")
            assert cache.lookup("m", "s").overflow_bytes > 0  # over 1 MiB: into Redis
        anonymous = CacheClient(ClientConfig(target, tls_ca=info["ca"]))
        with anonymous, pytest.raises(UnauthenticatedError):
            anonymous.stats()
    assert gone(pids)
    assert (tmp_path / "logs" / "cache-server-0.log").read_text().count("cache server listening")
    stopped = run_cli("status", "--state-dir", str(tmp_path))
    assert stopped.returncode == 1 and "EXITED" in stopped.stdout


def test_a_node_that_cannot_start_stops_the_others(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, servers=2, workers=0, net="127.0.85", ready_timeout_s=60)
    with socket.socket() as squatter:
        squatter.bind(("127.0.85.12", 50051))  # cache-server-1's address is taken
        squatter.listen()
        with pytest.raises(RuntimeError, match="cache-server-1"):
            cluster.up()
    state = json.loads((tmp_path / "cluster.json").read_text())
    assert state["status"] == "stopped"
    assert gone([node["pid"] for node in state["nodes"] if node["pid"]])


def test_cli_refuses_bad_options(tmp_path: Path) -> None:
    for args, message in (
        (["--servers", "0"], "servers must be 1 to 10"),
        (["--device-budget", "lots"], "not a size"),
        (["--net", "10.0.0"], "127.x.y"),
        (["--policy", "no-such-policy"], "unknown policy"),
    ):
        result = run_cli("up", "--state-dir", str(tmp_path), *args)
        assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "cluster.json").exists()


def test_redis_cluster_overflow(tmp_path: Path) -> None:
    cluster = Cluster(
        tmp_path, servers=1, workers=0, redis="cluster", device_budget="1MiB", net="127.0.84"
    )
    with cluster:
        info = cluster.describe()
        assert info["redis"]["mode"] == "cluster" and len(info["redis"]["nodes"]) == 3
        assert cluster.health() == {
            "redis-0": "SERVING",
            "redis-1": "SERVING",
            "redis-2": "SERVING",
            "cache-server-0": "SERVING",
        }
        rng = np.random.default_rng(1)
        kv = [
            tuple(rng.standard_normal((2, 600, 64)).astype(np.float16) for _ in range(2))
            for _ in range(8)
        ]
        target = info["cache_servers"][0]["target"]
        with CacheClient(cluster.cache_client_config(target)) as cache:
            cache.put("m", "s", kv, dtype="float16", policy="none")
            assert cache.lookup("m", "s").overflow_bytes > 0
            back = cache.prefetch_layers("m", "s")
        assert all(
            np.array_equal(k, sent_k) and np.array_equal(v, sent_v)
            for (k, v), (sent_k, sent_v) in zip(back, kv, strict=True)
        )
        pids = info["redis"]["pids"]
    assert gone(pids)
