"""The encoder of one sequence: every layer group's codecs, fed layer by layer.

Workers stream KV per layer, in chunks of tokens (the prefill as one chunk, then decode
steps a few tokens at a time). A group's chunk is encoded once every layer of the group
brought the same tokens: a single layer at once, the first layer of a merged pair waits
in `pending` for its partner. Appending token by token stores the same as appending the
same tokens in one chunk; `seal` (end of a bulk put) also closes partial blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from minicache_client.array_namespace import CARRIER_DTYPES, array_namespace, check_kv_dtype
from minicache_client.codecs import KINDS, codecs_for_group
from minicache_client.entry import LayerGroupEntry, fp16_bytes, stored_bytes
from minicache_client.policy import CompressionPolicy, LayerGroup, Quantization
from minicache_client.restore import restore_group, restore_layer

# Exponent bits of each carrier: all set means Inf or NaN.
_EXPONENT_MASKS = {
    "float16": (0x7C00, "uint16"),
    "bfloat16": (0x7F80, "uint16"),
    "float32": (0x7F800000, "uint32"),
}


_FINITE_CHUNK = 1 << 16


def check_finite(array: Any, dtype: str, what: str) -> None:
    """Raise ValueError when a KV tensor holds NaN or Inf.

    Tests the exponent bits of the carrier, one masked max over the tensor: several
    times faster than isfinite on float16, and this runs on every byte a put brings."""
    if array.size == 0:
        return
    xp = array_namespace(array)
    mask, carrier = _EXPONENT_MASKS[dtype]
    bits = xp.ascontiguousarray(array).view(getattr(xp, carrier)).reshape(-1)
    # A large tensor on NumPy goes in chunks through one scratch array that stays in
    # cache: a masked copy of the whole of it would cost a pass over fresh memory (page
    # faults) before the max.
    if xp is not np or bits.size <= _FINITE_CHUNK:
        pieces = [bits & mask]
    else:
        scratch = np.empty(_FINITE_CHUNK, dtype=bits.dtype)
        pieces = (
            np.bitwise_and(part, mask, out=scratch[: part.size])
            for part in (
                bits[first : first + _FINITE_CHUNK] for first in range(0, bits.size, _FINITE_CHUNK)
            )
        )
    if any(int(masked.max()) == mask for masked in pieces):
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
        entry: LayerGroupEntry | None = None,
    ) -> None:
        """`entry`: a stored entry of this group to continue (appends extend it, as if
        this encoder had built it); None starts an empty one."""
        if kv_heads < 1 or head_dim < 1:
            raise ValueError(f"kv_heads and head_dim must be >= 1, got {kv_heads}, {head_dim}")
        self.group = group
        self.dtype = check_kv_dtype(dtype)
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        shape = {"dtype": self.dtype, "kv_heads": kv_heads, "head_dim": head_dim}
        if entry is None:
            entry = LayerGroupEntry(
                layers=group.layers,
                keys=codecs_for_group(group, "keys", quantization, **shape),
                values=codecs_for_group(group, "values", quantization, **shape),
                **shape,
            )
        elif entry.layers != group.layers:
            raise ValueError("stored entries do not match this policy's layer groups")
        elif (entry.dtype, entry.kv_heads, entry.head_dim) != (self.dtype, kv_heads, head_dim):
            raise ValueError(f"entry of layers {entry.layers} has another shape or dtype")
        self.entry = entry

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

    def append(self, keys: Sequence[Any], values: Sequence[Any], owned: bool = False) -> None:
        """Append the next tokens: one `[kv_heads, n, head_dim]` tensor per layer of the
        group, for keys and for values, in the carrier dtype of the entry's dtype.
        `owned`: the caller hands the arrays over (it will not touch them again), so a
        codec may keep them without a copy (`Codec.adopt`)."""
        count = self._check_chunk(keys, "keys")
        if self._check_chunk(values, "values") != count:
            raise ValueError("keys and values differ in token count")
        if count == 0:
            return
        # A codec may still refuse its part (a transform code beyond 32 bits): then every
        # codec of the group is rolled back, so that keys and values keep one length.
        codecs = self.entry.codecs()
        refusing = any(codec.may_refuse for codec in codecs)
        snapshots = [(codec, codec.snapshot()) for codec in codecs] if refusing else []
        try:
            for kind, chunk in zip(KINDS, (keys, values), strict=True):
                position = 0
                for codec in getattr(self.entry, kind):
                    part = chunk[position : position + codec.layer_count]
                    if not (owned and codec.adopt(part)):
                        codec.append(part)
                    position += codec.layer_count
        except BaseException:
            for codec, snapshot in snapshots:
                codec.roll_back(snapshot)
            raise

    def seal(self) -> None:
        """End of a bulk put: close partial blocks. Later appends start new ones."""
        for codec in self.entry.codecs():
            codec.seal()


class SequenceEncoder:
    """Encoder state of one sequence: one `LayerGroupEncoder` per layer group."""

    def __init__(
        self,
        policy: CompressionPolicy,
        *,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: str,
        entries: Sequence[LayerGroupEntry] | None = None,
    ) -> None:
        """`entries`: the stored entries of a sequence to continue, one per layer group
        in order (appends then extend them); None starts empty."""
        self.policy = policy
        self.num_layers = num_layers
        groups = policy.resolve_layer_groups(num_layers)
        if entries is not None and len(entries) != len(groups):
            raise ValueError("stored entries do not match this policy's layer groups")
        self.encoders = [
            LayerGroupEncoder(
                group,
                policy.quantization,
                dtype=dtype,
                kv_heads=kv_heads,
                head_dim=head_dim,
                entry=None if entries is None else entries[index],
            )
            for index, group in enumerate(groups)
        ]
        self._encoder_of = {
            layer: encoder for encoder in self.encoders for layer in encoder.group.layers
        }
        self.pending: dict[int, tuple[Any, Any]] = {}

    def _encoder(self, layer: int) -> LayerGroupEncoder:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is out of range for {self.num_layers} layers")
        return self._encoder_of[layer]

    def put_layer(
        self, layer: int, keys: Any, values: Any, seal: bool = False, owned: bool = False
    ) -> None:
        """The next tokens of one layer, `[kv_heads, n, head_dim]` each. `seal` marks the
        end of a bulk put (a prefill): partial blocks are closed once the layer's group
        is complete. `owned`: the caller hands the arrays over (`LayerGroupEncoder.append`)."""
        encoder = self._encoder(layer)
        layers = encoder.group.layers
        if layer in self.pending:
            raise ValueError(f"layer {layer} was sent twice before the rest of {layers}")
        waiting = [other for other in layers if other != layer and other not in self.pending]
        if waiting:
            self.pending[layer] = (keys, values)
            return
        parts = {other: self.pending[other] for other in layers if other != layer}
        parts[layer] = (keys, values)
        counts = {parts[other][0].shape[1] for other in layers}
        if len(counts) > 1:
            raise ValueError(
                f"layers {layers} of one group carry different token counts ({sorted(counts)})"
            )
        # A rejected chunk leaves the waiting layers in place.
        encoder.append(
            [parts[other][0] for other in layers], [parts[other][1] for other in layers], owned
        )
        for other in layers:
            self.pending.pop(other, None)
        if seal:
            encoder.seal()

    def seal(self) -> None:
        if self.pending:
            raise ValueError(f"layers {sorted(self.pending)} still wait for their group")
        for encoder in self.encoders:
            encoder.seal()

    @property
    def entries(self) -> list[LayerGroupEntry]:
        return [encoder.entry for encoder in self.encoders]

    def entry_for(self, layer: int) -> LayerGroupEntry:
        return self._encoder(layer).entry

    def restore_layer(
        self, layer: int, start: int = 0, end: int | None = None, dtype: str | None = None
    ) -> tuple[Any, Any]:
        return restore_layer(self.entry_for(layer), layer, start, end, dtype)

    def restore_all(
        self, start: int = 0, end: int | None = None, dtype: str | None = None
    ) -> list[tuple[Any, Any]]:
        """Every layer's (keys, values), in layer order; each group decoded once."""
        return [
            (keys, values)
            for entry in self.entries
            for _, keys, values in restore_group(entry, start, end, dtype)
        ]

    def stored_bytes(self) -> int:
        return sum(stored_bytes(entry) for entry in self.entries)

    def fp16_bytes(self) -> int:
        return sum(fp16_bytes(entry) for entry in self.entries)

    def compression_ratio(self) -> float:
        return self.fp16_bytes() / self.stored_bytes()
