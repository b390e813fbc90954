"""Rendezvous placement of sequences on servers, and the miss semantics of a server that
is down: reads miss (NotFoundError) within the deadline, writes raise."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest

from minicache_client.channel import ClientConfig
from minicache_client.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from minicache_client.sharding import (
    ShardedCacheClient,
    UnreachableServerError,
    place_sequence,
    rendezvous_score,
)

SERVERS = [f"cache-{i}:50051" for i in range(4)]
IDS = [f"sequence-{i}" for i in range(10_000)]
MODEL = "smollm2-135m"


def placements(servers: list[str]) -> dict[str, str]:
    return {seq: place_sequence(servers, MODEL, seq) for seq in IDS}


def test_placement_is_deterministic_and_ignores_server_order() -> None:
    forward = placements(SERVERS)
    assert placements(list(reversed(SERVERS))) == forward
    assert placements(SERVERS) == forward


def test_placement_is_stable_across_processes() -> None:
    # Python's hash() of str changes with PYTHONHASHSEED; BLAKE2b does not.
    code = (
        "from minicache_client.sharding import place_sequence\n"
        f"servers = {SERVERS!r}\n"
        "print(','.join(place_sequence(servers, 'm', f's{i}') for i in range(200)))\n"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            check=True,
            capture_output=True,
            text=True,
            env={"PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert len(outputs) == 1
    here = ",".join(place_sequence(SERVERS, "m", f"s{i}") for i in range(200))
    assert outputs == {here + "\n"}


def test_placement_is_balanced_over_ten_thousand_ids() -> None:
    counts = Counter(placements(SERVERS).values())
    assert set(counts) == set(SERVERS)
    expected = len(IDS) / len(SERVERS)
    # The binomial standard deviation is about 43: 10 % is over 5 of them.
    assert all(abs(count - expected) < 0.1 * expected for count in counts.values()), counts


def test_adding_a_server_moves_about_one_in_n_and_only_to_it() -> None:
    before = placements(SERVERS)
    grown = [*SERVERS, "cache-4:50051"]
    after = placements(grown)
    moved = [seq for seq in IDS if before[seq] != after[seq]]
    assert all(after[seq] == "cache-4:50051" for seq in moved)
    assert 0.17 < len(moved) / len(IDS) < 0.23  # 1/5 expected


def test_removing_a_server_moves_only_its_sequences() -> None:
    before = placements(SERVERS)
    after = placements(SERVERS[1:])
    for seq in IDS:
        if before[seq] != SERVERS[0]:
            assert after[seq] == before[seq]
        else:
            assert after[seq] in SERVERS[1:]


def test_ids_are_not_ambiguous() -> None:
    # A separator-free concatenation would score these two sequences the same.
    assert rendezvous_score("s", "ab", "c") != rendezvous_score("s", "a", "bc")
    assert place_sequence(["only:1"], MODEL, "x") == "only:1"
    with pytest.raises(ValueError, match="no servers"):
        place_sequence([], MODEL, "x")


def test_sharded_client_routes_like_place_sequence() -> None:
    configs = [ClientConfig(f"127.0.0.1:{port}", insecure=True) for port in (7001, 7002, 7003)]
    with ShardedCacheClient(configs) as sharded:
        servers = [config.target for config in configs]
        assert sharded.servers == tuple(servers)
        for seq in IDS[:50]:
            server = sharded.server_for(MODEL, seq)
            assert server == place_sequence(servers, MODEL, seq)
            assert sharded.client_for(MODEL, seq).target == server


def test_sharded_client_needs_distinct_servers() -> None:
    with pytest.raises(ValueError, match="at least one server"):
        ShardedCacheClient([])
    config = ClientConfig("127.0.0.1:7001", insecure=True)
    with pytest.raises(ValueError, match="same server more than once"):
        ShardedCacheClient([config, config])


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A loopback port that accepts connections and never answers (a hung server)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    for connection in accepted:
        connection.close()
    listener.close()


LAYERS = [(np.zeros((1, 2, 4), np.float16), np.zeros((1, 2, 4), np.float16))]


def test_reads_from_a_refusing_server_are_misses_and_writes_raise() -> None:
    config = ClientConfig(f"127.0.0.1:{closed_port()}", insecure=True, timeout_s=5.0)
    with ShardedCacheClient([config]) as sharded:
        started = time.monotonic()
        with pytest.raises(NotFoundError, match=rf"miss: server {config.target} is unavailable"):
            sharded.lookup(MODEL, "s1")
        # A miss that says it is an outage, for callers that count those.
        with pytest.raises(UnreachableServerError) as miss:
            sharded.lookup(MODEL, "s1")
        assert miss.value.server == config.target
        assert isinstance(miss.value.cause, UnavailableError)
        with pytest.raises(NotFoundError, match="miss: server"):
            list(sharded.prefetch(MODEL, "s1"))
        with pytest.raises(NotFoundError, match="miss: server"):
            sharded.prefetch_layers(MODEL, "s1", wire_form="compressed")
        with pytest.raises(UnavailableError):
            sharded.put(MODEL, "s1", LAYERS, dtype="float16")
        with pytest.raises(UnavailableError):
            sharded.append(MODEL, "s1", LAYERS, dtype="float16", start_token=2)
        with pytest.raises(UnavailableError):
            sharded.delete(MODEL, "s1")
        # A streamed put (a worker's prefill) fails as it opens, on its first layer or at
        # finish (gRPC does not retry a Put: the refusal can come back at once).
        with pytest.raises(UnavailableError):
            stream = sharded.open_put(
                MODEL, "s1", num_layers=1, kv_heads=1, head_dim=4, dtype="float16", end_token=2
            )
            stream.send_layer(0, *LAYERS[0])
            stream.finish()
        with pytest.raises(NotFoundError, match="could not answer"):
            sharded.get_artifact("0" * 64)
        assert sharded.health() == {config.target: "UNAVAILABLE"}
        # Refused connections fail fast (bounded retries), well inside the deadline.
        assert time.monotonic() - started < 5.0


def test_a_hung_server_is_a_miss_at_the_deadline(silent_server: int) -> None:
    config = ClientConfig(f"127.0.0.1:{silent_server}", insecure=True, timeout_s=0.5)
    with ShardedCacheClient([config]) as sharded:
        for read in (
            lambda: sharded.lookup(MODEL, "s1"),
            lambda: sharded.prefetch_layers(MODEL, "s1"),
        ):
            started = time.monotonic()
            with pytest.raises(NotFoundError, match="miss: server"):
                read()
            assert time.monotonic() - started < 2.0
        with pytest.raises(UnreachableServerError) as miss:
            sharded.lookup(MODEL, "s1")
        assert isinstance(miss.value.cause, DeadlineExceededError)
        with pytest.raises(DeadlineExceededError):
            sharded.put(MODEL, "s1", LAYERS, dtype="float16")


def test_a_malformed_artifact_hash_is_refused_before_any_call() -> None:
    config = ClientConfig(f"127.0.0.1:{closed_port()}", insecure=True, timeout_s=5.0)
    with ShardedCacheClient([config]) as sharded, pytest.raises(InvalidArgumentError):
        sharded.get_artifact("not-a-hash")
