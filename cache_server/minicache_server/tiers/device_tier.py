"""The device tier: compressed entries in GPU memory (CuPy) or host memory (NumPy).

Entries are live `LayerGroupEntry` objects (merged directions, magnitudes, retained
tokens, quantized payloads) keyed by `EntryKey`, each made to own its memory by
`compact` (no view pins a larger buffer). Each is counted as every tier counts it, by
`stored_bytes` (its encoding's length), which the chain computes once per placement.
Order is least recently used first; the chain picks demotion victims from `coldest()`.
Nothing here does I/O: `put` and `get` are async only to honour the tier interface
(`tiers/base.py`); the store's in-place paths use `hold` and `peek`.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import ModuleType
from typing import Any

import numpy as np

from minicache_client.array_namespace import is_writeable
from minicache_client.codecs.base import has_spare_room
from minicache_client.entry import LayerGroupEntry
from minicache_server.tiers.base import EntryKey, IndexedTier

__all__ = ["DeviceTier", "EntryKey", "compact", "held_bytes"]


def held_bytes(entry: LayerGroupEntry) -> int:
    """Bytes of every buffer the entry holds in memory (exact once compacted); what the
    tier is charged is `stored_bytes`, the encoding's length, as every tier."""
    return sum(int(array.nbytes) for array in entry.arrays())


def compact(entry: LayerGroupEntry, xp: ModuleType = np) -> LayerGroupEntry:
    """Move the entry's arrays to `xp` and give each its own memory, in place.

    Views (a tail left after quantized blocks were cut from it, arrays decoded from an
    encoding) are copied; arrays that own their memory are kept, and so are the
    views a codec keeps with spare room behind them for appends (`has_spare_room`)."""

    def own(array: Any) -> Any:
        if xp is not np and not isinstance(array, xp.ndarray):
            return xp.asarray(array)
        if (array.base is not None or not is_writeable(array)) and not has_spare_room(array):
            return array.copy()
        return array

    for codec in entry.codecs():
        codec.map_arrays(own)
    return entry


class DeviceTier(IndexedTier):
    """Live entries under a byte budget, least recently used first."""

    persistent = False

    def __init__(self, budget_bytes: int, xp: ModuleType = np) -> None:
        super().__init__()
        if budget_bytes <= 0:
            raise ValueError(f"device budget must be > 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.xp = xp
        self.name = "gpu" if xp is not np else "host"
        self._entries: dict[EntryKey, LayerGroupEntry] = {}

    def __contains__(self, key: EntryKey) -> bool:
        return key in self._entries

    async def put(self, key: EntryKey, entry: LayerGroupEntry, size: int) -> None:
        self.hold(key, entry, size)

    def hold(self, key: EntryKey, entry: LayerGroupEntry, size: int) -> None:
        """Hold `entry` (compacted onto the tier's device) as most recently used, counted
        as `size` (its `stored_bytes`). Replaces an entry of the same key. The caller
        keeps the budget: this may leave the tier over it until the caller demotes."""
        self._entries[key] = compact(entry, self.xp)
        self._indexed(key, size)

    def resize(self, key: EntryKey, size: int) -> None:
        """Count a held entry, extended in place, as `size` bytes now. No compaction:
        an append leaves arrays that own their memory, or the views with spare room
        that `compact` keeps anyway."""
        if key not in self._entries:
            raise KeyError(key)
        self._indexed(key, size)

    async def get(self, key: EntryKey) -> LayerGroupEntry | None:
        return self.peek(key, touch=True)

    def peek(self, key: EntryKey, touch: bool = False) -> LayerGroupEntry | None:
        """The live entry without waiting (the device tier does no I/O)."""
        entry = self._entries.get(key)
        if entry is not None and touch:
            self._touched(key)
        return entry

    def pop(self, key: EntryKey) -> LayerGroupEntry | None:
        self._unindexed(key)
        return self._entries.pop(key, None)

    async def delete(self, keys: Iterable[EntryKey]) -> None:
        for key in keys:
            self.pop(key)
