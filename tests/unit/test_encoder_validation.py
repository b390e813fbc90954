"""Input validation of LayerGroupEncoder and SequenceEncoder: bad input is a ValueError
that names what is wrong, and leaves nothing half-stored."""

from __future__ import annotations

import numpy as np
import pytest
from kv_samples import assert_bit_equal, random_kv

from minicache_client.policy import PRESETS, LayerGroup, PairMerge, Quantization
from minicache_client.sequence_encoder import LayerGroupEncoder, SequenceEncoder, check_finite

HEADS, DIM = 2, 8


def pair_encoder(dtype: str = "float16", merged: bool = True) -> LayerGroupEncoder:
    group = LayerGroup((4, 5), PairMerge(4)) if merged else LayerGroup((4, 5))
    return LayerGroupEncoder(
        group,
        Quantization(4, 4, key_group_size=4, value_group_size=8),
        dtype=dtype,
        kv_heads=HEADS,
        head_dim=DIM,
    )


def kv(dtype: str = "float16", tokens: int = 3, seed: int = 0) -> np.ndarray:
    return random_kv(np.random.default_rng(seed), (HEADS, tokens, DIM), dtype)


@pytest.mark.parametrize("merged", [True, False])
@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((HEADS, DIM), np.float16), r"expected \[kv_heads, tokens, head_dim\]"),
        (np.zeros((1, HEADS, 3, DIM), np.float16), r"expected \[kv_heads, tokens, head_dim\]"),
        (np.zeros((HEADS + 1, 3, DIM), np.float16), "does not match kv_heads=2, head_dim=8"),
        (np.zeros((HEADS, 3, DIM * 2), np.float16), "does not match kv_heads=2, head_dim=8"),
        (np.zeros((HEADS, 3, DIM), np.float32), "dtype float32 does not carry float16"),
        (np.zeros((HEADS, 3, DIM), np.uint16), "dtype uint16 does not carry float16"),
        ([[[0.0] * DIM] * 3] * HEADS, r"got None"),
    ],
)
def test_malformed_tensors_are_rejected(merged: bool, bad, message: str) -> None:
    encoder = pair_encoder(merged=merged)
    good = kv()
    for keys, values in (([good, bad], [good, good]), ([good, good], [bad, good])):
        with pytest.raises(ValueError, match=message):
            encoder.append(keys, values)
    assert encoder.entry.tokens == 0


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("special", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_rejected(dtype: str, special: float) -> None:
    encoder = pair_encoder(dtype)
    bad = kv(dtype)
    bad[1, 2, 3] = special
    with pytest.raises(ValueError, match="layer 5 values contains NaN or Inf"):
        encoder.append([kv(dtype), kv(dtype)], [kv(dtype), bad])
    assert encoder.entry.tokens == 0


@pytest.mark.parametrize(
    ("dtype", "largest", "special"),
    [
        ("float32", np.array([3.4028235e38, -3.4028235e38], np.float32), np.float32(np.inf)),
        ("float16", np.array([65504, -65504], np.float16), np.float16(np.nan)),
        ("bfloat16", np.array([0x7F7F, 0xFF7F], np.uint16), np.uint16(0xFF80)),
    ],
)
def test_check_finite_reads_the_exponent_bits_of_each_carrier(
    dtype: str, largest: np.ndarray, special
) -> None:
    check_finite(largest, dtype, "edge")
    check_finite(largest[:0], dtype, "empty")
    strided = np.stack([largest, largest])[:, ::-1]
    check_finite(strided, dtype, "strided")
    strided[1, 0] = special
    with pytest.raises(ValueError, match="strided contains NaN or Inf"):
        check_finite(strided, dtype, "strided")


@pytest.mark.parametrize("pattern", [0x7F80, 0xFF80, 0x7FC0, 0xFF81, 0x7F81, 0xFFFF])
def test_bfloat16_nan_and_inf_bit_patterns_are_rejected(pattern: int) -> None:
    encoder = pair_encoder("bfloat16")
    bad = kv("bfloat16")
    bad[0, 0, 0] = pattern
    with pytest.raises(ValueError, match="layer 4 keys contains NaN or Inf"):
        encoder.append([bad, kv("bfloat16")], [kv("bfloat16"), kv("bfloat16")])


def test_largest_finite_bfloat16_is_accepted() -> None:
    encoder = pair_encoder("bfloat16", merged=False)
    edge = kv("bfloat16")
    edge[0, 0, :2] = [0x7F7F, 0xFF7F]
    encoder.append([edge, edge], [edge, edge])
    assert encoder.entry.tokens == 3


@pytest.mark.parametrize("merged", [True, False])
def test_layers_with_different_token_counts_are_rejected(merged: bool) -> None:
    encoder = pair_encoder(merged=merged)
    with pytest.raises(ValueError, match="differ in token count"):
        encoder.append([kv(tokens=3), kv(tokens=4)], [kv(tokens=3), kv(tokens=3)])
    with pytest.raises(ValueError, match="keys and values differ in token count"):
        encoder.append([kv(tokens=3), kv(tokens=3)], [kv(tokens=2), kv(tokens=2)])
    assert encoder.entry.tokens == 0


def test_wrong_number_of_layer_tensors_is_rejected() -> None:
    encoder = pair_encoder()
    with pytest.raises(ValueError, match=r"expected 2 layer tensors for layers \(4, 5\), got 1"):
        encoder.append([kv()], [kv(), kv()])


@pytest.mark.parametrize(("heads", "dim"), [(0, 8), (2, 0), (-1, 8)])
def test_encoder_needs_heads_and_channels(heads: int, dim: int) -> None:
    with pytest.raises(ValueError, match="kv_heads and head_dim must be >= 1"):
        LayerGroupEncoder(LayerGroup((0,)), None, dtype="float16", kv_heads=heads, head_dim=dim)


def test_encoder_rejects_unknown_dtype() -> None:
    with pytest.raises(ValueError, match="unsupported KV dtype 'float64'"):
        LayerGroupEncoder(LayerGroup((0,)), None, dtype="float64", kv_heads=1, head_dim=8)


def test_empty_chunk_is_accepted_and_changes_nothing() -> None:
    encoder = pair_encoder()
    empty = kv(tokens=0)
    encoder.append([empty, empty], [empty, empty])
    assert encoder.entry.tokens == 0


# -- SequenceEncoder ----------------------------------------------------------------------------


def sequence(dtype: str = "float16") -> SequenceEncoder:
    # paper on 6 layers: singles 0, 1, 2 and pairs (3, 4); single 5.
    return SequenceEncoder(
        PRESETS["paper"], num_layers=6, kv_heads=HEADS, head_dim=DIM, dtype=dtype
    )


def test_sequence_groups_follow_the_policy() -> None:
    encoder = sequence()
    assert [e.layers for e in encoder.entries] == [(0,), (1,), (2,), (3, 4), (5,)]
    assert encoder.entry_for(4) is encoder.entry_for(3)


@pytest.mark.parametrize("layer", [-1, 6, 100])
def test_layer_out_of_range(layer: int) -> None:
    encoder = sequence()
    with pytest.raises(ValueError, match=f"layer {layer} is out of range for 6 layers"):
        encoder.put_layer(layer, kv(), kv())
    with pytest.raises(ValueError, match="out of range"):
        encoder.restore_layer(layer)


@pytest.mark.parametrize("layer", [3, 4])
def test_same_layer_twice_before_its_partner(layer: int) -> None:
    encoder = sequence()
    encoder.put_layer(layer, kv(), kv())
    with pytest.raises(
        ValueError, match=rf"layer {layer} was sent twice before the rest of \(3, 4\)"
    ):
        encoder.put_layer(layer, kv(), kv())


def test_partner_with_a_different_token_count() -> None:
    encoder = sequence()
    encoder.put_layer(3, kv(tokens=3), kv(tokens=3))
    with pytest.raises(
        ValueError,
        match=r"layers \(3, 4\) of one group carry different token counts \(\[3, 5\]\)",
    ):
        encoder.put_layer(4, kv(tokens=5), kv(tokens=5))
    assert encoder.entry_for(3).tokens == 0


def test_seal_with_a_pending_layer() -> None:
    encoder = sequence()
    encoder.put_layer(4, kv(), kv())
    with pytest.raises(ValueError, match=r"layers \[4\] still wait for their group"):
        encoder.seal()
    encoder.put_layer(3, kv(), kv())
    encoder.seal()
    assert encoder.entry_for(3).tokens == 3


def test_single_layers_are_encoded_on_arrival_and_pairs_when_complete() -> None:
    encoder = sequence()
    encoder.put_layer(0, kv(), kv())
    assert encoder.entry_for(0).tokens == 3
    encoder.put_layer(3, kv(seed=1), kv(seed=2))
    assert encoder.entry_for(3).tokens == 0 and 3 in encoder.pending
    encoder.put_layer(4, kv(seed=3), kv(seed=4))
    assert encoder.entry_for(3).tokens == 3 and not encoder.pending


def test_pair_order_does_not_matter() -> None:
    forward, backward = sequence(), sequence()
    layers = {layer: (kv(seed=2 * layer), kv(seed=2 * layer + 1)) for layer in (3, 4)}
    for encoder, order in ((forward, (3, 4)), (backward, (4, 3))):
        for layer in order:
            encoder.put_layer(layer, *layers[layer])
    for layer in (3, 4):
        for a, b in zip(forward.restore_layer(layer), backward.restore_layer(layer), strict=True):
            assert_bit_equal(a, b)


def test_invalid_tensors_reach_the_caller_through_the_sequence() -> None:
    encoder = sequence()
    with pytest.raises(ValueError, match="dtype float32 does not carry float16"):
        encoder.put_layer(0, kv("float32"), kv("float32"))
    bad = kv()
    bad[0, 0, 0] = np.nan
    encoder.put_layer(3, kv(), kv())
    with pytest.raises(ValueError, match="NaN or Inf"):
        encoder.put_layer(4, bad, kv())


@pytest.mark.parametrize("problem", ["tokens", "nan"])
def test_rejected_partner_keeps_the_waiting_layer(problem: str) -> None:
    encoder = sequence()
    encoder.put_layer(3, kv(), kv())
    bad = kv(tokens=5) if problem == "tokens" else kv()
    if problem == "nan":
        bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError):
        encoder.put_layer(4, bad, bad)
    encoder.put_layer(4, kv(seed=1), kv(seed=1))
    assert encoder.entry_for(3).tokens == 3
    encoder.seal()


def test_a_refused_group_append_rolls_back_keys_and_values() -> None:
    # The values of this chunk are far outside the artifact's range: their transform
    # codes do not fit 32 bits. The keys, appended first, are rolled back too.
    from transform_samples import sample_artifact, transform_policy

    from minicache_client.entry import encode_entry

    _, digest = sample_artifact()
    encoder = SequenceEncoder(
        transform_policy(digest), num_layers=4, kv_heads=2, head_dim=16, dtype="float32"
    )
    rng = np.random.default_rng(1)
    for layer in range(4):
        keys, values = (rng.standard_normal((2, 20, 16)).astype(np.float32) for _ in range(2))
        encoder.put_layer(layer, keys, values, seal=True)
    before = [encode_entry(entry) for entry in encoder.entries]
    keys = rng.standard_normal((2, 10, 16)).astype(np.float32)
    values = 1e12 * rng.standard_normal((2, 10, 16)).astype(np.float32)
    encoder.put_layer(0, keys, values)
    with pytest.raises(ValueError, match="32 bits"):
        encoder.put_layer(1, keys, values, seal=True)
    assert [encode_entry(entry) for entry in encoder.entries] == before
    assert encoder.entries[0].tokens == 20
