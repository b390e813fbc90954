"""Sample KV tensors for the unit tests: real arrays in each KV dtype's carrier.

Every tensor is `[kv_heads, tokens, head_dim]`; bfloat16 is carried as uint16 bits.
"""

from __future__ import annotations

import numpy as np

from minicache_client.array_namespace import (
    CARRIER_DTYPES,
    KV_DTYPES,
    narrow_from_float32,
    widen_to_float32,
)

__all__ = [
    "KV_DTYPES",
    "as_float32",
    "assert_bit_equal",
    "bits_of",
    "finite_bit_patterns",
    "random_kv",
]

# Unsigned integer views, for bit-exact comparisons (-0.0 and NaN payloads included).
_BIT_VIEWS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def random_kv(
    rng: np.random.Generator, shape: tuple[int, ...], dtype: str, scale: float = 1.0
) -> np.ndarray:
    """Normal samples times `scale`, in the carrier of `dtype`."""
    values = (rng.standard_normal(shape) * scale).astype(np.float32)
    return narrow_from_float32(values, dtype)


def finite_bit_patterns(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """Arbitrary finite values of `dtype` (subnormals, -0.0, extremes), as carrier."""
    carrier = CARRIER_DTYPES[dtype]
    if dtype == "float32":
        bits = rng.integers(0, 2**32, size=shape, dtype=np.uint64).astype(np.uint32)
        exponent = (bits >> 23) & 0xFF
        bits = np.where(exponent == 0xFF, bits & 0x807FFFFF, bits).astype(np.uint32)
        return bits.view(np.float32)
    bits = rng.integers(0, 2**16, size=shape, dtype=np.uint32).astype(np.uint16)
    # (all exponent bits, lowest exponent bit) of each 16-bit format.
    exponent, lowest = (0x7C00, 0x0400) if dtype == "float16" else (0x7F80, 0x0080)
    # Clear the lowest exponent bit where all are set: still finite, still arbitrary.
    all_ones = (bits & exponent) == exponent
    bits = np.where(all_ones, bits & np.uint16(0xFFFF ^ lowest), bits).astype(np.uint16)
    return bits.view(carrier)


def as_float32(carrier: np.ndarray, dtype: str) -> np.ndarray:
    return np.asarray(widen_to_float32(np.asarray(carrier), dtype), dtype=np.float32)


def bits_of(array: np.ndarray) -> np.ndarray:
    """The raw bit patterns of an array of floats or unsigned integers."""
    array = np.ascontiguousarray(array)
    return array.view(_BIT_VIEWS[array.dtype.itemsize])


def assert_bit_equal(actual: np.ndarray, expected: np.ndarray) -> None:
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    mismatches = np.flatnonzero(bits_of(actual) != bits_of(expected))
    assert mismatches.size == 0, f"{mismatches.size} elements differ, first at {mismatches[:5]}"
