"""Accounting: what sequences and tenants hold, by one count per entry.

Every entry counts `stored_bytes` (its encoding's length, metadata included) wherever
it is: Put's `stored_bytes`, Lookup's and Stats' device and overflow bytes (overflow:
every tier below the device) and `minicache_tier_bytes` add up the same numbers. The
tenant quota is checked against them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from minicache_client.errors import ResourceExhaustedError
from minicache_client.results import PutResult, StatsResult
from minicache_server.store.sequences import Limits, StoredSequence
from minicache_server.tiers.chain import TierChain


class ByteSplit(NamedTuple):
    device_bytes: int
    lower_bytes: int  # in the tiers below the device (disk, Redis)
    device_groups: int


def sequence_bytes(chain: TierChain, sequence: StoredSequence) -> ByteSplit:
    """Where a sequence's stored bytes are: the device tier, or below it."""
    device_bytes = device_groups = 0
    for group, size in enumerate(sequence.entry_bytes):
        if chain.device.contains(sequence.key(group)):
            device_bytes += size
            device_groups += 1
    return ByteSplit(device_bytes, sequence.stored_bytes - device_bytes, device_groups)


def check_quota(
    limits: Limits,
    held: Iterable[StoredSequence],
    tenant: str,
    adding: int,
    replacing: StoredSequence | None,
) -> None:
    """Refuse `adding` bytes for `tenant` beyond its quota (`replacing` is freed)."""
    quota = limits.tenant_quota_bytes
    if not quota:
        return
    total = sum(s.stored_bytes for s in held if s.tenant == tenant and s is not replacing)
    if total + adding > quota:
        raise ResourceExhaustedError(
            f"tenant quota of {quota} bytes exceeded: {total} held, this write needs {adding}"
        )


def stats(
    chain: TierChain, limits: Limits, held: Iterable[StoredSequence], tenant: str
) -> StatsResult:
    mine = [s for s in held if s.tenant == tenant]
    splits = [sequence_bytes(chain, s) for s in mine]
    lower = chain.lower
    return StatsResult(
        sequences=len(mine),
        tokens=sum(s.tokens for s in mine),
        device_bytes=sum(split.device_bytes for split in splits),
        overflow_bytes=sum(split.lower_bytes for split in splits),
        fp16_bytes=sum(s.fp16_bytes for s in mine),
        quota_bytes=limits.tenant_quota_bytes,
        device_budget_bytes=chain.device.budget_bytes,
        overflow_available=bool(lower) and all(tier.available for tier in lower),
    )


def put_result(sequence: StoredSequence) -> PutResult:
    """What a committed put or append answers."""
    return PutResult(
        tokens=sequence.tokens,
        stored_bytes=sequence.stored_bytes,
        fp16_bytes=sequence.fp16_bytes,
    )
