"""The tier chain over real gRPC, real Redis and a real directory: every order of tiers
(device; device, disk; device, Redis; device, disk, Redis), one byte count per entry
whatever tier holds it (Put == Lookup == Stats == /metrics), a full disk tier (demotes
to Redis, or refuses when it is the last tier), disk entries corrupted, misplaced or
deleted behind the server's back (a miss, deleted, never data), and a sequence larger
than the device budget written and extended through the lower tiers."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from service_fixtures import kv_layers, scrape_tier_bytes, settings_for

from minicache_client import (
    CacheClient,
    ClientConfig,
    NotFoundError,
    ResourceExhaustedError,
)
from minicache_client.entry import stored_bytes
from minicache_client.policy import PRESETS
from minicache_client.sequence_encoder import SequenceEncoder
from minicache_client.serving.settings import SettingsError
from minicache_server.tiers.base import entry_name
from minicache_server.tiers.disk_tier import file_name

LAYERS, TOKENS, HEADS, DIM = 4, 128, 2, 16
RAW_GROUP = 2 * HEADS * TOKENS * DIM * 2  # one layer's keys and values, float16: 16,384
# A sequence of policy none: four entries of the raw bytes and their metadata.
SEQUENCE = LAYERS * RAW_GROUP + LAYERS * 1024


def client_of(server) -> CacheClient:
    return CacheClient(ClientConfig(target=server.address, insecure=True, timeout_s=20))


def put(client: CacheClient, name: str, seed: int, tokens: int = TOKENS, policy: str = "none"):
    layers = kv_layers(LAYERS, tokens, HEADS, DIM, seed=seed)
    result = client.put("m", name, layers, dtype="float16", policy=policy)
    return layers, result


def assert_exact(client: CacheClient, name: str, layers) -> None:
    received = client.prefetch_layers("m", name)
    assert len(received) == len(layers)
    for (keys, values), (sent_keys, sent_values) in zip(received, layers, strict=True):
        assert np.array_equal(keys, sent_keys) and np.array_equal(values, sent_values)


def entry_files(directory: Path) -> list[Path]:
    return sorted(path for path in (directory / "entries").iterdir() if path.is_file())


def entry_path(server, directory: Path, name: str, group: int) -> Path:
    key = server.store.sequences[("default", "m", name)].key(group)
    return directory / "entries" / file_name(entry_name(key))


def redis_entries(redis_process) -> list[bytes]:
    return [k for k in redis_process.client().keys("*") if not k.endswith(b":manifest")]


def tiers_of(server, name: str) -> list[str]:
    sequence = server.store.sequences[("default", "m", name)]
    return [server.store.chain.locate(key).name for key in sequence.entry_keys()]


def assert_one_count(server, client: CacheClient, puts: dict) -> None:
    """Put's stored bytes == Lookup's == the entries measured again, Stats adds them
    up, and /metrics' bytes per tier add up the entries each tier holds."""
    chain = server.store.chain
    by_tier = dict.fromkeys((tier.name for tier in chain.tiers), 0)
    total = 0
    for name, result in puts.items():
        lookup = client.lookup("m", name)
        assert lookup.stored_bytes == result.stored_bytes, name
        sequence = server.store.sequences[("default", "m", name)]
        for group, key in enumerate(sequence.entry_keys()):
            tier = chain.locate(key)
            by_tier[tier.name] += tier.size_of(key)
            assert tier.size_of(key) == sequence.entry_bytes[group]
            if tier is chain.device:
                assert stored_bytes(chain.device.peek(key)) == tier.size_of(key)
        device = sum(
            sequence.entry_bytes[g]
            for g, key in enumerate(sequence.entry_keys())
            if key in chain.device
        )
        assert (lookup.device_bytes, lookup.overflow_bytes) == (
            device,
            lookup.stored_bytes - device,
        )
        total += lookup.stored_bytes
    stats = client.stats()
    assert stats.stored_bytes == total
    assert stats.device_bytes == by_tier[chain.device.name]
    scraped = scrape_tier_bytes(server.server.metrics_port)
    assert scraped == by_tier  # the tiers' own names, each tier's own count
    assert sum(scraped.values()) == total


ORDERS = ["device", "device,disk", "device,redis", "device,disk,redis"]


