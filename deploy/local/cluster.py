"""The local multi-node runner: docker-compose.yml's topology as plain processes on this
machine, each node on its own loopback address, with TLS and bearer tokens everywhere.

    bash deploy/local/cluster.sh up [--servers 3] [--workers 2] [--redis single|cluster|none]
                                    [--device-budget 64MiB] [--policy NAME] [--foreground]
    bash deploy/local/cluster.sh status     # each node's health (exit 1 unless all serve)
    bash deploy/local/cluster.sh down       # stops every node `up` started

Nodes (NET is `--net`, default 127.0.0; every node listens on its own address only):

    redis            NET.2:6379            TLS only, ACL user `minicache` (as in compose)
    redis-j          NET.2:<free port>     `--redis cluster`: a Redis Cluster of 3 masters
                                           (and `--redis-replicas` each), TLS on client
                                           port, bus and replication, the same ACL user
    cache-server-i   NET.(11+i):50051      metrics NET.(11+i):9464/metrics, i < 10;
                                           plaintext grpc.health.v1 only on :8086 (it
                                           answers NOT_SERVING while the server drains;
                                           the TLS port refuses new calls then)
    worker-i         NET.(21+i):50061      metrics NET.(21+i):9465/metrics, i < 10

Cache servers keep their overflow in Redis under their own key prefix (`minicache-i`);
workers reach every cache server (`MINICACHE_WORKER_CACHE_TARGETS`, sessions sharded by
the SDK's rendezvous hashing). Certificates and tokens come from deploy/certs/generate.sh
(`MINICACHE_CERT_IPS` = the nodes' addresses) in `<state dir>/certs`; each node's log is
`<state dir>/logs/<name>.log`. `up` waits until every node answers grpc.health.v1
SERVING over TLS (Redis: PING), writes `<state dir>/cluster.json` (addresses, pids,
credential files: the contract other tools read), prints the addresses and returns,
leaving the nodes running; `--foreground` keeps it attached and stops everything on
Ctrl-C. Ctrl-C or a node that fails during `up` stops everything started so far.

Each node runs in its own process group (a session of its own), so stopping a node
stops whatever it started too: SIGTERM, then SIGKILL after the node's grace period.
`down` recognises a node by pid and start time, never signals a process that merely
reuses a pid.

The Python API, for tests and load scripts:

    with Cluster(state_dir, servers=3, workers=2, device_budget="8MiB") as cluster:
        info = cluster.describe()          # the cluster.json dict
        cluster.kill("cache-server-1")     # SIGKILL by default, waits for the exit
        cluster.restart("cache-server-1")  # starts it again, waits until it serves

Nodes started by the API die with the thread that started them (PR_SET_PDEATHSIG through
util-linux's setpriv), so a test run that is killed leaves no orphans (Redis Cluster nodes excepted: their class
starts them); `up` from the command line detaches them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
import redis

from minicache_client import CacheClient, CacheError, ClientConfig, WorkerClient
from minicache_client.policy import load_policy
from minicache_client.serving.settings import parse_size

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_STATE_DIR = REPO_ROOT / ".cluster"
GENERATE_CERTS = REPO_ROOT / "deploy" / "certs" / "generate.sh"
BIN_DIR = Path(sys.executable).parent
STATE_FILE = "cluster.json"

REDIS_MODES = ("single", "cluster", "none")
REDIS_CLUSTER_MASTERS = 3
MAX_SERVERS = 10
MAX_WORKERS = 10
REDIS_PORT = 6379
SERVER_PORT, SERVER_METRICS_PORT, SERVER_HEALTH_PORT = 50051, 9464, 8086
WORKER_PORT, WORKER_METRICS_PORT = 50061, 9465
# Host numbers within NET: the layout of the module docstring.
REDIS_HOST, FIRST_SERVER_HOST, FIRST_WORKER_HOST = 2, 11, 21
NET = re.compile(r"^127\.(\d{1,3})\.(\d{1,3})$")
REDIS_USER = "minicache"
# Health probes: one call's deadline, and the pause between rounds.
PROBE_TIMEOUT_S = 2.0
PROBE_INTERVAL_S = 0.5
SERVING = "SERVING"


class ClusterError(RuntimeError):
    """A node could not be started, did not become healthy, or is unknown."""


@dataclass
class Node:
    """One process of the cluster: what it runs, where it listens, and once started its
    pid and start time (psutil's `create_time`, which tells it from a reused pid)."""

    name: str
    role: str  # "redis", "cache-server" or "worker"
    host: str
    port: int
    metrics_port: int | None
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    stop_timeout_s: float
    process: subprocess.Popen | None = field(default=None, repr=False)
    pid: int | None = None
    started_at: float | None = None
    # False for Redis Cluster nodes, which tests/service/redis_cluster.py starts in the
    # runner's own process group: signalled by pid alone.
    own_group: bool = True

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def metrics(self) -> str:
        return f"{self.host}:{self.metrics_port}" if self.metrics_port else ""


@dataclass(frozen=True)
class Credentials:
    """The files generate.sh writes into `<state dir>/certs` that nodes and clients use."""

    directory: Path

    def path(self, name: str) -> str:
        return str(self.directory / name)

    @property
    def ca(self) -> str:
        return self.path("ca.crt")

    @property
    def cache_tokens(self) -> str:
        return self.path("tokens")

    @property
    def worker_tokens(self) -> str:
        return self.path("worker-tokens")


def first_token(tokens_file: str | Path) -> str:
    """The first token of a '<token> <tenant>' file (comments and blank lines skipped):
    an SDK client's tenant (tenant-a) in the files generate.sh writes."""
    for line in Path(tokens_file).read_text().splitlines():
        words = line.split()
        if words and not words[0].startswith("#"):
            return words[0]
    raise ClusterError(f"no token in {tokens_file}")


def _dying_with_parent(argv: list[str]) -> list[str]:
    """`argv` run by util-linux's setpriv, which asks the kernel to SIGKILL it when the
    thread that started it ends (PR_SET_PDEATHSIG, kept across exec). Not a
    `preexec_fn`: Python code between fork and exec runs the at-fork handlers of gRPC,
    which held a child up for a minute while the parent had calls open."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise ClusterError(
            "setpriv (util-linux) is not installed; it makes nodes die with the process "
            "that started them (die_with_parent=False does without)"
        )
    return [setpriv, "--pdeathsig", "KILL", "--", *argv]


def _live_process(pid: int | None, started_at: float | None) -> psutil.Process | None:
    """The process `pid` if it is still the one started at `started_at` and not a
    zombie; None otherwise."""
    if pid is None or started_at is None:
        return None
    try:
        process = psutil.Process(pid)
        if abs(process.create_time() - started_at) > 0.05:
            return None  # the pid was reused by another process
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process
    except psutil.NoSuchProcess:
        return None


def _signal_group(pid: int, sig: int, own_group: bool = True) -> None:
    """Signal the node's process group (its pid: each node leads a session), or only
    the process when it has no group of its own."""
    with contextlib.suppress(ProcessLookupError):
        if own_group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _log_tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def probe(node: dict[str, Any] | Node, credentials: Credentials) -> str:
    """One health check of a node: "SERVING", "NOT_SERVING" (the node answers, e.g. a
    worker still loading its model or a server draining) or "UNREACHABLE"."""
    if isinstance(node, Node):
        role, host, port = node.role, node.host, node.port
    else:
        role, (host, port) = node["role"], node["target"].rsplit(":", 1)
    if role == "redis":
        client = redis.Redis(
            host=host,
            port=int(port),
            ssl=True,
            ssl_ca_certs=credentials.ca,
            username=REDIS_USER,
            password=Path(credentials.path("redis-password")).read_text().strip(),
            socket_timeout=PROBE_TIMEOUT_S,
            socket_connect_timeout=PROBE_TIMEOUT_S,
        )
        try:
            return SERVING if client.ping() else "NOT_SERVING"
        except redis.RedisError:
            return "UNREACHABLE"
        finally:
            client.close()
    # A new channel each time: a channel to a node that was down waits out gRPC's
    # reconnect backoff, which would delay noticing the node back.
    config = ClientConfig(f"{host}:{port}", tls_ca=credentials.ca, timeout_s=PROBE_TIMEOUT_S)
    client_type = WorkerClient if role == "worker" else CacheClient
    try:
        with client_type(config) as client:
            return client.health()
    except (CacheError, grpc.RpcError):
        return "UNREACHABLE"


class Cluster:
    """The local cluster of one state directory (see the module docstring).

    servers: cache servers, 1 to 10. workers: inference workers, 0 to 10.
    redis: "single" (one TLS Redis, the servers' overflow tier), "cluster" (a Redis
        Cluster of 3 masters and `redis_replicas` replicas each, tests/service/
        redis_cluster.py's `RedisCluster`) or "none" (device tier only: a full budget
        refuses writes).
    device_budget: each cache server's MINICACHE_DEVICE_BUDGET_BYTES ("64MiB", bytes).
    policy: None (the services' `default`) or a preset name or policy JSON file: the
        servers' MINICACHE_DEFAULT_POLICY and the workers' MINICACHE_WORKER_DEFAULT_POLICY.
    net: the first three octets of every node's address, "127.x.y".
    grace_s: MINICACHE_GRACE_S of the servers (drain, then as long to write down) and
        MINICACHE_WORKER_GRACE_S of the workers.
    worker_threads: OMP_NUM_THREADS of each worker (torch's threads).
    ready_timeout_s: how long `up` and `restart` wait for health (workers load the
        model first).
    die_with_parent: nodes get SIGKILL when the thread that started them ends (call
        `up` and `restart` from a thread that outlives the cluster; the command line's
        `up` turns it off to leave the cluster running).
    stop_requested: set it (e.g. from a signal handler) to make a waiting `up` or
        `restart` stop what it started and raise KeyboardInterrupt; a signal handler
        that only sets an event never interrupts the stopping itself.
    """

    def __init__(
        self,
        state_dir: str | Path = DEFAULT_STATE_DIR,
        servers: int = 3,
        workers: int = 2,
        redis: str = "single",
        device_budget: str | int = "64MiB",
        policy: str | None = None,
        *,
        net: str = "127.0.0",
        grace_s: float = 10.0,
        worker_threads: int = 1,
        model: str = "smollm2",
        redis_maxmemory: str = "256mb",
        redis_replicas: int = 0,
        ready_timeout_s: float = 600.0,
        die_with_parent: bool = True,
        stop_requested: threading.Event | None = None,
    ) -> None:
        if not isinstance(servers, int) or not 1 <= servers <= MAX_SERVERS:
            raise ValueError(f"servers must be 1 to {MAX_SERVERS}, got {servers!r}")
        if not isinstance(workers, int) or not 0 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers must be 0 to {MAX_WORKERS}, got {workers!r}")
        if redis not in REDIS_MODES:
            raise ValueError(f"redis must be one of {', '.join(REDIS_MODES)}, got {redis!r}")
        budget = str(device_budget)
        if parse_size(budget) <= 0:  # raises ValueError on a malformed size
            raise ValueError(f"device_budget must be > 0, got {device_budget!r}")
        match = NET.match(net)
        if not match or any(int(octet) > 255 for octet in match.groups()):
            raise ValueError(
                f"net must be the first three octets of a loopback address, 127.x.y; got {net!r}"
            )
        if policy is not None:
            load_policy(policy)  # raises ValueError naming the presets
            if Path(policy).exists():
                policy = str(Path(policy).resolve())
        if not grace_s >= 0:
            raise ValueError(f"grace_s must be >= 0, got {grace_s!r}")
        if not isinstance(worker_threads, int) or worker_threads < 1:
            raise ValueError(f"worker_threads must be >= 1, got {worker_threads!r}")
        if redis_replicas not in (0, 1, 2):
            raise ValueError(f"redis_replicas must be 0, 1 or 2, got {redis_replicas!r}")
        if not ready_timeout_s > 0:
            raise ValueError(f"ready_timeout_s must be > 0, got {ready_timeout_s!r}")
        self.state_dir = Path(state_dir).resolve()
        self.credentials = Credentials(self.state_dir / "certs")
        self.log_dir = self.state_dir / "logs"
        self.redis_mode = redis
        self.device_budget = budget
        self.policy = policy
        self.net = net
        self.grace_s = float(grace_s)
        self.worker_threads = worker_threads
        self.model = model
        self.redis_maxmemory = redis_maxmemory
        self.redis_replicas = redis_replicas
        self.redis_cluster: Any = None  # the RedisCluster of mode "cluster", once up
        self.ready_timeout_s = float(ready_timeout_s)
        self.die_with_parent = die_with_parent
        self.stop_requested = stop_requested or threading.Event()
        self.redis_nodes = [self._redis_node()] if redis == "single" else []
        self.servers = [self._server_node(index) for index in range(servers)]
        self.workers = [self._worker_node(index) for index in range(workers)]

    # -- layout -----------------------------------------------------------------------

    @property
    def nodes(self) -> list[Node]:
        return [*self.redis_nodes, *self.servers, *self.workers]

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        known = ", ".join(node.name for node in self.nodes)
        raise ClusterError(f"no node named {name!r} (nodes: {known})")

    def _host(self, number: int) -> str:
        return f"{self.net}.{number}"

    def _base_env(self) -> dict[str, str]:
        # Nothing of the caller's MiniCache settings leaks into a node.
        env = {k: v for k, v in os.environ.items() if not k.startswith("MINICACHE_")}
        env["OMP_NUM_THREADS"] = "1"
        return env

    def _redis_url(self) -> str:
        if self.redis_cluster is not None:
            return self.redis_cluster.url
        if self.redis_mode == "single":
            return f"rediss://{self.redis_nodes[0].target}/0"
        return ""

    def _redis_node(self) -> Node:
        host = self._host(REDIS_HOST)
        data_dir = self.state_dir / "redis"
        c = self.credentials
        argv = [
            shutil.which("redis-server") or "redis-server",
            "--bind", host,
            "--port", "0",
            "--tls-port", str(REDIS_PORT),
            "--tls-cert-file", c.path("redis.crt"),
            "--tls-key-file", c.path("redis.key"),
            "--tls-ca-cert-file", c.ca,
            "--tls-auth-clients", "no",
            "--aclfile", c.path("redis-users.acl"),
            "--save", "",
            "--appendonly", "no",
            "--maxmemory", self.redis_maxmemory,
            "--maxmemory-policy", "allkeys-lru",
            "--dir", str(data_dir),
        ]  # fmt: skip
        return Node(
            "redis", "redis", host, REDIS_PORT, None, argv, self._base_env(),
            self.log_dir / "redis.log", stop_timeout_s=10.0,
        )  # fmt: skip

    def _server_node(self, index: int) -> Node:
        host = self._host(FIRST_SERVER_HOST + index)
        c = self.credentials
        env = {
            **self._base_env(),
            "MINICACHE_LISTEN": f"{host}:{SERVER_PORT}",
            "MINICACHE_METRICS_LISTEN": f"{host}:{SERVER_METRICS_PORT}",
            "MINICACHE_HEALTH_LISTEN": f"{host}:{SERVER_HEALTH_PORT}",
            "MINICACHE_TLS_CERT": c.path("server.crt"),
            "MINICACHE_TLS_KEY": c.path("server.key"),
            "MINICACHE_TOKENS_FILE": c.cache_tokens,
            "MINICACHE_DEVICE_BUDGET_BYTES": self.device_budget,
            "MINICACHE_GRACE_S": str(self.grace_s),
            "MINICACHE_LOG_FORMAT": "json",
        }
        if self.redis_mode != "none":  # MINICACHE_REDIS_URL once Redis is up
            env.update(
                {
                    "MINICACHE_REDIS_MODE": self.redis_mode,
                    "MINICACHE_REDIS_USERNAME": REDIS_USER,
                    "MINICACHE_REDIS_PASSWORD_FILE": c.path("redis-password"),
                    "MINICACHE_REDIS_TLS_CA": c.ca,
                    "MINICACHE_REDIS_TTL_S": "3600",
                    "MINICACHE_REDIS_KEY_PREFIX": f"minicache-{index}",
                }
            )
        if self.policy:
            env["MINICACHE_DEFAULT_POLICY"] = self.policy
        return Node(
            f"cache-server-{index}", "cache-server", host, SERVER_PORT, SERVER_METRICS_PORT,
            [str(BIN_DIR / "minicache-server")], env,
            self.log_dir / f"cache-server-{index}.log",
            # Draining, then writing the device tier down: up to grace_s each.
            stop_timeout_s=2 * self.grace_s + 15.0,
        )  # fmt: skip

    def _worker_node(self, index: int) -> Node:
        host = self._host(FIRST_WORKER_HOST + index)
        c = self.credentials
        env = {
            **self._base_env(),
            "OMP_NUM_THREADS": str(self.worker_threads),
            "MINICACHE_WORKER_LISTEN": f"{host}:{WORKER_PORT}",
            "MINICACHE_WORKER_METRICS_LISTEN": f"{host}:{WORKER_METRICS_PORT}",
            "MINICACHE_WORKER_MODEL": self.model,
            # The name sessions are stored under: workers that share sessions agree on it.
            "MINICACHE_WORKER_MODEL_ID": self.model,
            "MINICACHE_WORKER_CACHE_TARGETS": ",".join(s.target for s in self.servers),
            "MINICACHE_WORKER_CACHE_TLS_CA": c.ca,
            "MINICACHE_WORKER_CACHE_TOKEN_FILE": c.path("worker-cache-token"),
            "MINICACHE_WORKER_TLS_CERT": c.path("worker.crt"),
            "MINICACHE_WORKER_TLS_KEY": c.path("worker.key"),
            "MINICACHE_WORKER_TOKENS_FILE": c.worker_tokens,
            "MINICACHE_WORKER_GRACE_S": str(self.grace_s),
            "MINICACHE_WORKER_LOG_FORMAT": "json",
        }
        if self.policy:
            env["MINICACHE_WORKER_DEFAULT_POLICY"] = self.policy
        return Node(
            f"worker-{index}", "worker", host, WORKER_PORT, WORKER_METRICS_PORT,
            [str(BIN_DIR / "minicache-worker"), "serve"], env,
            self.log_dir / f"worker-{index}.log",
            stop_timeout_s=self.grace_s + 15.0,
        )  # fmt: skip

    # -- life cycle -------------------------------------------------------------------

    def up(self) -> Cluster:
        """Write the credentials, start Redis, then every cache server and worker at
        once, and wait until each is healthy; write cluster.json. Anything that fails
        (or Ctrl-C) stops every node started so far, then raises."""
        running = read_state(self.state_dir)
        if running and any(_live_process(n["pid"], n["started_at"]) for n in running["nodes"]):
            raise ClusterError(
                f"a cluster of {self.state_dir} is running: stop it first "
                f"(bash deploy/local/cluster.sh down --state-dir {self.state_dir})"
            )
        try:
            self._write_credentials()
            self.log_dir.mkdir(parents=True, exist_ok=True)
            if self.redis_mode == "cluster":
                self._start_redis_cluster()
            for node in self.redis_nodes if self.redis_mode == "single" else []:
                (self.state_dir / "redis").mkdir(parents=True, exist_ok=True)
                self._spawn(node)
            self._wait_healthy(self.redis_nodes)
            for node in self.servers:
                if self.redis_mode != "none":
                    node.env["MINICACHE_REDIS_URL"] = self._redis_url()
            for node in [*self.servers, *self.workers]:
                self._spawn(node)
            self._wait_healthy([*self.servers, *self.workers])
            self._write_state("running")
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        """Stop every node (workers, then servers, then Redis): SIGTERM to its process
        group, SIGKILL after its stop timeout. Idempotent."""
        for node in reversed(self.nodes):
            self._stop(node)
        if self.redis_cluster is not None:
            self.redis_cluster.stop()  # reaps its children
        if (self.state_dir / STATE_FILE).exists():
            self._write_state("stopped")

    def __enter__(self) -> Cluster:
        return self.up()

    def __exit__(self, *exc_info: object) -> None:
        self.down()

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to the node's process group; for SIGKILL wait until it is gone
        (other signals return at once: see `wait_exit`)."""
        node = self.node(name)
        if node.pid is None or _live_process(node.pid, node.started_at) is None:
            raise ClusterError(f"{name} is not running")
        if not node.own_group:
            self.redis_cluster.kill_node(self.redis_nodes.index(node), sig)  # waits
            return
        _signal_group(node.pid, sig)
        if sig == signal.SIGKILL:
            self.wait_exit(name, timeout_s=30.0)

    def wait_exit(self, name: str, timeout_s: float) -> int | None:
        """Wait up to `timeout_s` for the node to exit: its exit status (negative: the
        signal that ended it), or None if it still runs."""
        node = self.node(name)
        if node.process is not None:
            try:
                return node.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                return None
        process = _live_process(node.pid, node.started_at)
        if process is None:
            return 0
        try:
            return process.wait(timeout=timeout_s)
        except psutil.TimeoutExpired:
            return None

    def restart(self, name: str) -> None:
        """Stop the node if it runs (as `down` does), start it again with the same
        settings (same address, same Redis key prefix), and wait until it is healthy."""
        node = self.node(name)
        self._stop(node)
        if not node.own_group:
            index = self.redis_nodes.index(node)
            try:  # back in the cluster: every node agrees it is whole again
                self.redis_cluster.restart_node(index, timeout_s=self.ready_timeout_s)
            finally:
                self._track_redis_cluster_node(node, index)
                self._write_state("running")
            return
        self._spawn(node)
        try:
            self._wait_healthy([node])
        finally:
            self._write_state("running")

    def health(self) -> dict[str, str]:
        """Each node's probe: node name -> "SERVING", "NOT_SERVING", "UNREACHABLE" or
        "EXITED"."""
        return {
            node.name: probe(node, self.credentials)
            if _live_process(node.pid, node.started_at)
            else "EXITED"
            for node in self.nodes
        }

    def describe(self) -> dict[str, Any]:
        """The cluster.json dict: credential files, every node's target, metrics
        address and pid, Redis' mode, URL, nodes and pids."""

        def entry(node: Node) -> dict[str, Any]:
            described = {
                "name": node.name,
                "target": node.target,
                "metrics": node.metrics,
                "pid": node.pid,
                "log": str(node.log_path),
            }
            if node.role == "cache-server":
                described["health"] = f"{node.host}:{SERVER_HEALTH_PORT}"
            return described

        c = self.credentials
        return {
            "ca": c.ca,
            "cache_token_file": c.cache_tokens,
            "worker_token_file": c.worker_tokens,
            "cache_servers": [entry(node) for node in self.servers],
            "workers": [entry(node) for node in self.workers],
            "redis": {
                "mode": self.redis_mode,
                "url": self._redis_url(),
                "username": REDIS_USER if self.redis_nodes else "",
                "password_file": c.path("redis-password") if self.redis_nodes else "",
                "nodes": [node.target for node in self.redis_nodes],
                "pids": [node.pid for node in self.redis_nodes],
            },
            "model_id": self.model,
            "state_dir": str(self.state_dir),
        }

    def cache_client_config(self, target: str, **overrides: Any) -> ClientConfig:
        """A client of one cache server with the first token (an SDK client tenant)."""
        values = {
            "token": first_token(self.credentials.cache_tokens),
            "tls_ca": self.credentials.ca,
        }
        return ClientConfig(target, **{**values, **overrides})

    def worker_client_config(self, target: str, **overrides: Any) -> ClientConfig:
        """A client of one worker with the first token of the workers' tokens file."""
        values = {
            "token": first_token(self.credentials.worker_tokens),
            "tls_ca": self.credentials.ca,
        }
        return ClientConfig(target, **{**values, **overrides})

    # -- processes --------------------------------------------------------------------

    def _write_credentials(self) -> None:
        hosts = {node.host for node in self.nodes}
        if self.redis_mode != "none":  # Redis Cluster nodes exist only once started
            hosts.add(self._host(REDIS_HOST))
        env = {**os.environ, "MINICACHE_CERT_IPS": ",".join(sorted(hosts))}
        result = subprocess.run(
            ["bash", str(GENERATE_CERTS), "--out", str(self.credentials.directory)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            raise ClusterError(f"deploy/certs/generate.sh failed:\n{result.stderr.strip()}")

    def _spawn(self, node: Node) -> None:
        with node.log_path.open("ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S%z')} starting {node.name}\n".encode())
            log.flush()
            node.process = subprocess.Popen(
                _dying_with_parent(node.argv) if self.die_with_parent else node.argv,
                env=node.env,
                cwd=self.state_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped as one
            )
        node.pid = node.process.pid
        try:
            node.started_at = psutil.Process(node.pid).create_time()
        except psutil.NoSuchProcess:
            node.started_at = None  # already gone: the health wait reports its log
        self._write_state("starting")

    def _start_redis_cluster(self) -> None:
        """A Redis Cluster with the single Redis' TLS certificate and ACL user; its
        nodes become `redis-0`, `redis-1`, ..."""
        from redis_cluster import RedisCluster

        c = self.credentials
        self.redis_cluster = RedisCluster(
            self.state_dir / "redis-cluster",
            host=self._host(REDIS_HOST),
            masters=REDIS_CLUSTER_MASTERS,
            replicas=self.redis_replicas,
            tls_cert=c.path("redis.crt"),
            tls_key=c.path("redis.key"),
            tls_ca=c.ca,
            # What the nodes show each other on the cluster bus (redis.crt is serverAuth).
            tls_client_cert=c.path("client.crt"),
            tls_client_key=c.path("client.key"),
            username=REDIS_USER,
            password=Path(c.path("redis-password")).read_text().strip(),
        )
        self.redis_cluster.start()
        self.redis_nodes = []
        for index, address in enumerate(self.redis_cluster.startup_nodes):
            host, port = address.rsplit(":", 1)
            node = Node(
                f"redis-{index}", "redis", host, int(port), None, [], {},
                self.redis_cluster.directory / f"node-{index}" / "redis.log",
                stop_timeout_s=10.0, own_group=False,
            )  # fmt: skip
            self._track_redis_cluster_node(node, index)
            self.redis_nodes.append(node)
        self._write_state("starting")

    def _track_redis_cluster_node(self, node: Node, index: int) -> None:
        process = self.redis_cluster.processes[index]
        node.pid = process.pid if process is not None else None
        node.started_at = None
        if node.pid is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                node.started_at = psutil.Process(node.pid).create_time()

    def _check_running(self, node: Node) -> None:
        if node.process is not None and node.process.poll() is not None:
            raise ClusterError(
                f"{node.name} exited with status {node.process.returncode}; the end of its "
                f"log ({node.log_path}):\n{_log_tail(node.log_path)}"
            )

    def _wait_healthy(self, nodes: list[Node]) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        pending = list(nodes)
        while pending:
            if self.stop_requested.is_set():
                raise KeyboardInterrupt
            for node in list(pending):
                self._check_running(node)
                if probe(node, self.credentials) == SERVING:
                    pending.remove(node)
            if not pending:
                return
            if time.monotonic() > deadline:
                names = ", ".join(f"{n.name} (log {n.log_path})" for n in pending)
                raise ClusterError(f"not healthy after {self.ready_timeout_s:.0f} s: {names}")
            time.sleep(PROBE_INTERVAL_S)

    def _stop(self, node: Node) -> None:
        if not node.own_group:  # a Redis Cluster node: its class holds the process
            index = self.redis_nodes.index(node)
            if self.redis_cluster.is_running(index):
                self.redis_cluster.kill_node(index, signal.SIGTERM)
            return
        if node.pid is not None:
            stop_node(node.pid, node.started_at, node.stop_timeout_s)
        if node.process is not None:
            node.process.wait(timeout=10)  # reap our child
            node.process = None

    def _write_state(self, status: str) -> None:
        """cluster.json: the contract (`describe()`), and what `down` and `status` of
        another process need: every node's role, pid and start time."""
        state = self.describe()
        state["status"] = status
        state["nodes"] = [
            {
                "name": node.name,
                "role": node.role,
                "target": node.target,
                "pid": node.pid,
                "started_at": node.started_at,
                "stop_timeout_s": node.stop_timeout_s,
                "own_group": node.own_group,
                "log": str(node.log_path),
            }
            for node in self.nodes
        ]
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.state_dir / STATE_FILE
        partial = path.with_suffix(".json.partial")
        partial.write_text(json.dumps(state, indent=2) + "\n")
        partial.replace(path)


def stop_node(pid: int, started_at: float | None, timeout_s: float, own_group: bool = True) -> bool:
    """SIGTERM the node's process group (or the process alone), SIGKILL it after
    `timeout_s`; True if it was running."""
    process = _live_process(pid, started_at)
    if process is None:
        return False
    _signal_group(pid, signal.SIGTERM, own_group)
    try:
        process.wait(timeout=timeout_s)
    except psutil.TimeoutExpired:
        _signal_group(pid, signal.SIGKILL, own_group)
        try:
            process.wait(timeout=10)
        except psutil.TimeoutExpired as exc:
            raise ClusterError(f"pid {pid} survived SIGKILL for 10 s") from exc
    if own_group:  # whatever else is left in its group (a child that ignored SIGTERM)
        _signal_group(pid, signal.SIGKILL)
    return True


def read_state(state_dir: str | Path) -> dict[str, Any] | None:
    """cluster.json of a state directory, or None when there is none."""
    path = Path(state_dir) / STATE_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text())


# -- command line -------------------------------------------------------------------------


def _print_addresses(info: dict[str, Any]) -> None:
    redis_info = info["redis"]
    if redis_info["nodes"]:
        print(f"redis           {', '.join(redis_info['nodes'])}  {redis_info['url']}")
    for node in info["cache_servers"]:
        print(f"{node['name']:<15} {node['target']:<20} metrics http://{node['metrics']}/metrics")
    for node in info["workers"]:
        print(f"{node['name']:<15} {node['target']:<20} metrics http://{node['metrics']}/metrics")
    print(f"CA {info['ca']}")
    print(f"cache tokens {info['cache_token_file']}; worker tokens {info['worker_token_file']}")
    state_dir = Path(info["state_dir"])
    print(f"logs in {state_dir / 'logs'}; state in {state_dir / STATE_FILE}")


def run_up(args: argparse.Namespace) -> int:
    # Ctrl-C and SIGTERM only ask to stop: what is running is then stopped in order,
    # never cut short by a second signal.
    stop_requested = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop_requested.set())
    cluster = Cluster(
        args.state_dir,
        servers=args.servers,
        workers=args.workers,
        redis=args.redis,
        device_budget=args.device_budget,
        policy=args.policy,
        net=args.net,
        grace_s=args.grace_s,
        worker_threads=args.worker_threads,
        redis_replicas=args.redis_replicas,
        ready_timeout_s=args.ready_timeout_s,
        die_with_parent=args.foreground,
        stop_requested=stop_requested,
    )
    print(
        f"starting {len(cluster.servers)} cache servers, {len(cluster.workers)} workers, "
        f"redis {args.redis} (logs in {cluster.log_dir}) ...",
        flush=True,
    )
    try:
        cluster.up()
    except KeyboardInterrupt:
        print("interrupted: every node started was stopped", file=sys.stderr)
        return 130
    except ClusterError as exc:
        print(f"cluster: {exc}\nevery node started was stopped", file=sys.stderr)
        return 1
    _print_addresses(cluster.describe())
    if not args.foreground:
        print(
            f"up; stop it with: bash deploy/local/cluster.sh down --state-dir {cluster.state_dir}"
        )
        return 0
    print("up; Ctrl-C stops every node", flush=True)
    stop_requested.wait()
    print("stopping ...", flush=True)
    cluster.down()
    return 0


def _state_or_none(state_dir: Path) -> dict[str, Any] | None:
    state = read_state(state_dir)
    if state is None:
        print(f"no cluster in {state_dir} ({STATE_FILE} is missing)")
    return state


def run_down(args: argparse.Namespace) -> int:
    state = _state_or_none(args.state_dir)
    if state is None:
        return 0
    stopped = 0
    # Workers first, then servers (which write their device tier down to Redis), Redis last.
    for node in reversed(state["nodes"]):
        stopped_now = node["pid"] is not None and stop_node(
            node["pid"], node["started_at"], node["stop_timeout_s"], node.get("own_group", True)
        )
        if stopped_now:
            print(f"stopped {node['name']} (pid {node['pid']})", flush=True)
            stopped += 1
    state["status"] = "stopped"
    (Path(args.state_dir) / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    print(f"{stopped} nodes stopped" if stopped else "no node was running")
    return 0


def run_status(args: argparse.Namespace) -> int:
    state = _state_or_none(args.state_dir)
    if state is None:
        return 1
    credentials = Credentials(Path(state["ca"]).parent)
    healthy = True
    rows = []
    for node in state["nodes"]:
        alive = _live_process(node["pid"], node["started_at"]) is not None
        health = probe(node, credentials) if alive else "EXITED"
        healthy = healthy and health == SERVING
        rows.append({**node, "health": health})
    if args.json:
        print(json.dumps({"status": state["status"], "nodes": rows}, indent=2))
    else:
        for row in rows:
            print(f"{row['name']:<15} {row['target']:<20} pid {row['pid']!s:<8} {row['health']}")
    return 0 if healthy else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cluster.sh",
        description="A local MiniCache cluster (Redis, cache servers, inference workers) as "
        "processes on loopback addresses, TLS and tokens everywhere.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def add_state_dir(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--state-dir",
            type=Path,
            default=DEFAULT_STATE_DIR,
            help=f"certificates, logs and {STATE_FILE} (default: .cluster in the repository)",
        )

    up = commands.add_parser("up", help="start every node and wait until each is healthy")
    add_state_dir(up)
    up.add_argument("--servers", type=int, default=3, help=f"cache servers, 1 to {MAX_SERVERS}")
    up.add_argument("--workers", type=int, default=2, help=f"inference workers, 0 to {MAX_WORKERS}")
    up.add_argument("--redis", choices=REDIS_MODES, default="single", help="the overflow tier")
    up.add_argument(
        "--redis-replicas", type=int, default=0, help="--redis cluster: replicas per master"
    )
    up.add_argument("--device-budget", default="64MiB", help="each server's device tier budget")
    up.add_argument("--policy", default=None, help="default policy: preset or JSON file")
    up.add_argument("--net", default="127.0.0", help="first three octets of the nodes' addresses")
    up.add_argument("--grace-s", type=float, default=10.0, help="servers' and workers' grace")
    up.add_argument("--worker-threads", type=int, default=1, help="OMP_NUM_THREADS of a worker")
    up.add_argument("--ready-timeout-s", type=float, default=600.0, help="wait for health")
    up.add_argument(
        "--foreground", action="store_true", help="stay attached; Ctrl-C stops every node"
    )
    up.set_defaults(handler=run_up)
    down = commands.add_parser("down", help="stop every node of the state directory")
    add_state_dir(down)
    down.set_defaults(handler=run_down)
    status = commands.add_parser("status", help="each node's health (exit 1 unless all serve)")
    add_state_dir(status)
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(handler=run_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, ClusterError) as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
