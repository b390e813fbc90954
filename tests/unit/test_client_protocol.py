"""The client's side of the protocol without a server: requests are validated before any
call, and a Prefetch response stream becomes whole layers in ascending order, each as
soon as it is complete; a corrupt stored entry is never returned."""

from __future__ import annotations

import numpy as np
import pytest
from kv_samples import random_kv

from minicache_client.codecs import RawStream
from minicache_client.entry import LayerGroupEntry, encode_entry
from minicache_client.errors import (
    CorruptDataError,
    FailedPreconditionError,
    InvalidArgumentError,
    OutOfRangeError,
)
from minicache_client.proto import cache_service_pb2 as pb
from minicache_client.protocol import (
    PrefetchPlan,
    PutProgress,
    append_request,
    carried_layers,
    put_requests,
    sequence_header,
)
from minicache_client.wire import LayerAssembler, layer_chunks

HEADS, TOKENS, DIM = 2, 24, 8
LAYERS = 4


def make_layers(dtype: str = "float16", seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        (random_kv(rng, (HEADS, TOKENS, DIM), dtype), random_kv(rng, (HEADS, TOKENS, DIM), dtype))
        for _ in range(LAYERS)
    ]


def header_for(start: int = 0, end: int = TOKENS, dtype: str = "float16") -> pb.SequenceHeader:
    return sequence_header(
        "model",
        "seq",
        num_layers=LAYERS,
        kv_heads=HEADS,
        head_dim=DIM,
        dtype=dtype,
        start_token=start,
        end_token=end,
    )


# -- requests ---------------------------------------------------------------------------


def test_put_requests_are_the_header_then_bounded_chunks_of_every_layer() -> None:
    layers = make_layers()
    header = header_for()
    max_chunk_bytes = 1024  # 64 bytes per token of keys + values: 16 tokens per chunk
    requests = [
        pb.PutRequest.FromString(data)  # serialized by hand: they parse as the messages
        for data in put_requests(
            header, carried_layers(layers, "float16")[0], "float16", max_chunk_bytes
        )
    ]
    assert requests[0].WhichOneof("item") == "header"
    assert requests[0].header == header
    chunks = [request.chunk for request in requests[1:]]
    assert all(request.WhichOneof("item") == "chunk" for request in requests[1:])
    assert [chunk.layer for chunk in chunks] == sorted(chunk.layer for chunk in chunks)
    assert all(len(chunk.keys) + len(chunk.values) <= max_chunk_bytes for chunk in chunks)
    assembler = LayerAssembler(LAYERS, HEADS, TOKENS, DIM, "float16")
    restored = {chunk.layer: assembler.add(chunk) for chunk in chunks}
    for layer, (keys, values) in enumerate(layers):
        np.testing.assert_array_equal(restored[layer][0], keys)
        np.testing.assert_array_equal(restored[layer][1], values)


def test_layers_must_share_one_shape() -> None:
    layers = make_layers()
    layers[2] = (layers[2][0][:, :5], layers[2][1][:, :5])
    with pytest.raises(InvalidArgumentError, match="layer 2: shape"):
        carried_layers(layers, "float16")
    keys, values = make_layers()[0]
    with pytest.raises(InvalidArgumentError, match=r"layer 0: keys .* and values"):
        carried_layers([(keys, values[:1])], "float16")
    with pytest.raises(InvalidArgumentError, match="non-empty sequence"):
        carried_layers([], "float16")
    with pytest.raises(InvalidArgumentError, match=r"\(keys, values\) pair"):
        carried_layers([keys], "float16")
    with pytest.raises(InvalidArgumentError, match="hold no KV"):
        carried_layers([(keys[:, :0], values[:, :0])], "float16")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"end_token": 0}, "end_token .* must exceed start_token"),
        ({"start_token": -1}, "start_token must be in"),
        ({"num_layers": 0}, "num_layers must be in"),
        ({"kv_heads": 2.0}, "kv_heads must be an integer"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"start_token": 8, "policy": "kivi4"}, "policy can only be set by a write from token 0"),
        ({"model_id": ""}, "model_id must be a non-empty string"),
    ],
)
def test_bad_headers_are_refused(changes: dict, message: str) -> None:
    arguments = {
        "model_id": "model",
        "sequence_id": "seq",
        "num_layers": LAYERS,
        "kv_heads": HEADS,
        "head_dim": DIM,
        "dtype": "float16",
        "start_token": 0,
        "end_token": TOKENS,
    }
    arguments.update(changes)
    with pytest.raises(InvalidArgumentError, match=message):
        sequence_header(**arguments)