@pytest.mark.parametrize("tiers", ORDERS)
def test_every_order_of_tiers_holds_serves_and_counts_alike(
    tiers: str, make_server, redis_process, tmp_path: Path
) -> None:
    names = tiers.split(",")
    options = {"tiers": tiers, "metrics_listen": "127.0.0.1:0"}
    # The device holds a bit more than one sequence; with a tier below, five go in.
    options["device_budget_bytes"] = SEQUENCE * 11 // 10 if len(names) > 1 else 6 * SEQUENCE
    if "disk" in names:
        options["disk_dir"] = str(tmp_path / "disk")
        options["disk_budget_bytes"] = SEQUENCE * 11 // 10 if "redis" in names else 6 * SEQUENCE
    if "redis" in names:
        options["redis_url"] = redis_process.url
    server = make_server(**options)
    assert [tier.name for tier in server.store.chain.tiers] == [
        "host" if name == "device" else name for name in names
    ]
    with client_of(server) as client:
        sent, puts = {}, {}
        for index in range(5):
            sent[f"s{index}"], puts[f"s{index}"] = put(client, f"s{index}", seed=index)
        residency = {name: set(tiers_of(server, name)) for name in sent}
        assert residency["s4"] == {"host"}  # the newest is whole on the device
        if len(names) == 1:
            assert all(where == {"host"} for where in residency.values())
        elif names == ["device", "disk", "redis"]:
            # The oldest went all the way down, one is on disk, the newest on the device.
            assert residency["s0"] == {"redis"} and residency["s3"] == {"disk"}
        else:
            assert residency["s0"] == {names[1]}
        if "disk" in names:
            disk = server.store.chain.tier("disk")
            assert len(entry_files(tmp_path / "disk")) == len(disk) > 0
            assert disk.used_bytes <= disk.budget_bytes
        if "redis" in names:
            assert len(redis_entries(redis_process)) == len(server.store.chain.tier("redis")) > 0
        assert server.store.device.used_bytes <= server.store.device.budget_bytes
        assert_one_count(server, client, puts)
        # Every sequence comes back bit-exact from wherever it is, promoted to the device.
        for name in sent:
            assert_exact(client, name, sent[name])
            assert set(tiers_of(server, name)) == {"host"}
        assert_one_count(server, client, puts)
        for name in sent:
            assert client.delete("m", name)
        assert scrape_tier_bytes(server.server.metrics_port) == {
            tier.name: 0 for tier in server.store.chain.tiers
        }
    if "disk" in names:
        assert entry_files(tmp_path / "disk") == []
        assert list((tmp_path / "disk" / "manifests").iterdir()) == []
    if "redis" in names:
        assert redis_process.client().dbsize() == 0


def test_one_count_for_an_entry_on_the_device_on_disk_and_in_redis(
    make_server, redis_process, tmp_path: Path
) -> None:
    """A compressed sequence in each tier: each is counted the length of its encoding."""
    largest = 0
    for seed in range(3):
        encoder = SequenceEncoder(
            PRESETS["kivi4"], num_layers=LAYERS, kv_heads=HEADS, head_dim=DIM, dtype="float16"
        )
        for layer, (keys, values) in enumerate(kv_layers(LAYERS, TOKENS, HEADS, DIM, seed=seed)):
            encoder.put_layer(layer, keys, values)
        largest = max(largest, encoder.stored_bytes())
    # Each tier holds one sequence, not two.
    server = make_server(
        tiers="device,disk,redis",
        device_budget_bytes=largest * 11 // 10,
        disk_dir=str(tmp_path / "disk"),
        disk_budget_bytes=largest * 11 // 10,
        redis_url=redis_process.url,
        metrics_listen="127.0.0.1:0",
    )
    with client_of(server) as client:
        puts = {}
        for index in range(3):
            _, puts[f"k{index}"] = put(client, f"k{index}", seed=index, policy="kivi4")
        assert set(tiers_of(server, "k0")) == {"redis"}
        assert set(tiers_of(server, "k1")) == {"disk"}
        assert set(tiers_of(server, "k2")) == {"host"}
        assert_one_count(server, client, puts)
        # The Redis value is its encoding and the name it is bound to; the file too.
        k0 = server.store.sequences[("default", "m", "k0")]
        key = server.store.chain.tier("redis").key(k0.key(0))
        assert redis_process.client().strlen(key) == k0.entry_bytes[0] + 2 + len(
            entry_name(k0.key(0))
        )
        k1 = server.store.sequences[("default", "m", "k1")]
        path = entry_path(server, tmp_path / "disk", "k1", 0)
        assert path.stat().st_size == k1.entry_bytes[0] + 2 + len(entry_name(k1.key(0)))


