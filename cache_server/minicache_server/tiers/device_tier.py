"""The device tier: compressed entries in GPU memory (CuPy) or host memory (NumPy).

Entries are live `LayerGroupEntry` objects (merged directions, magnitudes, retained
tokens, quantized payloads) keyed by `EntryKey`. Their size is counted exactly from
the buffers they hold: `held_bytes` sums `nbytes` of every array after `compact` made
each array own its memory (no view pins a larger buffer). Order is least recently used
first; the store picks eviction victims from `coldest()`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from minicache_client.codecs.base import has_spare_room
from minicache_client.entry import LayerGroupEntry


class EntryKey(NamedTuple):
    """One layer group of one sequence generation within a tenant."""

    tenant: str
    model_id: str
    sequence_id: str
    generation: int
    group: int


def held_bytes(entry: LayerGroupEntry) -> int:
    """Bytes of every buffer the entry holds (exact once compacted)."""
    return sum(int(array.nbytes) for array in entry.arrays())


def compact(entry: LayerGroupEntry, xp: ModuleType = np) -> LayerGroupEntry:
    """Move the entry's arrays to `xp` and give each its own memory, in place.

    Views (a tail left after quantized blocks were cut from it, arrays decoded from an
    encoding) are copied; arrays that own their memory are kept, and so are the
    views a codec keeps with spare room behind them for appends (`has_spare_room`)."""

    def own(array: Any) -> Any:
        if xp is not np and not isinstance(array, xp.ndarray):
            return xp.asarray(array)
        if (array.base is not None or not array.flags.writeable) and not has_spare_room(array):
            return array.copy()
        return array

    for codec in entry.codecs():
        codec.map_arrays(own)
    return entry


class DeviceTier:
    """Entries under a byte budget, least recently used first."""

    def __init__(self, budget_bytes: int, xp: ModuleType = np) -> None:
        if budget_bytes <= 0:
            raise ValueError(f"device budget must be > 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.xp = xp
        self.used_bytes = 0
        self._entries: OrderedDict[EntryKey, tuple[LayerGroupEntry, int]] = OrderedDict()

    @property
    def name(self) -> str:
        return "gpu" if self.xp is not np else "host"

    def __contains__(self, key: EntryKey) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def free_bytes(self) -> int:
        return self.budget_bytes - self.used_bytes

    def put(self, key: EntryKey, entry: LayerGroupEntry) -> int:
        """Hold `entry` (compacted onto the tier's device) as most recently used; returns
        its size. Replaces an entry of the same key. The caller keeps the budget: this
        may leave the tier over it until the caller evicts."""
        compact(entry, self.xp)
        size = held_bytes(entry)
        self.pop(key)
        self._entries[key] = (entry, size)
        self.used_bytes += size
        return size

    def get(self, key: EntryKey, touch: bool = True) -> LayerGroupEntry | None:
        item = self._entries.get(key)
        if item is None:
            return None
        if touch:
            self._entries.move_to_end(key)
        return item[0]

    def size_of(self, key: EntryKey) -> int:
        return self._entries[key][1]

    def pop(self, key: EntryKey) -> LayerGroupEntry | None:
        item = self._entries.pop(key, None)
        if item is None:
            return None
        self.used_bytes -= item[1]
        return item[0]

    def coldest(self) -> Iterator[EntryKey]:
        """Keys from least to most recently used (a snapshot)."""
        return iter(list(self._entries))
