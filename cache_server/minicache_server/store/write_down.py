"""The write-down at a graceful stop: what lives only on the device tier is moved to the
first persistent tier below it, so that the next start recovers it (`recovery.py`).

`CacheServer.stop` calls `write_down(store, time_limit_s)` after the gRPC server
stopped accepting and drained its calls, before the tiers close. For every committed
sequence (most recently used first) whose entries are on the device, each such entry
is demoted one tier down through the chain (`TierChain.demote`: the tier below makes
room by demoting its own coldest entries further down, as any demotion does), then the
sequence's manifests are written where they are stale or missing
(`SequenceStore.write_manifests`). A sequence none of whose entries are on the device
needs nothing: its manifests were written as its entries landed.

Bounded and never raising: the whole write-down stops at `time_limit_s` (the stop's
grace period); a sequence that cannot be written down (the tier below is full and is
the last one, a tier is down) is counted and the next one tried; when the time runs
out, the rest are counted. A sequence whose entries do not
all reach a persistent tier is dropped at the next start, like after a crash: device
content is lost on `kill -9` by nature. With no tier below the device this does
nothing. The caller logs the report: INFO what was written down, one WARNING line of
what was not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from minicache_client.errors import UnavailableError, clipped
from minicache_server.store.sequences import StoredSequence
from minicache_server.tiers.base import EntryKey, TierUnavailableError
from minicache_server.tiers.chain import NoRoomError

if TYPE_CHECKING:
    from minicache_server.store.sequence_store import SequenceStore

log = logging.getLogger(__name__)

# The WARNING line's list of reasons is cut to this many bytes.
REASONS_LIMIT = 400


@dataclass
class WriteDownReport:
    """What a write-down moved (`sequences`, `entries`, `bytes`) and what it could not
    (`lost_sequences`, `lost_bytes`: device bytes of those sequences; `reasons`: each
    kind of failure with its count and first message)."""

    target: str = ""
    sequences: int = 0
    entries: int = 0
    bytes: int = 0
    lost_sequences: int = 0
    lost_bytes: int = 0
    seconds: float = 0.0
    reasons: dict[str, tuple[int, str]] = field(default_factory=dict)

    def failed(self, sequences: list[tuple[StoredSequence, int]], kind: str, message: str) -> None:
        """`sequences` (with their device bytes) were not written down, for `kind`."""
        if not sequences:
            return
        self.lost_sequences += len(sequences)
        self.lost_bytes += sum(size for _, size in sequences)
        count, first = self.reasons.get(kind, (0, message))
        self.reasons[kind] = (count + len(sequences), first)

    def reasons_line(self) -> str:
        """The reasons as one bounded line: `kind x count (first message); ...`."""
        text = "; ".join(
            f"{kind} x{count} ({message})" for kind, (count, message) in self.reasons.items()
        )
        return clipped(text, REASONS_LIMIT)


def on_device(store: SequenceStore) -> list[tuple[StoredSequence, list[EntryKey]]]:
    """Committed sequences with entries on the device and those entries, most recently
    used first."""
    found: dict[tuple[str, str, str], tuple[StoredSequence, list[EntryKey]]] = {}
    for key in reversed(store.device.coldest()):
        sequence = store.sequences.get(key[:3])
        if sequence is None or sequence.generation != key.generation:
            continue  # a write that never committed: nothing would recover it
        found.setdefault(sequence.name, (sequence, []))[1].append(key)
    return [(sequence, sorted(keys)) for sequence, keys in found.values()]


async def write_down(store: SequenceStore, time_limit_s: float) -> WriteDownReport:
    """Move what lives only on the device to the tier below it (see the module
    docstring), within `time_limit_s`. Never raises (but for cancellation)."""
    chain = store.chain
    if not chain.lower:
        return WriteDownReport()
    report = WriteDownReport(target=chain.lower[0].name)
    started = time.monotonic()
    todo = [
        (sequence, keys, sum(store.device.size_of(key) for key in keys))
        for sequence, keys in on_device(store)
    ]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max(time_limit_s, 0.0)
    for index, (sequence, keys, size) in enumerate(todo):
        rest = [(later, later_size) for later, _, later_size in todo[index:]]
        if loop.time() >= deadline:
            report.failed(rest, "out of time", f"the grace period of {time_limit_s:g} s ran out")
            break
        try:
            async with asyncio.timeout_at(deadline):
                moved = await _write_sequence(store, sequence, keys, size)
        except TimeoutError:
            report.failed(rest, "out of time", f"the grace period of {time_limit_s:g} s ran out")
            break
        except NoRoomError as exc:
            report.failed(rest[:1], "no room", str(exc))
            continue
        except (TierUnavailableError, UnavailableError) as exc:
            report.failed(rest[:1], "tier unavailable", str(exc))
            continue
        except Exception as exc:  # never crash the stop: count it, go on
            log.debug("write-down of a sequence failed", exc_info=True)
            report.failed(rest[:1], "error", f"{type(exc).__name__}: {exc}")
            continue
        if moved is not None:
            report.sequences += 1
            report.entries += moved[0]
            report.bytes += moved[1]
    report.seconds = round(time.monotonic() - started, 3)
    return report


async def _write_sequence(
    store: SequenceStore, sequence: StoredSequence, keys: list[EntryKey], size: int
) -> tuple[int, int] | None:
    """Demote the sequence's device entries `keys` (`size` stored bytes) and write its
    manifests; (entries, bytes) moved, None when the sequence is gone meanwhile."""
    chain = store.chain
    target = chain.lower[0]
    free = target.free_bytes()
    if target is chain.tiers[-1] and free is not None and free < size:
        # Nothing below it to make room in: refuse the sequence whole rather than
        # leave pieces of it that the next start would only drop.
        raise NoRoomError(
            f"the {target.name} tier has {free} of {target.budget_bytes} bytes free, "
            f"{size} needed, and no tier is below it",
            retryable=False,
        )
    async with sequence.lock:  # its entries count as in use: no one else moves them
        if store.sequences.get(sequence.name) is not sequence:
            return None
        entries = moved = 0
        async with chain.lock:
            for key in keys:
                if not store.device.contains(key):
                    continue
                key_size = store.device.size_of(key)
                await chain.demote(key)
                if not store.device.contains(key) and chain.locate(key) is not None:
                    entries += 1
                    moved += key_size
        await store.write_manifests(sequence)
    return entries, moved
