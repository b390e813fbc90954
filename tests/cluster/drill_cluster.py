"""The fault drills' cluster and its clients: deploy/local/cluster.py's `Cluster` (Redis
with TLS and an ACL user, cache servers and inference workers on the bundled SmolLM2,
each a real process on its own loopback address, TLS and tokens everywhere), wrapped
with the clients a drill needs."""

from __future__ import annotations

import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deploy" / "local"))

from cluster import Cluster, first_token

from minicache_client import CacheClient, TurnResult, WorkerClient
from minicache_client.sharding import place_sequence

# A small device budget: a session of a few turns (about 1.9 MB of float32 KV, where
# the default policy keeps its first and latest tokens exact) fits twice, so older
# sessions move to Redis when newer ones arrive.
DEVICE_BUDGET = "4MiB"
DEVICE_BUDGET_BYTES = 4 << 20
GRACE_S = 8.0
# An address block of the drills' own, apart from a cluster started by hand (127.0.0.x).
NET = "127.0.87"
MAX_NEW_TOKENS = 6


@dataclass
class Turn:
    """One turn's outcome as the caller saw it."""

    tokens: tuple[int, ...]
    cached_tokens: int
    recompute_reason: str
    history: list[int]  # the session's history after this turn

    @classmethod
    def of(cls, result: TurnResult, history: list[int]) -> Turn:
        return cls(
            result.tokens,
            result.cached_tokens,
            result.recompute_reason,
            [*history, *result.turn_tokens],
        )


class DrillCluster:
    """The cluster with the clients a drill needs: workers' clients (the first caller
    token), cache clients as the workers' tenant (to look at sessions' KV) and as an
    SDK tenant (for direct puts), and where a session lives."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        info = cluster.describe()
        self.model_id = info["model_id"]
        self.server_targets = [server["target"] for server in info["cache_servers"]]
        self.server_names = {s["target"]: s["name"] for s in info["cache_servers"]}
        self.caller_tenant = self._tenant_of(info["worker_token_file"])
        self.workers_cache_token = (
            Path(cluster.credentials.path("worker-cache-token")).read_text().strip()
        )

    @staticmethod
    def _tenant_of(tokens_file: str) -> str:
        token = first_token(tokens_file)
        for line in Path(tokens_file).read_text().splitlines():
            words = line.split()
            if words and words[0] == token:
                return words[1]
        raise AssertionError(f"no tenant for the first token of {tokens_file}")

    def worker(self, index: int) -> WorkerClient:
        node = self.cluster.workers[index]
        return WorkerClient(self.cluster.worker_client_config(node.target, timeout_s=120))

    def sessions_cache(self, server: str) -> CacheClient:
        """A client of `server` as the workers' tenant: it sees the sessions' KV."""
        node = self.cluster.node(server)
        config = self.cluster.cache_client_config(node.target, token=self.workers_cache_token)
        return CacheClient(config)

    def tenant_cache(self, server: str) -> CacheClient:
        """A client of `server` as an SDK tenant (the first cache token)."""
        return CacheClient(self.cluster.cache_client_config(self.cluster.node(server).target))

    def sequence_id(self, session: str) -> str:
        # The worker stores a session under its caller's tenant.
        return f"{self.caller_tenant}/{session}"

    def server_of(self, session: str) -> str:
        target = place_sequence(self.server_targets, self.model_id, self.sequence_id(session))
        return self.server_names[target]

    def sessions_on(self, server: str, prefix: str, count: int) -> list[str]:
        """`count` session ids starting with `prefix` that rendezvous hashing places on
        `server` (the first ones in a fixed order: the same every run)."""
        found = [f"{prefix}-{i}" for i in range(1000) if self.server_of(f"{prefix}-{i}") == server]
        assert len(found) >= count, f"fewer than {count} of 1000 ids land on {server}"
        return found[:count]

    def lookup(self, session: str):
        with self.sessions_cache(self.server_of(session)) as cache:
            return cache.lookup(self.model_id, self.sequence_id(session))

    def turn(
        self,
        worker: int,
        session: str,
        history: list[int],
        message: str,
        max_new_tokens: int = MAX_NEW_TOKENS,
    ) -> Turn:
        with self.worker(worker) as client:
            result = client.turn(
                session,
                history_tokens=history,
                user_message=message,
                max_new_tokens=max_new_tokens,
            )
        return Turn.of(result, history)

    def conversation(self, worker: int, session: str, messages: list[str]) -> list[Turn]:
        history: list[int] = []
        turns = []
        for message in messages:
            turns.append(self.turn(worker, session, history, message))
            history = turns[-1].history
        return turns

    def metrics(self, name: str) -> dict[tuple[str, tuple], float]:
        """One scrape of the node's /metrics: (sample name, sorted labels) -> value."""
        url = f"http://{self.cluster.node(name).metrics}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def fill_device(self, server: str, name: str) -> None:
        """Put a sequence as large as the device budget on `server` (policy none), so
        that everything written before it moves below the device."""
        layers, heads, dim = 8, 4, 64
        tokens = DEVICE_BUDGET_BYTES // (layers * 2 * heads * dim * 2) + 1
        rng = np.random.default_rng(0)
        kv = [
            (
                rng.standard_normal((heads, tokens, dim)).astype(np.float16),
                rng.standard_normal((heads, tokens, dim)).astype(np.float16),
            )
            for _ in range(layers)
        ]
        with self.tenant_cache(server) as cache:
            cache.put(self.model_id, name, kv, dtype="float16", policy="none", timeout_s=60)