def test_a_full_disk_tier_demotes_to_redis_or_refuses_when_last(
    make_server, redis_process, tmp_path: Path
) -> None:
    disk_budget = 2 * SEQUENCE
    below = make_server(
        tiers="device,disk,redis",
        device_budget_bytes=SEQUENCE,
        disk_dir=str(tmp_path / "with-redis"),
        disk_budget_bytes=disk_budget,
        redis_url=redis_process.url,
    )
    last = make_server(
        tiers="device,disk",
        device_budget_bytes=SEQUENCE,
        disk_dir=str(tmp_path / "last"),
        disk_budget_bytes=disk_budget,
    )
    with client_of(below) as client:
        sent = {f"s{i}": put(client, f"s{i}", seed=i)[0] for i in range(6)}
        disk = below.store.chain.tier("disk")
        assert disk.used_bytes <= disk_budget
        assert len(redis_entries(redis_process)) >= 2 * LAYERS
        for name, layers in sent.items():
            assert_exact(client, name, layers)
    with client_of(last) as client:
        kept = {}
        for index in range(10):
            try:
                kept[f"s{index}"] = put(client, f"s{index}", seed=index)[0]
            except ResourceExhaustedError as exc:
                assert "no tier can hold" in str(exc) and "no tier is below it" in str(exc)
                refused = f"s{index}"
                break
        else:
            pytest.fail("a full disk tier, the last one, accepted every put")
        assert len(kept) >= 2
        with pytest.raises(NotFoundError):
            client.lookup("m", refused)  # nothing of the refused write is visible
        disk = last.store.chain.tier("disk")
        assert disk.used_bytes <= disk_budget
        assert len(entry_files(tmp_path / "last")) == len(disk)  # its entries were removed
        for name, layers in kept.items():
            assert_exact(client, name, layers)
        # More than every tier together holds is refused at the header, with the reason.
        with pytest.raises(ResourceExhaustedError, match="every tier together"):
            put(client, "huge", seed=9, tokens=500)  # each layer fits the staging


