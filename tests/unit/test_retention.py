"""Token retention of merged SLERP pairs (`codecs/slerp_merge.py`): which (head, token)
units stay unmerged, on inputs whose angles are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from minicache_client.codecs import SlerpMerge
from minicache_client.codecs.slerp_merge import distance_threshold, retained_mask, slerp_merge
from minicache_client.policy import LayerGroup, PairMerge, Retention
from minicache_client.sequence_encoder import LayerGroupEncoder

SIDES = ("most_distinct", "least_distinct")


def retained_units(distances: np.ndarray, retention: Retention, first_token: int = 0) -> set:
    threshold = distance_threshold(distances, retention)
    mask = retained_mask(distances, threshold, retention, first_token)
    assert mask.dtype == np.bool_ and mask.shape == distances.shape
    return set(zip(*np.nonzero(mask), strict=True))


def pair_at_angles(angles: np.ndarray, head_dim: int = 4, seed: int = 0):
    """Layers x, y (float32 `[H, T, D]`) whose vectors meet at `angles` `[H, T]`.

    Each unit gets its own random plane and random magnitudes, so only the angle is known.
    """
    rng = np.random.default_rng(seed)
    heads, tokens = angles.shape
    basis = np.linalg.qr(rng.standard_normal((heads, tokens, head_dim, 2)))[0]
    first, second = basis[..., 0], basis[..., 1]
    x = first * rng.uniform(0.5, 4, (heads, tokens, 1))
    y = (np.cos(angles)[..., None] * first + np.sin(angles)[..., None] * second) * rng.uniform(
        0.5, 4, (heads, tokens, 1)
    )
    return x.astype(np.float32), y.astype(np.float32)


def encoder_for(retention: Retention | None, heads: int, head_dim: int, method: str = "slerp"):
    merge = PairMerge(0, method=method, retention=retention)
    return LayerGroupEncoder(
        LayerGroup((0, 1), merge), None, dtype="float32", kv_heads=heads, head_dim=head_dim
    )


def stored_positions(sides: list) -> set:
    (pair,) = sides
    return set(zip(pair.retained_heads.tolist(), pair.retained_tokens.tolist(), strict=True))


def merged(encoder: LayerGroupEncoder, kind: str = "keys") -> SlerpMerge:
    (pair,) = getattr(encoder.entry, kind)
    return pair


# -- the two sides, on inputs whose distinct tokens are known -----------------------------

# 2 heads x 21 tokens; head 0 sweeps 0.2..2.2 rad, head 1 the same reversed, so the
# min-max range is [0.2, 2.2] over tokens and heads.
SWEEP = np.linspace(0.2, 2.2, 21)
KNOWN_ANGLES = np.stack([SWEEP, SWEEP[::-1]])


def test_most_distinct_retains_the_largest_angles() -> None:
    x, y = pair_at_angles(KNOWN_ANGLES)
    encoder = encoder_for(Retention(gamma=0.12, side="most_distinct"), 2, 4)
    encoder.append([x, y], [x, y])
    # d̃ ≥ 0.88 ⟺ angle ≥ 0.2 + 0.88·2.0 = 1.96: angles 2.0, 2.1, 2.2.
    expected = {(0, 18), (0, 19), (0, 20), (1, 0), (1, 1), (1, 2)}
    assert stored_positions(encoder.entry.keys) == expected
    assert stored_positions(encoder.entry.values) == expected


def test_least_distinct_retains_the_smallest_angles() -> None:
    x, y = pair_at_angles(KNOWN_ANGLES)
    encoder = encoder_for(Retention(gamma=0.12, side="least_distinct"), 2, 4)
    encoder.append([x, y], [x, y])
    # d̃ ≤ 0.12 ⟺ angle ≤ 0.44: angles 0.2, 0.3, 0.4.
    expected = {(0, 0), (0, 1), (0, 2), (1, 18), (1, 19), (1, 20)}
    assert stored_positions(encoder.entry.keys) == expected


@pytest.mark.parametrize("side", SIDES)
def test_normalisation_spans_all_heads_not_each_head(side: str) -> None:
    # Head 0 meets at small angles, head 1 at large ones: normalised over both heads,
    # only head 1 holds the most distinct units and only head 0 the least distinct.
    angles = np.stack([np.linspace(0.2, 1.0, 9), np.linspace(1.4, 2.2, 9)])
    x, y = pair_at_angles(angles, seed=2)
    encoder = encoder_for(Retention(gamma=0.12, side=side), 2, 4)
    encoder.append([x, y], [x, y])
    kept_heads = {head for head, _ in stored_positions(encoder.entry.keys)}
    assert kept_heads == ({1} if side == "most_distinct" else {0})
    # Within 0.12·2.0 = 0.24 rad of the extreme: three angles on one head.
    assert merged(encoder).retained_count == 3


@pytest.mark.parametrize("side", SIDES)
def test_retained_originals_are_the_right_vectors(side: str) -> None:
    x, y = pair_at_angles(KNOWN_ANGLES, seed=5)
    encoder = encoder_for(Retention(gamma=0.12, side=side), 2, 4)
    encoder.append([x, y], [x, y])
    keys = merged(encoder)
    heads, tokens = keys.retained_heads, keys.retained_tokens
    np.testing.assert_array_equal(keys.retained[0], x[heads, tokens])
    np.testing.assert_array_equal(keys.retained[1], y[heads, tokens])


# -- the gamma rule ---------------------------------------------------------------------

distance_arrays = arrays(
    np.float32,
    st.tuples(st.integers(1, 4), st.integers(1, 30)),
    elements=st.floats(0, 1, width=32),
)


@settings(max_examples=150, deadline=None)
@given(distance_arrays, st.floats(0, 1), st.sampled_from(SIDES))
def test_gamma_rule_retains_normalised_distances_past_one_minus_gamma(
    distances: np.ndarray, gamma: float, side: str
) -> None:
    retention = Retention(gamma=gamma, side=side)
    kept = retained_units(distances, retention)
    low, high = float(distances.min()), float(distances.max())
    if high - low < 1e-7:
        assert kept == set()
        return
    normalised = (distances.astype(np.float64) - low) / (high - low)
    expected = normalised >= 1 - gamma if side == "most_distinct" else normalised <= gamma
    boundary = gamma if side == "least_distinct" else 1 - gamma
    # Units within float32 rounding of the boundary may fall either way.
    decided = np.abs(normalised - boundary) > 1e-6
    for unit in zip(*np.nonzero(decided), strict=True):
        assert (unit in kept) == bool(expected[unit]), (unit, normalised[unit], boundary)


@pytest.mark.parametrize("side", SIDES)
def test_gamma_one_retains_all_and_gamma_zero_only_the_extremes(side: str) -> None:
    distances = np.linspace(0.1, 0.9, 24, dtype=np.float32).reshape(3, 8)
    assert len(retained_units(distances, Retention(gamma=1.0, side=side))) == 24
    extreme = (2, 7) if side == "most_distinct" else (0, 0)
    assert retained_units(distances, Retention(gamma=0.0, side=side)) == {extreme}


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0.0, 0.5), st.sampled_from(SIDES))
def test_encoder_applies_the_gamma_rule_to_slerp_angles(seed: int, gamma: float, side: str) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 12, 8)).astype(np.float32)
    y = rng.standard_normal((2, 12, 8)).astype(np.float32)
    retention = Retention(gamma=gamma, side=side)
    encoder = encoder_for(retention, 2, 8)
    encoder.append([x, y], [y, x])
    distances = slerp_merge(x, y, 0.6)[2] / math.pi
    assert stored_positions(encoder.entry.keys) == retained_units(distances, retention)
    # Values merge (y, x): the same angles, so the same units.
    assert stored_positions(encoder.entry.values) == stored_positions(encoder.entry.keys)


# -- fixed fraction -----------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0.0, 1.0), st.sampled_from(SIDES))
def test_fraction_retains_that_fraction_from_the_chosen_side(
    seed: int, fraction: float, side: str
) -> None:
    distances = np.random.default_rng(seed).random((3, 40)).astype(np.float32)
    kept = retained_units(distances, Retention(fraction=fraction, side=side))
    assert abs(len(kept) - fraction * distances.size) <= 1
    if 0 < len(kept) < distances.size:
        mask = np.zeros(distances.shape, dtype=bool)
        mask[tuple(np.array(sorted(kept)).T)] = True
        if side == "most_distinct":
            assert distances[mask].min() > distances[~mask].max()
        else:
            assert distances[mask].max() < distances[~mask].min()


@pytest.mark.parametrize("side", SIDES)
def test_fraction_zero_retains_none_and_one_retains_all(side: str) -> None:
    distances = np.random.default_rng(0).random((2, 10)).astype(np.float32)
    assert retained_units(distances, Retention(fraction=0.0, side=side)) == set()
    assert len(retained_units(distances, Retention(fraction=1.0, side=side))) == 20
    # Also with all distances equal (no spread) and with no tokens at all.
    flat = np.full((2, 10), 0.5, dtype=np.float32)
    assert len(retained_units(flat, Retention(fraction=1.0, side=side))) == 20
    empty = np.zeros((2, 0), dtype=np.float32)
    assert retained_units(empty, Retention(fraction=1.0, side=side)) == set()


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_encoder_fraction_extremes(side: str, fraction: float) -> None:
    rng = np.random.default_rng(9)
    x, y = (rng.standard_normal((3, 7, 8)).astype(np.float32) for _ in range(2))
    encoder = encoder_for(Retention(fraction=fraction, side=side), 3, 8)
    encoder.append([x, y], [x, y])
    assert merged(encoder).retained_count == int(fraction * 21)


# -- sink tokens ------------------------------------------------------------------------


@pytest.mark.parametrize("side", SIDES)
def test_sink_tokens_are_retained_for_every_head(side: str) -> None:
    distances = np.random.default_rng(1).random((3, 10)).astype(np.float32)
    kept = retained_units(distances, Retention(fraction=0.0, sink_tokens=4, side=side))
    assert kept == {(h, t) for h in range(3) for t in range(4)}
    # On top of the rule's own choice, not instead of it.
    kept = retained_units(distances, Retention(fraction=0.5, sink_tokens=4, side=side))
    assert {(h, t) for h in range(3) for t in range(4)} <= kept
    assert len(kept) >= 15


def test_sink_tokens_count_from_the_absolute_token_index() -> None:
    distances = np.random.default_rng(2).random((2, 6)).astype(np.float32)
    retention = Retention(fraction=0.0, sink_tokens=5)
    assert retained_units(distances, retention, first_token=3) == {
        (h, t) for h in range(2) for t in range(2)
    }
    assert retained_units(distances, retention, first_token=5) == set()


def test_encoder_retains_sink_tokens_across_chunks() -> None:
    rng = np.random.default_rng(3)
    x, y = (rng.standard_normal((2, 9, 8)).astype(np.float32) for _ in range(2))
    encoder = encoder_for(Retention(fraction=0.0, sink_tokens=5), 2, 8)
    encoder.append([x[:, :3], y[:, :3]], [x[:, :3], y[:, :3]])
    encoder.append([x[:, 3:], y[:, 3:]], [x[:, 3:], y[:, 3:]])
    expected = {(h, t) for h in range(2) for t in range(5)}
    assert stored_positions(encoder.entry.keys) == expected
    assert stored_positions(encoder.entry.values) == expected


# -- the threshold is fixed by the first put -----------------------------------------------


def test_later_tokens_are_tested_against_the_first_put_threshold() -> None:
    x, y = pair_at_angles(KNOWN_ANGLES)
    encoder = encoder_for(Retention(gamma=0.12), 2, 4)
    encoder.append([x, y], [x, y])
    threshold = merged(encoder).threshold
    np.testing.assert_allclose(threshold * math.pi, 1.96, atol=1e-4)
    # Alone, each of these chunks would retain its own most distinct unit; against the
    # first put's threshold only the angles beyond 1.96 rad are retained.
    later = np.array([[0.3, 2.1, 1.0], [1.5, 0.25, 2.15]])
    x2, y2 = pair_at_angles(later, seed=1)
    encoder.append([x2, y2], [x2, y2])
    assert merged(encoder).threshold == threshold
    new = {(h, t) for h, t in stored_positions(encoder.entry.keys) if t >= 21}
    assert new == {(0, 22), (1, 23)}


# -- degenerate pairs -------------------------------------------------------------------------


@pytest.mark.parametrize("side", SIDES)
def test_no_spread_retains_none(side: str) -> None:
    distances = np.full((2, 10), 0.25, dtype=np.float32)
    assert distance_threshold(distances, Retention(side=side)) in (math.inf, -math.inf)
    assert retained_units(distances, Retention(side=side)) == set()
    assert retained_units(np.zeros((2, 0), np.float32), Retention(side=side)) == set()


def test_layers_at_one_common_angle_retain_none() -> None:
    x, y = pair_at_angles(np.full((2, 10), 1.0))
    encoder = encoder_for(Retention(gamma=0.05), 2, 4)
    encoder.append([x, y], [x, y])
    assert merged(encoder).retained_count == 0


@pytest.mark.parametrize("side", SIDES)
def test_identical_layers_retain_none(side: str) -> None:
    x = np.random.default_rng(0).standard_normal((2, 50, 64)).astype(np.float32)
    encoder = encoder_for(Retention(gamma=0.05, side=side), 2, 64)
    encoder.append([x, x.copy()], [x, x.copy()])
    assert merged(encoder).retained_count == 0
    assert merged(encoder, "values").retained_count == 0


def test_no_retention_and_the_average_merge_store_no_retained_tokens() -> None:
    rng = np.random.default_rng(4)
    x, y = (rng.standard_normal((2, 10, 8)).astype(np.float32) for _ in range(2))
    slerp = encoder_for(None, 2, 8)
    slerp.append([x, y], [x, y])
    assert merged(slerp).retained_count == 0
    assert merged(slerp).threshold is None
    # The average merge has no retention: the policy's retention settings are unused.
    average = encoder_for(Retention(), 2, 8, method="average")
    average.append([x, y], [x, y])
    (pair,) = average.entry.keys
    assert pair.name == "average" and not hasattr(pair, "retained")
