"""The stored entry's binary format (version 3): header layout, what decoding accepts,
and byte accounting. Round trips, checksums, truncation and structural corruption of
every codec are in the codec matrix (test_codec_matrix.py)."""

from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest
import xxhash
from kv_samples import random_kv

from minicache_client.codecs import SlerpMerge
from minicache_client.entry import (
    FORMAT_MAGIC,
    FORMAT_VERSION,
    CorruptEntryError,
    decode_entry,
    encode_entry,
    fp16_bytes,
)
from minicache_client.policy import PRESETS, CompressionPolicy, MergePlan, Quantization, Retention
from minicache_client.restore import restore_layer
from minicache_client.sequence_encoder import SequenceEncoder

# magic (4), version (1), 3 zero bytes, xxh3-64 of everything after the header (8)
HEADER = struct.Struct("<4sB3xQ")

POLICIES = {
    **PRESETS,
    "paper_quant_sink": CompressionPolicy(
        "paper_quant_sink",
        merge=MergePlan(start_layer=0, retention=Retention(gamma=0.2, sink_tokens=2)),
        quantization=Quantization(
            3, 2, key_group_size=8, value_group_size=8, window=3, sink_tokens=2
        ),
    ),
    "merge_window_quant": CompressionPolicy(
        "merge_window_quant",
        merge=MergePlan(start_layer=0, retention=Retention(gamma=0.2), window=5),
        quantization=Quantization(3, 2, key_group_size=8, value_group_size=8),
    ),
}


def encoded_sequence(
    policy_name: str, dtype: str = "float16", tokens: int = 29, num_layers: int = 2
) -> SequenceEncoder:
    policy = POLICIES[policy_name]
    num_layers = max(num_layers, policy.min_num_layers)
    encoder = SequenceEncoder(policy, num_layers=num_layers, kv_heads=2, head_dim=16, dtype=dtype)
    rng = np.random.default_rng(0)
    for layer in range(num_layers):
        encoder.put_layer(
            layer, random_kv(rng, (2, tokens, 16), dtype), random_kv(rng, (2, tokens, 16), dtype)
        )
    encoder.seal()
    return encoder


MERGED = encoded_sequence("paper_quant_sink").entries[0]
ENCODED = encode_entry(MERGED)


def test_merged_sample_holds_retained_tokens() -> None:
    (keys,) = MERGED.keys
    assert isinstance(keys, SlerpMerge) and keys.retained_count > 0


def test_header_is_magic_version_zero_bytes_and_checksum_of_the_rest() -> None:
    magic, version, checksum = HEADER.unpack_from(ENCODED)
    assert (magic, version) == (FORMAT_MAGIC, FORMAT_VERSION) == (b"MCKV", 3)
    assert ENCODED[5:8] == bytes(3)
    assert checksum == xxhash.xxh3_64_intdigest(ENCODED[HEADER.size :])
    # Arrays start, and the encoding ends, on 8-byte boundaries.
    assert len(ENCODED) % 8 == 0


@pytest.mark.parametrize("position", [5, 6, 7])
def test_reserved_header_bytes_must_be_zero(position: int) -> None:
    corrupted = bytearray(ENCODED)
    corrupted[position] = 1
    with pytest.raises(CorruptEntryError, match="reserved"):
        decode_entry(bytes(corrupted))


def test_decode_accepts_memoryview_and_bytearray() -> None:
    for data in (memoryview(ENCODED), bytearray(ENCODED)):
        assert decode_entry(data).tokens == 29


@pytest.mark.parametrize(
    "body",
    [
        b"",
        struct.pack("<I", 1) + b"\xc1" + bytes(3),  # never-used msgpack byte
        struct.pack("<I", 4) + b"\x93\x01\x02\x03",  # a list, not a mapping
        struct.pack("<I", 5) + b"\x81\xa3foo\x01" + bytes(7),  # a mapping without fields
        struct.pack("<I", 1 << 20) + bytes(4),  # metadata longer than the entry
        struct.pack("<I", 3) + msgpack.packb({}) + bytes(4),  # metadata past its length
    ],
)
def test_valid_checksum_over_a_malformed_body_is_still_rejected(body: bytes) -> None:
    data = HEADER.pack(FORMAT_MAGIC, FORMAT_VERSION, xxhash.xxh3_64_intdigest(body)) + body
    with pytest.raises(CorruptEntryError):
        decode_entry(data)


def test_recent_tokens_beyond_the_merge_window_are_rejected() -> None:
    entry = encoded_sequence("merge_window_quant").entries[0]
    (keys,) = entry.keys
    assert keys.recent.shape[2] == keys.window == 5
    assert entry.tokens == 29
    decode_entry(encode_entry(entry))
    keys.window = 4
    with pytest.raises(CorruptEntryError, match="more recent tokens than the window"):
        decode_entry(encode_entry(entry))
    keys.window = 5
    keys.recent = keys.recent[:, :, :, :-1]  # a channel short
    with pytest.raises(CorruptEntryError, match="recent tokens have the wrong shape"):
        decode_entry(encode_entry(entry))


def test_decoded_arrays_are_read_only_views() -> None:
    decoded = decode_entry(ENCODED)
    (keys,) = decoded.keys
    assert not keys.retained.flags.writeable
    assert not keys.direction.codes.flags.writeable
    # Restoring from read-only storage still works, retained tokens included.
    restored, _ = restore_layer(decoded, 0)
    assert restored.shape == (2, 29, 16)


# -- byte accounting ----------------------------------------------------------------------------


def test_fp16_bytes_counts_keys_and_values_of_every_layer() -> None:
    one_layer = 2 * 2 * 29 * 16 * 2  # keys and values, heads, tokens, head_dim, 2 bytes
    encoder = encoded_sequence("paper", dtype="float32", tokens=29, num_layers=4)
    assert [entry.layers for entry in encoder.entries] == [(0,), (1,), (2, 3)]
    assert [fp16_bytes(entry) for entry in encoder.entries] == [one_layer, one_layer, 2 * one_layer]
    encoder = encoded_sequence("none", dtype="float32", tokens=29, num_layers=2)
    assert [fp16_bytes(entry) for entry in encoder.entries] == [one_layer] * 2


def test_uncompressed_float16_ratio_is_just_below_one() -> None:
    ratio = encoded_sequence("none", tokens=512).compression_ratio()
    assert 0.95 < ratio < 1.0


def test_uncompressed_float32_ratio_is_about_one_half() -> None:
    assert 0.45 < encoded_sequence("none", dtype="float32", tokens=512).compression_ratio() < 0.5


def test_two_bits_compress_more_than_four() -> None:
    kivi4 = encoded_sequence("kivi4", tokens=256).compression_ratio()
    kivi2 = encoded_sequence("kivi2", tokens=256).compression_ratio()
    assert kivi2 > kivi4 > 2.0
