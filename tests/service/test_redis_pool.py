"""The Redis tier under more concurrent operations than its connection pool holds: they
wait for a connection instead of failing with "Too many connections" (which would turn
into UNAVAILABLE or a miss under load)."""

from __future__ import annotations

import asyncio

from minicache_server.tiers.redis_tier import RedisTier


def test_operations_beyond_the_pool_wait_for_a_connection(redis_process) -> None:
    async def exercise() -> list[bytes | None]:
        tier = RedisTier(redis_process.url, pool_size=2, timeout_s=5)
        try:
            names = [f"t:m:s{index}:0:0" for index in range(24)]
            await asyncio.gather(*(tier.write(name, [name.encode() * 4096]) for name in names))
            return await asyncio.gather(*(tier.read(name) for name in names))
        finally:
            await tier.close()

    values = asyncio.run(exercise())
    assert values == [f"t:m:s{index}:0:0".encode() * 4096 for index in range(24)]
