"""The Redis tier: checksummed entry encodings in Redis or a Redis Cluster, the last
tier of a chain.

Redis is treated as lossy: what comes back is verified and a failed check is a miss.
Each value starts with the name it was written under (`encoded_tier.py`), so an entry
that is valid but sits under another key (copied, renamed, a stale generation) is
refused; the entry's own checksum is verified by `decode_entry`. Sequence manifests
(`put_manifest`) sit beside the entries, so a restarted server finds them.

Keys (`RedisTier.redis_key`): on a single Redis `<prefix>:<entry_name>` and
`<prefix>:<manifest_name>` (`tiers/base.py`). On a Redis Cluster they carry a hash tag,
the sequence's escaped ids in braces, `<prefix>:{<tenant>:<model_id>:<sequence_id>}:
<generation>:<group>` and `...:manifest` (`hash_tagged_key`), so every key of one
sequence lives in one slot, on one master. The ids are percent-escaped, so they hold no
brace, and the prefix may hold none either. The single layout stays as it was, so what
an existing Redis holds is still recovered.

With `cluster=True` the client is redis-py's `redis.asyncio.cluster.RedisCluster`,
given every startup node of the URL (`redis://host:port,host:port,...`; any one that
answers suffices to discover the rest). The commands that touch several keys are the
library's slot-aware ones: DEL and MGET split per slot (`delete`, `mget_nonatomic`),
a pipeline goes node by node, and the restart scan (`scan_iter`) visits every master.

Connection settings are passed explicitly (pool size, timeouts, bounded retries of
connection errors only): redis-py's defaults differ between versions. Any Redis
failure surfaces as `TierUnavailableError`; the client reconnects by itself once Redis
is back (a cluster client also rediscovers the slots, e.g. after a replica took over
from a failed master).
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import redis.asyncio as redis_asyncio
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from minicache_client.serving.settings import split_address
from minicache_server.tiers.base import (
    EntryKey,
    SequenceName,
    TierUnavailableError,
    entry_name,
    manifest_name,
)
from minicache_server.tiers.encoded_tier import NAME_LENGTH, EncodedTier

log = logging.getLogger(__name__)

# What `RedisTier` raised before the tier interface; the same class.
OverflowUnavailableError = TierUnavailableError

# What a failing Redis raises: the cluster client's own errors (no startup node
# answers, slots not covered) are not `RedisError`s.
REDIS_FAILURES = (RedisError, RedisClusterException, OSError)

# Characters SCAN's MATCH pattern treats as wildcards, escaped in a literal prefix.
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


@dataclass(frozen=True)
class ClusterAddress:
    """What a Redis Cluster URL names: `redis://[user[:password]@]host:port[,host:port...]`
    (`rediss://` for TLS), each host:port a startup node."""

    tls: bool
    nodes: tuple[tuple[str, int], ...]
    username: str
    password: str


def parse_cluster_url(url: str) -> ClusterAddress:
    """The startup nodes and credentials of a Redis Cluster URL; ValueError saying what
    is wrong (no database number: a cluster has only database 0)."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError("a Redis Cluster URL starts with redis:// or rediss://")
    if parts.path.strip("/") not in ("", "0") or parts.query or parts.fragment:
        raise ValueError("a Redis Cluster URL names no database (a cluster has only 0)")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    nodes = []
    for node in hosts.split(","):
        try:
            host, port = split_address(node.strip())
        except ValueError:
            host, port = "", 0
        if not node.strip() or port <= 0 or host == "0.0.0.0":
            raise ValueError(f"a startup node must be host:port, not {node.strip()!r}")
        nodes.append((host, port))
    return ClusterAddress(
        parts.scheme == "rediss", tuple(nodes), unquote(username), unquote(password)
    )


def check_key_prefix(prefix: str) -> None:
    """ValueError when `prefix` cannot start a key: empty, or holding a brace (a brace
    would make the prefix the hash tag of every key: one slot for all)."""
    if not prefix or "{" in prefix or "}" in prefix:
        raise ValueError("the Redis key prefix must be non-empty and hold no '{' or '}'")


def hash_tagged_key(prefix: str, name: str) -> str:
    """The Redis Cluster key of an `entry_name` or `manifest_name`: the sequence's
    three escaped ids become the hash tag, `<prefix>:{<ids>}:<rest>`."""
    tenant, model_id, sequence_id, rest = name.split(":", 3)
    return f"{prefix}:{{{tenant}:{model_id}:{sequence_id}}}:{rest}"


