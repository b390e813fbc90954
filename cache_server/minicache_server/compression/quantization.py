"""KIVI-style asymmetric min/max quantization of a block of tokens.

Keys per channel (statistics over the block's tokens), values per token (statistics
over groups of channels). Scale and center (midpoint of the range) are stored as float16 (float32 only
where float16 would overflow), and codes are computed against those stored values so
that the decoder reproduces exactly what the encoder intended.
"""

from __future__ import annotations

from typing import Any

from minicache_client.array_namespace import array_namespace
from minicache_client.bit_packing import pack_codes
from minicache_client.entry import QuantizedBlock


def _stored_statistic(values: Any) -> Any:
    xp = array_namespace(values)
    as_fp16 = values.astype(xp.float16)
    return as_fp16 if bool(xp.isfinite(as_fp16).all()) else values.astype(xp.float32)


def quantize_block(block: Any, bits: int, mode: str, group_size: int) -> QuantizedBlock:
    """Quantize float32 `[kv_heads, tokens, head_dim]`.

    mode "per_channel": one scale/center per (head, channel) over the block's tokens.
    mode "per_token": one per (head, token, group of `group_size` channels).
    Codes c in [0, 2**bits - 1] restore as center + (c - (2**bits - 1) / 2) * scale.
    """
    xp = array_namespace(block)
    heads, tokens, dim = block.shape
    if mode == "per_channel":
        grouped = block
        reduce_axis = 1
    else:
        grouped = block.reshape(heads, tokens, dim // group_size, group_size)
        reduce_axis = -1
    # Statistics are few: float64 keeps (high - low) exact and free of overflow.
    low = grouped.min(axis=reduce_axis, keepdims=True).astype(xp.float64)
    high = grouped.max(axis=reduce_axis, keepdims=True).astype(xp.float64)
    levels = (1 << bits) - 1
    scale = _stored_statistic((high - low) / levels)
    center = _stored_statistic((high + low) / 2)
    scale32 = scale.astype(xp.float32)
    step = xp.where(scale32 > 0, scale32, 1)
    codes = xp.rint((grouped - center.astype(xp.float32)) / step + levels / 2)
    codes = xp.clip(codes, 0, levels).astype(xp.uint8)
    if mode == "per_token":
        scale, center = scale[..., 0], center[..., 0]
    return QuantizedBlock(tokens, pack_codes(codes, bits), scale, center)
