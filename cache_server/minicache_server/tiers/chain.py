"""The tier chain: the configured tiers in order (device -> disk -> Redis, or any prefix
of it), and every move of an entry between them.

- `place(key, entry, size, own)`: a new or rewritten entry goes to the highest tier
  whose budget can hold it, making room there by demoting that tier's coldest entries
  one tier down (which may demote in turn). The last tier has nowhere to demote to: a
  full last tier refuses.
- `read(key, promote)`: the entry from whichever tier holds it, verified by that tier;
  an entry found below the device is promoted back to it when room can be made without
  touching entries in use (else it is served from where it is).
- `delete(keys)`: from every tier that holds them.
- `demote(key)`: one entry one tier down, as a full tier does; the store's write-down
  at a graceful stop (`store/write_down.py`) moves what lives only on the device this
  way to the first persistent tier.

Entries in use are never demoted by someone else: `Residents` (the store) says which
keys are in use (`is_busy`: a sequence being read or extended, a put in progress other
than `own`) and which still matter (`is_live`: an entry demoted while its sequence was
deleted or replaced is removed again at once). Before an entry first lands in a
persistent tier, `Residents.persisting` writes its sequence's manifest there. Every
move holds `lock`, so budgets are checked and changed by one request at a time.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from minicache_client.entry import CorruptEntryError, LayerGroupEntry
from minicache_server.metrics import CacheMetrics
from minicache_server.tiers.base import EntryKey, StorageTier, TierUnavailableError
from minicache_server.tiers.device_tier import DeviceTier
from minicache_server.tiers.encoded_tier import EncodedTier

log = logging.getLogger(__name__)

TIER_ORDER = ("device", "disk", "redis")


class LostEntryError(CorruptEntryError):
    """An entry is in no tier any more (evicted, expired, deleted behind our back)."""


class NoRoomError(Exception):
    """A tier cannot make room. `retryable`: entries in use hold the room (it frees up
    as their requests finish); else the budgets themselves are too small."""

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class Residents(Protocol):
    def is_busy(self, key: EntryKey, own: int | None) -> bool: ...

    def is_live(self, key: EntryKey) -> bool: ...

    async def persisting(self, key: EntryKey, tier: StorageTier) -> None: ...


def check_tier_order(names: list[str]) -> None:
    """`names` must be a prefix of device, disk, redis, or device then redis."""
    allowed = [["device"], ["device", "disk"], ["device", "redis"], list(TIER_ORDER)]
    if names not in allowed:
        shown = ", ".join(",".join(option) for option in allowed)
        raise ValueError(f"tiers {','.join(names)!r} is not one of: {shown}")


class TierChain:
    def __init__(self, tiers: list[StorageTier], metrics: CacheMetrics) -> None:
        if not tiers or not isinstance(tiers[0], DeviceTier):
            raise ValueError("a tier chain starts with the device tier")
        self.tiers = tiers
        self.device: DeviceTier = tiers[0]
        self.metrics = metrics
        self.residents: Residents | None = None
        self.lock = asyncio.Lock()

    @property
    def lower(self) -> list[StorageTier]:
        """The tiers below the device."""
        return self.tiers[1:]

    @property
    def persistent(self) -> list[StorageTier]:
        return [tier for tier in self.tiers if tier.persistent]

    def tier(self, name: str) -> StorageTier | None:
        return next((tier for tier in self.tiers if tier.name == name), None)

    def locate(self, key: EntryKey) -> StorageTier | None:
        return next((tier for tier in self.tiers if tier.contains(key)), None)

    def capacity(self) -> int | None:
        """Stored bytes the chain can hold at most; None: unbounded (Redis is in it)."""
        if any(tier.budget_bytes is None for tier in self.tiers):
            return None
        return sum(tier.budget_bytes for tier in self.tiers)

    # -- placement and demotion (callers hold `lock`) --------------------------------

    async def place(self, key: EntryKey, entry: LayerGroupEntry, size: int, own: int) -> None:
        """Put a new or rewritten entry into the highest tier that can take it (see the
        module docstring). Raises `NoRoomError` when none can, `TierUnavailableError`
        when a tier it needs does not answer."""
        refusals = []
        for index, tier in enumerate(self.tiers):
            if tier.budget_bytes is not None and size > tier.budget_bytes:
                refusals.append(f"{tier.name}: budget {tier.budget_bytes} bytes")
                continue
            try:
                await self.make_room(index, size, own)
            except NoRoomError as exc:
                if index + 1 < len(self.tiers):
                    refusals.append(f"{tier.name}: {exc}")
                    continue
                raise NoRoomError(
                    f"no tier can hold an entry of {size} bytes ({'; '.join([*refusals, str(exc)])})",
                    exc.retryable or any("in use" in refusal for refusal in refusals),
                ) from None
            if tier.persistent:
                await self.residents.persisting(key, tier)
            await tier.put(key, entry, size)
            return
        raise NoRoomError(
            f"an entry of {size} bytes is larger than every tier's budget ({'; '.join(refusals)})",
            retryable=False,
        )

    async def make_room(self, index: int, size: int, own: int | None) -> None:
        tier = self.tiers[index]
        free = tier.free_bytes()
        if free is None or free >= size:
            return
        last = index + 1 == len(self.tiers)
        if last:
            raise NoRoomError(
                f"the {tier.name} tier's budget of {tier.budget_bytes} bytes is full "
                f"({tier.used_bytes} held) and no tier is below it",
                retryable=False,
            )
        for key in tier.coldest():
            if tier.free_bytes() >= size:
                return
            if self.residents.is_busy(key, own) or not tier.contains(key):
                continue
            await self._demote(key, index, own)
        if tier.free_bytes() < size:
            raise NoRoomError(
                f"the {tier.name} tier's budget of {tier.budget_bytes} bytes cannot make room "
                f"for {size} bytes now: the rest is in use by requests in progress",
                retryable=True,
            )

    async def demote(self, key: EntryKey) -> None:
        """Move `key` from the tier that holds it to the next one, making room there as
        placement does (`NoRoomError`, `TierUnavailableError` when it cannot). Caller
        holds `lock`; a key in no tier or in the last one is left as it is."""
        tier = self.locate(key)
        if tier is None or tier is self.tiers[-1]:
            return
        await self._demote(key, self.tiers.index(tier), None)

    async def _demote(self, key: EntryKey, index: int, own: int | None) -> None:
        """Move one entry from tier `index` to the next one."""
        source, target = self.tiers[index], self.tiers[index + 1]
        size = source.size_of(key)
        data = None
        if isinstance(source, DeviceTier):
            entry = source.peek(key)
        else:
            try:
                found = await source.get_encoded(key)
            except CorruptEntryError as exc:
                self.metrics.corrupt_entries.inc()
                log.warning("corrupt entry dropped on demotion", extra={"error": str(exc)})
                await self._forget(source, [key])
                return
            if found is None:
                return
            entry, data = found
        await self.make_room(index + 1, size, own)
        if target.persistent:
            await self.residents.persisting(key, target)
        if data is not None and isinstance(target, EncodedTier):
            await target.put_encoded(key, data)
        else:
            await target.put(key, entry, size)
        if not source.contains(key) or not self.residents.is_live(key):
            # Deleted or replaced while it was being written: drop the orphan.
            await self._forget(target, [key])
            return
        await source.delete([key])
        self.metrics.evictions.inc()

    # -- reads ------------------------------------------------------------------------

    async def read(self, key: EntryKey, promote: bool = True) -> LayerGroupEntry:
        """The entry, verified; promoted to the device when `promote` and room can be
        made. `LostEntryError` when no tier holds it; `CorruptEntryError` when it failed
        verification (it is deleted); `TierUnavailableError` when its tier is down."""
        tier = self.locate(key)
        if tier is None:
            raise LostEntryError("entry is in no tier (evicted, expired or deleted)")
        if tier is self.device:
            self.metrics.hits.inc(tier=tier.name)
            return self.device.peek(key, touch=True)
        try:
            entry = await tier.get(key)
        except CorruptEntryError:
            await self._forget(tier, [key])
            raise
        if entry is None:
            raise LostEntryError(f"entry is gone from the {tier.name} tier")
        self.metrics.hits.inc(tier=tier.name)
        if promote:
            await self._promote(key, entry, tier)
        return entry

    async def _promote(self, key: EntryKey, entry: LayerGroupEntry, source: StorageTier) -> None:
        size = source.size_of(key) if source.contains(key) else None
        if size is None or size > self.device.budget_bytes:
            return
        async with self.lock:
            if not source.contains(key) or not self.residents.is_live(key):
                return
            try:
                await self.make_room(0, size, None)
            except (NoRoomError, TierUnavailableError) as exc:
                log.debug("served without promotion", extra={"reason": str(exc)})
                return
            self.device.hold(key, entry, size)
            await self._forget(source, [key])
        self.metrics.promotions.inc()

    # -- deletes ----------------------------------------------------------------------

    async def delete(self, keys: list[EntryKey]) -> None:
        """Delete `keys` from every tier that holds them; a tier that is down keeps its
        copies (never served again: their generation is gone; a TTL, if set, reclaims)."""
        for tier in self.tiers:
            await self._forget(tier, [key for key in keys if tier.contains(key)])

    async def _forget(self, tier: StorageTier, keys: list[EntryKey]) -> None:
        if not keys:
            return
        try:
            await tier.delete(keys)
        except TierUnavailableError as exc:
            log.warning("could not delete entries", extra={"tier": tier.name, "error": str(exc)})
