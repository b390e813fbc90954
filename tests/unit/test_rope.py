"""RoPE tables (`minicache_client.rope.RopeTable`) against transformers' own RoPE.

For every rope type transformers implements (`ROPE_INIT_FUNCTIONS`, plus "default"), a
table built from the type's `inv_freq` and `attention_scaling` rotates keys as
`apply_rotary_pos_emb` does with the cos/sin of the model's rotary embedding
(`LlamaRotaryEmbedding`, or Phi-3's split for partial rotary), at the same positions;
undoing the rotation gives the keys back; channels beyond `rotary_dim` are untouched.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from kv_samples import bits_of
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)
from transformers.models.phi3.modeling_phi3 import (
    apply_rotary_pos_emb as apply_partial_rotary_pos_emb,
)

from minicache_client.rope import RopeTable

HEAD_DIM = 16
MAX_POSITIONS = 256  # the config's max_position_embeddings
ORIGINAL_POSITIONS = 64  # original_max_position_embeddings of the scaled types


def rope_parameters(rope_type: str, rotary_fraction: float = 1.0) -> dict[str, Any]:
    """The `rope_parameters` of a small config of `rope_type`."""
    rotary_pairs = int(HEAD_DIM * rotary_fraction) // 2
    parameters: dict[str, Any] = {
        "default": {},
        "linear": {"factor": 4.0},
        "dynamic": {"factor": 4.0},
        "yarn": {"factor": 4.0, "original_max_position_embeddings": ORIGINAL_POSITIONS},
        "longrope": {
            "long_factor": [1.0 + 0.5 * i for i in range(rotary_pairs)],
            "short_factor": [1.0 + 0.1 * i for i in range(rotary_pairs)],
            "original_max_position_embeddings": ORIGINAL_POSITIONS,
        },
        "llama3": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": ORIGINAL_POSITIONS,
        },
        "proportional": {"factor": 2.0},
    }[rope_type]
    theta = 500000.0 if rope_type == "llama3" else 10000.0
    parameters = {"rope_type": rope_type, "rope_theta": theta, **parameters}
    if rotary_fraction != 1.0:
        parameters["partial_rotary_factor"] = rotary_fraction
    return parameters


ROPE_TYPES = ("default", *sorted(ROPE_INIT_FUNCTIONS))


def config_of(rope_type: str, rotary_fraction: float = 1.0) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=4 * HEAD_DIM,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        num_hidden_layers=2,
        intermediate_size=32,
        vocab_size=32,
        max_position_embeddings=MAX_POSITIONS,
        rope_parameters=rope_parameters(rope_type, rotary_fraction),
    )


def table_of(config: LlamaConfig, seq_len: int) -> RopeTable:
    """The table of `config` for a sequence of `seq_len` tokens (what a model reading
    its RoPE at that length holds: dynamic and longrope depend on it)."""
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        inv_freq, scaling = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len=seq_len)
    return RopeTable(inv_freq.numpy(), float(scaling))


def transformers_rotate(config: LlamaConfig, keys: np.ndarray, first: int) -> np.ndarray:
    """`keys [heads, tokens, head_dim]` at positions first, first + 1, ... through
    transformers' rotary embedding and `apply_rotary_pos_emb`."""
    x = torch.from_numpy(keys)[None]
    positions = torch.arange(first, first + keys.shape[1])[None]
    cos, sin = LlamaRotaryEmbedding(config)(x, positions)
    apply = apply_rotary_pos_emb if cos.shape[-1] == HEAD_DIM else apply_partial_rotary_pos_emb
    _, rotated = apply(x, x, cos, sin)
    return rotated[0].numpy()


def sample_keys(seed: int, tokens: int, heads: int = 3, head_dim: int = HEAD_DIM) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((heads, tokens, head_dim)).astype(np.float32)


# (first position, tokens): within the original length, across it, and beyond the
# config's max_position_embeddings (dynamic grows its base there, longrope switches to
# its long factors above the original length).
SPANS = ((0, 40), (37, 50), (230, 60), (1000, 9))


