"""Chunks serialized by hand parse back to exactly what protobuf would have sent, and a
raw stream adopts handed-over arrays only when it holds nothing yet."""

from __future__ import annotations

import numpy as np
import pytest

from minicache_client.codecs.raw import RawStream
from minicache_client.errors import InvalidArgumentError
from minicache_client.policy import PRESETS
from minicache_client.proto import cache_service_pb2 as pb
from minicache_client.sequence_encoder import SequenceEncoder
from minicache_client.wire import layer_chunks, serialized_layer_chunks


@pytest.mark.parametrize("envelope", [pb.PrefetchResponse, pb.PutRequest])
@pytest.mark.parametrize("shape", [(3, 2913, 64), (1, 1, 4), (2, 300, 12)])
@pytest.mark.parametrize("layer", [0, 7, 300])
@pytest.mark.parametrize("chunk_bytes", [1 << 20, 4096])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_serialized_chunks_parse_as_protobuf_messages(envelope, shape, layer, chunk_bytes, dtype):
    rng = np.random.default_rng(layer)
    keys = rng.standard_normal(shape).astype(dtype)
    values = rng.standard_normal(shape).astype(dtype)
    expected = [
        envelope(chunk=chunk) for chunk in layer_chunks(layer, keys, values, dtype, chunk_bytes)
    ]
    parsed = [
        envelope.FromString(data)
        for data in serialized_layer_chunks(layer, keys, values, dtype, envelope, chunk_bytes)
    ]
    assert parsed == expected


def test_serialized_chunks_check_their_input_like_layer_chunks():
    keys = np.zeros((2, 4, 8), np.float16)
    with pytest.raises(InvalidArgumentError, match="does not carry"):
        next(serialized_layer_chunks(0, keys.astype(np.float32), keys, "float16", pb.PutRequest))
    with pytest.raises(InvalidArgumentError, match="must both be"):
        next(serialized_layer_chunks(0, keys, keys[:1], "float16", pb.PutRequest))


def test_a_raw_stream_adopts_only_its_first_tokens():
    stream = RawStream(kv_heads=2, head_dim=4, dtype="float32")
    first = np.ones((2, 3, 4), np.float32)
    assert stream.adopt([first]) and stream.values is first
    assert not stream.adopt([np.zeros((2, 1, 4), np.float32)])


def test_an_owned_put_keeps_the_arrays_and_a_plain_one_copies_them():
    layers = [(np.full((1, 5, 4), layer, np.float16),) * 2 for layer in range(2)]
    for owned in (True, False):
        encoder = SequenceEncoder(
            PRESETS["none"], num_layers=2, dtype="float16", kv_heads=1, head_dim=4
        )
        for layer, (keys, values) in enumerate(layers):
            encoder.put_layer(layer, keys, values, seal=True, owned=owned)
        held = encoder.entries[0].keys[0].values
        assert (held is layers[0][0]) is owned
        assert np.array_equal(held, layers[0][0])
