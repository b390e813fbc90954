"""bfloat16 carried as uint16 bits: widen by shift, narrow with round-to-nearest-even.

The reference below is pure NumPy float64 arithmetic (torch is not a client dependency).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from minicache_client.array_namespace import (
    array_namespace,
    check_kv_dtype,
    narrow_from_float32,
    to_numpy,
    widen_to_float32,
)

ALL_BF16_PATTERNS = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
# Where float32 overflows bfloat16 under round-to-nearest: max finite bf16 plus half an ulp.
BF16_OVERFLOW = 2.0**128 - 2.0**119


def reference_bf16_bits(values: np.ndarray) -> np.ndarray:
    """bfloat16 bits of finite float32 `values`, rounded to nearest, ties to even."""
    values = np.asarray(values, dtype=np.float32)
    toward_zero = (values.view(np.uint32) >> 16).astype(np.uint32)
    away = toward_zero + 1
    exact = values.astype(np.float64)

    def value_of(bits: np.ndarray) -> np.ndarray:
        magnitude = (bits & 0x7FFF).astype(np.float64)
        exponent = magnitude // 128
        mantissa = magnitude % 128
        normal = (1 + mantissa / 128) * 2.0 ** (exponent - 127)
        subnormal = mantissa / 128 * 2.0**-126
        result = np.where(exponent == 0, subnormal, normal)
        result = np.where(exponent == 255, 2.0**128, result)  # inf, as RNE sees it
        return np.where(bits & 0x8000, -result, result)

    lower_gap = np.abs(exact - value_of(toward_zero))
    upper_gap = np.abs(value_of(away) - exact)
    take_away = (upper_gap < lower_gap) | ((upper_gap == lower_gap) & (toward_zero % 2 == 1))
    return np.where(take_away, away, toward_zero).astype(np.uint16)


def test_every_bf16_pattern_round_trips_through_float32() -> None:
    widened = widen_to_float32(ALL_BF16_PATTERNS, "bfloat16")
    assert widened.dtype == np.float32
    narrowed = narrow_from_float32(widened, "bfloat16")
    assert narrowed.dtype == np.uint16
    np.testing.assert_array_equal(narrowed, ALL_BF16_PATTERNS)


def test_widen_is_exact_for_every_finite_pattern() -> None:
    finite = ALL_BF16_PATTERNS[(ALL_BF16_PATTERNS & 0x7F80) != 0x7F80]
    widened = widen_to_float32(finite, "bfloat16").astype(np.float64)
    expected = np.where(finite & 0x8000, -1.0, 1.0) * np.where(
        (finite & 0x7F80) == 0,
        (finite & 0x7F) / 128 * 2.0**-126,
        (1 + (finite & 0x7F) / 128) * 2.0 ** (((finite >> 7) & 0xFF).astype(np.float64) - 127),
    )
    np.testing.assert_array_equal(widened, expected)


@pytest.mark.parametrize(
    ("bits", "value"),
    [
        (0x3F80, 1.0),
        (0xC000, -2.0),
        (0x0000, 0.0),
        (0x0001, 2.0**-133),
        (0x7F7F, 3.3895313892515355e38),
        (0x7F80, np.inf),
        (0xFF80, -np.inf),
    ],
)
def test_widen_known_values(bits: int, value: float) -> None:
    assert widen_to_float32(np.array([bits], dtype=np.uint16), "bfloat16")[0] == value


def test_widen_keeps_negative_zero_and_nan() -> None:
    widened = widen_to_float32(np.array([0x8000, 0x7FC0, 0xFF81], dtype=np.uint16), "bfloat16")
    assert widened[0] == 0 and np.signbit(widened[0])
    assert np.isnan(widened[1:]).all()


@settings(max_examples=150, deadline=None)
@given(
    arrays(
        np.float32,
        st.integers(0, 64),
        elements=st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True),
    )
)
def test_narrow_matches_round_to_nearest_even_reference(values: np.ndarray) -> None:
    np.testing.assert_array_equal(
        narrow_from_float32(values, "bfloat16"), reference_bf16_bits(values)
    )


def test_narrow_matches_reference_on_dense_bit_patterns() -> None:
    # Every low-16-bit remainder that matters for rounding, on odd and even mantissas.
    high = np.array([0x3F80, 0x3F81, 0xBF80, 0xBF81, 0x0000, 0x0001, 0x7F7E, 0x7F7F], np.uint32)
    low = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=np.uint32)
    values = ((high[:, None] << 16) | low[None, :]).reshape(-1).view(np.float32)
    np.testing.assert_array_equal(
        narrow_from_float32(values, "bfloat16"), reference_bf16_bits(values)
    )


@pytest.mark.parametrize(
    ("value", "expected_bits"),
    [
        (1.0 + 2.0**-8, 0x3F80),  # halfway between 1 and 1 + 2^-7: to even (down)
        (1.0 + 3 * 2.0**-8, 0x3F82),  # halfway, lower neighbour odd: up
        (1.0 + 2.0**-8 + 2.0**-20, 0x3F81),  # just above halfway: up
        (-(1.0 + 2.0**-8), 0xBF80),
        (2.0**-140, 0x0000),  # below half the smallest subnormal
        (3 * 2.0**-134, 0x0002),  # halfway between subnormals 1 and 2: to even
        (3.39e38, 0x7F7F),
        (3.4e38, 0x7F80),  # beyond max + half ulp: overflow to inf
    ],
)
def test_narrow_rounding_cases(value: float, expected_bits: int) -> None:
    narrowed = narrow_from_float32(np.array([value], dtype=np.float32), "bfloat16")
    assert int(narrowed[0]) == expected_bits


def test_narrow_overflow_threshold() -> None:
    below = np.nextafter(np.float32(BF16_OVERFLOW), np.float32(0))
    at = np.float32(BF16_OVERFLOW)
    narrowed = narrow_from_float32(np.array([below, at, -at], dtype=np.float32), "bfloat16")
    assert narrowed.tolist() == [0x7F7F, 0x7F80, 0xFF80]


def test_narrow_keeps_every_nan_a_nan() -> None:
    nan_bits = np.array([0x7FC00000, 0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0xFF800001], np.uint32)
    narrowed = narrow_from_float32(nan_bits.view(np.float32), "bfloat16")
    assert np.isnan(widen_to_float32(narrowed, "bfloat16")).all(), [hex(b) for b in narrowed]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_other_dtypes_widen_and_narrow_by_cast(dtype: str) -> None:
    values = np.array([0.0, -0.0, 1.5, -65504.0, 2.0**-24], dtype=dtype)
    widened = widen_to_float32(values, dtype)
    assert widened.dtype == np.float32
    np.testing.assert_array_equal(widened, values.astype(np.float32))
    narrowed = narrow_from_float32(widened, dtype)
    assert narrowed.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(
        narrowed.view(f"u{narrowed.itemsize}"), values.view(f"u{values.itemsize}")
    )


def test_namespace_is_numpy_for_numpy_arrays() -> None:
    array = np.zeros(3, dtype=np.float32)
    assert array_namespace(array) is np
    assert to_numpy(array) is array


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_check_kv_dtype_accepts_kv_dtypes(dtype: str) -> None:
    assert check_kv_dtype(dtype) == dtype


@pytest.mark.parametrize("dtype", ["int8", "float64", "bf16", ""])
def test_check_kv_dtype_rejects_others_and_names_the_choices(dtype: str) -> None:
    with pytest.raises(ValueError, match="float32, float16, bfloat16"):
        check_kv_dtype(dtype)
