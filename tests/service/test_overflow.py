"""Device tier under a tiny budget with real Redis: overflow, promotion, byte
accounting, Redis killed and restarted, corrupted and misplaced bytes in Redis."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from service_fixtures import ServerThread, kv_layers, settings_for

from minicache_client import CacheClient, ClientConfig, NotFoundError, UnavailableError
from minicache_client.entry import stored_bytes

LAYERS, TOKENS, HEADS, DIM = 6, 256, 2, 16
SEQUENCE_BYTES = LAYERS * 2 * HEADS * TOKENS * DIM * 2  # policy none, float16: 196,608
BUDGET = 2 * SEQUENCE_BYTES + SEQUENCE_BYTES // 2  # two and a half sequences


@pytest.fixture
def cluster(redis_process):
    server = ServerThread(
        settings_for(device_budget_bytes=BUDGET, redis_url=redis_process.url, redis_timeout_s=0.5)
    )
    client = CacheClient(ClientConfig(target=server.address, insecure=True, timeout_s=10))
    yield server, client, redis_process
    client.close()
    server.stop()


def _device_bytes_recounted(server) -> int:
    """The device tier's entries, measured again (the length of their encodings)."""
    device = server.store.device
    return sum(stored_bytes(device.peek(key)) for key in device.coldest())


def _entry_keys(redis_process) -> list[bytes]:
    """The entries in Redis (the sequences' manifests sit beside them)."""
    return [key for key in redis_process.client().keys("*") if not key.endswith(b":manifest")]


def _put_all(client, count: int) -> dict[str, list]:
    sent = {}
    for index in range(count):
        sent[f"s{index}"] = kv_layers(LAYERS, TOKENS, HEADS, DIM, seed=index)
        client.put("m", f"s{index}", sent[f"s{index}"], dtype="float16", policy="none")
    return sent


def _assert_exact(client, sequence: str, layers) -> None:
    received = client.prefetch_layers("m", sequence)
    for (keys, values), (sent_keys, sent_values) in zip(received, layers, strict=True):
        assert np.array_equal(keys, sent_keys) and np.array_equal(values, sent_values)


def test_overflow_promotion_and_byte_accounting(cluster) -> None:
    server, client, redis_process = cluster
    sent = _put_all(client, 6)
    device = server.store.device
    assert device.used_bytes <= BUDGET
    assert device.used_bytes == _device_bytes_recounted(server)
    lookups = {name: client.lookup("m", name) for name in sent}
    overflowed = sum(lookup.overflow_groups for lookup in lookups.values())
    assert overflowed >= 3 * LAYERS  # at least three sequences' worth left the device
    assert len(_entry_keys(redis_process)) == overflowed
    # The coldest sequence went first, the newest is whole on the device.
    assert lookups["s0"].overflow_groups == LAYERS and lookups["s5"].overflow_groups == 0
    for lookup in lookups.values():
        assert lookup.device_bytes + lookup.overflow_bytes > 0
        assert lookup.device_groups + lookup.overflow_groups == LAYERS
    stats = client.stats()
    assert stats.device_bytes == device.used_bytes
    assert stats.overflow_bytes == sum(lookup.overflow_bytes for lookup in lookups.values())
    # A prefetch of an overflowed sequence promotes it back, bit-exact.
    promotions = server.store.metrics.promotions.value()
    _assert_exact(client, "s0", sent["s0"])
    assert client.lookup("m", "s0").overflow_groups == 0
    assert server.store.metrics.promotions.value() == promotions + LAYERS
    assert device.used_bytes <= BUDGET and device.used_bytes == _device_bytes_recounted(server)
    for name in sent:
        _assert_exact(client, name, sent[name])
    assert len(_entry_keys(redis_process)) == sum(
        client.lookup("m", name).overflow_groups for name in sent
    )
    # Deleting drops both tiers.
    for name in sent:
        assert client.delete("m", name)
    assert device.used_bytes == 0 and redis_process.client().dbsize() == 0


