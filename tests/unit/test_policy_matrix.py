"""Every compression policy, end to end on a small 6-layer model: encode random KV,
restore every layer, check shapes, dtypes, finiteness, byte ratio and error bounds."""

from __future__ import annotations

import numpy as np
import pytest
from kv_samples import as_float32, assert_bit_equal, random_kv

from minicache_client.entry import MergedStream, decode_entry, encode_entry
from minicache_client.policy import (
    PRESETS,
    CompressionPolicy,
    MergePlan,
    PairMerge,
    Quantization,
    Retention,
)
from minicache_client.restore import restore_layer
from minicache_server.compression import SequenceEncoder

NUM_LAYERS, HEADS, TOKENS, DIM = 6, 2, 70, 32

CUSTOM_POLICIES = [
    CompressionPolicy(
        "pairs_keys_only_least",
        merge=MergePlan(
            pairs=(
                PairMerge(
                    0, values=False, t=0.5, retention=Retention(fraction=0.2, side="least_distinct")
                ),
                PairMerge(4, keys=False, retention=Retention(gamma=0.1, sink_tokens=2)),
            )
        ),
    ),
    CompressionPolicy(
        "k3v2_sink_window",
        quantization=Quantization(
            3,
            2,
            key_group_size=16,
            value_group_size=8,
            window=8,
            sink_tokens=4,
            full_precision_layers=(0,),
        ),
    ),
    CompressionPolicy(
        "merge_from_2_kivi8",
        merge=MergePlan(start_layer=2, t=0.4, retention=Retention(fraction=0.1)),
        quantization=Quantization(8, 8, key_group_size=32, value_group_size=32),
    ),
    CompressionPolicy(
        "average_values_kivi4",
        merge=MergePlan(start_layer=1, keys=False, method="average", retention=None),
        quantization=Quantization(4, None, key_group_size=8, window=4),
    ),
]
POLICIES = {**PRESETS, **{policy.name: policy for policy in CUSTOM_POLICIES}}


def layer_bound(policy: CompressionPolicy, kind: str, layer: int, merged: bool) -> str:
    if merged:
        return "merged"
    bits = policy.quantization.bits_for(kind, layer) if policy.quantization else None
    return "exact" if bits is None else f"bits{bits}"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policy_end_to_end(name: str, dtype: str) -> None:
    policy = POLICIES[name]
    # Calibrated presets name layers of their model: give them enough.
    num_layers = max(NUM_LAYERS, policy.min_num_layers)
    rng = np.random.default_rng(sum(map(ord, name)))
    layers = [
        (
            random_kv(rng, (HEADS, TOKENS, DIM), dtype),
            random_kv(rng, (HEADS, TOKENS, DIM), dtype, 0.3),
        )
        for _ in range(num_layers)
    ]
    encoder = SequenceEncoder(
        policy, num_layers=num_layers, kv_heads=HEADS, head_dim=DIM, dtype=dtype
    )
    prefill = 50
    for layer, (keys, values) in enumerate(layers):
        encoder.put_layer(layer, keys[:, :prefill], values[:, :prefill])
    encoder.seal()
    for token in range(prefill, TOKENS):
        for layer, (keys, values) in enumerate(layers):
            encoder.put_layer(layer, keys[:, token : token + 1], values[:, token : token + 1])

    assert encoder.fp16_bytes() == num_layers * 2 * HEADS * TOKENS * DIM * 2
    ratio = encoder.compression_ratio()
    assert ratio >= 0.9
    if name == "none":
        assert ratio < 1.0
    elif policy.quantization is not None and policy.quantization.key_bits is not None:
        # Sink tokens stay 16-bit: with 32 of these 70 tokens (default) less is saved.
        mostly_quantized = policy.quantization.sink_tokens * 4 < TOKENS
        assert ratio > (1.3 if mostly_quantized else 1.2)

    decoded = {id(entry): decode_entry(encode_entry(entry)) for entry in encoder.entries}
    for layer, originals in enumerate(layers):
        entry = encoder.entry_for(layer)
        restored = restore_layer(decoded[id(entry)], layer)
        for kind_index, kind in enumerate(("keys", "values")):
            original, result = originals[kind_index], restored[kind_index]
            assert result.shape == (HEADS, TOKENS, DIM)
            assert result.dtype == original.dtype
            x = as_float32(original, dtype).astype(np.float64)
            x_hat = as_float32(result, dtype).astype(np.float64)
            assert np.isfinite(x_hat).all()
            side = getattr(entry, kind)
            bound = layer_bound(policy, kind, layer, isinstance(side, MergedStream))
            if bound == "exact":
                assert_bit_equal(result, original)
            elif bound.startswith("bits"):
                # Loose: one whole step of the head's full range (plus 16-bit rounding).
                levels = (1 << int(bound[4:])) - 1
                head_range = x.max(axis=(1, 2), keepdims=True) - x.min(axis=(1, 2), keepdims=True)
                assert (np.abs(x - x_hat) <= head_range / levels + 1e-2).all()
                assert np.abs(x - x_hat).max() > 0
            else:
                # Merged: the partner's vector can point anywhere; the restored one is at most
                # both norms away (SLERP keeps |x|; the average is (x + y) / 2).
                partner = entry.layers[1 - entry.layers.index(layer)]
                y = as_float32(layers[partner][kind_index], dtype).astype(np.float64)
                norms = np.maximum(np.linalg.norm(x, axis=-1), np.linalg.norm(y, axis=-1))
                assert (np.linalg.norm(x - x_hat, axis=-1) <= 2.05 * norms + 0.1).all()
                if side.retained_count:
                    which = entry.layers.index(layer)
                    heads, tokens = side.retained_heads, side.retained_tokens
                    assert_bit_equal(result[heads, tokens], side.retained[which])
                    assert_bit_equal(result[heads, tokens], original[heads, tokens])
                if side.method == "slerp" and side.direction.bits is None:
                    kept = np.linalg.norm(x_hat, axis=-1) / np.maximum(
                        np.linalg.norm(x, axis=-1), 1e-6
                    )
                    np.testing.assert_allclose(kept, 1.0, rtol=1e-2)
