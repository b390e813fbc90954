"""The stored entry's binary format: round trip, checksum, header, byte accounting."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kv_samples import assert_bit_equal, random_kv

from minicache_client.entry import (
    FORMAT_MAGIC,
    FORMAT_VERSION,
    CorruptEntryError,
    LayerGroupEntry,
    MergedStream,
    decode_entry,
    encode_entry,
    fp16_bytes,
    stored_bytes,
)
from minicache_client.policy import PRESETS, CompressionPolicy, MergePlan, Quantization, Retention
from minicache_client.restore import restore_layer
from minicache_server.compression import SequenceEncoder

HEADER_SIZE = 9  # magic (4), version (1), CRC-32 (4)

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
):
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


def merged_entry() -> LayerGroupEntry:
    entry = encoded_sequence("paper_quant_sink").entries[0]
    assert isinstance(entry.keys, MergedStream) and entry.keys.retained_count > 0
    return entry


ENCODED = encode_entry(merged_entry())


@pytest.mark.parametrize("policy_name", sorted(POLICIES))
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_decoded_entry_restores_exactly_what_the_original_restores(
    policy_name: str, dtype: str
) -> None:
    encoder = encoded_sequence(policy_name, dtype)
    for entry in encoder.entries:
        data = encode_entry(entry)
        assert data[:4] == FORMAT_MAGIC and data[4] == FORMAT_VERSION
        decoded = decode_entry(data)
        assert decoded.layers == entry.layers and decoded.dtype == entry.dtype
        assert decoded.tokens == entry.tokens and decoded.frozen_tokens == entry.frozen_tokens
        for layer in entry.layers:
            for restored, expected in zip(
                restore_layer(decoded, layer), restore_layer(entry, layer), strict=True
            ):
                assert_bit_equal(restored, expected)
        # Encoding is deterministic, and decoding loses nothing that is stored.
        assert encode_entry(decoded) == data


def test_decode_accepts_memoryview_and_bytearray() -> None:
    for data in (memoryview(ENCODED), bytearray(ENCODED)):
        assert decode_entry(data).tokens == 29


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_any_single_flipped_byte_is_detected(data: st.DataObject) -> None:
    position = data.draw(st.integers(0, len(ENCODED) - 1), label="position")
    flip = data.draw(st.integers(1, 255), label="xor")
    corrupted = bytearray(ENCODED)
    corrupted[position] ^= flip
    with pytest.raises(CorruptEntryError):
        decode_entry(bytes(corrupted))


@pytest.mark.parametrize(
    "position", [HEADER_SIZE, HEADER_SIZE + 1, len(ENCODED) // 2, len(ENCODED) - 1]
)
def test_flipped_body_byte_is_a_checksum_mismatch(position: int) -> None:
    corrupted = bytearray(ENCODED)
    corrupted[position] ^= 0x01
    with pytest.raises(CorruptEntryError, match="checksum"):
        decode_entry(bytes(corrupted))


def test_bad_magic() -> None:
    with pytest.raises(CorruptEntryError, match="magic"):
        decode_entry(b"XCKV" + ENCODED[4:])


@pytest.mark.parametrize("version", [0, FORMAT_VERSION + 1, 255])
def test_bad_version(version: int) -> None:
    data = ENCODED[:4] + bytes([version]) + ENCODED[5:]
    with pytest.raises(CorruptEntryError, match=f"version {version}"):
        decode_entry(data)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_truncated_or_extended_data_is_rejected(data: st.DataObject) -> None:
    length = data.draw(st.integers(0, len(ENCODED) - 1), label="length")
    with pytest.raises(CorruptEntryError):
        decode_entry(ENCODED[:length])
    extra = data.draw(st.binary(min_size=1, max_size=8), label="extra")
    with pytest.raises(CorruptEntryError):
        decode_entry(ENCODED + extra)


def test_valid_checksum_over_a_malformed_body_is_still_rejected() -> None:
    for body in (b"\xc1", b"\x93\x01\x02\x03", b"\x81\xa3foo\x01"):
        data = struct.pack("<4sBI", FORMAT_MAGIC, FORMAT_VERSION, zlib.crc32(body)) + body
        with pytest.raises(CorruptEntryError):
            decode_entry(data)


def test_structurally_inconsistent_entry_is_rejected() -> None:
    entry = merged_entry()
    entry.keys.magnitudes = entry.keys.magnitudes[:, :, :-1]  # one token short
    with pytest.raises(CorruptEntryError, match="magnitudes"):
        decode_entry(encode_entry(entry))


def test_recent_tokens_beyond_the_merge_window_are_rejected() -> None:
    entry = encoded_sequence("merge_window_quant").entries[0]
    assert entry.keys.recent_tokens == entry.keys.window == 5
    assert entry.tokens == 29
    decode_entry(encode_entry(entry))
    entry.keys.window = 4
    with pytest.raises(CorruptEntryError, match="more recent tokens than the window"):
        decode_entry(encode_entry(entry))
    entry.keys.window = 5
    entry.keys.recent = entry.keys.recent[:, :, :, :-1]  # a channel short
    with pytest.raises(CorruptEntryError, match="recent tokens have the wrong shape"):
        decode_entry(encode_entry(entry))


def test_decoded_arrays_are_read_only_views() -> None:
    decoded = decode_entry(ENCODED)
    assert not decoded.keys.retained.flags.writeable
    # Restoring from read-only storage still works, retained tokens included.
    keys, _ = restore_layer(decoded, 0)
    assert keys.shape == (2, 29, 16)


# -- byte accounting ----------------------------------------------------------------------------


@pytest.mark.parametrize("policy_name", ["none", "paper", "kivi4", "paper_quant_sink"])
def test_stored_bytes_is_the_length_of_the_encoding(policy_name: str) -> None:
    for entry in encoded_sequence(policy_name).entries:
        assert stored_bytes(entry) == len(encode_entry(entry))


def test_fp16_bytes_counts_keys_and_values_of_every_layer() -> None:
    one_layer = 2 * 2 * 29 * 16 * 2  # keys and values, heads, tokens, head_dim, 2 bytes
    encoder = encoded_sequence("paper", dtype="float32", tokens=29, num_layers=4)
    assert [entry.layers for entry in encoder.entries] == [(0,), (1,), (2, 3)]
    assert [fp16_bytes(entry) for entry in encoder.entries] == [one_layer, one_layer, 2 * one_layer]
    encoder = encoded_sequence("none", dtype="float32", tokens=29, num_layers=2)
    assert [fp16_bytes(entry) for entry in encoder.entries] == [one_layer] * 2


def test_uncompressed_float16_ratio_is_just_below_one() -> None:
    encoder = encoded_sequence("none", tokens=512)
    ratio = encoder.compression_ratio()
    assert 0.95 < ratio < 1.0


def test_uncompressed_float32_ratio_is_about_one_half() -> None:
    assert 0.45 < encoded_sequence("none", dtype="float32", tokens=512).compression_ratio() < 0.5


def test_two_bits_compress_more_than_four() -> None:
    kivi4 = encoded_sequence("kivi4", tokens=256).compression_ratio()
    kivi2 = encoded_sequence("kivi2", tokens=256).compression_ratio()
    assert kivi2 > kivi4 > 2.0