@pytest.mark.parametrize("span", SPANS, ids=lambda span: f"{span[0]}+{span[1]}")
@pytest.mark.parametrize("rope_type", ROPE_TYPES)
def test_rotate_matches_transformers(rope_type: str, span: tuple[int, int]) -> None:
    first, tokens = span
    config = config_of(rope_type)
    table = table_of(config, first + tokens)
    keys = sample_keys(first, tokens)
    expected = transformers_rotate(config, keys, first)
    # transformers multiplies positions by inv_freq in float32 (an angle error up to
    # ~1e-4 rad at position 1000); the table's angles are float64.
    np.testing.assert_allclose(table.rotate(keys, first), expected, rtol=0, atol=3e-4)


def test_every_rope_type_of_transformers_is_covered() -> None:
    # A rope type added to transformers fails here until rope_parameters knows it.
    for rope_type in ROPE_TYPES:
        assert rope_parameters(rope_type)["rope_type"] == rope_type


@pytest.mark.parametrize("rope_type", ROPE_TYPES)
def test_scaled_types_are_not_the_default(rope_type: str) -> None:
    # The comparison above means something only if the types differ from each other.
    table = table_of(config_of(rope_type), 2 * MAX_POSITIONS)
    default = table_of(config_of("default"), 2 * MAX_POSITIONS)
    if rope_type != "default":
        assert not (
            np.allclose(table.inv_freq, default.inv_freq)
            and table.attention_scaling == default.attention_scaling
        )
    if rope_type in ("yarn", "longrope"):
        assert table.attention_scaling > 1.0


@pytest.mark.parametrize("span", SPANS, ids=lambda span: f"{span[0]}+{span[1]}")
@pytest.mark.parametrize("rope_type", ROPE_TYPES)
def test_inverse_undoes_rotate(rope_type: str, span: tuple[int, int]) -> None:
    first, tokens = span
    table = table_of(config_of(rope_type), first + tokens)
    keys = sample_keys(first + 1, tokens)
    rotated = table.rotate(keys, first)
    np.testing.assert_allclose(table.rotate(rotated, first, inverse=True), keys, atol=2e-6)
    unrotated = table.rotate(keys, first, inverse=True)
    np.testing.assert_allclose(table.rotate(unrotated, first), keys, atol=2e-6)
    # The inverse is the transpose rotation, divided by the scale: norms per channel
    # pair scale by attention_scaling one way and back the other.
    half = table.rotary_dim // 2
    pairs = np.hypot(keys[..., :half], keys[..., half:])
    rotated_pairs = np.hypot(rotated[..., :half], rotated[..., half:])
    np.testing.assert_allclose(rotated_pairs, pairs * table.attention_scaling, rtol=1e-5)


@pytest.mark.parametrize("rope_type", ROPE_TYPES)
def test_positions_are_token_indices_whatever_the_split(rope_type: str) -> None:
    # A codec rotates each block at its own first position: pieces at consecutive
    # positions rotate as the whole does.
    table = table_of(config_of(rope_type), 100)
    keys = sample_keys(7, 60)
    whole = table.rotate(keys, 11)
    pieces = [table.rotate(keys[:, a:b], 11 + a) for a, b in ((0, 1), (1, 17), (17, 60))]
    np.testing.assert_array_equal(np.concatenate(pieces, axis=1), whole)


def test_far_positions_are_exact_to_float32() -> None:
    # Angles are computed in float64: at position 10^6 the rotation is still accurate
    # to float32 precision (a float32 angle would be off by ~0.03 rad).
    table = table_of(config_of("default"), 1)
    keys = sample_keys(3, 5)
    first = 1_000_000
    angles = np.arange(first, first + 5, dtype=np.float64)[:, None] * table.inv_freq.astype(
        np.float64
    )
    low, high = keys[..., :8].astype(np.float64), keys[..., 8:].astype(np.float64)
    expected = np.concatenate(
        [
            low * np.cos(angles) - high * np.sin(angles),
            high * np.cos(angles) + low * np.sin(angles),
        ],
        axis=-1,
    )
    np.testing.assert_allclose(table.rotate(keys, first), expected, atol=2e-6)


PARTIAL_TYPES = ("linear", "dynamic", "yarn", "longrope", "llama3")


