"""The storage-tier interface: what every tier of the cache server offers.

A tier holds layer-group entries (`minicache_client.entry.LayerGroupEntry`) under an
`EntryKey` and counts each by one number, `stored_bytes(entry)` (the length of its
checksummed encoding, metadata included), the same number Put, Lookup, Stats and the
metrics report. Tiers are chained (`tiers/chain.py`, `TierChain`): device -> disk ->
Redis, or any prefix of it; no caller of the chain knows which tier it talks to.

Primitives (abstract unless marked as a hook), and who calls them:

- `name` (attribute): the tier's label in metrics (`minicache_tier_bytes{tier=...}`,
  `minicache_hits_total{tier=...}`) and in messages. Read by `TierChain` and
  `metrics.StoreTotals`.
- `budget_bytes` (attribute): stored bytes the tier may hold; None: unbounded (Redis,
  whose own `maxmemory` policy is the operator's). `TierChain` makes room against it.
- `persistent` (attribute): the tier outlives the server process (disk, Redis): it
  also keeps sequence manifests and `SequenceStore.recover` reads them at start.
- `contains(key)`, `size_of(key)`, `used_bytes`, `coldest()`: the tier's index of what
  it holds, kept in memory so that Lookup, Stats and eviction never wait on I/O
  (`IndexedTier` implements them). `TierChain` and the store's accounting call them.
- `put(key, entry, size)` (async): hold the entry; returns once it is durable in the
  tier (Redis acknowledged; the file fsync'd and renamed). Called by `TierChain` when it
  places, demotes or promotes an entry. May leave a bounded tier over its budget: the
  chain makes room first.
- `get(key)` (async): the entry, verified (`decode_entry`: checksum and structure; the
  key bound inside the stored bytes), or None when the tier does not hold it. An entry
  that fails verification raises `CorruptEntryError`: the chain deletes it and the
  read is a miss, never data. Called by `TierChain.read` and demotion.
- `delete(keys)` (async): forget entries (absent ones are ignored). Called by the
  chain when a sequence is deleted, replaced or lost, and after a promotion.
- `available` (attribute): False after the tier failed to answer (Redis down, disk
  unwritable) until it answers again. Stats and `minicache_overflow_available` read it.
- hook `recover_entries(keys)` (async): for recovery, which of `keys` the tier still
  holds and their stored bytes; added to the index. Default: none (the device tier
  starts empty).
- hooks `put_manifest(name, data)`, `delete_manifest(name)`, `manifests()` (async):
  the sequence manifests of a persistent tier (`store/manifest.py` encodes them).
  Defaults: nothing kept.
- hook `ping()`, `close()` (async): start-up check and shutdown. Called by the server.

Failures: a tier that cannot answer raises `TierUnavailableError` (a retry can help);
the chain turns it into UNAVAILABLE or, on a read path that can do without the tier,
into a miss.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterable
from typing import NamedTuple
from urllib.parse import quote, unquote

from minicache_client.entry import LayerGroupEntry


class EntryKey(NamedTuple):
    """One layer group of one sequence generation within a tenant."""

    tenant: str
    model_id: str
    sequence_id: str
    generation: int
    group: int


class SequenceName(NamedTuple):
    """A sequence within a tenant: what a manifest is kept under."""

    tenant: str
    model_id: str
    sequence_id: str


class TierUnavailableError(RuntimeError):
    """A tier did not answer (Redis down or timed out, the disk unwritable)."""


def entry_name(key: EntryKey) -> str:
    """`tenant:model_id:sequence_id:generation:group`, ids escaped (no ':' inside): the
    name an entry is stored and bound under in a persistent tier."""
    ids = ":".join(quote(part, safe="") for part in key[:3])
    return f"{ids}:{key.generation}:{key.group}"


def manifest_name(name: SequenceName) -> str:
    """`tenant:model_id:sequence_id:manifest`, ids escaped: four parts where an entry's
    name has five, so the two never collide."""
    return ":".join(quote(part, safe="") for part in name) + ":manifest"


def parse_entry_name(text: str) -> EntryKey | None:
    """The key of an `entry_name`, None when `text` is not one."""
    parts = text.split(":")
    if len(parts) != 5 or not (parts[3].isdigit() and parts[4].isdigit()):
        return None
    tenant, model_id, sequence_id = (unquote(part) for part in parts[:3])
    return EntryKey(tenant, model_id, sequence_id, int(parts[3]), int(parts[4]))


class StorageTier(ABC):
    """One tier of the chain (see the module docstring for every primitive)."""

    name: str
    budget_bytes: int | None = None
    persistent: bool = False
    available: bool = True

    @abstractmethod
    def contains(self, key: EntryKey) -> bool: ...

    @abstractmethod
    def size_of(self, key: EntryKey) -> int:
        """Stored bytes of a held entry (KeyError when not held)."""

    @property
    @abstractmethod
    def used_bytes(self) -> int: ...

    @abstractmethod
    def coldest(self) -> list[EntryKey]:
        """Held keys from least to most recently used (a snapshot)."""

    @abstractmethod
    async def put(self, key: EntryKey, entry: LayerGroupEntry, size: int) -> None: ...

    @abstractmethod
    async def get(self, key: EntryKey) -> LayerGroupEntry | None: ...

    @abstractmethod
    async def delete(self, keys: Iterable[EntryKey]) -> None: ...

    def free_bytes(self) -> int | None:
        """Room left under the budget; None: unbounded."""
        if self.budget_bytes is None:
            return None
        return self.budget_bytes - self.used_bytes

    async def recover_entries(self, keys: list[EntryKey]) -> dict[EntryKey, int]:
        return {}

    async def put_manifest(self, name: SequenceName, data: bytes) -> None:
        return None

    async def delete_manifest(self, name: SequenceName) -> None:
        return None

    async def manifests(self) -> list[bytes]:
        return []

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None


class IndexedTier(StorageTier):
    """A tier whose index (key -> stored bytes, least recently used first) lives in
    memory: `contains`, `size_of`, `used_bytes` and `coldest` never do I/O."""

    def __init__(self) -> None:
        self._index: OrderedDict[EntryKey, int] = OrderedDict()
        self._used = 0

    def contains(self, key: EntryKey) -> bool:
        return key in self._index

    def size_of(self, key: EntryKey) -> int:
        return self._index[key]

    @property
    def used_bytes(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._index)

    def coldest(self) -> list[EntryKey]:
        return list(self._index)

    def _indexed(self, key: EntryKey, size: int) -> None:
        """Record `key` as held with `size` bytes, most recently used."""
        self._unindexed(key)
        self._index[key] = size
        self._used += size

    def _unindexed(self, key: EntryKey) -> bool:
        size = self._index.pop(key, None)
        if size is None:
            return False
        self._used -= size
        return True

    def _touched(self, key: EntryKey) -> None:
        if key in self._index:
            self._index.move_to_end(key)
