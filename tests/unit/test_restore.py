"""Restore (minicache_client.restore) of what the encoder stored: exactness where
nothing was lost, magnitudes and directions where a pair was merged. Ranges, group
restores and other dtypes of every codec are in the codec matrix
(test_codec_matrix.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kv_samples import KV_DTYPES, as_float32, assert_bit_equal, finite_bit_patterns, random_kv

from minicache_client.codecs.slerp_merge import slerp_merge
from minicache_client.entry import decode_entry, encode_entry
from minicache_client.policy import (
    PRESETS,
    CompressionPolicy,
    LayerGroup,
    MergePlan,
    PairMerge,
    Retention,
)
from minicache_client.restore import restore_layer
from minicache_client.sequence_encoder import LayerGroupEncoder, SequenceEncoder

kv_shapes = st.tuples(st.integers(1, 4), st.integers(0, 40), st.integers(8, 64))
# Merged pairs with no tokens are covered by their own test below.
merged_kv_shapes = st.tuples(st.integers(1, 4), st.integers(1, 40), st.integers(8, 64))
seeds = st.integers(0, 2**32 - 1)
scales = st.sampled_from([1e-3, 1.0, 30.0])


def merged_pair_encoder(retention, dtype, heads, dim, keys=True, values=True, t=0.6):
    merge = PairMerge(0, keys=keys, values=values, t=t, retention=retention)
    return LayerGroupEncoder(
        LayerGroup((0, 1), merge), None, dtype=dtype, kv_heads=heads, head_dim=dim
    )


@settings(max_examples=60, deadline=None)
@given(
    seeds,
    st.sampled_from(KV_DTYPES),
    merged_kv_shapes,
    scales,
    st.sampled_from(["most_distinct", "least_distinct"]),
)
def test_merge_retaining_every_token_restores_both_layers_bit_exactly(
    seed: int, dtype: str, shape: tuple[int, int, int], scale: float, side: str
) -> None:
    heads, tokens, dim = shape
    rng = np.random.default_rng(seed)
    layers = [random_kv(rng, (heads, tokens, dim), dtype, scale) for _ in range(4)]
    # Zero vectors and exact duplicates are the corner cases of the merge.
    layers[0][:, 0] = 0
    layers[3][:, -1] = layers[1][:, -1]
    encoder = merged_pair_encoder(Retention(fraction=1.0, side=side), dtype, heads, dim)
    encoder.append(layers[:2], layers[2:])
    for entry in (encoder.entry, decode_entry(encode_entry(encoder.entry))):
        for which in (0, 1):
            keys, values = restore_layer(entry, which)
            assert_bit_equal(keys, layers[which])
            assert_bit_equal(values, layers[2 + which])


@settings(max_examples=40, deadline=None)
@given(seeds, st.sampled_from(KV_DTYPES), kv_shapes)
def test_policy_none_round_trips_arbitrary_bit_patterns(
    seed: int, dtype: str, shape: tuple[int, int, int]
) -> None:
    heads, tokens, dim = shape
    rng = np.random.default_rng(seed)
    encoder = SequenceEncoder(
        PRESETS["none"], num_layers=2, kv_heads=heads, head_dim=dim, dtype=dtype
    )
    layers = [
        (finite_bit_patterns(rng, shape, dtype), finite_bit_patterns(rng, shape, dtype))
        for _ in range(2)
    ]
    # Two chunks, to cover concatenation of the stored tail.
    cut = tokens // 3
    for layer, (keys, values) in enumerate(layers):
        encoder.put_layer(layer, keys[:, :cut], values[:, :cut])
    for layer, (keys, values) in enumerate(layers):
        encoder.put_layer(layer, keys[:, cut:], values[:, cut:])
    encoder.seal()
    for layer, (keys, values) in enumerate(layers):
        entry = encoder.entry_for(layer)
        for stored in (entry, decode_entry(encode_entry(entry))):
            restored_keys, restored_values = restore_layer(stored, layer)
            assert_bit_equal(restored_keys, keys)
            assert_bit_equal(restored_values, values)


@pytest.mark.parametrize("retention", [None, Retention(fraction=1.0)])
def test_merged_pair_without_tokens_restores_empty(retention: Retention | None) -> None:
    encoder = merged_pair_encoder(retention, "float16", 2, 8)
    empty = np.zeros((2, 0, 8), dtype=np.float16)
    encoder.append([empty, empty], [empty, empty])
    for which in (0, 1):
        keys, values = restore_layer(encoder.entry, which)
        assert_bit_equal(keys, empty)
        assert_bit_equal(values, empty)


@pytest.mark.parametrize("dtype", KV_DTYPES)
def test_retention_of_every_token_through_a_sequence_policy(dtype: str) -> None:
    policy = CompressionPolicy(
        "all_retained", merge=MergePlan(start_layer=1, retention=Retention(fraction=1.0))
    )
    rng = np.random.default_rng(0)
    encoder = SequenceEncoder(policy, num_layers=4, kv_heads=2, head_dim=16, dtype=dtype)
    layers = [
        (random_kv(rng, (2, 11, 16), dtype), random_kv(rng, (2, 11, 16), dtype)) for _ in range(4)
    ]
    for layer in (3, 0, 2, 1):  # partners in either order
        encoder.put_layer(layer, *layers[layer])
    encoder.seal()
    for layer, (keys, values) in enumerate(layers):
        restored_keys, restored_values = encoder.restore_layer(layer)
        assert_bit_equal(restored_keys, keys)
        assert_bit_equal(restored_values, values)


# -- merged restore without retention -------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    seeds,
    st.sampled_from(KV_DTYPES),
    st.tuples(st.integers(1, 3), st.integers(1, 20), st.integers(8, 64)),
    st.floats(0, 1),
)
def test_merged_restore_has_the_stored_magnitudes_and_the_merged_direction(
    seed: int, dtype: str, shape: tuple[int, int, int], t: float
) -> None:
    rng = np.random.default_rng(seed)
    keys = [random_kv(rng, shape, dtype, 3.0) for _ in range(2)]
    values = [random_kv(rng, shape, dtype, 0.5) for _ in range(2)]
    encoder = merged_pair_encoder(None, dtype, shape[0], shape[2], t=t)
    encoder.append(keys, values)
    entry = encoder.entry
    assert entry.keys[0].retained_count == 0
    # Output narrowed to the entry dtype: bf16 keeps 8 significant bits, fp16 11.
    tolerance = {"float32": 2e-3, "float16": 3e-3, "bfloat16": 1.6e-2}[dtype]
    for kind_index, (kind, originals) in enumerate((("keys", keys), ("values", values))):
        x = as_float32(originals[0], dtype)
        y = as_float32(originals[1], dtype)
        direction, magnitudes, _ = slerp_merge(x, y, t)
        (side,) = getattr(entry, kind)
        for which in (0, 1):
            restored = as_float32(restore_layer(entry, which)[kind_index], dtype)
            norms = np.linalg.norm(restored, axis=-1)
            np.testing.assert_allclose(norms, magnitudes[which], rtol=tolerance)
            np.testing.assert_allclose(
                norms, side.magnitudes[which].astype(np.float32), rtol=tolerance
            )
            np.testing.assert_allclose(restored / norms[..., None], direction, atol=2 * tolerance)


def test_merged_restore_of_float32_uses_the_stored_magnitudes_to_float32_precision() -> None:
    rng = np.random.default_rng(1)
    x, y = (rng.standard_normal((2, 9, 32)).astype(np.float32) for _ in range(2))
    encoder = merged_pair_encoder(None, "float32", 2, 32)
    encoder.append([x, y], [x, y])
    stored = encoder.entry.keys[0].magnitudes.astype(np.float32)
    for which in (0, 1):
        norms = np.linalg.norm(restore_layer(encoder.entry, which)[0], axis=-1)
        np.testing.assert_allclose(norms, stored[which], rtol=1e-6)
    # Both layers share one direction: they differ only in length.
    first, second = (restore_layer(encoder.entry, which)[0] for which in (0, 1))
    np.testing.assert_allclose(
        first / stored[0][..., None], second / stored[1][..., None], rtol=1e-5, atol=1e-6
    )


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_magnitudes_beyond_float16_range_are_kept() -> None:
    rng = np.random.default_rng(2)
    small = rng.standard_normal((1, 4, 16)).astype(np.float32)
    large = (rng.standard_normal((1, 6, 16)) * 3e4).astype(np.float32)  # |x| ~ 1.2e5
    x = np.concatenate([small, large], axis=1)
    y = rng.standard_normal((1, 10, 16)).astype(np.float32)
    encoder = merged_pair_encoder(None, "float32", 1, 16)
    # float16 magnitudes first, then a chunk that needs float32: earlier ones are widened.
    (keys,) = encoder.entry.keys
    encoder.append([x[:, :4], y[:, :4]], [x[:, :4], y[:, :4]])
    assert keys.magnitudes.dtype == np.float16
    encoder.append([x[:, 4:], y[:, 4:]], [x[:, 4:], y[:, 4:]])
    assert keys.magnitudes.dtype == np.float32
    assert keys.magnitudes.shape == (2, 1, 10)
    restored = restore_layer(encoder.entry, 0)[0]
    assert np.isfinite(restored).all()
    np.testing.assert_allclose(
        np.linalg.norm(restored, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-3
    )


def test_zero_vectors_restore_to_zero() -> None:
    x = np.zeros((1, 3, 8), dtype=np.float16)
    encoder = merged_pair_encoder(None, "float16", 1, 8)
    encoder.append([x, x], [x, x])
    for which in (0, 1):
        keys, values = restore_layer(encoder.entry, which)
        assert_bit_equal(keys, x)
        assert_bit_equal(values, x)


def test_merging_only_keys_keeps_values_exact() -> None:
    rng = np.random.default_rng(3)
    keys = [random_kv(rng, (2, 7, 16), "float16") for _ in range(2)]
    values = [random_kv(rng, (2, 7, 16), "float16") for _ in range(2)]
    encoder = merged_pair_encoder(Retention(), "float16", 2, 16, values=False)
    encoder.append(keys, values)
    for which in (0, 1):
        restored_keys, restored_values = restore_layer(encoder.entry, which)
        assert_bit_equal(restored_values, values[which])
        assert np.abs(restored_keys.astype(np.float32) - keys[which]).max() > 0.1


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("method", ["slerp", "average"])
def test_merge_window_keeps_the_recent_tokens_exact_and_merges_older_ones_alike(
    dtype: str, method: str
) -> None:
    rng = np.random.default_rng(8)
    keys = [random_kv(rng, (2, 30, 16), dtype) for _ in range(2)]
    values = [random_kv(rng, (2, 30, 16), dtype) for _ in range(2)]

    def encoded(window: int) -> SequenceEncoder:
        policy = CompressionPolicy(
            "window",
            merge=MergePlan(pairs=(PairMerge(0, method=method, retention=None, window=window),)),
        )
        encoder = SequenceEncoder(policy, num_layers=2, kv_heads=2, head_dim=16, dtype=dtype)
        for start, end in ((0, 20), *((t, t + 1) for t in range(20, 30))):
            for layer in (0, 1):
                encoder.put_layer(layer, keys[layer][:, start:end], values[layer][:, start:end])
        return encoder

    windowed, unwindowed = encoded(6), encoded(0)
    entry = windowed.entry_for(0)
    (pair,) = entry.keys
    assert entry.tokens == 30 and pair.recent.shape[2] == 6 and pair.merged_tokens == 24
    assert entry.frozen_tokens <= 24
    for layer in (0, 1):
        restored = windowed.restore_layer(layer)
        merged = unwindowed.restore_layer(layer)
        for got, alike, original in zip(
            restored, merged, (keys[layer], values[layer]), strict=True
        ):
            assert got.shape == (2, 30, 16)
            assert_bit_equal(got[:, 24:], original[:, 24:])
            assert_bit_equal(got[:, :24], alike[:, :24])
            assert (
                np.abs(as_float32(got[:, :24], dtype) - as_float32(original[:, :24], dtype)).max()
                > 0.1
            )
        for start, end in ((0, 24), (20, 27), (24, 30), (26, 29), (30, 30)):
            part = windowed.restore_layer(layer, start, end)
            assert_bit_equal(part[0], restored[0][:, start:end])
            assert_bit_equal(part[1], restored[1][:, start:end])


# -- partial ranges and output dtype ----------------------------------------------------------


def test_restore_to_another_dtype_and_bad_arguments() -> None:
    rng = np.random.default_rng(5)
    encoder = SequenceEncoder(
        PRESETS["none"], num_layers=1, kv_heads=1, head_dim=8, dtype="float32"
    )
    keys = rng.standard_normal((1, 4, 8)).astype(np.float32)
    encoder.put_layer(0, keys, keys)
    as_bf16, _ = encoder.restore_layer(0, dtype="bfloat16")
    assert as_bf16.dtype == np.uint16
    np.testing.assert_allclose(as_float32(as_bf16, "bfloat16"), keys, rtol=2**-8)
    assert encoder.restore_layer(0, dtype="float16")[0].dtype == np.float16
    entry = encoder.entry_for(0)
    with pytest.raises(ValueError, match="layer 1 is not in this entry"):
        restore_layer(entry, 1)
    with pytest.raises(ValueError, match="outside"):
        restore_layer(entry, 0, 2, 5)
    with pytest.raises(ValueError, match="outside"):
        restore_layer(entry, 0, 3, 2)
    with pytest.raises(ValueError, match="unsupported KV dtype"):
        restore_layer(entry, 0, dtype="int8")


def test_average_merge_of_float32_beyond_float16_range_stays_finite() -> None:
    x = (np.random.default_rng(6).standard_normal((1, 4, 8)) * 1e5).astype(np.float32)
    merge = PairMerge(0, method="average", retention=None)
    encoder = LayerGroupEncoder(
        LayerGroup((0, 1), merge), None, dtype="float32", kv_heads=1, head_dim=8
    )
    with np.errstate(all="ignore"):
        encoder.append([x, x], [x, x])
        keys, _ = restore_layer(encoder.entry, 0)
    assert np.isfinite(keys).all()
    np.testing.assert_allclose(keys, x, rtol=1e-3)
