"""Streamed puts (new writes and extensions) queue for the staging of puts in progress
(bounded by the device budget) instead of being refused UNAVAILABLE: a put reserves the
staging it needs at most before its first layer, first come first served, and is
refused only when it waited `STAGING_WAIT_S` without room.

Real server, real gRPC over loopback, Redis for what overflows the small device."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
from service_fixtures import kv_layers

from minicache_client import CacheClient, ClientConfig
from minicache_server.store.writes import MAX_QUEUED_LAYERS

LAYERS, HEADS, DIM, TOKENS = 8, 2, 32, 2048
LAYER_BYTES = 2 * HEADS * TOKENS * DIM * 2  # one layer's keys and values in fp16


def test_reservations_are_granted_in_order_and_a_timeout_or_cancel_takes_nothing(
    make_server,
) -> None:
    server = make_server(device_budget_bytes=1 << 20)
    store = server.store

    async def scenario() -> None:
        budget = store.device.budget_bytes
        assert await store.reserve_staging(budget - 100, 1.0)
        granted: list[str] = []

        async def reserve(name: str, nbytes: int) -> None:
            assert await store.reserve_staging(nbytes, 5.0)
            granted.append(name)

        big = asyncio.create_task(reserve("big", budget // 2))
        await asyncio.sleep(0.01)
        # 50 bytes would fit now, but the big write asked first.
        small = asyncio.create_task(reserve("small", 50))
        await asyncio.sleep(0.05)
        assert granted == [] and store.staging_waiting == 2  # the metrics' gauge
        store.staged_bytes -= budget - 100  # the first write ends
        store.staging_released()
        await asyncio.gather(big, small)
        assert granted == ["big", "small"] and store.staging_waiting == 0
        assert store.staged_bytes == budget // 2 + 50

        assert not await store.reserve_staging(budget, 0.05)  # no room in time
        waiting = asyncio.create_task(store.reserve_staging(budget, 5.0))
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert store.staged_bytes == budget // 2 + 50  # neither took anything

        store.staged_bytes = 0
        store.staging_released()
        assert await store.reserve_staging(budget, 0.1)  # nothing left queued ahead
        store.staged_bytes = 0

    server.call(scenario())


def test_concurrent_puts_wait_for_staging_instead_of_being_refused(
    make_server, redis_process
) -> None:
    # Room to stage one put at a time (its peak: a layer group of one plus the layers
    # queued for the encoder), not two; stored entries overflow to Redis.
    peak = (1 + MAX_QUEUED_LAYERS) * LAYER_BYTES
    server = make_server(device_budget_bytes=peak + LAYER_BYTES, redis_url=redis_process.url)
    config = ClientConfig(target=server.address, insecure=True, timeout_s=60)

    def write(index: int) -> int:
        with CacheClient(config) as client:
            layers = kv_layers(LAYERS, TOKENS, HEADS, DIM, seed=index)
            client.put("m", f"s{index}", layers, dtype="float16", policy="kivi4", seal=True)
            return client.lookup("m", f"s{index}").tokens

    with ThreadPoolExecutor(max_workers=6) as pool:
        held = list(pool.map(write, range(6)))
    assert held == [TOKENS] * 6
    assert server.store.staged_bytes == 0
    requests = server.store.metrics.requests
    assert requests.value(method="Put", code="OK") == 6
    assert requests.value(method="Put", code="UNAVAILABLE") == 0


def test_extensions_queue_for_staging_too(make_server, redis_process) -> None:
    # Room to stage one extension at a time: each holds all its raw layers until it
    # commits, so the others wait for it instead of being refused.
    extension_tokens = 256
    extension_bytes = LAYERS * 2 * HEADS * extension_tokens * DIM * 2
    server = make_server(
        device_budget_bytes=extension_bytes + extension_bytes // 2, redis_url=redis_process.url
    )
    config = ClientConfig(target=server.address, insecure=True, timeout_s=60)

    def extend(index: int) -> int:
        with CacheClient(config) as client:
            prefix = kv_layers(LAYERS, 64, HEADS, DIM, seed=index)
            client.put("m", f"e{index}", prefix, dtype="float16", policy="kivi4")
            more = kv_layers(LAYERS, extension_tokens, HEADS, DIM, seed=100 + index)
            client.put("m", f"e{index}", more, dtype="float16", start_token=64)
            return client.lookup("m", f"e{index}").tokens

    with ThreadPoolExecutor(max_workers=6) as pool:
        held = list(pool.map(extend, range(6)))
    assert held == [64 + extension_tokens] * 6
    assert server.store.staged_bytes == 0
    assert server.store.metrics.requests.value(method="Put", code="UNAVAILABLE") == 0
