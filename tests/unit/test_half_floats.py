"""The NumPy float16 casts equal `astype` bit for bit, on every pattern that matters."""

from __future__ import annotations

import numpy as np
import pytest

from minicache_client.half_floats import (
    CHUNK_VALUES,
    float16_to_float32,
    float32_to_float16,
    float32_to_float16_into,
)

EVERY_HALF = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)


def numpy_half_bits(values: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return values.astype(np.float16).view(np.uint16)


def rounding_cases() -> np.ndarray:
    """Every finite float16 as float32, the midpoints to its neighbour (ties, which
    round to even) and the float32 values one unit either side of them, random bit
    patterns over every exponent, and the specials."""
    finite = EVERY_HALF[np.isfinite(EVERY_HALF)].astype(np.float32)
    ordered = np.unique(finite)
    midpoints = ((ordered[:-1].astype(np.float64) + ordered[1:]) / 2).astype(np.float32)
    below = np.nextafter(midpoints, np.float32(-np.inf))
    above = np.nextafter(midpoints, np.float32(np.inf))
    rng = np.random.default_rng(7)
    random_bits = rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32)
    specials = np.array(
        [
            0.0,
            -0.0,
            np.inf,
            -np.inf,
            np.nan,
            65504.0,
            65519.99,
            65520.0,
            65536.0,
            1e30,
            2.0**-14,
            2.0**-24,
            2.0**-25,
            3 * 2.0**-26,
            1e-30,
            -(2.0**-25),
        ],
        dtype=np.float32,
    )
    return np.concatenate([finite, midpoints, below, above, random_bits.view(np.float32), specials])


def test_widening_every_half_equals_numpy():
    widened = float16_to_float32(EVERY_HALF.reshape(256, 256))
    assert widened.shape == (256, 256) and widened.dtype == np.float32
    assert np.array_equal(
        widened.view(np.uint32).reshape(-1), EVERY_HALF.astype(np.float32).view(np.uint32)
    )


def test_narrowing_equals_numpy_on_ties_neighbours_random_and_specials():
    cases = rounding_cases()
    # Finite chunks take the integer rounding path; the specials' chunk takes NumPy's.
    finite = cases[np.abs(cases) < 65536]
    assert np.array_equal(float32_to_float16(finite).view(np.uint16), numpy_half_bits(finite))
    with np.errstate(over="ignore", invalid="ignore"):
        assert np.array_equal(float32_to_float16(cases).view(np.uint16), numpy_half_bits(cases))


@pytest.mark.parametrize("size", [0, 1, CHUNK_VALUES - 1, CHUNK_VALUES, 2 * CHUNK_VALUES + 3])
def test_narrowing_across_chunk_boundaries(size: int):
    values = np.random.default_rng(size).standard_normal(size, dtype=np.float32) * 1000
    values[::97] *= 1e-9  # subnormal results in many chunks
    assert np.array_equal(float32_to_float16(values).view(np.uint16), numpy_half_bits(values))


def test_narrowing_into_a_strided_slice_leaves_the_rest_untouched():
    values = np.random.default_rng(3).standard_normal((3, 100, 64), dtype=np.float32)
    out = np.full((3, 300, 64), 7, dtype=np.float16)
    float32_to_float16_into(values, out[:, 100:200])
    assert np.array_equal(out[:, 100:200], values.astype(np.float16))
    assert (out[:, :100] == 7).all() and (out[:, 200:] == 7).all()


def test_narrowing_refuses_another_shape():
    with pytest.raises(ValueError, match="shapes differ"):
        float32_to_float16_into(np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float16))