class RedisTier(EncodedTier):
    name = "redis"
    budget_bytes = None

    def __init__(
        self,
        url: str,
        *,
        cluster: bool = False,
        username: str = "",
        password: str = "",
        tls_ca: str = "",
        pool_size: int = 16,
        timeout_s: float = 2.0,
        ttl_s: int = 0,
        key_prefix: str = "minicache",
    ) -> None:
        super().__init__()
        check_key_prefix(key_prefix)
        options = {
            "max_connections": pool_size,
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
            "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=1),
            "retry_on_error": [RedisConnectionError, RedisTimeoutError],
            "health_check_interval": 10,
        }
        if username:
            options["username"] = username
        if password:
            options["password"] = password
        if tls_ca:
            if not url.startswith("rediss://"):
                raise ValueError("a Redis TLS CA is set but the Redis URL is not rediss://")
            options["ssl_ca_certs"] = tls_ca
        self.cluster = cluster
        # At most `pool_size` operations at once; the others wait their turn. redis-py's
        # pools (one per node on a cluster) raise "Too many connections" rather than
        # wait when every connection is busy, which under load would turn reads into
        # misses and writes into UNAVAILABLE.
        self.operations = asyncio.Semaphore(pool_size)
        if cluster:
            self.client = self._cluster_client(parse_cluster_url(url), options)
            self.pool = None
        else:
            self.pool = redis_asyncio.ConnectionPool.from_url(url, **options)
            self.client = redis_asyncio.Redis(connection_pool=self.pool)
        self.ttl_s = ttl_s
        self.key_prefix = key_prefix
        # SCAN pattern of the manifests: the prefix literal, the sequence ids a wildcard.
        literal_prefix = _GLOB_SPECIAL.sub(r"\\\1", key_prefix)
        ids = "{*}" if cluster else "*"
        self.manifest_pattern = f"{literal_prefix}:{ids}:manifest"
        self.available = True
        self.url_for_logs = url.split("@")[-1]

    def _cluster_client(self, address: ClusterAddress, options: dict) -> RedisCluster:
        """redis-py's cluster client over `address`'s startup nodes. `max_connections`
        is per node; the cluster client's own retry re-reads the slots between tries,
        which is what lets a command reach the replica that took over a failed master."""
        options.setdefault("username", address.username or None)
        options.setdefault("password", address.password or None)
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in address.nodes],
            ssl=address.tls,
            # The servers' cluster-require-full-coverage decides whether the slots of
            # a failed master take the others down; the client does not add its own.
            require_full_coverage=False,
            **options,
        )

    @property
    def startup_nodes(self) -> list[str]:
        """`host:port` of each startup node (one for a single Redis), for logs."""
        if self.cluster:
            return [node.name for node in self.client.startup_nodes]
        return [self.url_for_logs]

    def redis_key(self, name: str) -> str:
        """The Redis key of an `entry_name` or `manifest_name`: `<prefix>:<name>`, with
        the sequence's ids as hash tag on a cluster (`hash_tagged_key`)."""
        if self.cluster:
            return hash_tagged_key(self.key_prefix, name)
        return f"{self.key_prefix}:{name}"

    def key(self, key: EntryKey) -> str:
        """Redis key of an entry."""
        return self.redis_key(entry_name(key))

    def manifest_key(self, name: SequenceName) -> str:
        """Redis key of a sequence's manifest (on a cluster, in the slot of its entries)."""
        return self.redis_key(manifest_name(name))

    def _failed(self, action: str, exc: Exception) -> TierUnavailableError:
        if self.available:
            log.warning(
                "Redis tier unavailable",
                extra={"redis": self.startup_nodes, "error": str(exc)},
            )
        self.available = False
        return TierUnavailableError(f"Redis tier unavailable during {action}: {exc}")

    def _succeeded(self) -> None:
        if not self.available:
            log.info("Redis tier available again", extra={"redis": self.startup_nodes})
        self.available = True

    async def write(self, name: str, parts: list[bytes | memoryview]) -> None:
        """Returns once Redis acknowledged the write."""
        value = b"".join(parts)
        try:
            async with self.operations:
                await self.client.set(self.redis_key(name), value, ex=self.ttl_s or None)
        except REDIS_FAILURES as exc:
            raise self._failed("write", exc) from exc
        self._succeeded()

    async def read(self, name: str) -> bytes | None:
        try:
            async with self.operations:
                value = await self.client.get(self.redis_key(name))
        except REDIS_FAILURES as exc:
            raise self._failed("read", exc) from exc
        self._succeeded()
        return value

    async def remove(self, names: list[str]) -> None:
        """One DEL; the cluster client splits it into one DEL per slot."""
        try:
            async with self.operations:
                await self.client.delete(*(self.redis_key(name) for name in names))
        except REDIS_FAILURES as exc:
            raise self._failed("delete", exc) from exc
        self._succeeded()

    async def recover_entries(self, keys: list[EntryKey]) -> dict[EntryKey, int]:
        if not keys:
            return {}
        try:
            async with self.operations, self.client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.strlen(self.key(key))
                lengths = await pipe.execute()
        except REDIS_FAILURES as exc:
            raise self._failed("recovery", exc) from exc
        found = {}
        for key, length in zip(keys, lengths, strict=True):
            binding = NAME_LENGTH.size + len(entry_name(key).encode())
            if length > binding:
                found[key] = length - binding
                self._indexed(key, length - binding)
        return found

    async def put_manifest(self, name: SequenceName, data: bytes) -> None:
        await self.write(manifest_name(name), [data])

    async def delete_manifest(self, name: SequenceName) -> None:
        await self.remove([manifest_name(name)])

    async def manifests(self) -> list[bytes]:
        """Every manifest under the prefix: SCAN (on every master of a cluster), then
        MGET in batches (split per slot on a cluster)."""
        mget = self.client.mget_nonatomic if self.cluster else self.client.mget
        found: list[bytes] = []
        try:
            async with self.operations:
                keys = [
                    key
                    async for key in self.client.scan_iter(match=self.manifest_pattern, count=1000)
                ]
                for start in range(0, len(keys), 256):
                    values = await mget(keys[start : start + 256])
                    found.extend(value for value in values if value is not None)
        except REDIS_FAILURES as exc:
            raise self._failed("recovery", exc) from exc
        self._succeeded()
        return found

    async def ping(self) -> bool:
        try:
            async with self.operations:
                await self.client.ping()
        except REDIS_FAILURES as exc:
            self._failed("ping", exc)
            return False
        self._succeeded()
        return True

    async def close(self) -> None:
        await self.client.aclose()
        if self.pool is not None:
            await self.pool.aclose()
