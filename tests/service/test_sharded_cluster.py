"""Several real servers behind `ShardedCacheClient`: placement by rendezvous hashing,
a server that is down (or never answers) is a miss within the deadline, and calibration
artifacts come from whichever server answers."""

from __future__ import annotations

import socket
import time
from collections import Counter

import numpy as np
import pytest
from service_fixtures import free_port, kv_layers
from transform_samples import sample_artifact

from minicache_client import ClientConfig, NotFoundError, ShardedCacheClient, UnavailableError
from minicache_client.sharding import place_sequence, rendezvous_score
from minicache_client.transform_artifact import ArtifactRegistry

# An artifact of its own (a seed no other module uses); in-process servers serve it
# from the test process's registry, which `sample_artifact` fills.
ARTIFACT, DIGEST = sample_artifact(seed=4646)


def test_sequences_spread_and_come_back(make_server) -> None:
    servers = [make_server() for _ in range(3)]
    configs = [ClientConfig(target=s.address, insecure=True, timeout_s=10) for s in servers]
    client = ShardedCacheClient(configs)
    sent = {f"s{i}": kv_layers(4, 20, 2, 16, seed=i) for i in range(24)}
    for name, layers in sent.items():
        client.put("m", name, layers, dtype="float16", policy="none")
    held = [len(server.store.sequences) for server in servers]
    # Each server holds what rendezvous hashing places on it (the ports are random, so
    # the shares are too), and the sequences spread over more than one server.
    placed = Counter(place_sequence([c.target for c in configs], "m", name) for name in sent)
    assert held == [placed[server.address] for server in servers]
    assert sum(held) == 24 and sum(1 for count in held if count) >= 2
    for name, layers in sent.items():
        target = client.server_for("m", name)
        assert target == place_sequence([c.target for c in configs], "m", name)
        owner = next(s for s in servers if s.address == target)
        assert ("default", "m", name) in owner.store.sequences
        received = client.prefetch_layers("m", name)
        assert all(np.array_equal(k, sk) for (k, _), (sk, _) in zip(received, layers, strict=True))


def test_down_server_is_a_miss_never_a_hang(make_server) -> None:
    alive = make_server()
    dead_address = f"127.0.0.1:{free_port()}"  # nothing listens here
    # A server that accepts connections and never answers.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    silent_address = f"127.0.0.1:{silent.getsockname()[1]}"
    configs = [
        ClientConfig(target=address, insecure=True, timeout_s=2)
        for address in (alive.address, dead_address, silent_address)
    ]
    client = ShardedCacheClient(configs)
    try:
        by_server: dict[str, str] = {}
        for index in range(60):
            by_server.setdefault(client.server_for("m", f"q{index}"), f"q{index}")
        assert len(by_server) == 3
        for address in (dead_address, silent_address):
            name = by_server[address]
            started = time.monotonic()
            with pytest.raises(NotFoundError, match="miss"):
                client.prefetch_layers("m", name)
            with pytest.raises(NotFoundError):
                client.lookup("m", name)
            with pytest.raises((UnavailableError, Exception)) as write:
                client.put("m", name, kv_layers(2, 4, 1, 8), dtype="float16", policy="none")
            assert not isinstance(write.value, NotFoundError)
            assert time.monotonic() - started < 3 * 2 + 3  # three calls, 2 s deadlines
        name = by_server[alive.address]
        client.put("m", name, kv_layers(2, 4, 1, 8), dtype="float16", policy="none")
        assert client.lookup("m", name).tokens == 4
    finally:
        silent.close()


def test_artifacts_come_from_a_server_that_answers(make_server, tmp_path) -> None:
    alive = make_server()
    # A refusing server that the digest's rendezvous order asks first (bounded search).
    dead_address = next(
        address
        for address in (f"127.0.0.1:{free_port()}" for _ in range(64))
        if rendezvous_score(address, "", DIGEST) > rendezvous_score(alive.address, "", DIGEST)
    )
    configs = [
        ClientConfig(target=address, insecure=True, timeout_s=5)
        for address in (dead_address, alive.address)
    ]
    registry = ArtifactRegistry([tmp_path / "fetched"])
    with ShardedCacheClient(configs) as client:
        assert client.get_artifact(DIGEST) == ARTIFACT
        missing = "f" * 64
        with pytest.raises(NotFoundError, match=f"no cache server holds the artifact {missing}"):
            client.get_artifact(missing)
        # A registry that lacks the artifact fetches it through the sharded client.
        client.use_for_artifacts(registry)
        assert registry.fetch == client.get_artifact
        assert registry.data(DIGEST) == ARTIFACT
    assert registry.fetch is None  # close() undid use_for_artifacts
    assert (tmp_path / "fetched" / f"{DIGEST}.mcta").read_bytes() == ARTIFACT
