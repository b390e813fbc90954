"""Recovery after a restart, over real gRPC with a real directory and a real Redis: a
server stopped and a new one started with the same disk directory and Redis serves
what those tiers hold, bit-exact, with the same Lookup answers; a sequence whose pieces
are incomplete (an entry only on the device, or deleted while the server was down) is
dropped, its remaining pieces deleted, never served; tenants stay apart; new writes
after the restart never collide with recovered ones. A graceful stop writes what lives
only on the device down to the tier below it (disk, Redis), so it is recovered too;
a stop with no grace (`ServerThread.stop()`'s default: as a crash) writes nothing
down, a full last tier or Redis down leaves sequences out, logged, and the stop goes on."""

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
    first.stop()  # grace 0: as a crash, nothing is written down
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


# -- the write-down at a graceful stop ------------------------------------------------

WRITE_DOWN_LOG = "minicache_server.service.server"


def device_resident(server: ServerThread) -> set[str]:
    """Sequence ids of tenant a whose entries are all on the device."""
    store = server.store
    return {
        name
        for (tenant, _, name), sequence in store.sequences.items()
        if tenant == "tenant-a" and all(store.device.contains(key) for key in sequence.entry_keys())
    }


def write_down_records(caplog, level: str) -> list:
    return [
        record
        for record in caplog.records
        if record.name == WRITE_DOWN_LOG
        and record.levelname == level
        and record.getMessage().startswith("device")
    ]


def tiered_settings(tmp_path: Path, tiers: str, redis_url: str = "", **overrides):
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKENS_FILE_LINES)
    fields = {
        "tiers": tiers,
        "device_budget_bytes": 8 * SEQUENCE,
        "tokens_file": str(tokens),
    }
    if "disk" in tiers:
        fields |= {"disk_dir": str(tmp_path / "disk"), "disk_budget_bytes": 8 * SEQUENCE}
    if "redis" in tiers:
        fields["redis_url"] = redis_url
    return settings_for(**(fields | overrides))


@pytest.mark.parametrize("tiers", ["device,disk", "device,redis"])
def test_a_graceful_stop_writes_the_device_down(
    tiers, redis_process, tmp_path: Path, caplog
) -> None:
    caplog.set_level("INFO", logger=WRITE_DOWN_LOG)
    settings = tiered_settings(tmp_path, tiers, redis_process.url)
    first = ServerThread(settings)
    sent, lookups = {}, {}
    try:
        with client_of(first, A) as a, client_of(first, B) as b:
            for index in range(3):
                sent[f"s{index}"] = kv_layers(LAYERS, TOKENS, HEADS, DIM, seed=index)
                a.put("m", f"s{index}", sent[f"s{index}"], dtype="float16", policy="none")
            # A compressed one extended in place (a decode step), another tenant's.
            k = kv_layers(LAYERS, TOKENS, HEADS, DIM, seed=7)
            a.put("m", "k", k, dtype="float16", policy="kivi4")
            step = kv_layers(LAYERS, 1, HEADS, DIM, seed=8)
            a.append("m", "k", step, dtype="float16", start_token=TOKENS)
            b.put("m", "s0", kv_layers(LAYERS, TOKENS, HEADS, DIM, seed=9), dtype="float16")
            compressed = {"k": restored(a, "k"), "b": restored(b, "s0")}
            for name in [*sent, "k"]:
                lookups[name] = a.lookup("m", name)
            lookups["b"] = b.lookup("m", "s0")
        assert device_resident(first) == {"s0", "s1", "s2", "k"}  # nothing below yet
        held = sum(sequence.stored_bytes for sequence in first.store.sequences.values())
    finally:
        first.stop(grace_s=10)
    [info] = write_down_records(caplog, "INFO")
    assert (info.sequences, info.bytes, info.tier) == (5, held, tiers.split(",")[1])
    assert not write_down_records(caplog, "WARNING")

    second = ServerThread(settings)
    try:
        with client_of(second, A) as a, client_of(second, B) as b:
            assert len(second.store.sequences) == 5
            for name, before in [*((name, lookups[name]) for name in [*sent, "k"])]:
                after = a.lookup("m", name)
                assert (after.tokens, after.stored_bytes, after.tag, after.policy) == (
                    before.tokens,
                    before.stored_bytes,
                    before.tag,
                    before.policy,
                )
                assert after.device_bytes == 0  # recovered below the device
            for name in sent:
                assert_exact(restored(a, name), sent[name])
            assert_exact(restored(a, "k"), compressed["k"])
            assert_exact(restored(b, "s0"), compressed["b"])
            assert b.lookup("m", "s0").stored_bytes == lookups["b"].stored_bytes
    finally:
        second.stop()


