"""Recovery after a restart, over real gRPC with a real directory and a real Redis: a
server stopped and a new one started with the same disk directory and Redis serves
what those tiers hold, bit-exact, with the same Lookup answers; a sequence whose pieces
are incomplete (an entry only on the device, or deleted while the server was down) is
dropped, its remaining pieces deleted, never served; tenants stay apart; new writes
after the restart never collide with recovered ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from service_fixtures import ServerThread, kv_layers, settings_for

from minicache_client import CacheClient, ClientConfig, NotFoundError
from minicache_server.tiers.base import entry_name
from minicache_server.tiers.disk_tier import file_name

LAYERS, TOKENS, HEADS, DIM = 4, 128, 2, 16
SEQUENCE = LAYERS * 2 * HEADS * TOKENS * DIM * 2 + LAYERS * 1024  # policy none, float16
TOKENS_FILE_LINES = "token-of-tenant-a-0123456789 tenant-a\ntoken-of-tenant-b-0123456789 tenant-b\n"


def client_of(server: ServerThread, token: str) -> CacheClient:
    return CacheClient(
        ClientConfig(target=server.address, insecure=True, timeout_s=20, token=token)
    )


def restored(client: CacheClient, name: str):
    return client.prefetch_layers("m", name)


def assert_exact(received, layers) -> None:
    assert len(received) == len(layers)
    for (keys, values), (sent_keys, sent_values) in zip(received, layers, strict=True):
        assert np.array_equal(keys, sent_keys) and np.array_equal(values, sent_values)


@pytest.fixture
def restartable(redis_process, tmp_path: Path):
    """`start()` starts a server on the same disk directory and Redis each time; every
    server started is stopped at the end."""
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKENS_FILE_LINES)
    settings = settings_for(
        tiers="device,disk,redis",
        device_budget_bytes=SEQUENCE * 11 // 10,
        disk_dir=str(tmp_path / "disk"),
        disk_budget_bytes=2 * SEQUENCE * 11 // 10,
        redis_url=redis_process.url,
        tokens_file=str(tokens),
    )
    started: list[ServerThread] = []

    def start() -> ServerThread:
        server = ServerThread(settings)
        started.append(server)
        return server

    yield start, tmp_path / "disk"
    for server in started:
        if server.thread.is_alive():
            server.stop()


A, B = "token-of-tenant-a-0123456789", "token-of-tenant-b-0123456789"


def test_a_restarted_server_serves_what_its_tiers_hold(restartable, redis_process) -> None:
    start, directory = restartable
    first = start()
    sent, lookups, compressed = {}, {}, {}
    with client_of(first, A) as a, client_of(first, B) as b:
        for index in range(4):
            name = f"s{index}"
            sent[name] = kv_layers(LAYERS, TOKENS, HEADS, DIM, seed=index)
            a.put("m", name, sent[name], dtype="float16", policy="none", tag=f"t{index}".encode())
        # A compressed sequence, extended, and another tenant's of the same ids.
        k = kv_layers(LAYERS, TOKENS, HEADS, DIM, seed=7)
        a.put("m", "k", k, dtype="float16", policy="kivi4", seal=True)
        a.append(
            "m", "k", kv_layers(LAYERS, 3, HEADS, DIM, seed=8), dtype="float16", start_token=TOKENS
        )
        b.put(
            "m",
            "s0",
            kv_layers(LAYERS, TOKENS, HEADS, DIM, seed=99),
            dtype="float16",
            policy="none",
        )
        compressed["k"] = restored(a, "k")
        compressed["b"] = restored(b, "s0")
        # Push the compressed one and tenant b's down: the newest fill the device.
        for name, seed in (("s4", 4), ("s5", 5)):
            sent[name] = kv_layers(LAYERS, TOKENS, HEADS, DIM, seed=seed)
            a.put("m", name, sent[name], dtype="float16", policy="none")
        for name in sent:
            lookups[name] = a.lookup("m", name)
        lookups["k"] = a.lookup("m", "k")
        lookups["b"] = b.lookup("m", "s0")
        # Which sequences live wholly below the device now (they survive a restart).
        store = first.store
        below, on_device = set(), set()
        for (tenant, _, name), sequence in store.sequences.items():
            on = any(store.device.contains(key) for key in sequence.entry_keys())
            (on_device if on else below).add((tenant, name))
    assert {("tenant-a", "s0"), ("tenant-a", "s1"), ("tenant-a", "k")} <= below
    assert ("tenant-b", "s0") in below and ("tenant-a", "s5") in on_device
    first.stop()
    kept = {name for tenant, name in below if tenant == "tenant-a" and name in sent}

    second = start()
    with client_of(second, A) as a, client_of(second, B) as b:
        assert second.store.sequences.keys() == {(t, "m", name) for t, name in below}
        # Lookup answers as before the restart (shape, tokens, policy, tag, bytes and
        # where they are: below the device).
        for name in kept | {"k"}:
            assert a.lookup("m", name) == lookups[name]
        assert b.lookup("m", "s0") == lookups["b"]
        assert a.lookup("m", "s0").tag == b"t0" and a.lookup("m", "k").tokens == TOKENS + 3
        for name in kept:
            assert_exact(restored(a, name), sent[name])  # bit-exact, policy none
        assert_exact(restored(a, "k"), compressed["k"])
        # Tenant b's sequence of the same ids is its own, recovered under its tenant.
        assert_exact(restored(b, "s0"), compressed["b"])
        # A sequence that had entries on the device is incomplete: dropped.
        for tenant, name in on_device:
            with pytest.raises(NotFoundError):
                (a if tenant == "tenant-a" else b).lookup("m", name)
        # Writes after the restart neither collide with nor disturb recovered ones.
        fresh = kv_layers(LAYERS, TOKENS, HEADS, DIM, seed=50)
        a.put("m", "fresh", fresh, dtype="float16", policy="none")
        assert_exact(restored(a, "fresh"), fresh)
        for name in kept:
            assert_exact(restored(a, name), sent[name])
        more = kv_layers(LAYERS, 2, HEADS, DIM, seed=51)
        a.append("m", "s1", more, dtype="float16", start_token=TOKENS)
        extended = [
            (np.concatenate([k_, mk], axis=1), np.concatenate([v_, mv], axis=1))
            for (k_, v_), (mk, mv) in zip(sent["s1"], more, strict=True)
        ]
        assert_exact(restored(a, "s1"), extended)
        # Two more sequences push the extended one below the device again.
        for name, seed in (("s6", 6), ("s7", 7)):
            a.put("m", name, kv_layers(LAYERS, TOKENS, HEADS, DIM, seed=seed), dtype="float16")
        s1 = second.store.sequences[("tenant-a", "m", "s1")]
        assert not any(second.store.device.contains(key) for key in s1.entry_keys())
    second.stop()

    # A third start finds the extension (a newer generation than the first server's
    # manifest described) and nothing stale.
    third = start()
    with client_of(third, A) as a:
        assert a.lookup("m", "s1").tokens == TOKENS + 2
        assert_exact(restored(a, "s1"), extended)
    # Nothing is left in the lower tiers that no recovered sequence claims.
    held = {key for sequence in third.store.sequences.values() for key in sequence.entry_keys()}
    files = {path.name for path in (directory / "entries").iterdir()}
    assert files <= {file_name(entry_name(key)) for key in held}


def test_an_incomplete_sequence_is_dropped_at_recovery(restartable, redis_process) -> None:
    start, directory = restartable
    first = start()
    sent = {}
    with client_of(first, A) as a:
        for index in range(5):
            sent[f"s{index}"] = kv_layers(LAYERS, TOKENS, HEADS, DIM, seed=index)
            a.put("m", f"s{index}", sent[f"s{index}"], dtype="float16", policy="none")
    store = first.store
    on_disk = [
        name
        for name in sent
        if all(
            store.chain.locate(key).name == "disk"
            for key in store.sequences[("tenant-a", "m", name)].entry_keys()
        )
    ]
    in_redis = [
        name
        for name in sent
        if all(
            store.chain.locate(key).name == "redis"
            for key in store.sequences[("tenant-a", "m", name)].entry_keys()
        )
    ]
    assert on_disk and in_redis
    damaged_disk, damaged_redis = on_disk[0], in_redis[0]
    disk_keys = store.sequences[("tenant-a", "m", damaged_disk)].entry_keys()
    redis_keys = store.sequences[("tenant-a", "m", damaged_redis)].entry_keys()
    redis_tier = store.chain.tier("redis")
    first.stop()
    # While the server is down: one file of a sequence deleted, one Redis entry too.
    (directory / "entries" / file_name(entry_name(disk_keys[2]))).unlink()
    redis_process.client().delete(redis_tier.key(redis_keys[1]))

    second = start()
    with client_of(second, A) as a:
        for name in (damaged_disk, damaged_redis):
            with pytest.raises(NotFoundError):
                a.lookup("m", name)
            with pytest.raises(NotFoundError):
                a.prefetch_layers("m", name)
        for name in set(on_disk + in_redis) - {damaged_disk, damaged_redis}:
            assert_exact(restored(a, name), sent[name])
    # The pieces left of the dropped sequences were deleted, with their manifests.
    for key in disk_keys:
        assert not (directory / "entries" / file_name(entry_name(key))).exists()
    redis = redis_process.client()
    assert not any(redis.exists(redis_tier.key(key)) for key in redis_keys)
    manifests = [key for key in redis.keys("*") if key.endswith(b":manifest")]
    assert not any(f":{name}:".encode() in key for key in manifests for name in (damaged_redis,))
