"""The opaque content tag of a sequence (SequenceHeader.tag) through a real server.

Every committed write (a put from token 0, an extension put, an append) sets the tag to
the request's, a write without one clears it, and Lookup returns it; a write that fails
or is aborted leaves the tag it found. Tags above 64 bytes are refused by the client and,
sent with a raw stub, by the server (INVALID_ARGUMENT).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from service_fixtures import kv_layers

from minicache_client import (
    AsyncCacheClient,
    CacheClient,
    ClientConfig,
    InvalidArgumentError,
    OutOfRangeError,
    ResourceExhaustedError,
    ShardedCacheClient,
)
from minicache_client.proto import cache_service_pb2 as pb
from minicache_client.proto import cache_service_pb2_grpc as pb_grpc
from minicache_client.protocol import MAX_TAG_BYTES, append_request, sequence_header
from minicache_client.wire import layer_chunks

MODEL = "tag-model"
LAYERS, TOKENS, HEADS, DIM = 4, 16, 2, 16
TIMEOUT = 10


def digest(*tokens: int) -> bytes:
    """What a worker would store: a digest of the token history."""
    return hashlib.blake2b(np.asarray(tokens, np.int64).tobytes(), digest_size=32).digest()


TAG_A, TAG_B, TAG_C = digest(1, 2, 3), digest(1, 2, 3, 4), digest(1, 2, 3, 4, 5)


def kv(tokens: int = TOKENS, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    return kv_layers(LAYERS, tokens, HEADS, DIM, seed=seed)


def config(address: str) -> ClientConfig:
    return ClientConfig(target=address, insecure=True, timeout_s=TIMEOUT)


@pytest.fixture(scope="module")
def client(server) -> Iterator[CacheClient]:
    with CacheClient(config(server.address)) as client:
        yield client


@pytest.fixture(scope="module")
def stub(server) -> Iterator[pb_grpc.CacheServiceStub]:
    channel = grpc.insecure_channel(server.address)
    try:
        yield pb_grpc.CacheServiceStub(channel)
    finally:
        channel.close()


def tag_of(client: CacheClient, sequence_id: str) -> bytes:
    return client.lookup(MODEL, sequence_id).tag


# -- committed writes set it ----------------------------------------------------------


def test_every_write_replaces_the_tag(client) -> None:
    sequence = "every-write"
    client.put(MODEL, sequence, kv(), dtype="float16", policy="none", tag=TAG_A)
    assert tag_of(client, sequence) == TAG_A

    client.put(
        MODEL, sequence, kv(seed=1), dtype="float16", start_token=TOKENS, tag=TAG_B
    )  # an extension put
    found = client.lookup(MODEL, sequence)
    assert (found.tokens, found.tag) == (2 * TOKENS, TAG_B)

    client.append(
        MODEL, sequence, kv(1, seed=2), dtype="float16", start_token=2 * TOKENS, tag=TAG_C
    )
    found = client.lookup(MODEL, sequence)
    assert (found.tokens, found.tag) == (2 * TOKENS + 1, TAG_C)

    # A write without a tag clears it: an append, an extension, a put from token 0.
    client.append(MODEL, sequence, kv(1, seed=3), dtype="float16", start_token=2 * TOKENS + 1)
    assert tag_of(client, sequence) == b""
    client.append(
        MODEL, sequence, kv(1, seed=4), dtype="float16", start_token=2 * TOKENS + 2, tag=TAG_A
    )
    client.put(MODEL, sequence, kv(seed=5), dtype="float16", start_token=2 * TOKENS + 3)
    assert tag_of(client, sequence) == b""
    client.put(MODEL, sequence, kv(), dtype="float16", policy="none", tag=TAG_B)
    client.put(MODEL, sequence, kv(), dtype="float16", policy="none")
    found = client.lookup(MODEL, sequence)
    assert (found.tokens, found.tag) == (TOKENS, b"")


def test_streamed_put_sets_the_tag_when_it_commits(client) -> None:
    sequence = "streamed"
    layers = kv()
    with client.open_put(
        MODEL,
        sequence,
        num_layers=LAYERS,
        kv_heads=HEADS,
        head_dim=DIM,
        dtype="float16",
        end_token=TOKENS,
        policy="none",
        tag=TAG_A,
    ) as put:
        for layer, (keys, values) in enumerate(layers):
            put.send_layer(layer, keys, values)
    assert put.result.tokens == TOKENS
    assert tag_of(client, sequence) == TAG_A


def test_a_sequence_written_without_a_tag_has_none(client) -> None:
    client.put(MODEL, "untagged", kv(), dtype="float16")
    found = client.lookup(MODEL, "untagged")
    assert found.tag == b"" and isinstance(found.tag, bytes)


def test_a_tag_of_64_bytes_is_kept_exactly(client) -> None:
    tag = bytes(range(256 - MAX_TAG_BYTES, 256))  # 64 bytes, high bytes included
    client.put(MODEL, "longest-tag", kv(), dtype="float16", tag=bytearray(tag))
    assert tag_of(client, "longest-tag") == tag


# -- failed and aborted writes leave it -----------------------------------------------


def test_aborted_puts_leave_the_tag(client) -> None:
    sequence = "aborted"
    client.put(MODEL, sequence, kv(), dtype="float16", policy="none", tag=TAG_A)
    layers = kv(seed=1)
    for start_token in (0, TOKENS):  # a replacement and an extension
        with (
            pytest.raises(RuntimeError, match="stop"),
            client.open_put(
                MODEL,
                sequence,
                num_layers=LAYERS,
                kv_heads=HEADS,
                head_dim=DIM,
                dtype="float16",
                start_token=start_token,
                end_token=start_token + TOKENS,
                tag=TAG_B,
            ) as put,
        ):
            for layer in range(LAYERS - 1):  # all but the last
                put.send_layer(layer, *layers[layer])
            time.sleep(0.2)  # let the server read what was sent: only the commit is missing
            raise RuntimeError("stop")  # aborts the put
    found = client.lookup(MODEL, sequence)
    assert (found.tokens, found.tag) == (TOKENS, TAG_A)


def test_failed_writes_leave_the_tag(client) -> None:
    sequence = "failed"
    client.put(MODEL, sequence, kv(), dtype="float16", policy="none", tag=TAG_A)
    with pytest.raises(OutOfRangeError, match="holds 16 tokens"):
        client.append(MODEL, sequence, kv(1), dtype="float16", start_token=TOKENS + 5, tag=TAG_B)
    with pytest.raises(OutOfRangeError, match="holds 16 tokens"):
        client.put(MODEL, sequence, kv(), dtype="float16", start_token=TOKENS + 1, tag=TAG_B)
    bad = kv(seed=1)
    bad[2][0][0, 3, 1] = np.nan  # refused by the server while the stream is read
    with pytest.raises(InvalidArgumentError, match="NaN or Inf"):
        client.put(MODEL, sequence, bad, dtype="float16", policy="none", tag=TAG_C)
    found = client.lookup(MODEL, sequence)
    assert (found.tokens, found.tag) == (TOKENS, TAG_A)


def test_writes_refused_at_commit_leave_the_tag(make_server) -> None:
    """The quota is checked when the write commits, after every layer arrived."""
    # One put of 16 tokens takes 8 KiB uncompressed (plus entry metadata); 32 do not fit.
    server = make_server(tenant_quota_bytes=12 * 1024)
    with CacheClient(config(server.address)) as client:
        client.put(MODEL, "quota", kv(), dtype="float16", policy="none", tag=TAG_A)
        with pytest.raises(ResourceExhaustedError, match="quota"):  # an extension
            client.put(MODEL, "quota", kv(), dtype="float16", start_token=TOKENS, tag=TAG_B)
        with pytest.raises(ResourceExhaustedError, match="quota"):  # a replacement
            client.put(MODEL, "quota", kv(2 * TOKENS), dtype="float16", policy="none", tag=TAG_C)
        found = client.lookup(MODEL, "quota")
        assert (found.tokens, found.tag) == (TOKENS, TAG_A)


# -- limits ---------------------------------------------------------------------------


TOO_LONG = bytes(MAX_TAG_BYTES + 1)


def test_the_client_refuses_a_bad_tag(client) -> None:
    client.put(MODEL, "client-refusal", kv(), dtype="float16", policy="none", tag=TAG_A)
    with pytest.raises(InvalidArgumentError, match="tag is 65 bytes, more than the limit of 64"):
        client.put(MODEL, "client-refusal", kv(), dtype="float16", tag=TOO_LONG)
    with pytest.raises(InvalidArgumentError, match="tag is 65 bytes"):
        client.append(
            MODEL, "client-refusal", kv(1), dtype="float16", start_token=TOKENS, tag=TOO_LONG
        )
    with pytest.raises(InvalidArgumentError, match="tag is 65 bytes"):
        client.open_put(
            MODEL,
            "client-refusal",
            num_layers=LAYERS,
            kv_heads=HEADS,
            head_dim=DIM,
            dtype="float16",
            end_token=TOKENS,
            tag=TOO_LONG,
        )
    with pytest.raises(InvalidArgumentError, match="tag must be bytes"):
        client.put(MODEL, "client-refusal", kv(), dtype="float16", tag=TAG_A.hex())
    with pytest.raises(ValueError, match="tag must be bytes"):  # InvalidArgumentError is one
        client.append(MODEL, "client-refusal", kv(1), dtype="float16", start_token=TOKENS, tag=None)
    found = client.lookup(MODEL, "client-refusal")
    assert (found.tokens, found.tag) == (TOKENS, TAG_A)


def test_the_server_refuses_a_tag_above_64_bytes(client, stub) -> None:
    """Requests built directly, past the client's checks."""
    sequence = "server-refusal"
    client.put(MODEL, sequence, kv(), dtype="float16", policy="none", tag=TAG_A)

    header = sequence_header(
        MODEL,
        sequence,
        num_layers=LAYERS,
        kv_heads=HEADS,
        head_dim=DIM,
        dtype="float16",
        start_token=0,
        end_token=TOKENS,
    )
    header.tag = TOO_LONG
    requests = [pb.PutRequest(header=header)] + [
        pb.PutRequest(chunk=chunk)
        for layer, (keys, values) in enumerate(kv(seed=1))
        for chunk in layer_chunks(layer, keys, values, "float16", 1 << 20)
    ]
    with pytest.raises(grpc.RpcError) as put_error:
        stub.Put(iter(requests), timeout=TIMEOUT)

    append = append_request(
        MODEL, sequence, kv(1), dtype="float16", start_token=TOKENS, max_message_bytes=1 << 22
    )
    append.header.tag = TOO_LONG
    with pytest.raises(grpc.RpcError) as append_error:
        stub.Append(append, timeout=TIMEOUT)

    for error in (put_error.value, append_error.value):
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert "tag is 65 bytes, more than the limit of 64" in error.details()
    found = client.lookup(MODEL, sequence)
    assert (found.tokens, found.tag) == (TOKENS, TAG_A)

    # The raw Lookup answers the tag in its header.
    response = stub.Lookup(
        pb.LookupRequest(sequence=pb.SequenceRef(model_id=MODEL, sequence_id=sequence)),
        timeout=TIMEOUT,
    )
    assert response.header.tag == TAG_A


