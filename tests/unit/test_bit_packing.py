"""Packing of 2/3/4/8-bit quantization codes into bytes (minicache_client.bit_packing)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minicache_client.bit_packing import (
    code_offsets,
    pack_codes,
    pack_rows,
    packed_size,
    row_bytes,
    unpack_codes,
)

BITS = (2, 3, 4, 8)


@st.composite
def codes_and_bits(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    bits = draw(st.sampled_from(BITS))
    values = draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=200))
    return np.array(values, dtype=np.uint8), bits


@settings(max_examples=200, deadline=None)
@given(codes_and_bits())
def test_round_trip_of_arbitrary_codes(sample: tuple[np.ndarray, int]) -> None:
    codes, bits = sample
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8
    assert packed.size == packed_size(codes.size, bits) == -(-codes.size * bits // 8)
    unpacked = unpack_codes(packed, bits, codes.size)
    assert unpacked.dtype == np.uint8
    np.testing.assert_array_equal(unpacked, codes)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("count", [0, 1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 63, 64, 65])
def test_round_trip_at_lengths_around_byte_boundaries(bits: int, count: int) -> None:
    rng = np.random.default_rng(count * 10 + bits)
    codes = rng.integers(0, 1 << bits, size=count, dtype=np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.size == (count * bits + 7) // 8
    np.testing.assert_array_equal(unpack_codes(packed, bits, count), codes)


@pytest.mark.parametrize("bits", BITS)
def test_largest_codes_survive(bits: int) -> None:
    codes = np.full(13, (1 << bits) - 1, dtype=np.uint8)
    np.testing.assert_array_equal(unpack_codes(pack_codes(codes, bits), bits, 13), codes)


def test_multidimensional_codes_are_flattened_row_major() -> None:
    codes = np.arange(24, dtype=np.uint8).reshape(2, 3, 4) % 16
    np.testing.assert_array_equal(unpack_codes(pack_codes(codes, 4), 4, 24), codes.reshape(-1))


@pytest.mark.parametrize(
    ("codes", "bits", "expected"),
    [
        # Little-endian within a byte: the first code sits in the lowest bits.
        ([1, 2, 3, 0], 2, [0b00_11_10_01]),
        ([1, 2, 3], 2, [0b00_11_10_01]),
        ([0x1, 0xF, 0x3], 4, [0xF1, 0x03]),
        ([5, 3, 7], 3, [0b11_011_101, 0b0000000_1]),
        ([200, 7], 8, [200, 7]),
    ],
)
def test_bit_layout_is_little_endian_within_a_byte(
    codes: list[int], bits: int, expected: list[int]
) -> None:
    packed = pack_codes(np.array(codes, dtype=np.uint8), bits)
    assert packed.tolist() == expected


@pytest.mark.parametrize(
    ("count", "bits", "size"),
    [
        (0, 2, 0),
        (1, 2, 1),
        (4, 2, 1),
        (5, 2, 2),
        (1, 3, 1),
        (8, 3, 3),
        (9, 3, 4),
        (3, 4, 2),
        (7, 8, 7),
    ],
)
def test_packed_size(count: int, bits: int, size: int) -> None:
    assert packed_size(count, bits) == size


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("delta", [-1, 1])
def test_wrong_buffer_size_raises(bits: int, delta: int) -> None:
    count = 10
    packed = np.zeros(packed_size(count, bits) + delta, dtype=np.uint8)
    with pytest.raises(ValueError, match=f"expected {packed_size(count, bits)}"):
        unpack_codes(packed, bits, count)


def test_empty_buffer_for_nonzero_count_raises() -> None:
    with pytest.raises(ValueError):
        unpack_codes(np.zeros(0, dtype=np.uint8), 3, 1)


# -- packed rows (one per head and token of quantized KV) --------------------------------


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from(BITS),
    st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 70)),
    st.integers(0, 2**32 - 1),
)
def test_packed_rows_read_back_as_offsets_from_the_middle_code(
    bits: int, shape: tuple[int, int, int], seed: int
) -> None:
    codes = np.random.default_rng(seed).integers(0, 1 << bits, size=shape, dtype=np.uint8)
    packed = pack_rows(codes, bits)
    head_dim = shape[-1]
    assert packed.dtype == np.uint8
    assert packed.shape == (*shape[:-1], row_bytes(head_dim, bits))
    offsets = code_offsets(packed, bits, head_dim)
    assert offsets.dtype == np.float32 and offsets.shape == shape
    np.testing.assert_array_equal(offsets, codes - ((1 << bits) - 1) / 2)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("head_dim", "codes_per_row"), [(1, 8), (8, 8), (12, 16), (64, 64)])
def test_every_row_is_padded_to_whole_bytes(bits: int, head_dim: int, codes_per_row: int) -> None:
    assert row_bytes(head_dim, bits) == codes_per_row * bits // 8
    codes = np.full((2, head_dim), (1 << bits) - 1, dtype=np.uint8)
    packed = pack_rows(codes, bits)
    # Each row is the bit stream of its own codes, then zero padding.
    np.testing.assert_array_equal(
        packed[1], pack_codes(np.pad(codes[1], (0, codes_per_row - head_dim)), bits)
    )