def test_disk_entries_corrupted_misplaced_or_deleted_are_misses(
    make_server, tmp_path: Path
) -> None:
    directory = tmp_path / "disk"
    server = make_server(
        tiers="device,disk",
        device_budget_bytes=SEQUENCE,
        disk_dir=str(directory),
        disk_budget_bytes=8 * SEQUENCE,
    )
    metrics = server.store.metrics
    with client_of(server) as client:
        sent = {f"s{i}": put(client, f"s{i}", seed=i)[0] for i in range(5)}
        for name in ("s0", "s1", "s2", "s3"):
            assert set(tiers_of(server, name)) == {"disk"}
        # One flipped bit in a file of s0.
        s0_files = [entry_path(server, directory, "s0", group) for group in range(LAYERS)]
        data = bytearray(s0_files[1].read_bytes())
        data[len(data) // 2] ^= 0x10
        s0_files[1].write_bytes(bytes(data))
        with pytest.raises(NotFoundError, match="recompute"):
            client.prefetch_layers("m", "s0")
        assert metrics.corrupt_entries.value() == 1
        assert not any(path.exists() for path in s0_files)  # deleted, not kept
        with pytest.raises(NotFoundError):
            client.lookup("m", "s0")
        # A valid file of s2 copied over s1's: intact bytes, wrong key.
        shutil.copyfile(
            entry_path(server, directory, "s2", 0), entry_path(server, directory, "s1", 0)
        )
        with pytest.raises(NotFoundError):
            client.prefetch_layers("m", "s1", first_layer=0, last_layer=0)
        assert metrics.corrupt_entries.value() == 2
        # A file deleted behind the server's back: a miss, and the rest of it goes too.
        s2_files = [entry_path(server, directory, "s2", group) for group in range(LAYERS)]
        s2_files[3].unlink()
        lost = metrics.misses.value(reason="lost_entry")
        with pytest.raises(NotFoundError, match="recompute"):
            client.prefetch_layers("m", "s2")
        assert metrics.misses.value(reason="lost_entry") == lost + 1
        assert not any(path.exists() for path in s2_files)
        # The others are untouched, and the tier's count matches its files.
        for name in ("s3", "s4"):
            assert_exact(client, name, sent[name])
        disk = server.store.chain.tier("disk")
        assert sum(path.stat().st_size for path in entry_files(directory)) > disk.used_bytes
        assert len(entry_files(directory)) == len(disk)


@pytest.mark.parametrize("tiers", ["device,disk", "device,redis"])
def test_a_sequence_larger_than_the_device_is_written_and_extended(
    tiers: str, make_server, redis_process, tmp_path: Path
) -> None:
    # A layer's raw KV (the staging of a put) fits the device budget; the sequence not.
    options = {"tiers": tiers, "device_budget_bytes": SEQUENCE}
    if "disk" in tiers:
        options.update(disk_dir=str(tmp_path / "disk"), disk_budget_bytes=16 * SEQUENCE)
    else:
        options["redis_url"] = redis_process.url
    server = make_server(**options)
    device = server.store.device
    with client_of(server) as client:
        # Three times the device budget, in one put.
        layers, result = put(client, "long", seed=1, tokens=3 * TOKENS)
        assert result.stored_bytes > device.budget_bytes
        lookup = client.lookup("m", "long")
        assert lookup.overflow_groups > 0 and lookup.stored_bytes == result.stored_bytes
        assert device.used_bytes <= device.budget_bytes
        assert_exact(client, "long", layers)
        # Extended by appends (a decode step, then a few tokens) and by a put.
        held = 3 * TOKENS
        for step, count in enumerate((1, 5)):
            more = kv_layers(LAYERS, count, HEADS, DIM, seed=10 + step)
            answer = client.append("m", "long", more, dtype="float16", start_token=held)
            held += count
            assert answer.tokens == held
            layers = [
                (np.concatenate([k, mk], axis=1), np.concatenate([v, mv], axis=1))
                for (k, v), (mk, mv) in zip(layers, more, strict=True)
            ]
            assert client.lookup("m", "long").stored_bytes == answer.stored_bytes
        more = kv_layers(LAYERS, TOKENS, HEADS, DIM, seed=20)
        answer = client.put("m", "long", more, dtype="float16", start_token=held)
        layers = [
            (np.concatenate([k, mk], axis=1), np.concatenate([v, mv], axis=1))
            for (k, v), (mk, mv) in zip(layers, more, strict=True)
        ]
        assert answer.tokens == held + TOKENS
        assert device.used_bytes <= device.budget_bytes
        assert_exact(client, "long", layers)
        assert client.lookup("m", "long").stored_bytes == answer.stored_bytes
        # One generation is left: the old entries were deleted.
        lower = server.store.chain.lower[0]
        assert len(lower) + len(device) == LAYERS
        # A sequence that outgrows the device through appends alone.
        grown, result = put(client, "grows", seed=3, tokens=TOKENS // 4)
        held = TOKENS // 4
        while client.lookup("m", "grows").stored_bytes <= device.budget_bytes:
            more = kv_layers(LAYERS, 32, HEADS, DIM, seed=held)
            client.append("m", "grows", more, dtype="float16", start_token=held)
            held += 32
            grown = [
                (np.concatenate([k, mk], axis=1), np.concatenate([v, mv], axis=1))
                for (k, v), (mk, mv) in zip(grown, more, strict=True)
            ]
        assert client.lookup("m", "grows").overflow_groups > 0
        assert_exact(client, "grows", grown)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tiers": "disk,device"}, "MINICACHE_TIERS (--tiers): tiers 'disk,device' is not one of"),
        ({"tiers": "device,redis,disk"}, "is not one of"),
        ({"tiers": "device,disk"}, "set MINICACHE_DISK_DIR"),
        ({"tiers": "device", "redis_url": "redis://127.0.0.1:1/0"}, "set MINICACHE_REDIS_URL"),
        ({"disk_budget_bytes": 0}, "MINICACHE_DISK_BUDGET_BYTES"),
    ],
)
def test_a_bad_tier_chain_stops_start_up_naming_its_variable(overrides, message) -> None:
    with pytest.raises(SettingsError, match=re.escape(message)):
        settings_for(**overrides)
