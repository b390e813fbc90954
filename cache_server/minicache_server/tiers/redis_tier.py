"""The overflow tier: checksummed entry encodings in Redis.

Redis is treated as lossy: what comes back is verified and a failed check is a miss.
Each value starts with the Redis key it was written under, so an entry that is valid but
sits under another key (copied, renamed, a stale generation) is refused here; the
entry's own checksum is verified by the caller (`decode_entry`). Connection settings are passed explicitly (pool size,
timeouts, bounded retries of connection errors only): redis-py's defaults differ between
versions. Any Redis failure surfaces as `OverflowUnavailableError`; the connection pool
reconnects by itself once Redis is back.
"""

from __future__ import annotations

import logging
import struct
from urllib.parse import quote

import redis.asyncio as redis_asyncio
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from minicache_client.entry import CorruptEntryError
from minicache_server.tiers.device_tier import EntryKey

log = logging.getLogger(__name__)

_KEY_LENGTH = struct.Struct("<H")


class OverflowUnavailableError(RuntimeError):
    """Redis did not answer (down, timed out, refused the credentials)."""


class RedisTier:
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
        """Redis key of an entry: prefix and tenant first, ids escaped (no ':' inside)."""
        parts = (key.tenant, key.model_id, key.sequence_id)
        escaped = ":".join(quote(part, safe="") for part in parts)
        return f"{self.key_prefix}:{escaped}:{key.generation}:{key.group}"

    def _failed(self, action: str, exc: Exception) -> OverflowUnavailableError:
        if self.available:
            log.warning(
                "overflow tier unavailable", extra={"redis": self.url_for_logs, "error": str(exc)}
            )
        self.available = False
        return OverflowUnavailableError(f"overflow tier (Redis) unavailable during {action}: {exc}")

    def _succeeded(self) -> None:
        if not self.available:
            log.info("overflow tier available again", extra={"redis": self.url_for_logs})
        self.available = True

    async def put(self, key: EntryKey, data: bytes) -> None:
        """Store `data`; returns once Redis acknowledged the write."""
        name = self.key(key)
        bound = _KEY_LENGTH.pack(len(name.encode())) + name.encode() + data
        try:
            await self.client.set(name, bound, ex=self.ttl_s or None)
        except (RedisError, OSError) as exc:
            raise self._failed("write", exc) from exc
        self._succeeded()

    async def get(self, key: EntryKey) -> memoryview | None:
        """The stored bytes, None when the key is absent; `CorruptEntryError` when the
        value was not written under this key."""
        name = self.key(key).encode()
        try:
            data = await self.client.get(name)
        except (RedisError, OSError) as exc:
            raise self._failed("read", exc) from exc
        self._succeeded()
        if data is None:
            return None
        view = memoryview(data)
        size = _KEY_LENGTH.size
        if len(view) < size or view[size : size + _KEY_LENGTH.unpack_from(view)[0]] != name:
            raise CorruptEntryError("overflowed value was not written under its key")
        return view[size + len(name) :]

    async def delete(self, keys: list[EntryKey]) -> None:
        if not keys:
            return
        try:
            await self.client.delete(*(self.key(key) for key in keys))
        except (RedisError, OSError) as exc:
            raise self._failed("delete", exc) from exc
        self._succeeded()

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