def test_a_sequence_nothing_wrote_down_is_dropped(redis_process, tmp_path: Path, caplog) -> None:
    """A stop without time to write down (grace 0: as after a crash), a device-only
    chain, and a full last tier: what stayed only on the device is gone at the restart."""
    caplog.set_level("INFO", logger=WRITE_DOWN_LOG)
    layers = kv_layers(LAYERS, TOKENS, HEADS, DIM, seed=1)
    # No grace: nothing written down, the sequence is not recovered.
    settings = tiered_settings(tmp_path, "device,disk")
    first = ServerThread(settings)
    with client_of(first, A) as a:
        a.put("m", "s", layers, dtype="float16", policy="none")
    first.stop(grace_s=0)
    [warning] = write_down_records(caplog, "WARNING")
    assert warning.sequences == 1 and "out of time" in warning.reasons
    second = ServerThread(settings)
    try:
        with client_of(second, A) as a, pytest.raises(NotFoundError):
            a.lookup("m", "s")
    finally:
        second.stop(grace_s=0)

    # A device-only chain: nothing below the device, nothing written, nothing logged.
    caplog.clear()
    only = settings_for(tiers="device", device_budget_bytes=4 * SEQUENCE)
    first = ServerThread(only)
    with client_of(first, "") as a:
        a.put("m", "s", layers, dtype="float16", policy="none")
    first.stop(grace_s=10)
    assert not write_down_records(caplog, "INFO") and not write_down_records(caplog, "WARNING")
    second = ServerThread(only)
    try:
        with client_of(second, "") as a, pytest.raises(NotFoundError):
            a.lookup("m", "s")
    finally:
        second.stop()

    # A disk tier (the last one) with room for one of two sequences: the most recently
    # used is written down, the other refused whole (no pieces left), one WARNING line.
    caplog.clear()
    (tmp_path / "full").mkdir()
    full = tiered_settings(tmp_path / "full", "device,disk", disk_budget_bytes=SEQUENCE * 3 // 2)
    first = ServerThread(full)
    with client_of(first, A) as a:
        old = kv_layers(LAYERS, TOKENS, HEADS, DIM, seed=2)
        a.put("m", "old", old, dtype="float16", policy="none")
        a.put("m", "new", layers, dtype="float16", policy="none")
    first.stop(grace_s=10)
    [info] = write_down_records(caplog, "INFO")
    [warning] = write_down_records(caplog, "WARNING")
    assert info.sequences == 1 and warning.sequences == 1
    assert "no room" in warning.reasons and "disk" in warning.reasons
    second = ServerThread(full)
    try:
        # Only the written-down sequence's files are on disk (before a read promotes).
        held = second.store.sequences[("tenant-a", "m", "new")].entry_keys()
        files = {path.name for path in (tmp_path / "full" / "disk" / "entries").iterdir()}
        assert files == {file_name(entry_name(key)) for key in held}
        with client_of(second, A) as a:
            assert_exact(restored(a, "new"), layers)
            with pytest.raises(NotFoundError):
                a.lookup("m", "old")
    finally:
        second.stop()


def test_a_graceful_stop_with_redis_down_stops_and_warns(
    redis_process, tmp_path: Path, caplog
) -> None:
    caplog.set_level("INFO", logger=WRITE_DOWN_LOG)
    first = ServerThread(tiered_settings(tmp_path, "device,redis", redis_process.url))
    with client_of(first, A) as a:
        a.put("m", "s", kv_layers(LAYERS, TOKENS, HEADS, DIM, seed=1), dtype="float16")
    redis_process.stop()
    first.stop(grace_s=10)  # returns: the stop never fails on a tier
    [warning] = write_down_records(caplog, "WARNING")
    assert warning.sequences == 1 and "tier unavailable" in warning.reasons
    assert len(warning.reasons.encode()) <= 400
