"""Recovery after a restart: the sequences the persistent tiers (disk, Redis) still
hold, found from the manifests kept beside their entries.

For each sequence the newest manifest (highest generation, then tokens) of any tier is
taken; the sequence is served again only when every one of its entries is in some
persistent tier with the size the manifest records. A sequence whose pieces are
incomplete (an entry that lived only on the device, or was lost) is dropped: its
entries and manifests are deleted, never served.

What the device tier held survives only a graceful stop: `CacheServer.stop` (SIGTERM,
SIGINT) writes every committed sequence's device-only entries down to the persistent
tier below the device, with their manifests, within the grace period
(`write_down.py`), so the next start finds those sequences whole. A crash (`kill -9`,
an OOM kill, a power loss) writes nothing down: the device's content is lost by nature,
and a sequence that had any entry only there is dropped here, as is one the write-down
could not finish (a full last tier, Redis down, the grace period spent). Entry files on disk that no recovered
sequence claims are deleted too. Nothing is decoded here: every entry is verified when
it is read, like any read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from minicache_client.entry import CorruptEntryError
from minicache_server.store.manifest import decode_manifest
from minicache_server.store.sequences import StoredSequence
from minicache_server.tiers.base import EntryKey, SequenceName, TierUnavailableError
from minicache_server.tiers.disk_tier import DiskTier

if TYPE_CHECKING:
    from minicache_server.store.sequence_store import SequenceStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecoveryReport:
    recovered: int = 0
    dropped: int = 0
    unreadable_manifests: int = 0
    orphan_files: int = 0


async def recover(store: SequenceStore) -> RecoveryReport:
    """Find again what the persistent tiers hold (see the module docstring)."""
    chain = store.chain
    newest: dict[SequenceName, StoredSequence] = {}
    states: dict[SequenceName, dict[str, tuple[int, int]]] = {}
    unreadable = 0
    highest = 0
    for tier in chain.persistent:
        try:
            blobs = await tier.manifests()
        except TierUnavailableError as exc:
            log.warning("no recovery from an unavailable tier", extra={"error": str(exc)})
            continue
        for blob in blobs:
            try:
                sequence = decode_manifest(blob)
            except CorruptEntryError as exc:
                unreadable += 1
                log.warning(
                    "unreadable manifest skipped", extra={"tier": tier.name, "error": str(exc)}
                )
                continue
            highest = max(highest, sequence.generation)
            states.setdefault(sequence.name, {})[tier.name] = sequence.state
            held = newest.get(sequence.name)
            if held is None or sequence.state > held.state:
                newest[sequence.name] = sequence
    recovered = dropped = 0
    for name, sequence in newest.items():
        keys = sequence.entry_keys()
        found: dict[EntryKey, int] = {}
        for tier in chain.persistent:
            missing = [key for key in keys if key not in found]
            try:
                found.update(await tier.recover_entries(missing))
            except TierUnavailableError as exc:
                log.warning("entries not looked up", extra={"tier": tier.name, "error": str(exc)})
        complete = all(
            found.get(key) == size for key, size in zip(keys, sequence.entry_bytes, strict=True)
        )
        if complete:
            sequence.manifests = {
                tier: state for tier, state in states[name].items() if state == sequence.state
            }
            store.sequences[name] = sequence
            recovered += 1
            continue
        dropped += 1
        log.warning(
            "incomplete sequence dropped at recovery",
            extra={
                "model_id": sequence.model_id,
                "sequence_id": sequence.sequence_id,
                "entries_found": len(found),
                "entries": len(keys),
            },
        )
        await chain.delete(list(found))
        sequence.manifests = dict(states[name])
        await store.delete_manifests(sequence)
    orphans = 0
    for tier in chain.persistent:
        if isinstance(tier, DiskTier):
            highest = max([highest, *(key.generation for key in tier.found)])
            orphans += await tier.remove_orphans()
    store.generation = max(store.generation, highest)
    return RecoveryReport(recovered, dropped, unreadable, orphans)
