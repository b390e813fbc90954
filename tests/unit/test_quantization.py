"""KIVI-style quantization (`codecs/kivi.py`): error bounds, the stored layout, exact
sink and window, block formation, seal(). Chunking, round trips and frozen tokens of
every configuration are in the codec matrix (test_codec_matrix.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kv_samples import as_float32, assert_bit_equal, random_kv

from minicache_client.array_namespace import narrow_from_float32
from minicache_client.bit_packing import row_bytes
from minicache_client.codecs import KiviStream
from minicache_client.codecs.kivi import quantize_blocks
from minicache_client.policy import LayerBits, LayerGroup, PairMerge, Quantization
from minicache_client.restore import restore_layer
from minicache_client.sequence_encoder import LayerGroupEncoder

BITS = (2, 3, 4, 8)
MODES = ("per_channel", "per_token")


def quantized(block: np.ndarray, bits: int, mode: str, group_size: int) -> KiviStream:
    """`block` (float32 `[heads, tokens, head_dim]`) quantized as one block."""
    heads, tokens, dim = block.shape
    stream = KiviStream(
        heads, dim, "float32", bits=bits, mode=mode, group_size=group_size, block_tokens=tokens
    )
    stream.append([block])
    stream.seal()
    assert stream.quantized_tokens == tokens
    return stream


def restored(stream: KiviStream) -> np.ndarray:
    return stream.restore_float32(0, 0, stream.tokens)


def block_sizes(stream: KiviStream) -> list[int]:
    return np.diff(stream.block_ends, prepend=0).tolist()


def group_ranges(block: np.ndarray, mode: str, group_size: int):
    """Per-element (low, high) of the element's quantization group, float64."""
    heads, tokens, dim = block.shape
    if mode == "per_channel":
        low = block.min(axis=1, keepdims=True)
        high = block.max(axis=1, keepdims=True)
        return np.broadcast_to(low, block.shape), np.broadcast_to(high, block.shape)
    grouped = block.reshape(heads, tokens, dim // group_size, group_size)
    low = np.broadcast_to(grouped.min(axis=-1, keepdims=True), grouped.shape)
    high = np.broadcast_to(grouped.max(axis=-1, keepdims=True), grouped.shape)
    return low.reshape(block.shape), high.reshape(block.shape)


def stored_scale(stream: KiviStream, mode: str, shape, group_size: int) -> np.ndarray:
    scale = stream.scale.astype(np.float64)
    if mode == "per_channel":
        return np.broadcast_to(scale, shape)
    return np.repeat(scale, group_size, axis=-1)


@settings(max_examples=120, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.sampled_from(BITS),
    st.sampled_from(MODES),
    st.tuples(st.integers(1, 3), st.integers(1, 40), st.sampled_from([8, 16, 32, 64])),
    st.sampled_from([4, 8, 16, 32]),
    st.sampled_from([1e-3, 1.0, 100.0]),
    st.floats(-50, 50),
)
def test_error_is_at_most_half_a_step_per_group(
    seed: int, bits: int, mode: str, shape, group_size: int, scale: float, offset: float
) -> None:
    group_size = min(group_size, shape[2])
    rng = np.random.default_rng(seed)
    block = (rng.standard_normal(shape) * scale + offset).astype(np.float32)
    stream = quantized(block, bits, mode, group_size)
    result = restored(stream)
    assert result.shape == shape and result.dtype == np.float32
    error = np.abs(block.astype(np.float64) - result)
    low, high = group_ranges(block.astype(np.float64), mode, group_size)
    step = stored_scale(stream, mode, shape, group_size)
    # float16 statistics: half an ulp of the center, and of the scale, per level.
    levels = (1 << bits) - 1
    slack = 2.0**-11 * (np.abs(low) + (high - low)) + levels * 2.0**-25 + 1e-6 * np.abs(high)
    assert (error <= step / 2 + slack).all(), float((error - step / 2 - slack).max())
    # And the step is the group's range over the levels (to float16 precision).
    np.testing.assert_allclose(step, (high - low) / levels, rtol=2**-10, atol=2**-24)


@pytest.mark.parametrize("bits", BITS)
def test_more_bits_give_smaller_errors(bits: int) -> None:
    block = np.random.default_rng(bits).standard_normal((2, 32, 32)).astype(np.float32)
    errors = {}
    for b in BITS:
        errors[b] = np.abs(restored(quantized(block, b, "per_token", 32)) - block).max()
    assert errors[2] > errors[3] > errors[4] > errors[8]


@pytest.mark.parametrize("bits", BITS)
def test_stored_layout(bits: int) -> None:
    block = np.random.default_rng(0).standard_normal((3, 24, 32)).astype(np.float32)
    codes, scale, center = quantize_blocks(block, bits, "per_channel", 32, 12)
    assert scale.shape == center.shape == (3, 2, 32)  # two blocks of 12 tokens
    for group_size in (8, 32):
        per_token = quantize_blocks(block, bits, "per_token", group_size, 12)
        assert per_token[1].shape == per_token[2].shape == (3, 24, 32 // group_size)
        assert per_token[0].shape == codes.shape
    assert scale.dtype == center.dtype == np.float16
    # One packed row per (head, token).
    assert codes.dtype == np.uint8
    assert codes.shape == (3, 24, row_bytes(32, bits)) == (3, 24, 4 * bits)
    partial = quantize_blocks(block[:, :5], bits, "per_channel", 32, 12)
    assert partial[1].shape == (3, 1, 32)


def test_a_stream_records_where_each_block_ends() -> None:
    block = np.random.default_rng(1).standard_normal((2, 40, 16)).astype(np.float32)
    stream = KiviStream(2, 16, "float32", bits=4, mode="per_channel", block_tokens=16)
    stream.append([block])
    assert stream.block_ends.tolist() == [16, 32] and stream.tail.shape[1] == 8
    stream.seal()
    assert stream.block_ends.tolist() == [16, 32, 40] and stream.tail.shape[1] == 0
    assert stream.scale.shape == (2, 3, 16) and stream.codes.shape == (2, 40, 8)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("value", [0.0, -3.5, 1234.0, 2.0**-20])
def test_constant_input_is_exact(mode: str, value: float) -> None:
    block = np.full((2, 5, 16), value, dtype=np.float32)
    np.testing.assert_array_equal(restored(quantized(block, 2, mode, 8)), block)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_statistics_beyond_float16_range_fall_back_to_float32() -> None:
    block = np.array([[[-1e6, 0.0], [1e6, 5e5]]], dtype=np.float32)  # [1, 2, 2]
    _, scale, center = quantize_blocks(block, 8, "per_channel", 2, 2)
    assert scale.dtype == np.float32 or center.dtype == np.float32
    result = restored(quantized(block, 8, "per_channel", 2))
    assert np.isfinite(result).all()
    assert np.abs(result - block).max() <= 2e6 / 255 / 2 * 1.01


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"bits": 5}, r"bits must be one of \(2, 3, 4, 8\)"),
        ({"group_size": 0}, "group_size must be >= 1"),
        ({"group_size": 12}, "value_group_size 12 does not divide head_dim 32"),
    ],
)
def test_bad_settings_are_refused(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KiviStream(1, 32, "float16", **arguments)


# -- through the encoder --------------------------------------------------------------------


def single_layer_encoder(quantization: Quantization, dtype: str = "float16", heads=2, dim=32):
    return LayerGroupEncoder(
        LayerGroup((0,)), quantization, dtype=dtype, kv_heads=heads, head_dim=dim
    )


def append_tokens(encoder: LayerGroupEncoder, keys: np.ndarray, values: np.ndarray) -> None:
    layers = len(encoder.group.layers)
    encoder.append([keys] * layers, [values] * layers)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("seal", [False, True])
def test_sink_and_window_tokens_stay_16_bit_exactly(dtype: str, seal: bool) -> None:
    quantization = Quantization(2, 2, key_group_size=8, value_group_size=8, window=5, sink_tokens=3)
    rng = np.random.default_rng(0)
    keys, values = random_kv(rng, (2, 40, 32), dtype), random_kv(rng, (2, 40, 32), dtype)
    encoder = single_layer_encoder(quantization, dtype)
    append_tokens(encoder, keys, values)
    if seal:
        encoder.seal()
    restored_keys, restored_values = restore_layer(encoder.entry, 0)
    for restored, original in ((restored_keys, keys), (restored_values, values)):
        assert_bit_equal(restored[:, :3], original[:, :3])
        assert_bit_equal(restored[:, -5:], original[:, -5:])
        # The tokens between them went through 2-bit codes.
        middle = as_float32(restored[:, 3:-5], dtype) - as_float32(original[:, 3:-5], dtype)
        assert np.abs(middle).max() > 0.05


def test_float32_sink_and_window_are_kept_exact() -> None:
    quantization = Quantization(4, 4, key_group_size=8, value_group_size=8, window=4, sink_tokens=2)
    keys = np.random.default_rng(1).standard_normal((1, 20, 16)).astype(np.float32)
    encoder = single_layer_encoder(quantization, "float32", heads=1, dim=16)
    append_tokens(encoder, keys, keys)
    restored, _ = restore_layer(encoder.entry, 0)
    assert restored.dtype == np.float32
    # float32 entries keep float32 sink and window: no silent float16 overflow.
    assert_bit_equal(restored[:, :2], keys[:, :2])
    assert_bit_equal(restored[:, -4:], keys[:, -4:])


def test_full_precision_layers_are_not_quantized() -> None:
    quantization = Quantization(
        2, 2, key_group_size=4, value_group_size=8, full_precision_layers=(1,)
    )
    rng = np.random.default_rng(2)
    for layer, exact in ((0, False), (1, True)):
        encoder = LayerGroupEncoder(
            LayerGroup((layer,)), quantization, dtype="float16", kv_heads=1, head_dim=16
        )
        keys = random_kv(rng, (1, 12, 16), "float16")
        encoder.append([keys], [keys])
        encoder.seal()
        restored, _ = restore_layer(encoder.entry, layer)
        assert np.array_equal(restored, keys) == exact


def test_tail_keeps_tokens_older_than_the_window_until_a_block_forms() -> None:
    block, window, sink = 8, 4, 2
    quantization = Quantization(
        4, 4, key_group_size=block, value_group_size=16, window=window, sink_tokens=sink
    )
    rng = np.random.default_rng(3)
    keys = random_kv(rng, (1, 60, 16), "float16")
    encoder = single_layer_encoder(quantization, heads=1, dim=16)
    for count in range(1, 61):
        append_tokens(encoder, keys[:, count - 1 : count], keys[:, count - 1 : count])
        (stream,) = encoder.entry.keys
        after_sink = max(0, count - sink)
        expected_blocks = max(0, after_sink - window) // block
        assert stream.sink.shape[1] == min(count, sink)
        assert block_sizes(stream) == [block] * expected_blocks
        assert stream.tail.shape[1] == after_sink - expected_blocks * block
        assert stream.tokens == count
        assert encoder.entry.frozen_tokens == min(count, sink) + expected_blocks * block


def test_seal_quantizes_the_partial_block_and_later_appends_start_new_blocks() -> None:
    quantization = Quantization(
        4, 4, key_group_size=8, value_group_size=16, window=4, sink_tokens=2
    )
    rng = np.random.default_rng(4)
    keys = random_kv(rng, (1, 40, 16), "float16")
    encoder = single_layer_encoder(quantization, heads=1, dim=16)
    append_tokens(encoder, keys[:, :21], keys[:, :21])  # 2 sink, 15 ready, 4 window
    (stream,) = encoder.entry.keys
    assert block_sizes(stream) == [8] and stream.tail.shape[1] == 11
    encoder.seal()
    assert block_sizes(stream) == [8, 7] and stream.tail.shape[1] == 4
    assert encoder.entry.frozen_tokens == 17
    # Sealing again changes nothing; the window always stays 16-bit.
    encoder.seal()
    assert block_sizes(stream) == [8, 7] and stream.tail.shape[1] == 4
    append_tokens(encoder, keys[:, 21:], keys[:, 21:])  # 19 more: tail 23 → 2 blocks of 8
    assert block_sizes(stream) == [8, 7, 8, 8] and stream.tail.shape[1] == 7
    assert stream.tokens == 40


def test_seal_with_fewer_tokens_than_the_window_quantizes_nothing() -> None:
    encoder = single_layer_encoder(Quantization(4, 4, window=16), heads=1, dim=32)
    keys = random_kv(np.random.default_rng(5), (1, 10, 32), "float16")
    append_tokens(encoder, keys, keys)
    encoder.seal()
    assert encoder.entry.keys[0].quantized_tokens == 0
    assert_bit_equal(restore_layer(encoder.entry, 0)[0], keys)


def test_unquantized_entries_are_frozen_entirely() -> None:
    encoder = single_layer_encoder(None, heads=1, dim=8)
    keys = random_kv(np.random.default_rng(7), (1, 6, 8), "float16")
    append_tokens(encoder, keys, keys)
    assert encoder.entry.frozen_tokens == 6


def test_value_group_larger_than_head_dim_uses_head_dim_and_nondivisor_is_rejected() -> None:
    encoder = single_layer_encoder(Quantization(4, 4, value_group_size=128), heads=1, dim=32)
    assert encoder.entry.values[0].group_size == 32
    with pytest.raises(ValueError, match="value_group_size 12 does not divide head_dim 32"):
        single_layer_encoder(Quantization(4, 4, value_group_size=12), heads=1, dim=32)


def test_float32_values_beyond_float16_range_survive_quantization() -> None:
    keys = (np.random.default_rng(8).standard_normal((1, 40, 32)) * 1e5).astype(np.float32)
    encoder = single_layer_encoder(Quantization(8, 8), "float32", heads=1, dim=32)
    with np.errstate(all="ignore"):
        append_tokens(encoder, keys, keys)
        encoder.seal()
        restored_keys, restored_values = restore_layer(encoder.entry, 0)
    for restored in (restored_keys, restored_values):
        assert np.isfinite(restored).all()
        assert np.abs(restored - keys).max() <= 0.01 * np.abs(keys).max()


def test_bfloat16_values_near_the_top_of_the_range_survive_quantization() -> None:
    # One token per row: the channels' min/max span -3e38..3e38, all finite in bf16.
    values = np.array([[[-3e38, 1.0, 2.0, -1.0]] * 4 + [[3e38, 1.0, 2.0, -1.0]] * 4], np.float32)
    keys = narrow_from_float32(values, "bfloat16")
    encoder = single_layer_encoder(
        Quantization(8, 8, key_group_size=8, value_group_size=4), "bfloat16", heads=1, dim=4
    )
    with np.errstate(all="ignore"):
        append_tokens(encoder, keys, keys)
        encoder.seal()
        restored, _ = restore_layer(encoder.entry, 0)
    assert np.isfinite(as_float32(restored, "bfloat16")).all()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_constant_kv_is_exact_through_the_encoder(dtype: str) -> None:
    encoder = single_layer_encoder(
        Quantization(2, 2, key_group_size=8, value_group_size=8), dtype, heads=2, dim=16
    )
    keys = random_kv(np.random.default_rng(10), (2, 1, 16), dtype).repeat(20, axis=1)
    values = np.full((2, 20, 16), keys[0, 0, 0], dtype=keys.dtype)
    append_tokens(encoder, keys, values)
    encoder.seal()
    assert block_sizes(encoder.entry.keys[0]) == [8, 8, 4]
    restored_keys, restored_values = restore_layer(encoder.entry, 0)
    assert_bit_equal(restored_keys, keys)  # keys per channel: constant along tokens
    assert_bit_equal(restored_values, values)


def test_merged_pair_with_different_layer_bits_stores_the_wider_direction() -> None:
    quantization = Quantization(
        4, 2, key_group_size=4, value_group_size=8, layer_bits=(LayerBits(1, 2, 3),)
    )
    pair = LayerGroup((0, 1), PairMerge(0, retention=None))
    encoder = LayerGroupEncoder(pair, quantization, dtype="float16", kv_heads=1, head_dim=16)
    (keys,), (values,) = encoder.entry.keys, encoder.entry.values
    assert (keys.direction.name, keys.direction.bits, keys.direction.mode) == (
        "kivi",
        4,
        "per_channel",
    )
    assert (values.direction.bits, values.direction.mode) == (3, "per_token")
