"""A real local Redis Cluster: redis-server processes in cluster mode on loopback, joined
by `redis-cli --cluster create`, for the local cluster runner (deploy/local/cluster.py,
`--redis cluster`) and the tests.

`RedisCluster(directory, masters=3, replicas=1)` starts `masters * (1 + replicas)`
nodes, each with its own port, cluster bus port and directory (its `nodes.conf`), and
waits until every node reports `cluster_state:ok` and every replica's link to its
master is up. Nothing is persisted (`--save ''`, no AOF): like the single overflow
Redis, the cluster is a lossy tier. `kill_node(i)` is a crash (SIGKILL);
`restart_node(i)` starts the node again on the same port with its `nodes.conf`, so it
rejoins the cluster (as a replica when its replica took over meanwhile). Every node
listens on `host` (any 127.0.0.x; announced as such to peers and clients), on its own
ports; `url` names them all as startup nodes, `pids` their processes.

Optional TLS (`tls_cert`, `tls_key`, `tls_ca`: client port, cluster bus and
replication all over TLS, no plaintext port, client certificates not required from
clients). The cluster bus always asks a peer node for its certificate: a node presents
`tls_client_cert` and `tls_client_key` when given, else `tls_cert`, which then must
also be valid for client authentication (deploy/certs/generate.sh's redis.crt is for
server authentication only: pass its client.crt and client.key). Authentication is
optional too (`password` alone: the default user's password; `username` and
`password`: an ACL user without admin commands, as deploy/certs/generate.sh writes for
docker-compose, and the default user off). The class itself administers the nodes
(cluster creation, replication) as `admin_username` with a random password, written to
the nodes' ACL file only (never on a command line). With TLS, clients check that the
certificate names `host` (deploy/certs/generate.sh's redis.crt names 127.0.0.1 and
the addresses in MINICACHE_CERT_IPS).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis
from redis.cluster import ClusterNode
from redis.cluster import RedisCluster as RedisClusterClient

START_TIMEOUT_S = 30.0


def free_port_pairs(host: str, count: int) -> list[tuple[int, int]]:
    """`count` pairs of ports free on `host`, all distinct (every socket is held until
    all are chosen): each node's client port and cluster bus port."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(2 * count)]
        for sock in sockets:
            sock.bind((host, 0))
        ports = [sock.getsockname()[1] for sock in sockets]
    return list(zip(ports[::2], ports[1::2], strict=True))


class NodeExitedError(RuntimeError):
    """A node's redis-server exited (its log, named in the message, says why)."""