# -- the other clients ----------------------------------------------------------------


def test_async_client_sets_and_reads_the_tag(server) -> None:
    sequence = "async"

    async def main() -> list[bytes]:
        tags = []
        async with AsyncCacheClient(config(server.address)) as client:
            await client.put(MODEL, sequence, kv(), dtype="float16", policy="none", tag=TAG_A)
            tags.append((await client.lookup(MODEL, sequence)).tag)
            await client.append(
                MODEL, sequence, kv(1), dtype="float16", start_token=TOKENS, tag=TAG_B
            )
            tags.append((await client.lookup(MODEL, sequence)).tag)
            stream = await client.open_put(
                MODEL,
                sequence,
                num_layers=LAYERS,
                kv_heads=HEADS,
                head_dim=DIM,
                dtype="float16",
                start_token=TOKENS + 1,
                end_token=2 * TOKENS + 1,
                tag=TAG_C,
            )
            for layer, (keys, values) in enumerate(kv(seed=1)):
                await stream.send_layer(layer, keys, values)
            await stream.finish()
            tags.append((await client.lookup(MODEL, sequence)).tag)
            with pytest.raises(InvalidArgumentError, match="tag is 65 bytes"):
                await client.put(MODEL, sequence, kv(), dtype="float16", tag=TOO_LONG)
            tags.append((await client.lookup(MODEL, sequence)).tag)
        return tags

    assert asyncio.run(main()) == [TAG_A, TAG_B, TAG_C, TAG_C]


def test_sharded_client_passes_the_tag(make_server) -> None:
    servers = [make_server(), make_server()]
    with ShardedCacheClient([config(server.address) for server in servers]) as sharded:
        sharded.put(MODEL, "sharded", kv(), dtype="float16", tag=TAG_A)
        assert sharded.lookup(MODEL, "sharded").tag == TAG_A
        sharded.append(MODEL, "sharded", kv(1), dtype="float16", start_token=TOKENS, tag=TAG_B)
        assert sharded.lookup(MODEL, "sharded").tag == TAG_B
