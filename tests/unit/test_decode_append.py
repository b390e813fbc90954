"""Decode-append equivalence through `SequenceEncoder`, for whole policies: after the
same first put, appending token by token stores exactly what one chunk stores.

History is never re-merged: the retention threshold comes from the first merged chunk,
merged tokens are independent of each other, and quantized blocks form at the same
token positions however the tokens arrive (design.md §3, "Decoding"). The codec matrix
(test_codec_matrix.py) checks the same codec by codec.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kv_samples import assert_bit_equal, random_kv

from minicache_client.codecs import SlerpMerge
from minicache_client.entry import encode_entry
from minicache_client.policy import (
    CompressionPolicy,
    MergePlan,
    PairMerge,
    Quantization,
    Retention,
)
from minicache_client.sequence_encoder import SequenceEncoder

NUM_LAYERS, HEADS, DIM = 4, 2, 16

DECODE_POLICIES = {
    "paper_like": CompressionPolicy(
        "paper_like", merge=MergePlan(start_layer=0, retention=Retention(gamma=0.2))
    ),
    "average": CompressionPolicy(
        "average", merge=MergePlan(start_layer=2, method="average", retention=None)
    ),
    "kivi4_window": CompressionPolicy(
        "kivi4_window",
        quantization=Quantization(4, 4, key_group_size=8, value_group_size=8, window=5),
    ),
    "paper_quant_sink": CompressionPolicy(
        "paper_quant_sink",
        merge=MergePlan(start_layer=2, retention=Retention(gamma=0.1, sink_tokens=3)),
        quantization=Quantization(
            3, 2, key_group_size=8, value_group_size=8, window=2, sink_tokens=4
        ),
    ),
    "slerp_window_quant": CompressionPolicy(
        "slerp_window_quant",
        merge=MergePlan(start_layer=0, retention=None, window=3),
        quantization=Quantization(3, 2, key_group_size=8, value_group_size=8, sink_tokens=2),
    ),
    "average_values_window": CompressionPolicy(
        "average_values_window",
        merge=MergePlan(start_layer=2, keys=False, method="average", retention=None, window=5),
    ),
    "fraction_least": CompressionPolicy(
        "fraction_least",
        merge=MergePlan(
            pairs=(
                PairMerge(0, retention=Retention(fraction=0.3, side="least_distinct")),
                PairMerge(2, values=False, t=0.3, retention=Retention(fraction=0.25)),
            )
        ),
    ),
}


def sample_layers(seed: int, tokens: int, dtype: str):
    rng = np.random.default_rng(seed)
    shape = (HEADS, tokens, DIM)
    return [(random_kv(rng, shape, dtype), random_kv(rng, shape, dtype)) for _ in range(NUM_LAYERS)]


def new_encoder(policy: CompressionPolicy, dtype: str) -> SequenceEncoder:
    return SequenceEncoder(policy, num_layers=NUM_LAYERS, kv_heads=HEADS, head_dim=DIM, dtype=dtype)


def put_tokens(encoder: SequenceEncoder, layers, start: int, end: int) -> None:
    for layer, (keys, values) in enumerate(layers):
        encoder.put_layer(layer, keys[:, start:end], values[:, start:end])


def merged_pairs(encoder: SequenceEncoder) -> list[SlerpMerge]:
    return [
        codec
        for entry in encoder.entries
        for codec in entry.codecs()
        if isinstance(codec, SlerpMerge)
    ]


def retained_positions(encoder: SequenceEncoder) -> list[list[tuple[int, int]]]:
    return [
        list(zip(pair.retained_heads.tolist(), pair.retained_tokens.tolist(), strict=True))
        for pair in merged_pairs(encoder)
    ]


def assert_same_store(first: SequenceEncoder, second: SequenceEncoder) -> None:
    """The same encodings, so the same restores."""
    assert [e.tokens for e in first.entries] == [e.tokens for e in second.entries]
    assert [e.frozen_tokens for e in first.entries] == [e.frozen_tokens for e in second.entries]
    for a, b in zip(first.entries, second.entries, strict=True):
        assert encode_entry(a) == encode_entry(b)
    for (a_keys, a_values), (b_keys, b_values) in zip(
        first.restore_all(), second.restore_all(), strict=True
    ):
        assert_bit_equal(a_keys, b_keys)
        assert_bit_equal(a_values, b_values)


@pytest.mark.parametrize("name", sorted(DECODE_POLICIES))
@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
    prefix=st.integers(1, 20),
    decoded=st.integers(1, 24),
)
def test_token_by_token_equals_one_chunk(
    name: str, seed: int, dtype: str, prefix: int, decoded: int
) -> None:
    policy = DECODE_POLICIES[name]
    layers = sample_layers(seed, prefix + decoded, dtype)
    stepwise, chunked = new_encoder(policy, dtype), new_encoder(policy, dtype)
    for encoder in (stepwise, chunked):
        put_tokens(encoder, layers, 0, prefix)
    for token in range(prefix, prefix + decoded):
        put_tokens(stepwise, layers, token, token + 1)
    put_tokens(chunked, layers, prefix, prefix + decoded)
    assert retained_positions(stepwise) == retained_positions(chunked)
    assert_same_store(stepwise, chunked)
    for encoder in (stepwise, chunked):
        encoder.seal()
    assert_same_store(stepwise, chunked)


@pytest.mark.parametrize("name", ["paper_like", "fraction_least", "average"])
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), prefix=st.integers(1, 12), decoded=st.integers(1, 20))
def test_whole_sequence_with_the_prefix_threshold_equals_prefix_then_tokens(
    name: str, seed: int, prefix: int, decoded: int
) -> None:
    policy = DECODE_POLICIES[name]
    layers = sample_layers(seed, prefix + decoded, "float16")
    stepwise = new_encoder(policy, "float16")
    put_tokens(stepwise, layers, 0, prefix)
    for token in range(prefix, prefix + decoded):
        put_tokens(stepwise, layers, token, token + 1)
    whole = new_encoder(policy, "float16")
    for mine, theirs in zip(merged_pairs(whole), merged_pairs(stepwise), strict=True):
        mine.threshold = theirs.threshold
    put_tokens(whole, layers, 0, prefix + decoded)
    assert retained_positions(whole) == retained_positions(stepwise)
    assert_same_store(whole, stepwise)


def test_the_threshold_really_comes_from_the_prefix() -> None:
    # Guard for the test above: with its own threshold a whole-sequence encode differs.
    layers = sample_layers(0, 40, "float16")
    policy = DECODE_POLICIES["fraction_least"]
    stepwise, whole = new_encoder(policy, "float16"), new_encoder(policy, "float16")
    put_tokens(stepwise, layers, 0, 4)
    for token in range(4, 40):
        put_tokens(stepwise, layers, token, token + 1)
    put_tokens(whole, layers, 0, 40)
    assert retained_positions(whole) != retained_positions(stepwise)