class RedisCluster:
    """A Redis Cluster of `masters` masters with `replicas` replicas each, on `host`."""

    admin_username = "cluster-admin"

    def __init__(
        self,
        directory: Path | str,
        host: str = "127.0.0.1",
        masters: int = 3,
        replicas: int = 0,
        *,
        tls_cert: str | Path = "",
        tls_key: str | Path = "",
        tls_ca: str | Path = "",
        tls_client_cert: str | Path = "",
        tls_client_key: str | Path = "",
        username: str = "",
        password: str = "",
        node_timeout_ms: int = 1000,
    ) -> None:
        if masters < 3:
            raise ValueError("a Redis Cluster needs at least 3 masters")
        if replicas not in (0, 1, 2):
            raise ValueError("replicas must be 0, 1 or 2 per master")
        if bool(tls_cert) != bool(tls_key) or (bool(tls_cert) and not tls_ca):
            raise ValueError("TLS needs tls_cert, tls_key and tls_ca together")
        if bool(tls_client_cert) != bool(tls_client_key) or (tls_client_cert and not tls_cert):
            raise ValueError("tls_client_cert and tls_client_key go together, with tls_cert")
        if username and not password:
            raise ValueError("an ACL username needs a password")
        if node_timeout_ms < 100:
            raise ValueError("node_timeout_ms must be at least 100")
        missing = [name for name in ("redis-server", "redis-cli") if shutil.which(name) is None]
        if missing:
            raise RuntimeError(
                f"{' and '.join(missing)} not installed (Debian package redis-server)"
            )
        self.directory = Path(directory)
        self.host = host
        self.masters = masters
        self.replicas = replicas
        self.tls = (str(tls_cert), str(tls_key), str(tls_ca)) if tls_cert else None
        self.tls_client = (str(tls_client_cert), str(tls_client_key)) if tls_client_cert else None
        self.username = username
        self.password = password
        self.node_timeout_ms = node_timeout_ms
        # With a password alone the admin is the default user, with that password.
        self.admin_password = secrets.token_hex(16) if username else password
        count = masters * (1 + replicas)
        self.ports = free_port_pairs(host, count)
        self.processes: list[subprocess.Popen | None] = [None] * count

    # -- addresses ------------------------------------------------------------------

    @property
    def startup_nodes(self) -> list[str]:
        """`host:port` of every node (masters and replicas as created)."""
        return [f"{self.host}:{port}" for port, _ in self.ports]

    @property
    def url(self) -> str:
        """`redis://host:port,host:port,...` (`rediss://` with TLS), every node a startup
        node, without credentials (the cache server takes those from its own settings:
        MINICACHE_REDIS_USERNAME, MINICACHE_REDIS_PASSWORD_FILE)."""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{','.join(self.startup_nodes)}"

    @property
    def pids(self) -> list[int]:
        """Process ids of the running nodes."""
        return [process.pid for process in self.processes if process and process.poll() is None]

    # -- clients --------------------------------------------------------------------

    def _connection_options(self) -> dict:
        options: dict = {"socket_timeout": 5, "socket_connect_timeout": 5}
        if self.password:
            username = self.admin_username if self.username else None
            options.update(username=username, password=self.admin_password)
        if self.tls:
            options.update(ssl=True, ssl_ca_certs=self.tls[2])
        return options

    def node_client(self, index: int) -> redis.Redis:
        """An admin connection to node `index` alone (no redirections)."""
        return redis.Redis(host=self.host, port=self.ports[index][0], **self._connection_options())

    def client(self) -> RedisClusterClient:
        """An admin cluster client (redis-py `RedisCluster`), for tests to look inside."""
        nodes = [ClusterNode(self.host, port) for port, _ in self.ports]
        return RedisClusterClient(startup_nodes=nodes, **self._connection_options())

    def is_running(self, index: int) -> bool:
        process = self.processes[index]
        return process is not None and process.poll() is None

    def master_indexes(self) -> list[int]:
        """Running nodes that are masters now (after a failover, a former replica)."""
        found = []
        for index in range(len(self.ports)):
            if not self.is_running(index):
                continue
            with self.node_client(index) as client:
                if client.execute_command("ROLE")[0] in (b"master", "master"):
                    found.append(index)
        return found

    # -- processes ------------------------------------------------------------------

    def _acl_file(self) -> Path | None:
        """The nodes' users: the admin, and the caller's user when a password is set."""
        if not self.password:
            return None
        if self.username:
            lines = [
                "user default off",
                f"user {self.admin_username} on >{self.admin_password} ~* &* +@all",
                f"user {self.username} on >{self.password} ~* &* +@all -@admin",
            ]
        else:
            lines = [f"user default on >{self.password} ~* &* +@all"]
        path = self.directory / "users.acl"
        path.touch(mode=0o600)
        path.write_text("\n".join(lines) + "\n")
        return path

    def _node_args(self, index: int, acl_file: Path | None) -> list[str]:
        port, bus_port = self.ports[index]
        node_dir = self.directory / f"node-{index}"
        node_dir.mkdir(parents=True, exist_ok=True)
        args = [
            shutil.which("redis-server") or "redis-server",
            "--bind",
            self.host,
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(self.node_timeout_ms),
            "--cluster-port",
            str(bus_port),
            # The address the other nodes and clients use: a node bound to 127.0.0.x
            # would otherwise learn 127.0.0.1, where its peers' connections come from.
            "--cluster-announce-ip",
            self.host,
            # A replica takes over however long its link was down (a lossy cache).
            "--cluster-replica-validity-factor",
            "0",
            # A replica's first sync starts at once, not after the default 5 s wait.
            "--repl-diskless-sync-delay",
            "0",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(node_dir),
        ]
        if self.tls:
            cert, key, ca = self.tls
            args += ["--port", "0", "--tls-port", str(port)]
            args += ["--tls-cert-file", cert, "--tls-key-file", key, "--tls-ca-cert-file", ca]
            args += ["--tls-auth-clients", "no", "--tls-cluster", "yes"]
            args += ["--tls-replication", "yes"]
            if self.tls_client:
                client_cert, client_key = self.tls_client
                args += ["--tls-client-cert-file", client_cert]
                args += ["--tls-client-key-file", client_key]
        else:
            args += ["--port", str(port)]
        if acl_file is not None:
            args += ["--aclfile", str(acl_file)]
            # Replicas authenticate to their master as the admin (replication is @admin).
            admin = self.admin_username if self.username else "default"
            args += ["--masteruser", admin]
        return args

    def _spawn(self, index: int) -> None:
        acl_file = self.directory / "users.acl" if self.password else None
        args = self._node_args(index, acl_file)
        log = open(self.directory / f"node-{index}" / "redis.log", "ab")  # noqa: SIM115
        with log:
            self.processes[index] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

    def _wait_answering(self, index: int) -> None:
        """Wait until node `index` answers; then give it the replication password
        (set after start, so that it never shows in ps)."""
        self._wait(lambda: self._ping(index), f"node {index} to answer", 10)
        if self.password:
            with self.node_client(index) as client:
                client.config_set("masterauth", self.admin_password)

    def _ping(self, index: int) -> bool:
        if not self.is_running(index):
            raise NodeExitedError(f"redis-server node {index} exited; see {self._log_path(index)}")
        try:
            with self.node_client(index) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def _log_path(self, index: int) -> Path:
        return self.directory / f"node-{index}" / "redis.log"

    def _wait(self, condition, what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.05)
        raise RuntimeError(f"Redis Cluster: timed out after {timeout_s:.0f} s waiting for {what}")

    def _create(self) -> None:
        command = [shutil.which("redis-cli") or "redis-cli", "--cluster", "create"]
        command += self.startup_nodes
        command += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
        environ = dict(os.environ)
        if self.password:
            if self.username:
                command += ["--user", self.admin_username]
            environ["REDISCLI_AUTH"] = self.admin_password
        if self.tls:
            command += ["--tls", "--cacert", self.tls[2]]
        result = subprocess.run(
            command, capture_output=True, text=True, env=environ, timeout=START_TIMEOUT_S
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"redis-cli --cluster create failed ({result.returncode}): "
                f"{(result.stdout + result.stderr)[-2000:]}"
            )

    def _healthy(self) -> bool:
        """`masters` running masters (a replica took over from a killed one, or it is
        back), every running node says cluster_state:ok, and every running replica's
        link to its master is up."""
        try:
            if len(self.master_indexes()) != self.masters:
                return False
        except redis.RedisError:
            return False
        for index in range(len(self.ports)):
            if not self.is_running(index):
                continue
            try:
                with self.node_client(index) as client:
                    if client.cluster("INFO").get("cluster_state") != "ok":
                        return False
                    replication = client.info("replication")
                    if replication.get("role") == "slave" and (
                        replication.get("master_link_status") != "up"
                    ):
                        return False
            except redis.RedisError:
                return False
        return True

    def wait_healthy(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Block until `_healthy` (bounded by `timeout_s`; RuntimeError after it). Right
        after `kill_node` of a master this waits for its replica to take over (about
        twice `node_timeout_ms`); without replicas, until the master is restarted."""
        self._wait(self._healthy, f"{self.masters} masters and cluster_state:ok", timeout_s)

    def start(self) -> RedisCluster:
        """Start every node, create the cluster, wait until it is healthy; on any
        failure everything started is stopped and the error raised. A node that exits
        at once (its port taken meanwhile by another process) is tried again, once,
        with every port chosen afresh."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for attempt in range(2):
            try:
                self._acl_file()
                for index in range(len(self.ports)):
                    self._spawn(index)
                for index in range(len(self.ports)):
                    self._wait_answering(index)
                break
            except NodeExitedError:
                self.stop()
                if attempt == 1:
                    raise
                self.ports = free_port_pairs(self.host, len(self.ports))
                for stale in self.directory.glob("node-*/nodes.conf"):
                    stale.unlink()
            except BaseException:
                self.stop()
                raise
        try:
            self._create()
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def kill_node(self, index: int, sig: int = signal.SIGKILL) -> None:
        """Send `sig` (default SIGKILL, a crash) to node `index` and reap it."""
        process = self.processes[index]
        if process is None:
            raise ValueError(f"node {index} is not running")
        process.send_signal(sig)
        process.wait(timeout=10)
        self.processes[index] = None

    def restart_node(self, index: int, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start node `index` again (same port, same nodes.conf, empty data) and wait
        until the cluster is healthy with it."""
        if self.is_running(index):
            raise ValueError(f"node {index} is running")
        self._spawn(index)
        self._wait_answering(index)
        self.wait_healthy(timeout_s)

    def stop(self) -> None:
        """Kill every node (no persistence: nothing to flush) and reap it."""
        for index, process in enumerate(self.processes):
            if process is not None:
                process.kill()
                process.wait(timeout=10)
                self.processes[index] = None

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
