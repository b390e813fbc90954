"""KIVI-style quantization: error bounds, statistics layout, 16-bit sink and window,
block formation, seal() and frozen tokens."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kv_samples import as_float32, assert_bit_equal, random_kv

from minicache_client.array_namespace import narrow_from_float32
from minicache_client.entry import TokenStream
from minicache_client.policy import LayerBits, LayerGroup, PairMerge, Quantization, Retention
from minicache_client.restore import dequantize_block, restore_layer
from minicache_server.compression.layer_group_encoder import LayerGroupEncoder
from minicache_server.compression.quantization import quantize_block

BITS = (2, 3, 4, 8)
MODES = ("per_channel", "per_token")


def stream_for(block_shape, bits: int, mode: str, group_size: int) -> TokenStream:
    heads, _, dim = block_shape
    return TokenStream(heads, dim, "float16", bits=bits, mode=mode, group_size=group_size)


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


def stored_scale(quantized, mode: str, shape, group_size: int) -> np.ndarray:
    scale = quantized.scale.astype(np.float64)
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
    quantized = quantize_block(block, bits, mode, group_size)
    restored = dequantize_block(quantized, stream_for(shape, bits, mode, group_size))
    assert restored.shape == shape and restored.dtype == np.float32
    error = np.abs(block.astype(np.float64) - restored)
    low, high = group_ranges(block.astype(np.float64), mode, group_size)
    step = stored_scale(quantized, mode, shape, group_size)
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
        quantized = quantize_block(block, b, "per_token", 32)
        errors[b] = np.abs(
            dequantize_block(quantized, stream_for(block.shape, b, "per_token", 32)) - block
        ).max()
    assert errors[2] > errors[3] > errors[4] > errors[8]


@pytest.mark.parametrize("bits", BITS)
def test_statistics_layout(bits: int) -> None:
    block = np.random.default_rng(0).standard_normal((3, 12, 32)).astype(np.float32)
    per_channel = quantize_block(block, bits, "per_channel", 12)
    assert per_channel.scale.shape == per_channel.center.shape == (3, 1, 32)
    per_token = quantize_block(block, bits, "per_token", 8)
    assert per_token.scale.shape == per_token.center.shape == (3, 12, 4)
    for quantized in (per_channel, per_token):
        assert quantized.tokens == 12
        assert quantized.scale.dtype == np.float16
        assert quantized.codes.dtype == np.uint8
        assert quantized.codes.size == (3 * 12 * 32 * bits + 7) // 8


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("value", [0.0, -3.5, 1234.0, 2.0**-20])
def test_constant_input_is_exact(mode: str, value: float) -> None:
    block = np.full((2, 5, 16), value, dtype=np.float32)
    quantized = quantize_block(block, 2, mode, 8)
    restored = dequantize_block(quantized, stream_for(block.shape, 2, mode, 8))
    np.testing.assert_array_equal(restored, block)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_statistics_beyond_float16_range_fall_back_to_float32() -> None:
    block = np.array([[[-1e6, 0.0], [1e6, 5e5]]], dtype=np.float32)  # [1, 2, 2]
    quantized = quantize_block(block, 8, "per_channel", 2)
    assert quantized.scale.dtype == np.float32 or quantized.center.dtype == np.float32
    restored = dequantize_block(quantized, stream_for(block.shape, 8, "per_channel", 2))
    assert np.isfinite(restored).all()
    assert np.abs(restored - block).max() <= 2e6 / 255 / 2 * 1.01


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
        stream = encoder.entry.keys[0]
        after_sink = max(0, count - sink)
        expected_blocks = max(0, after_sink - window) // block
        assert stream.sink.shape[1] == min(count, sink)
        assert len(stream.blocks) == expected_blocks
        assert all(b.tokens == block for b in stream.blocks)
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
    stream = encoder.entry.keys[0]
    assert [b.tokens for b in stream.blocks] == [8] and stream.tail.shape[1] == 11
    encoder.seal()
    assert [b.tokens for b in stream.blocks] == [8, 7] and stream.tail.shape[1] == 4
    assert encoder.entry.frozen_tokens == 17
    # Sealing again changes nothing; the window always stays 16-bit.
    encoder.seal()
    assert [b.tokens for b in stream.blocks] == [8, 7] and stream.tail.shape[1] == 4
    append_tokens(encoder, keys[:, 21:], keys[:, 21:])  # 19 more: tail 23 → 2 blocks of 8
    assert [b.tokens for b in stream.blocks] == [8, 7, 8, 8] and stream.tail.shape[1] == 7
    assert stream.tokens == 40


def test_seal_with_fewer_tokens_than_the_window_quantizes_nothing() -> None:
    encoder = single_layer_encoder(Quantization(4, 4, window=16), heads=1, dim=32)
    keys = random_kv(np.random.default_rng(5), (1, 10, 32), "float16")
    append_tokens(encoder, keys, keys)
    encoder.seal()
    assert encoder.entry.keys[0].blocks == []
    assert_bit_equal(restore_layer(encoder.entry, 0)[0], keys)


@pytest.mark.parametrize("merged", [False, True])
def test_frozen_tokens_never_change_on_later_appends(merged: bool) -> None:
    quantization = Quantization(3, 2, key_group_size=8, value_group_size=8, window=3, sink_tokens=1)
    group = (
        LayerGroup((0, 1), PairMerge(0, retention=Retention(gamma=0.1)))
        if merged
        else LayerGroup((0, 1))
    )
    encoder = LayerGroupEncoder(group, quantization, dtype="float16", kv_heads=2, head_dim=16)
    rng = np.random.default_rng(6)
    keys = [random_kv(rng, (2, 50, 16), "float16") for _ in range(2)]
    values = [random_kv(rng, (2, 50, 16), "float16") for _ in range(2)]
    history = []
    for end in (5, 12, 13, 30, 31, 50):
        start = encoder.entry.tokens
        encoder.append([k[:, start:end] for k in keys], [v[:, start:end] for v in values])
        frozen = encoder.entry.frozen_tokens
        assert frozen <= encoder.entry.tokens == end
        restored = [restore_layer(encoder.entry, layer) for layer in (0, 1)]
        for old_frozen, old_restored in history:
            for layer in (0, 1):
                for kind in (0, 1):
                    assert_bit_equal(
                        restored[layer][kind][:, :old_frozen],
                        old_restored[layer][kind][:, :old_frozen],
                    )
        history.append((frozen, restored))
    assert history[-1][0] > history[0][0]


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
    assert len(encoder.entry.keys[0].blocks) == 3
    restored_keys, restored_values = restore_layer(encoder.entry, 0)
    assert_bit_equal(restored_keys, keys)  # keys per channel: constant along tokens
    assert_bit_equal(restored_values, values)


def test_merged_pair_with_different_layer_bits_stores_the_wider_direction() -> None:
    quantization = Quantization(
        4, 2, key_group_size=4, value_group_size=8, layer_bits=(LayerBits(1, 2, 3),)
    )
    pair = LayerGroup((0, 1), PairMerge(0, retention=None))
    encoder = LayerGroupEncoder(pair, quantization, dtype="float16", kv_heads=1, head_dim=16)
    assert encoder.entry.keys.direction.bits == 4
    assert encoder.entry.values.direction.bits == 3