def test_streamed_put_checks_every_layer() -> None:
    layers = make_layers()
    progress = PutProgress(header_for(), max_chunk_bytes=1 << 20)
    requests = progress.layer_requests(2, *layers[2])
    assert [request.chunk.layer for request in requests] == [2]
    assert progress.missing_layers() == [0, 1, 3]
    with pytest.raises(InvalidArgumentError, match="layer 2 was already sent"):
        progress.layer_requests(2, *layers[2])
    with pytest.raises(InvalidArgumentError, match="layer must be in"):
        progress.layer_requests(LAYERS, *layers[0])
    with pytest.raises(InvalidArgumentError, match=r"keys have shape \(2, 23, 8\)"):
        progress.layer_requests(0, layers[0][0][:, 1:], layers[0][1][:, 1:])
    with pytest.raises(InvalidArgumentError, match="does not carry 'float16'"):
        progress.layer_requests(0, layers[0][0].astype(np.float32), layers[0][1])
    assert progress.missing_layers() == [0, 1, 3]


def test_a_token_larger_than_a_chunk_is_refused_before_streaming() -> None:
    with pytest.raises(InvalidArgumentError, match="more than the chunk limit"):
        PutProgress(header_for(), max_chunk_bytes=16)


def test_append_is_one_chunk_per_layer() -> None:
    layers = [(keys[:, :2], values[:, :2]) for keys, values in make_layers()]
    request = append_request(
        "model", "seq", layers, dtype="float16", start_token=TOKENS, max_message_bytes=1 << 20
    )
    assert (request.header.start_token, request.header.end_token) == (TOKENS, TOKENS + 2)
    assert [chunk.layer for chunk in request.layers] == list(range(LAYERS))
    assert all(chunk.tokens == 2 and chunk.token_offset == 0 for chunk in request.layers)
    np.testing.assert_array_equal(
        np.frombuffer(request.layers[3].values, np.float16).reshape(HEADS, 2, DIM), layers[3][1]
    )


def test_append_over_the_message_limit_is_refused() -> None:
    layers = make_layers()  # 4 layers x 2 x 768 bytes = 6144 bytes
    with pytest.raises(InvalidArgumentError, match=r"max_message_bytes \(4096\).*put\(start"):
        append_request(
            "model", "seq", layers, dtype="float16", start_token=TOKENS, max_message_bytes=4096
        )


