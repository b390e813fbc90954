"""Decoder: restored KV from a stored `LayerGroupEntry`.

Restore of a merged pair (design.md section 3): x̂ = |x|·e/|e|, ŷ = |y|·e/|e|, then the
retained tokens' original vectors are scattered back at their (head, token) positions;
the recent tokens not merged yet follow as stored.
All math in float32; the result is narrowed to the requested dtype at the end.
Shapes: every restored tensor is `[kv_heads, end - start, head_dim]`.
"""

from __future__ import annotations

from typing import Any

from minicache_client.array_namespace import (
    array_namespace,
    check_kv_dtype,
    narrow_from_float32,
    widen_to_float32,
)
from minicache_client.bit_packing import unpack_codes
from minicache_client.entry import LayerGroupEntry, MergedStream, QuantizedBlock, TokenStream


def dequantize_block(block: QuantizedBlock, stream: TokenStream) -> Any:
    """float32 `[kv_heads, block.tokens, head_dim]`."""
    xp = array_namespace(block.codes)
    heads, dim = stream.kv_heads, stream.head_dim
    codes = unpack_codes(block.codes, stream.bits, heads * block.tokens * dim)
    scale = block.scale.astype(xp.float32)
    center = block.center.astype(xp.float32)
    # Offsets from the center, not the minimum: no overflow near the float32 limits.
    offsets = (
        codes.astype(xp.float32).reshape(heads, block.tokens, dim) - ((1 << stream.bits) - 1) / 2
    )
    if stream.mode == "per_channel":
        return offsets * scale + center
    groups = scale.shape[-1]
    grouped = offsets.reshape(heads, block.tokens, groups, dim // groups)
    return (grouped * scale[..., None] + center[..., None]).reshape(heads, block.tokens, dim)


def restore_stream(stream: TokenStream, start: int = 0, end: int | None = None) -> Any:
    """float32 tokens [start, end) of a stream."""
    end = stream.tokens if end is None else end
    xp = array_namespace(stream.tail)
    pieces = []
    offset = 0

    def take(count: int, produce) -> None:
        nonlocal offset
        lo, hi = max(start, offset), min(end, offset + count)
        if lo < hi:
            pieces.append(produce()[:, lo - offset : hi - offset])
        offset += count

    take(stream.sink.shape[1], lambda: widen_to_float32(stream.sink, stream.storage_dtype))
    for block in stream.blocks:
        if offset >= end:
            break
        take(block.tokens, lambda block=block: dequantize_block(block, stream))
    take(stream.tail.shape[1], lambda: widen_to_float32(stream.tail, stream.storage_dtype))
    if not pieces:
        return xp.zeros((stream.kv_heads, 0, stream.head_dim), dtype=xp.float32)
    return pieces[0] if len(pieces) == 1 else xp.concatenate(pieces, axis=1)


def restore_merged(
    merged: MergedStream, which: int, dtype: str, start: int = 0, end: int | None = None
) -> Any:
    """float32 tokens [start, end) of layer `which` (0 or 1) of a merged pair.

    `dtype` is the entry's dtype, in which retained and recent tokens are stored."""
    end = merged.tokens if end is None else end
    boundary = merged.merged_tokens
    if end > boundary:
        recent = widen_to_float32(
            merged.recent[which, :, max(start, boundary) - boundary : end - boundary], dtype
        )
        if start >= boundary:
            return recent
        older = restore_merged(merged, which, dtype, start, boundary)
        return array_namespace(older).concatenate([older, recent], axis=1)
    direction = restore_stream(merged.direction, start, end)
    xp = array_namespace(direction)
    if merged.method == "average" or merged.magnitudes is None:
        # Average merge, or a pair that holds no tokens yet.
        restored = direction
    else:
        norms = xp.linalg.norm(direction, axis=-1, keepdims=True)
        # Magnitudes are float16 (float32 where float16 would overflow), never bfloat16.
        magnitudes = merged.magnitudes[which, :, start:end].astype(xp.float32)
        safe = xp.where(norms > 0, norms, 1)
        restored = xp.where(norms > 0, direction * (magnitudes[..., None] / safe), 0)
    if merged.retained_count:
        tokens = merged.retained_tokens
        inside = (tokens >= start) & (tokens < end)
        if bool(inside.any()):
            restored = restored.copy() if restored is direction else restored
            originals = widen_to_float32(merged.retained[which][inside], dtype)
            restored[merged.retained_heads[inside], tokens[inside] - start] = originals
    return restored


def restore_layer(
    entry: LayerGroupEntry,
    layer: int,
    start: int = 0,
    end: int | None = None,
    dtype: str | None = None,
) -> tuple[Any, Any]:
    """Keys and values of one layer, tokens [start, end), in `dtype` (default: the
    entry's dtype; bfloat16 comes back as uint16 bits)."""
    if layer not in entry.layers:
        raise ValueError(f"layer {layer} is not in this entry (layers {entry.layers})")
    end = entry.tokens if end is None else end
    if not 0 <= start <= end <= entry.tokens:
        raise ValueError(
            f"token range [{start}, {end}) is outside the entry's {entry.tokens} tokens"
        )
    dtype = check_kv_dtype(dtype or entry.dtype)
    which = entry.layers.index(layer)
    restored = []
    for side in (entry.keys, entry.values):
        if isinstance(side, MergedStream):
            values = restore_merged(side, which, entry.dtype, start, end)
        elif side[which].bits is None and side[which].storage_dtype == dtype:
            # Stored as asked for: a plain copy, no float32 round trip.
            restored.append(side[which].tail[:, start:end].copy())
            continue
        else:
            values = restore_stream(side[which], start, end)
        restored.append(narrow_from_float32(values, dtype))
    return restored[0], restored[1]
