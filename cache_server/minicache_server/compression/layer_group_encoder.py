"""Builds one layer group's `LayerGroupEntry` as tokens arrive.

Tokens arrive in order, in chunks of any size: the prefill as one large chunk, then
decode steps a few tokens at a time. A merged pair holds its most recent `window`
tokens unmerged and merges older ones as they leave the window, chunk by chunk (its
retention threshold fixed by the first merged chunk); quantized streams move tokens from the
16-bit tail into quantized blocks once they are older than the recent window. Hence
appending token by token stores the same as appending the same tokens in one chunk.
`seal()` (end of a bulk put) also quantizes a last, partial block.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from minicache_client.array_namespace import (
    CARRIER_DTYPES,
    array_namespace,
    check_kv_dtype,
    narrow_from_float32,
    widen_to_float32,
)
from minicache_client.entry import LayerGroupEntry, MergedStream, TokenStream
from minicache_client.policy import LayerGroup, PairMerge, Quantization
from minicache_server.compression.quantization import quantize_block
from minicache_server.compression.retention import distance_threshold, retained_mask
from minicache_server.compression.slerp_merge import average_merge, slerp_merge

KINDS = ("keys", "values")


def _concat(xp: Any, first: Any, second: Any, axis: int) -> Any:
    """A new array: the entry never aliases a caller's buffer."""
    if first is None or first.shape[axis] == 0:
        return second.copy()
    return xp.concatenate([first, second], axis=axis)


# Exponent bits of each carrier: all set means Inf or NaN.
_EXPONENT_MASKS = {
    "float16": (0x7C00, "uint16"),
    "bfloat16": (0x7F80, "uint16"),
    "float32": (0x7F800000, "uint32"),
}


def check_finite(array: Any, dtype: str, what: str) -> None:
    """Raise ValueError when a KV tensor holds NaN or Inf.

    Tests the exponent bits of the carrier, one masked max over the tensor: several
    times faster than isfinite on float16, and this runs on every byte a put brings."""
    if array.size == 0:
        return
    xp = array_namespace(array)
    mask, carrier = _EXPONENT_MASKS[dtype]
    bits = xp.ascontiguousarray(array).view(getattr(xp, carrier))
    if int((bits & mask).max()) == mask:
        raise ValueError(f"{what} contains NaN or Inf values")