def test_prefetch_layer_range_is_exclusive_on_the_wire() -> None:
    everything = PrefetchPlan.create("model", "seq").request()
    assert (everything.first_layer, everything.end_layer, everything.end_token) == (0, 0, 0)
    assert everything.wire_form == pb.WIRE_FORM_RESTORED
    some = PrefetchPlan.create(
        "model", "seq", first_layer=1, last_layer=2, end_token=9, dtype="float32"
    ).request()
    assert (some.first_layer, some.end_layer, some.end_token) == (1, 3, 9)
    assert some.dtype == pb.DTYPE_FLOAT32
    only_first = PrefetchPlan.create("model", "seq", last_layer=0).request()
    assert (only_first.first_layer, only_first.end_layer) == (0, 1)
    # Compressed entries travel as stored; the client restores into the dtype asked for.
    compressed = PrefetchPlan.create("model", "seq", wire_form="compressed", dtype="float32")
    assert compressed.request().dtype == pb.DTYPE_UNSPECIFIED


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"start_token": 5, "end_token": 5}, "end_token .* must exceed start_token"),
        ({"first_layer": 3, "last_layer": 2}, "last_layer .* must not precede first_layer"),
        ({"wire_form": "raw"}, "wire_form must be one of"),
        ({"dtype": "float64"}, "dtype must be one of"),
        ({"first_layer": -1}, "first_layer must be in"),
    ],
)
def test_bad_prefetch_arguments_are_refused(arguments: dict, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        PrefetchPlan.create("model", "seq", **arguments)


# -- prefetch streams -------------------------------------------------------------------


def prefetch_header(start: int, end: int, dtype: str = "float16") -> pb.PrefetchResponse:
    return pb.PrefetchResponse(header=header_for(start, end, dtype))


def restored_messages(layers, first: int, last: int, start: int, end: int, chunk_bytes: int):
    for layer in range(first, last + 1):
        keys, values = layers[layer]
        for chunk in layer_chunks(
            layer, keys[:, start:end], values[:, start:end], "float16", chunk_bytes
        ):
            yield pb.PrefetchResponse(chunk=chunk)


def test_restored_layers_come_out_as_soon_as_each_is_complete() -> None:
    layers = make_layers()
    plan = PrefetchPlan.create("model", "seq", start_token=4, end_token=20, first_layer=1)
    stream = plan.stream()
    assert stream.feed(prefetch_header(4, 20)) == []
    out = []
    for message in restored_messages(layers, 1, LAYERS - 1, 4, 20, chunk_bytes=256):
        completed = stream.feed(message)
        # A layer is yielded with its last chunk, before the next layer's first one.
        if message.chunk.token_offset + message.chunk.tokens == 16:
            assert [layer for layer, _, _ in completed] == [message.chunk.layer]
        else:
            assert completed == []
        out.extend(completed)
    stream.finish()
    assert [layer for layer, _, _ in out] == [1, 2, 3]
    for layer, keys, values in out:
        np.testing.assert_array_equal(keys, layers[layer][0][:, 4:20])
        np.testing.assert_array_equal(values, layers[layer][1][:, 4:20])


def test_a_stream_must_open_with_its_header() -> None:
    layers = make_layers()
    stream = PrefetchPlan.create("model", "seq").stream()
    with pytest.raises(FailedPreconditionError, match="not the header"):
        stream.feed(next(restored_messages(layers, 0, 0, 0, TOKENS, 1 << 20)))
    with pytest.raises(FailedPreconditionError, match="before its header"):
        PrefetchPlan.create("model", "seq").stream().finish()


def test_a_truncated_stream_is_an_error_not_a_short_answer() -> None:
    layers = make_layers()
    stream = PrefetchPlan.create("model", "seq").stream()
    stream.feed(prefetch_header(0, TOKENS))
    for message in restored_messages(layers, 0, 1, 0, TOKENS, 1 << 20):
        stream.feed(message)
    with pytest.raises(FailedPreconditionError, match=r"layers \[2, 3\] were complete"):
        stream.finish()


def test_restored_stream_checks_dtype_range_and_layers() -> None:
    stream = PrefetchPlan.create("model", "seq", dtype="float32").stream()
    with pytest.raises(InvalidArgumentError, match="come in float16, requested float32"):
        stream.feed(prefetch_header(0, TOKENS))
    stream = PrefetchPlan.create("model", "seq", end_token=10).stream()
    with pytest.raises(InvalidArgumentError, match="ends at 24, requested 10"):
        stream.feed(prefetch_header(0, TOKENS))
    stream = PrefetchPlan.create("model", "seq", last_layer=LAYERS).stream()
    with pytest.raises(OutOfRangeError, match="last_layer 4 is out of range"):
        stream.feed(prefetch_header(0, TOKENS))
    layers = make_layers()
    stream = PrefetchPlan.create("model", "seq", first_layer=2, last_layer=2).stream()
    stream.feed(prefetch_header(0, TOKENS))
    with pytest.raises(InvalidArgumentError, match="chunk of layer 1, outside"):
        stream.feed(next(restored_messages(layers, 1, 1, 0, TOKENS, 1 << 20)))


def plain_entry(layers, group: tuple[int, ...], dtype: str) -> LayerGroupEntry:
    """A stored entry holding `group`'s layers uncompressed (bit-exact on restore)."""
    return LayerGroupEntry(
        layers=group,
        dtype=dtype,
        kv_heads=HEADS,
        head_dim=DIM,
        keys=[RawStream(HEADS, DIM, dtype, values=layers[layer][0]) for layer in group],
        values=[RawStream(HEADS, DIM, dtype, values=layers[layer][1]) for layer in group],
    )


def entry_messages(data: bytes, group: tuple[int, ...], piece: int):
    for offset in range(0, len(data), piece):
        yield pb.PrefetchResponse(
            entry=pb.EntryChunk(
                layers=list(group),
                total_bytes=len(data),
                offset=offset,
                data=data[offset : offset + piece],
            )
        )


GROUPS = ((0,), (1,), (2, 3))  # layers 2 and 3 stored as one entry


def compressed_messages(layers, dtype: str = "float16", piece: int = 300):
    for group in GROUPS:
        yield from entry_messages(encode_entry(plain_entry(layers, group, dtype)), group, piece)


def test_compressed_entries_are_verified_and_restored() -> None:
    layers = make_layers()
    stream = PrefetchPlan.create(
        "model", "seq", start_token=3, end_token=21, wire_form="compressed"
    ).stream()
    stream.feed(prefetch_header(3, 21))
    out = []
    for message in compressed_messages(layers):
        out.extend(stream.feed(message))
    stream.finish()
    assert [layer for layer, _, _ in out] == [0, 1, 2, 3]
    for layer, keys, values in out:
        assert keys.dtype == np.float16
        np.testing.assert_array_equal(keys, layers[layer][0][:, 3:21])
        np.testing.assert_array_equal(values, layers[layer][1][:, 3:21])


def test_compressed_entries_restore_into_the_requested_dtype() -> None:
    layers = make_layers("bfloat16")
    stream = PrefetchPlan.create(
        "model", "seq", first_layer=3, wire_form="compressed", dtype="float32"
    ).stream()
    stream.feed(prefetch_header(0, TOKENS, "bfloat16"))
    out = []
    for group in ((2, 3),):  # the server sends the entry that holds layer 3
        data = encode_entry(plain_entry(layers, group, "bfloat16"))
        for message in entry_messages(data, group, piece=len(data)):
            out.extend(stream.feed(message))
    stream.finish()
    ((layer, keys, _),) = out
    assert layer == 3 and keys.dtype == np.float32
    expected = (layers[3][0].astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(keys, expected)


def test_a_corrupt_entry_raises_and_nothing_of_it_is_returned() -> None:
    layers = make_layers()
    stream = PrefetchPlan.create("model", "seq", wire_form="compressed").stream()
    stream.feed(prefetch_header(0, TOKENS))
    good = encode_entry(plain_entry(layers, (0,), "float16"))
    out = []
    for message in entry_messages(good, (0,), piece=500):
        out.extend(stream.feed(message))
    assert [layer for layer, _, _ in out] == [0]
    corrupt = bytearray(encode_entry(plain_entry(layers, (1,), "float16")))
    corrupt[-5] ^= 0x01
    messages = list(entry_messages(bytes(corrupt), (1,), piece=500))
    for message in messages[:-1]:
        assert stream.feed(message) == []
    with pytest.raises(CorruptDataError, match=r"layers \(1,\) failed verification"):
        stream.feed(messages[-1])


def test_entry_pieces_must_arrive_in_order_and_agree() -> None:
    layers = make_layers()
    data = encode_entry(plain_entry(layers, (0,), "float16"))
    first, second, *_ = entry_messages(data, (0,), piece=200)
    stream = PrefetchPlan.create("model", "seq", wire_form="compressed").stream()
    stream.feed(prefetch_header(0, TOKENS))
    with pytest.raises(InvalidArgumentError, match="starts at byte 200"):
        stream.feed(second)
    stream = PrefetchPlan.create("model", "seq", wire_form="compressed").stream()
    stream.feed(prefetch_header(0, TOKENS))
    stream.feed(first)
    with pytest.raises(FailedPreconditionError, match="expected 200"):
        stream.feed(first)
    other = pb.PrefetchResponse()
    other.entry.CopyFrom(second.entry)
    other.entry.layers[:] = [1]
    with pytest.raises(InvalidArgumentError, match=r"inside the entry of layers \(0,\)"):
        stream.feed(other)


def test_an_entry_that_disagrees_with_the_header_is_refused() -> None:
    layers = make_layers()
    stream = PrefetchPlan.create("model", "seq", wire_form="compressed").stream()
    stream.feed(prefetch_header(0, TOKENS, "bfloat16"))  # the entry holds float16
    data = encode_entry(plain_entry(layers, (0,), "float16"))
    with pytest.raises(InvalidArgumentError, match="disagrees"):
        stream.feed(next(entry_messages(data, (0,), piece=len(data))))


def test_wire_forms_do_not_mix() -> None:
    layers = make_layers()
    stream = PrefetchPlan.create("model", "seq").stream()
    stream.feed(prefetch_header(0, TOKENS))
    with pytest.raises(InvalidArgumentError, match="stored entry in a restored stream"):
        stream.feed(next(compressed_messages(layers)))
    stream = PrefetchPlan.create("model", "seq", wire_form="compressed").stream()
    stream.feed(prefetch_header(0, TOKENS))
    with pytest.raises(InvalidArgumentError, match="layer chunk in a compressed stream"):
        stream.feed(next(restored_messages(layers, 0, 0, 0, TOKENS, 1 << 20)))


def test_a_stream_that_ends_inside_an_entry_is_an_error() -> None:
    layers = make_layers()
    stream = PrefetchPlan.create("model", "seq", wire_form="compressed").stream()
    stream.feed(prefetch_header(0, TOKENS))
    data = encode_entry(plain_entry(layers, (0,), "float16"))
    stream.feed(next(entry_messages(data, (0,), piece=100)))
    with pytest.raises(FailedPreconditionError, match=r"inside the entry of layers \(0,\)"):
        stream.finish()
