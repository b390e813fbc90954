"""Many clients at once, sync threads and asyncio tasks, against one server with a
budget small enough to overflow to Redis while they run: every sequence comes back as
its own, never another's."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from service_fixtures import kv_layers

from minicache_client import AsyncCacheClient, CacheClient, ClientConfig

LAYERS, HEADS, DIM = 6, 2, 32


def _layers(seed: int, tokens: int):
    return kv_layers(LAYERS, tokens, HEADS, DIM, seed=seed)


def _same(received, sent) -> bool:
    return len(received) == len(sent) and all(
        np.array_equal(k, sk) and np.array_equal(v, sv)
        for (k, v), (sk, sv) in zip(received, sent, strict=True)
    )


@pytest.fixture
def busy_server(make_server, redis_process):
    # Less than the clients write in all, more than the sequences in flight at once
    # hold (they stay on the device while a request uses them): overflow and promotion
    # happen while other requests run.
    return make_server(device_budget_bytes=3 << 20, redis_url=redis_process.url)


def test_threads_put_extend_and_prefetch_without_cross_talk(busy_server) -> None:
    config = ClientConfig(target=busy_server.address, insecure=True, timeout_s=30)

    def conversation(worker: int) -> list[str]:
        problems = []
        with CacheClient(config) as client:
            for turn in range(3):
                sequence = f"w{worker}-c{turn}"
                prefill, extension = _layers(worker * 10 + turn, 200), _layers(99 + worker, 40)
                policy = ("none", "kivi4")[worker % 2]
                client.put("m", sequence, prefill, dtype="float16", policy=policy, seal=True)
                client.put("m", sequence, extension, dtype="float16", start_token=200)
                received = client.prefetch_layers("m", sequence, start_token=200)
                if policy == "none" and not _same(received, extension):
                    problems.append(f"{sequence}: extension came back different")
                held = client.lookup("m", sequence)
                if held.tokens != 240:
                    problems.append(f"{sequence}: holds {held.tokens} tokens")
                if policy == "none":
                    full = client.prefetch_layers("m", sequence, end_token=200)
                    if not _same(full, prefill):
                        problems.append(f"{sequence}: prefill came back different")
        return problems

    with ThreadPoolExecutor(max_workers=8) as pool:
        problems = [p for result in pool.map(conversation, range(8)) for p in result]
    assert problems == []
    store = busy_server.store
    assert store.metrics.evictions.value() > 0  # the budget really was exceeded
    assert store.device.used_bytes <= store.device.budget_bytes
    assert len(store.sequences) == 24


def test_asyncio_clients_interleave_without_cross_talk(busy_server) -> None:
    config = ClientConfig(target=busy_server.address, insecure=True, timeout_s=30)

    in_flight = asyncio.Semaphore(8)

    async def one(client: AsyncCacheClient, index: int) -> bool:
        async with in_flight:
            return await conversation(client, index)

    async def conversation(client: AsyncCacheClient, index: int) -> bool:
        sent = _layers(1000 + index, 120)
        await client.put("m", f"a{index}", sent, dtype="float16", policy="none")
        for step in range(3):
            await client.append(
                "m",
                f"a{index}",
                _layers(2000 + index * 3 + step, 1),
                dtype="float16",
                start_token=120 + step,
            )
        received = await client.prefetch_layers("m", f"a{index}", end_token=120)
        return _same(received, sent)

    async def main() -> list[bool]:
        async with AsyncCacheClient(config) as client:
            return await asyncio.gather(*(one(client, index) for index in range(32)))

    assert all(asyncio.run(main()))
    assert all(
        busy_server.store.sequences[("default", "m", f"a{index}")].tokens == 123
        for index in range(32)
    )
    assert busy_server.store.metrics.evictions.value() > 0