def test_redis_down_then_back(cluster) -> None:
    server, client, redis_process = cluster
    sent = _put_all(client, 4)  # s0 and s1 overflowed, s2 and s3 on the device
    assert client.lookup("m", "s0").overflow_groups == LAYERS
    redis_process.stop()
    # The device tier keeps serving.
    _assert_exact(client, "s3", sent["s3"])
    # Reading an overflowed entry and writing what needs overflow fail fast, retryable.
    with pytest.raises(UnavailableError):
        client.prefetch_layers("m", "s0")
    started = time.monotonic()
    with pytest.raises(UnavailableError):
        client.put(
            "m",
            "s9",
            kv_layers(LAYERS, TOKENS, HEADS, DIM, seed=9),
            dtype="float16",
            policy="none",
            timeout_s=8,
        )
    assert time.monotonic() - started < 8
    with pytest.raises(NotFoundError):
        client.lookup("m", "s9")  # nothing of the failed write is visible
    assert server.store.device.used_bytes <= BUDGET
    # Deleting a device-resident sequence needs no Redis; a write that fits the freed
    # room needs no overflow.
    assert client.delete("m", "s3")
    client.put("m", "small", kv_layers(LAYERS, 8, HEADS, DIM), dtype="float16", policy="none")
    # Redis returns (empty: it kept nothing): overflowed sequences are misses, never data;
    # writes work again.
    redis_process.start()
    with pytest.raises(NotFoundError):
        client.prefetch_layers("m", "s0")
    with pytest.raises(NotFoundError):
        client.lookup("m", "s0")
    sent["s9"] = kv_layers(LAYERS, TOKENS, HEADS, DIM, seed=9)
    client.put("m", "s9", sent["s9"], dtype="float16", policy="none")
    for name in ("s2", "s9"):
        _assert_exact(client, name, sent[name])
    assert server.store.metrics.misses.value(reason="lost_entry") >= 1


def test_corrupted_and_misplaced_entries_are_misses(cluster) -> None:
    server, client, redis_process = cluster
    _put_all(client, 6)  # s0, s1, s2 overflowed whole (s3 half)
    redis = redis_process.client()
    keys = sorted(_entry_keys(redis_process))
    s0_keys = [key for key in keys if b":s0:" in key]
    s1_keys = [key for key in keys if b":s1:" in key]
    s2_keys = [key for key in keys if b":s2:" in key]
    assert len(s0_keys) == len(s1_keys) == len(s2_keys) == LAYERS
    # One flipped bit in a stored entry of s0.
    value = bytearray(redis.get(s0_keys[0]))
    value[len(value) // 2] ^= 0x04
    redis.set(s0_keys[0], bytes(value))
    with pytest.raises(NotFoundError, match="recompute"):
        client.prefetch_layers("m", "s0")
    assert server.store.metrics.corrupt_entries.value() == 1
    assert not any(redis.exists(key) for key in s0_keys)  # deleted, not kept
    # A valid entry of s2 copied under s1's key: intact bytes, wrong place.
    redis.set(s1_keys[0], redis.get(s2_keys[0]))
    with pytest.raises(NotFoundError):
        client.prefetch_layers("m", "s1", first_layer=0, last_layer=0)
    assert server.store.metrics.corrupt_entries.value() == 2
    with pytest.raises(NotFoundError):
        client.lookup("m", "s1")


def test_append_while_its_sequence_is_being_demoted(redis_process) -> None:
    """An append that arrives while another put is moving the same sequence's entries to
    Redis (held there by Redis pausing its writes) extends the sequence wherever its
    entries end up: it never finds an entry gone from the device under its feet."""
    server = ServerThread(
        settings_for(device_budget_bytes=BUDGET, redis_url=redis_process.url, redis_timeout_s=10)
    )
    client = CacheClient(ClientConfig(target=server.address, insecure=True, timeout_s=30))
    try:
        sent = _put_all(client, 2)  # s0 is the coldest
        step = kv_layers(LAYERS, 1, HEADS, DIM, seed=99)
        redis_process.client().execute_command("CLIENT", "PAUSE", "1500", "WRITE")
        with ThreadPoolExecutor(max_workers=1) as pool:
            # Needs room: demotes s0's entries, each write held by the pause.
            put = pool.submit(
                client.put,
                "m",
                "s2",
                kv_layers(LAYERS, TOKENS, HEADS, DIM, seed=2),
                dtype="float16",
                policy="none",
            )
            time.sleep(0.5)
            result = client.append("m", "s0", step, dtype="float16", start_token=TOKENS)
            put.result()
        assert result.tokens == TOKENS + 1
        received = client.prefetch_layers("m", "s0")
        for (keys, values), (sent_keys, sent_values), (step_keys, step_values) in zip(
            received, sent["s0"], step, strict=True
        ):
            assert np.array_equal(keys, np.concatenate([sent_keys, step_keys], axis=1))
            assert np.array_equal(values, np.concatenate([sent_values, step_values], axis=1))
    finally:
        client.close()
        server.stop()
