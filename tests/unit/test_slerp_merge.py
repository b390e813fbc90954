"""SLERP merge of two adjacent layers' vectors (design.md §3), and the average merge."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minicache_client.codecs import AverageMerge, RawStream
from minicache_client.codecs.slerp_merge import NEAR_PARALLEL_SIN, slerp_merge

shapes = st.tuples(st.integers(1, 3), st.integers(0, 8), st.integers(2, 32))
seeds = st.integers(0, 2**32 - 1)
interpolations = st.floats(0.0, 1.0)


def layer_pair(seed: int, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    y = (rng.standard_normal(shape) * rng.uniform(0.1, 10)).astype(np.float32)
    return x, y


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def reference_slerp(x: np.ndarray, y: np.ndarray, t: float) -> np.ndarray:
    """e = sin((1-t)Ω)/sinΩ·x̂ + sin(tΩ)/sinΩ·ŷ, vector by vector in float64."""
    heads, tokens, _ = x.shape
    result = np.zeros(x.shape, dtype=np.float64)
    for h in range(heads):
        for i in range(tokens):
            xv, yv = x[h, i].astype(np.float64), y[h, i].astype(np.float64)
            xu, yu = xv / np.linalg.norm(xv), yv / np.linalg.norm(yv)
            omega = math.acos(max(-1.0, min(1.0, float(xu @ yu))))
            result[h, i] = (math.sin((1 - t) * omega) * xu + math.sin(t * omega) * yu) / math.sin(
                omega
            )
    return result


@settings(max_examples=60, deadline=None)
@given(seeds, shapes, interpolations)
def test_outputs_have_the_documented_shapes_and_ranges(
    seed: int, shape: tuple[int, int, int], t: float
) -> None:
    x, y = layer_pair(seed, shape)
    direction, magnitudes, omega = slerp_merge(x, y, t)
    heads, tokens, _ = shape
    assert direction.shape == shape and direction.dtype == np.float32
    assert magnitudes.shape == (2, heads, tokens) and magnitudes.dtype == np.float32
    assert omega.shape == (heads, tokens) and omega.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(direction, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(magnitudes[0], np.linalg.norm(x, axis=-1), rtol=1e-6)
    np.testing.assert_allclose(magnitudes[1], np.linalg.norm(y, axis=-1), rtol=1e-6)
    assert ((omega >= 0) & (omega <= np.float32(math.pi))).all()


@settings(max_examples=40, deadline=None)
@given(seeds, shapes, interpolations)
def test_direction_matches_the_slerp_formula(
    seed: int, shape: tuple[int, int, int], t: float
) -> None:
    x, y = layer_pair(seed, shape)
    cosine = (unit(x.astype(np.float64)) * unit(y.astype(np.float64))).sum(-1)
    # Away from the near-parallel/antiparallel fallback, where float32 arccos is accurate.
    well_separated = np.abs(cosine) < 0.99
    direction, _, omega = slerp_merge(x, y, t)
    expected = reference_slerp(x, y, t)
    np.testing.assert_allclose(
        direction[well_separated], expected[well_separated], atol=2e-5, rtol=0
    )
    np.testing.assert_allclose(omega, np.arccos(np.clip(cosine, -1, 1)), atol=2e-3)


def test_formula_on_a_known_angle() -> None:
    # x̂ = e1, ŷ = e2 (Ω = π/2): the merge lies on the arc at angle tΩ from e1.
    x = np.array([[[2.0, 0.0, 0.0]]], dtype=np.float32)
    y = np.array([[[0.0, 5.0, 0.0]]], dtype=np.float32)
    direction, magnitudes, omega = slerp_merge(x, y, 0.6)
    angle = 0.6 * math.pi / 2
    np.testing.assert_allclose(direction[0, 0], [math.cos(angle), math.sin(angle), 0], atol=1e-6)
    np.testing.assert_allclose(magnitudes[:, 0, 0], [2.0, 5.0])
    np.testing.assert_allclose(omega[0, 0], math.pi / 2, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(seeds, shapes)
def test_t_zero_gives_x_direction_and_t_one_gives_y_direction(
    seed: int, shape: tuple[int, int, int]
) -> None:
    x, y = layer_pair(seed, shape)
    np.testing.assert_allclose(slerp_merge(x, y, 0.0)[0], unit(x), atol=1e-5)
    np.testing.assert_allclose(slerp_merge(x, y, 1.0)[0], unit(y), atol=1e-5)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.6, 1.0])
def test_parallel_inputs_give_the_common_direction(t: float) -> None:
    x = np.random.default_rng(1).standard_normal((3, 16, 64)).astype(np.float32)
    direction, magnitudes, omega = slerp_merge(x, 3 * x, t)
    assert np.isfinite(direction).all()
    np.testing.assert_allclose(direction, unit(x), atol=1e-6)
    np.testing.assert_allclose(magnitudes[1], 3 * magnitudes[0], rtol=1e-6)
    assert (omega < 1e-2).all()


def test_parallel_inputs_use_the_near_parallel_fallback() -> None:
    x = np.random.default_rng(1).standard_normal((3, 16, 64)).astype(np.float32)
    _, _, omega = slerp_merge(x, 3 * x, 0.6)
    assert (np.sin(omega) < NEAR_PARALLEL_SIN).all(), float(omega.max())


def test_antiparallel_inputs_stay_finite() -> None:
    x = np.random.default_rng(2).standard_normal((1, 4, 8)).astype(np.float32)
    direction, _, omega = slerp_merge(x, -x, 0.5)
    assert np.isfinite(direction).all()
    np.testing.assert_allclose(omega, math.pi, atol=1e-3)
    # The documented degenerate case: exactly opposite at t = 0.5 has no direction.
    np.testing.assert_allclose(direction, 0, atol=1e-3)
    direction, _, _ = slerp_merge(x, -x, 0.2)
    np.testing.assert_allclose(direction, unit(x), atol=1e-3)


def test_zero_vectors_give_finite_outputs() -> None:
    y = np.random.default_rng(3).standard_normal((2, 3, 8)).astype(np.float32)
    zero = np.zeros_like(y)
    for first, second in ((zero, zero), (zero, y), (y, zero)):
        with np.errstate(all="raise"):
            direction, magnitudes, omega = slerp_merge(first, second, 0.6)
        for output in (direction, magnitudes, omega):
            assert np.isfinite(output).all()
    direction, magnitudes, _ = slerp_merge(zero, zero, 0.6)
    np.testing.assert_array_equal(direction, 0)
    np.testing.assert_array_equal(magnitudes, 0)
    # With one side zero the merge takes the other side's direction.
    np.testing.assert_allclose(slerp_merge(zero, y, 0.6)[0], unit(y), atol=1e-6)
    np.testing.assert_allclose(slerp_merge(y, zero, 0.6)[0], unit(y), atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_average_merge_restores_both_layers_as_the_mean(dtype: str) -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 5, 8)).astype(dtype)
    y = rng.standard_normal((2, 5, 8)).astype(dtype)
    pair = AverageMerge(2, 8, dtype, RawStream(2, 8, dtype))
    pair.append([x, y])
    mean = (x.astype(np.float64) + y) / 2
    tolerance = np.finfo(dtype).eps
    for restored in pair.restore_group(0, 5, dtype):
        assert restored.dtype == x.dtype
        np.testing.assert_allclose(restored, mean, rtol=tolerance, atol=tolerance)