@pytest.mark.parametrize("rotary_fraction", (0.25, 0.5))
@pytest.mark.parametrize("rope_type", PARTIAL_TYPES)
def test_partial_rotary_leaves_the_other_channels(rope_type: str, rotary_fraction: float) -> None:
    config = config_of(rope_type, rotary_fraction)
    first, tokens = 30, 50
    table = table_of(config, first + tokens)
    rotary_dim = int(HEAD_DIM * rotary_fraction)
    assert table.rotary_dim == rotary_dim
    keys = sample_keys(5, tokens)
    rotated = table.rotate(keys, first)
    np.testing.assert_allclose(rotated, transformers_rotate(config, keys, first), rtol=0, atol=3e-4)
    for result in (rotated, table.rotate(keys, first, inverse=True)):
        np.testing.assert_array_equal(
            bits_of(result[..., rotary_dim:]), bits_of(keys[..., rotary_dim:])
        )
        assert not np.allclose(result[..., :rotary_dim], keys[..., :rotary_dim])
    restored = table.rotate(rotated, first, inverse=True)
    np.testing.assert_allclose(restored, keys, atol=2e-6)


def test_proportional_rope_with_a_partial_factor_keeps_unrotated_pairs() -> None:
    # Proportional RoPE pads inv_freq with zeros: those pairs turn by angle 0.
    config = config_of("proportional", 0.5)
    table = table_of(config, 10)
    assert table.rotary_dim == HEAD_DIM and (table.inv_freq[HEAD_DIM // 4 :] == 0).all()
    keys = sample_keys(9, 10)
    rotated = table.rotate(keys, 3)
    np.testing.assert_allclose(rotated, transformers_rotate(config, keys, 3), rtol=0, atol=3e-4)
    for channels in (slice(HEAD_DIM // 4, HEAD_DIM // 2), slice(3 * HEAD_DIM // 4, None)):
        np.testing.assert_array_equal(rotated[..., channels], keys[..., channels])


def test_rotate_returns_a_new_float32_array_and_leaves_its_input() -> None:
    table = RopeTable(np.array([1.0, 0.1, 0.01], dtype=np.float32), 1.5)
    keys = sample_keys(1, 4, head_dim=8)
    before = keys.copy()
    for inverse in (False, True):
        out = table.rotate(keys, 2, inverse=inverse)
        assert out.dtype == np.float32 and out.shape == keys.shape
        assert not np.shares_memory(out, keys)
        np.testing.assert_array_equal(keys, before)
    # Any leading axes: [layers, heads, tokens, head_dim] rotates like each layer.
    stacked = np.stack([keys, 2 * keys])
    np.testing.assert_array_equal(table.rotate(stacked, 5)[1], table.rotate(2 * keys, 5))
    # At position 0 the rotation is the identity times the scale; channels beyond
    # rotary_dim are not scaled either (as in transformers' partial rotary).
    at_zero = table.rotate(keys, 0)[:, :1]
    np.testing.assert_allclose(at_zero[..., :6], 1.5 * keys[:, :1, :6], rtol=1e-6)
    np.testing.assert_array_equal(at_zero[..., 6:], keys[:, :1, 6:])


@pytest.mark.parametrize(
    "inv_freq, scaling",
    [
        ([], 1.0),
        ([[1.0, 0.5]], 1.0),
        ([1.0, np.nan], 1.0),
        ([1.0, np.inf], 1.0),
        (1.0, 1.0),
        ([1.0, 0.5], 0.0),
        ([1.0, 0.5], -1.0),
        ([1.0, 0.5], np.nan),
        ([1.0, 0.5], np.inf),
    ],
)
def test_invalid_tables_are_refused(inv_freq: Any, scaling: float) -> None:
    with pytest.raises(ValueError):
        RopeTable(inv_freq, scaling)


def test_keys_narrower_than_the_table_are_refused() -> None:
    table = RopeTable(np.ones(8, dtype=np.float32))
    assert table.rotary_dim == 16
    with pytest.raises(ValueError, match="rotary_dim"):
        table.rotate(sample_keys(0, 3, head_dim=12), 0)
