"""The Redis tier: checksummed entry encodings in Redis, the last tier of a chain.

Redis is treated as lossy: what comes back is verified and a failed check is a miss.
Each value starts with the name it was written under (`encoded_tier.py`), so an entry
that is valid but sits under another key (copied, renamed, a stale generation) is
refused; the entry's own checksum is verified by `decode_entry`. Sequence manifests
(`put_manifest`) sit beside the entries under `<prefix>:<ids>:manifest`, so a restarted
server finds them. Connection settings are passed explicitly (pool size, timeouts,
bounded retries of connection errors only): redis-py's defaults differ between
versions. Any Redis failure surfaces as `TierUnavailableError`; the connection pool
reconnects by itself once Redis is back.
"""

from __future__ import annotations

import logging

import redis.asyncio as redis_asyncio
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

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


class RedisTier(EncodedTier):
    name = "redis"
    budget_bytes = None

    def __init__(
        self,
        url: str,
        *,
        username: str = "",
        password: str = "",
        tls_ca: str = "",
        pool_size: int = 16,
        timeout_s: float = 2.0,
        ttl_s: int = 0,
        key_prefix: str = "minicache",
    ) -> None:
        super().__init__()
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
        self.pool = redis_asyncio.ConnectionPool.from_url(url, **options)
        self.client = redis_asyncio.Redis(connection_pool=self.pool)
        self.ttl_s = ttl_s
        self.key_prefix = key_prefix
        self.available = True
        self.url_for_logs = url.split("@")[-1]

    def key(self, key: EntryKey) -> str:
        """Redis key of an entry: the prefix, then `entry_name` (tenant first)."""
        return f"{self.key_prefix}:{entry_name(key)}"

    def _failed(self, action: str, exc: Exception) -> TierUnavailableError:
        if self.available:
            log.warning(
                "Redis tier unavailable", extra={"redis": self.url_for_logs, "error": str(exc)}
            )
        self.available = False
        return TierUnavailableError(f"Redis tier unavailable during {action}: {exc}")

    def _succeeded(self) -> None:
        if not self.available:
            log.info("Redis tier available again", extra={"redis": self.url_for_logs})
        self.available = True

    async def write(self, name: str, parts: list[bytes | memoryview]) -> None:
        """Returns once Redis acknowledged the write."""
        value = b"".join(parts)
        try:
            await self.client.set(f"{self.key_prefix}:{name}", value, ex=self.ttl_s or None)
        except (RedisError, OSError) as exc:
            raise self._failed("write", exc) from exc
        self._succeeded()

    async def read(self, name: str) -> bytes | None:
        try:
            value = await self.client.get(f"{self.key_prefix}:{name}")
        except (RedisError, OSError) as exc:
            raise self._failed("read", exc) from exc
        self._succeeded()
        return value

    async def remove(self, names: list[str]) -> None:
        try:
            await self.client.delete(*(f"{self.key_prefix}:{name}" for name in names))
        except (RedisError, OSError) as exc:
            raise self._failed("delete", exc) from exc
        self._succeeded()

    async def recover_entries(self, keys: list[EntryKey]) -> dict[EntryKey, int]:
        if not keys:
            return {}
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.strlen(self.key(key))
                lengths = await pipe.execute()
        except (RedisError, OSError) as exc:
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
        found: list[bytes] = []
        try:
            keys = [key async for key in self.client.scan_iter(f"{self.key_prefix}:*:manifest")]
            for start in range(0, len(keys), 256):
                values = await self.client.mget(keys[start : start + 256])
                found.extend(value for value in values if value is not None)
        except (RedisError, OSError) as exc:
            raise self._failed("recovery", exc) from exc
        self._succeeded()
        return found

    async def ping(self) -> bool:
        try:
            await self.client.ping()
        except (RedisError, OSError) as exc:
            self._failed("ping", exc)
            return False
        self._succeeded()
        return True

    async def close(self) -> None:
        await self.client.aclose()
        await self.pool.aclose()
