"""KV tensors on the wire: dtypes, bounded layer chunks, and their reassembly.

A layer's keys and values, `[kv_heads, tokens, head_dim]` each, travel as `LayerChunk`
messages that split the tokens so that one chunk's keys + values stay within
`max_chunk_bytes`. Bytes are the little-endian carrier of the dtype (bfloat16 as uint16
bit patterns). `LayerAssembler` checks every chunk against the declared shape and puts
the tokens back in place, so a malformed stream raises `InvalidArgumentError` (or
`FailedPreconditionError` for chunks out of order) and never yields a partial tensor.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np

from minicache_client.array_namespace import CARRIER_DTYPES, to_numpy
from minicache_client.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    OutOfRangeError,
)
from minicache_client.proto import cache_service_pb2 as pb

DEFAULT_CHUNK_BYTES = 1 << 20

DTYPE_TO_WIRE = {
    "float32": pb.DTYPE_FLOAT32,
    "float16": pb.DTYPE_FLOAT16,
    "bfloat16": pb.DTYPE_BFLOAT16,
}
WIRE_TO_DTYPE = {wire: name for name, wire in DTYPE_TO_WIRE.items()}


def dtype_from_wire(value: int, what: str = "dtype") -> str:
    try:
        return WIRE_TO_DTYPE[value]
    except KeyError:
        raise InvalidArgumentError(
            f"{what} must be one of {', '.join(DTYPE_TO_WIRE)} (got enum value {value})"
        ) from None


def carrier_of(dtype: str) -> np.dtype:
    return CARRIER_DTYPES[dtype].newbyteorder("<")


def tokens_per_chunk(kv_heads: int, head_dim: int, dtype: str, max_chunk_bytes: int) -> int:
    """Tokens of one layer (keys + values) that fit in `max_chunk_bytes`."""
    per_token = 2 * kv_heads * head_dim * CARRIER_DTYPES[dtype].itemsize
    if per_token > max_chunk_bytes:
        raise InvalidArgumentError(
            f"one token of one layer takes {per_token} bytes, more than the chunk limit "
            f"of {max_chunk_bytes} bytes"
        )
    return max_chunk_bytes // per_token


def _checked_layer(layer: int, keys: Any, values: Any, dtype: str) -> tuple[Any, Any]:
    """Host arrays of one layer's keys and values, checked against `dtype`'s carrier."""
    keys, values = to_numpy(keys), to_numpy(values)
    carrier = carrier_of(dtype)
    if keys.shape != values.shape or keys.ndim != 3:
        raise InvalidArgumentError(
            f"layer {layer}: keys {keys.shape} and values {values.shape} must both be "
            "[kv_heads, tokens, head_dim]"
        )
    if keys.dtype != carrier or values.dtype != carrier:
        raise InvalidArgumentError(
            f"layer {layer}: dtype {keys.dtype}/{values.dtype} does not carry {dtype} "
            f"(expected {carrier})"
        )
    return keys, values


def _token_ranges(shape: tuple[int, ...], dtype: str, max_chunk_bytes: int):
    heads, tokens, dim = shape
    step = tokens_per_chunk(heads, dim, dtype, max_chunk_bytes)
    for start in range(0, tokens, step):
        yield start, min(tokens, start + step)


def layer_chunks(
    layer: int,
    keys: Any,
    values: Any,
    dtype: str,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    token_offset: int = 0,
) -> Iterator[pb.LayerChunk]:
    """Chunks of one layer; `keys`/`values` are `[kv_heads, tokens, head_dim]` arrays in
    the carrier dtype of `dtype` (NumPy, CuPy, or anything with `__array__`)."""
    keys, values = _checked_layer(layer, keys, values, dtype)
    for start, end in _token_ranges(keys.shape, dtype, max_chunk_bytes):
        yield pb.LayerChunk(
            layer=layer,
            token_offset=token_offset + start,
            tokens=end - start,
            # tobytes() is the one copy: a token slice of [heads, tokens, dim] is strided.
            keys=keys[:, start:end].tobytes(),
            values=values[:, start:end].tobytes(),
        )


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited_key(message: Any, field: str) -> bytes:
    """The key of a length-delimited field (wire type 2), its number from protos/."""
    return _varint(message.DESCRIPTOR.fields_by_name[field].number << 3 | 2)


_KEYS_KEY = _length_delimited_key(pb.LayerChunk, "keys")
_VALUES_KEY = _length_delimited_key(pb.LayerChunk, "values")


def serialized_layer_chunks(
    layer: int,
    keys: Any,
    values: Any,
    dtype: str,
    envelope: Any,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[bytes]:
    """`layer_chunks` already serialized, each as the `chunk` field of an `envelope`
    message (`pb.PrefetchResponse` or `pb.PutRequest`), for a stream whose serializer
    passes bytes through.

    Each message is built with one copy of its KV: the rows of every head joined
    straight into the message's bytes. Through protobuf the same bytes are copied three
    times (out of the arrays, into the message, into its serialization), which on
    loopback costs more than the wire. The encoding is protobuf's own (tests parse it
    back): the small fields serialized by protobuf, then the two byte fields, each a key,
    a varint length and the data."""
    keys, values = _checked_layer(layer, keys, values, dtype)
    keys, values = np.ascontiguousarray(keys), np.ascontiguousarray(values)
    envelope_key = _length_delimited_key(envelope, "chunk")
    heads = keys.shape[0]
    for start, end in _token_ranges(keys.shape, dtype, max_chunk_bytes):
        fields = pb.LayerChunk(layer=layer, token_offset=start, tokens=end - start)
        small = fields.SerializeToString()
        size = keys[:, start:end].nbytes
        length = _varint(size)
        inner = len(small) + 2 * (len(_KEYS_KEY) + len(length) + size)
        yield b"".join(
            [
                envelope_key,
                _varint(inner),
                small,
                _KEYS_KEY,
                length,
                *(keys[head, start:end] for head in range(heads)),
                _VALUES_KEY,
                length,
                *(values[head, start:end] for head in range(heads)),
            ]
        )


class LayerChunkFields(Protocol):
    """What `LayerAssembler` reads of a chunk: a `pb.LayerChunk`, or the server's
    protobuf-free copy of one (`minicache_server.domain.LayerChunk`)."""

    layer: int
    token_offset: int
    tokens: int
    keys: bytes
    values: bytes


class LayerAssembler:
    """Reassembles the chunks of layers `[kv_heads, tokens, head_dim]`, in token order.

    `add` returns the layer's (keys, values) NumPy arrays once its last chunk arrived,
    else None.
    """

    def __init__(
        self, num_layers: int, kv_heads: int, tokens: int, head_dim: int, dtype: str
    ) -> None:
        self.num_layers = num_layers
        self.shape = (kv_heads, tokens, head_dim)
        self.dtype = dtype
        self.carrier = carrier_of(dtype)
        self.token_bytes = kv_heads * head_dim * self.carrier.itemsize
        self.filled: dict[int, int] = {}
        self.buffers: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.complete: set[int] = set()

    def add(self, chunk: LayerChunkFields) -> tuple[np.ndarray, np.ndarray] | None:
        layer = chunk.layer
        heads, tokens, dim = self.shape
        if layer >= self.num_layers:
            raise OutOfRangeError(f"layer {layer} is out of range for {self.num_layers} layers")
        if layer in self.complete:
            raise InvalidArgumentError(f"layer {layer} was sent twice")
        filled = self.filled.get(layer, 0)
        if chunk.token_offset != filled:
            raise FailedPreconditionError(
                f"layer {layer}: chunk starts at token {chunk.token_offset}, expected "
                f"{filled} (chunks of a layer must arrive in token order)"
            )
        if chunk.tokens == 0 or filled + chunk.tokens > tokens:
            raise InvalidArgumentError(
                f"layer {layer}: chunk of {chunk.tokens} tokens at {filled} does not fit the "
                f"{tokens} tokens of the header's range"
            )
        expected = chunk.tokens * self.token_bytes
        if len(chunk.keys) != expected or len(chunk.values) != expected:
            raise InvalidArgumentError(
                f"layer {layer}: {chunk.tokens} tokens of {heads} heads x {dim} in {self.dtype} "
                f"take {expected} bytes each for keys and values, got {len(chunk.keys)} and "
                f"{len(chunk.values)}"
            )
        keys_values = [
            np.frombuffer(data, dtype=self.carrier).reshape(heads, chunk.tokens, dim)
            for data in (chunk.keys, chunk.values)
        ]
        if filled == 0 and chunk.tokens == tokens:
            # The whole layer in one chunk: no copy.
            self.complete.add(layer)
            self.filled[layer] = tokens
            return keys_values[0], keys_values[1]
        if layer not in self.buffers:
            self.buffers[layer] = (
                np.empty(self.shape, dtype=self.carrier),
                np.empty(self.shape, dtype=self.carrier),
            )
        for buffer, part in zip(self.buffers[layer], keys_values, strict=True):
            buffer[:, filled : filled + chunk.tokens] = part
        self.filled[layer] = filled + chunk.tokens
        if self.filled[layer] < tokens:
            return None
        self.complete.add(layer)
        return self.buffers.pop(layer)

    def missing_layers(self) -> list[int]:
        return [layer for layer in range(self.num_layers) if layer not in self.complete]
