"""What the store knows of one committed sequence (`StoredSequence`; its entries are
in the tiers) and the server's limits on what a write may declare (`Limits`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from minicache_client.errors import OutOfRangeError, clipped
from minicache_client.policy import CompressionPolicy, LayerGroup
from minicache_server.tiers.base import EntryKey, SequenceName


@dataclass(frozen=True)
class Limits:
    max_chunk_bytes: int = 1 << 20
    max_tokens: int = 1 << 17
    max_layers: int = 256
    max_kv_heads: int = 1024
    max_head_dim: int = 1024
    tenant_quota_bytes: int = 0


@dataclass
class StoredSequence:
    """One committed sequence of a tenant. Its layer groups' entries are in the tiers
    under `key(group)`; `entry_bytes[group]` is each one's `stored_bytes`, the one size
    every answer and metric counts."""

    tenant: str
    model_id: str
    sequence_id: str
    generation: int
    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    policy: CompressionPolicy
    groups: tuple[LayerGroup, ...]
    tokens: int = 0
    entry_bytes: list[int] = field(default_factory=list)
    fp16_bytes: int = 0
    # Opaque label of the content, set by the last committed write (b"": none).
    tag: bytes = b""
    # Persistent tier name -> (generation, tokens) of the manifest written there.
    manifests: dict[str, tuple[int, int]] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def name(self) -> SequenceName:
        """The sequence's key in `SequenceStore.sequences` (an `EntryKey`'s first three)."""
        return SequenceName(self.tenant, self.model_id, self.sequence_id)

    @property
    def state(self) -> tuple[int, int]:
        """What a manifest describes: the generation and the tokens held."""
        return (self.generation, self.tokens)

    @property
    def stored_bytes(self) -> int:
        return sum(self.entry_bytes)

    def key(self, group: int) -> EntryKey:
        return EntryKey(*self.name, self.generation, group)

    def entry_keys(self) -> list[EntryKey]:
        return [self.key(group) for group in range(len(self.groups))]

    def group_of(self, layer: int) -> int:
        for index, group in enumerate(self.groups):
            if layer in group.layers:
                return index
        raise OutOfRangeError(f"layer {layer} is out of range for {self.num_layers} layers")


def sequence_label(model_id: str, sequence_id: str) -> str:
    """`model_id/sequence_id` as messages show it (long ids cut)."""
    return f"{clipped(model_id, 48)}/{clipped(sequence_id, 64)}"
