"""Decoder: restored KV from a stored `LayerGroupEntry`.

Each codec restores its own layers (`minicache_client.codecs`); a merged pair decodes
its shared direction once when both layers are asked for (`restore_group`). Shapes:
every restored tensor is `[kv_heads, end - start, head_dim]`, in the carrier of the
requested dtype (bfloat16 as uint16 bits).
"""

from __future__ import annotations

from typing import Any

from minicache_client.array_namespace import check_kv_dtype
from minicache_client.entry import LayerGroupEntry


def _token_range(entry: LayerGroupEntry, start: int, end: int | None) -> int:
    end = entry.tokens if end is None else end
    if not 0 <= start <= end <= entry.tokens:
        raise ValueError(
            f"token range [{start}, {end}) is outside the entry's {entry.tokens} tokens"
        )
    return end


def restore_layer(
    entry: LayerGroupEntry,
    layer: int,
    start: int = 0,
    end: int | None = None,
    dtype: str | None = None,
) -> tuple[Any, Any]:
    """Keys and values of one layer, tokens [start, end), in `dtype` (default: the
    entry's dtype)."""
    located = entry.locate(layer)
    end = _token_range(entry, start, end)
    dtype = check_kv_dtype(dtype or entry.dtype)
    keys, values = (codec.restore(which, start, end, dtype) for codec, which in located)
    return keys, values


def restore_group(
    entry: LayerGroupEntry, start: int = 0, end: int | None = None, dtype: str | None = None
) -> list[tuple[int, Any, Any]]:
    """`(layer, keys, values)` of every layer of the entry, in layer order."""
    end = _token_range(entry, start, end)
    dtype = check_kv_dtype(dtype or entry.dtype)
    sides = []
    for side in (entry.keys, entry.values):
        sides.append([layer for codec in side for layer in codec.restore_group(start, end, dtype)])
    return [(layer, keys, values) for layer, keys, values in zip(entry.layers, *sides, strict=True)]
