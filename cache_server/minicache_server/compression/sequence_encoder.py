"""All layer groups of one sequence, fed layer by layer.

Workers stream KV per layer. A single layer is encoded as soon as it arrives; the first
layer of a merged pair waits in `pending` until its partner brings the same tokens,
then the pair is merged and the raw layers are dropped.
"""

from __future__ import annotations

from typing import Any

from minicache_client.entry import LayerGroupEntry, fp16_bytes, stored_bytes
from minicache_client.policy import CompressionPolicy
from minicache_client.restore import restore_layer
from minicache_server.compression.layer_group_encoder import LayerGroupEncoder


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
    ) -> None:
        self.policy = policy
        self.num_layers = num_layers
        self.encoders = [
            LayerGroupEncoder(
                group, policy.quantization, dtype=dtype, kv_heads=kv_heads, head_dim=head_dim
            )
            for group in policy.resolve_layer_groups(num_layers)
        ]
        self._encoder_of = {
            layer: encoder for encoder in self.encoders for layer in encoder.group.layers
        }
        self.pending: dict[int, tuple[Any, Any]] = {}

    def _encoder(self, layer: int) -> LayerGroupEncoder:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is out of range for {self.num_layers} layers")
        return self._encoder_of[layer]

    def put_layer(self, layer: int, keys: Any, values: Any, seal: bool = False) -> None:
        """The next tokens of one layer, `[kv_heads, n, head_dim]` each. `seal` marks the
        end of a bulk put (a prefill): partial quantization blocks are closed once the
        layer's group is complete."""
        encoder = self._encoder(layer)
        layers = encoder.group.layers
        if len(layers) == 1:
            encoder.append([keys], [values])
            if seal:
                encoder.seal()
            return
        partner = layers[1] if layer == layers[0] else layers[0]
        if layer in self.pending:
            raise ValueError(f"layer {layer} was sent twice before layer {partner}")
        if partner not in self.pending:
            self.pending[layer] = (keys, values)
            return
        partner_keys, partner_values = self.pending[partner]
        if partner_keys.shape[1] != keys.shape[1]:
            raise ValueError(
                f"layers {layers} of a merged pair carry different token counts "
                f"({partner_keys.shape[1]} and {keys.shape[1]})"
            )
        first = (partner_keys, partner_values) if partner == layers[0] else (keys, values)
        second = (keys, values) if partner == layers[0] else (partner_keys, partner_values)
        # A rejected chunk leaves the waiting partner in place.
        encoder.append([first[0], second[0]], [first[1], second[1]])
        del self.pending[partner]
        if seal:
            encoder.seal()

    def load_entries(self, entries: list[LayerGroupEntry]) -> None:
        """Continue from stored entries (one per layer group, in order): appends then
        extend them, as if this encoder had built them."""
        if [entry.layers for entry in entries] != [e.group.layers for e in self.encoders]:
            raise ValueError("stored entries do not match this policy's layer groups")
        for encoder, entry in zip(self.encoders, entries, strict=True):
            if (entry.dtype, entry.kv_heads, entry.head_dim) != (
                encoder.dtype,
                encoder.kv_heads,
                encoder.head_dim,
            ):
                raise ValueError(f"entry of layers {entry.layers} has another shape or dtype")
            encoder.entry = entry

    def seal(self) -> None:
        if self.pending:
            raise ValueError(f"layers {sorted(self.pending)} still wait for their pair partner")
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

    def stored_bytes(self) -> int:
        return sum(stored_bytes(entry) for entry in self.entries)

    def fp16_bytes(self) -> int:
        return sum(fp16_bytes(entry) for entry in self.entries)

    def compression_ratio(self) -> float:
        return self.fp16_bytes() / self.stored_bytes()