class LayerGroupEncoder:
    """Encoder of one layer group (a single layer, or a pair) of one sequence."""

    def __init__(
        self,
        group: LayerGroup,
        quantization: Quantization | None,
        *,
        dtype: str,
        kv_heads: int,
        head_dim: int,
    ) -> None:
        if kv_heads < 1 or head_dim < 1:
            raise ValueError(f"kv_heads and head_dim must be >= 1, got {kv_heads}, {head_dim}")
        self.group = group
        self.quantization = quantization
        self.dtype = check_kv_dtype(dtype)
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.entry = LayerGroupEntry(
            layers=group.layers,
            dtype=self.dtype,
            kv_heads=kv_heads,
            head_dim=head_dim,
            keys=self._new_side("keys"),
            values=self._new_side("values"),
        )

    # -- construction -------------------------------------------------------------

    def _merged_kind(self, kind: str) -> PairMerge | None:
        merge = self.group.merge
        if merge is None or not (merge.keys if kind == "keys" else merge.values):
            return None
        return merge

    def _new_stream(self, kind: str, bits: int | None, raw_dtype: str) -> TokenStream:
        quant = self.quantization
        if bits is None:
            return TokenStream(self.kv_heads, self.head_dim, raw_dtype)
        if kind == "keys":
            mode, group_size = "per_channel", quant.key_group_size
        else:
            mode, group_size = "per_token", min(quant.value_group_size, self.head_dim)
            if self.head_dim % group_size:
                raise ValueError(
                    f"value_group_size {quant.value_group_size} does not divide "
                    f"head_dim {self.head_dim}"
                )
        return TokenStream(
            self.kv_heads,
            self.head_dim,
            raw_dtype,
            bits=bits,
            mode=mode,
            group_size=group_size,
            block_tokens=quant.key_group_size,
            sink_capacity=quant.sink_tokens,
            window=quant.window,
        )

    def _bits(self, kind: str) -> int | None:
        """Bits of a merged pair's shared direction: the wider of its two layers'."""
        if self.quantization is None:
            return None
        bits = [self.quantization.bits_for(kind, layer) for layer in self.group.layers]
        return None if None in bits else max(bits)

    def _new_side(self, kind: str) -> list[TokenStream] | MergedStream:
        merge = self._merged_kind(kind)
        if merge is None:
            return [
                self._new_stream(
                    kind,
                    self.quantization.bits_for(kind, layer) if self.quantization else None,
                    self.dtype,
                )
                for layer in self.group.layers
            ]
        # The direction of a 16-bit entry is stored at 16-bit; float32 entries may hold
        # values beyond float16's range, so they keep float32.
        direction_dtype = self.dtype
        retention = merge.retention if merge.method == "slerp" else None
        return MergedStream(
            method=merge.method,
            direction=self._new_stream(kind, self._bits(kind), direction_dtype),
            side=retention.side if retention else "most_distinct",
            sink_tokens=retention.sink_tokens if retention else 0,
            window=merge.window,
        )

    # -- appending ------------------------------------------------------------------

    def _check_chunk(self, chunk: Sequence[Any], kind: str) -> int:
        if len(chunk) != len(self.group.layers):
            raise ValueError(
                f"{kind}: expected {len(self.group.layers)} layer tensors for layers "
                f"{self.group.layers}, got {len(chunk)}"
            )
        carrier = CARRIER_DTYPES[self.dtype]
        tokens = None
        for layer, array in zip(self.group.layers, chunk, strict=True):
            what = f"layer {layer} {kind}"
            shape = getattr(array, "shape", None)
            if shape is None or len(shape) != 3:
                raise ValueError(f"{what}: expected [kv_heads, tokens, head_dim], got {shape}")
            if (shape[0], shape[2]) != (self.kv_heads, self.head_dim):
                raise ValueError(
                    f"{what}: shape {tuple(shape)} does not match kv_heads={self.kv_heads}, "
                    f"head_dim={self.head_dim}"
                )
            if array.dtype != carrier:
                raise ValueError(
                    f"{what}: dtype {array.dtype} does not carry {self.dtype} (expected {carrier})"
                )
            if tokens is not None and shape[1] != tokens:
                raise ValueError(f"{kind}: layers of one chunk differ in token count")
            tokens = shape[1]
            check_finite(array, self.dtype, what)
        return tokens

    def append(self, keys: Sequence[Any], values: Sequence[Any]) -> None:
        """Append the next tokens: one `[kv_heads, n, head_dim]` tensor per layer of the
        group, for keys and for values, in the carrier dtype of the entry's dtype."""
        count = self._check_chunk(keys, "keys")
        if self._check_chunk(values, "values") != count:
            raise ValueError("keys and values differ in token count")
        if count == 0:
            return
        for kind, chunk in (("keys", keys), ("values", values)):
            side = getattr(self.entry, kind)
            if isinstance(side, MergedStream):
                self._append_merged(side, self._merged_kind(kind), chunk)
            else:
                for stream, array in zip(side, chunk, strict=True):
                    self._append_stream(stream, array, self.dtype)

    def seal(self) -> None:
        """End of a bulk put: quantize every token older than the window, partial
        blocks included. Later appends start new blocks."""
        for stream in self._streams():
            self._flush(stream, seal=True)

    def _streams(self) -> list[TokenStream]:
        streams = []
        for side in (self.entry.keys, self.entry.values):
            streams.extend([side.direction] if isinstance(side, MergedStream) else side)
        return streams

    def _append_stream(self, stream: TokenStream, array: Any, dtype: str) -> None:
        xp = array_namespace(array)
        if stream.storage_dtype != dtype:
            array = narrow_from_float32(widen_to_float32(array, dtype), stream.storage_dtype)
        if stream.bits is not None and stream.sink.shape[1] < stream.sink_capacity:
            room = stream.sink_capacity - stream.sink.shape[1]
            stream.sink = _concat(xp, stream.sink, array[:, :room], axis=1)
            array = array[:, room:]
        if array.shape[1]:
            stream.tail = _concat(xp, stream.tail, array, axis=1)
        self._flush(stream, seal=False)

    @staticmethod
    def _flush(stream: TokenStream, seal: bool) -> None:
        if stream.bits is None:
            return
        ready = stream.tail.shape[1] - stream.window
        sizes = [stream.block_tokens] * max(0, ready // stream.block_tokens)
        if seal and ready % stream.block_tokens and ready > 0:
            sizes.append(ready % stream.block_tokens)
        for size in sizes:
            block = widen_to_float32(stream.tail[:, :size], stream.storage_dtype)
            stream.blocks.append(quantize_block(block, stream.bits, stream.mode, stream.group_size))
            stream.tail = stream.tail[:, size:]

    def _append_merged(self, side: MergedStream, merge: PairMerge, chunk: Sequence[Any]) -> None:
        """Add the chunk to the recent window; merge what leaves it."""
        if side.window:
            xp = array_namespace(*chunk)
            recent = _concat(xp, side.recent, xp.stack(list(chunk)), axis=2)
            leaving = recent.shape[2] - side.window
            if leaving <= 0:
                side.recent = recent
                return
            side.recent = recent[:, :, leaving:].copy()
            chunk = (recent[0, :, :leaving], recent[1, :, :leaving])
        self._merge(side, merge, chunk)

    def _merge(self, side: MergedStream, merge: PairMerge, chunk: Sequence[Any]) -> None:
        xp = array_namespace(*chunk)
        first_token = side.merged_tokens
        x = widen_to_float32(chunk[0], self.dtype)
        y = widen_to_float32(chunk[1], self.dtype)
        storage = side.direction.storage_dtype
        if merge.method == "average":
            self._append_stream(
                side.direction, narrow_from_float32(average_merge(x, y), storage), storage
            )
            return
        direction, magnitudes, omega = slerp_merge(x, y, merge.t)
        self._append_stream(side.direction, narrow_from_float32(direction, storage), storage)
        stored = magnitudes.astype(xp.float16)
        if not bool(xp.isfinite(stored).all()) or (
            side.magnitudes is not None and side.magnitudes.dtype == xp.float32
        ):
            stored = magnitudes
            if side.magnitudes is not None:
                side.magnitudes = side.magnitudes.astype(xp.float32)
        side.magnitudes = _concat(xp, side.magnitudes, stored, axis=2)
        retention = merge.retention
        if retention is None:
            return
        distances = omega / math.pi
        if side.threshold is None:
            side.threshold = distance_threshold(distances, retention)
        heads, tokens = xp.nonzero(retained_mask(distances, side.threshold, retention, first_token))
        if heads.size == 0:
            return
        originals = xp.stack([chunk[0][heads, tokens], chunk[1][heads, tokens]])
        side.retained_heads = _concat(xp, side.retained_heads, heads.astype(xp.int16), axis=0)
        side.retained_tokens = _concat(
            xp, side.retained_tokens, (tokens + first_token).astype(xp.int32), axis=0
        )
        side.retained = _concat(xp, side.retained, originals, axis=1)
