"""`SequenceStore`: the cache server's domain, one object per server.

It holds the committed sequences (`sequences`, by tenant and ids) and the tier chain
their entries live in, answers the servicer's calls (see the package docstring) and
tells the chain which entries are in use (`is_busy`, `is_live`, `persisting`). The
work is in the modules beside it: `writes`, `reads`, `accounting`, `recovery`,
`write_down`, `manifest`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any

import numpy as np

from minicache_client.entry import CorruptEntryError, LayerGroupEntry
from minicache_client.errors import (
    CacheError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
    clipped,
)
from minicache_client.policy import (
    PRESETS,
    CompressionPolicy,
    ModelShape,
    policy_for_model,
)
from minicache_client.protocol import requested_policy
from minicache_client.results import LookupResult, PutResult, StatsResult
from minicache_server import artifacts
from minicache_server.domain import (
    PrefetchQuery,
    RestoredLayer,
    SequenceHeader,
    SequenceRef,
    StoredEntry,
)
from minicache_server.metrics import CacheMetrics
from minicache_server.store import accounting, reads, recovery, write_down
from minicache_server.store.manifest import encode_manifest
from minicache_server.store.sequences import Limits, StoredSequence, sequence_label
from minicache_server.store.writes import PutSession, room_error
from minicache_server.tiers.base import EntryKey, StorageTier, TierUnavailableError
from minicache_server.tiers.chain import LostEntryError, NoRoomError, TierChain
from minicache_server.tiers.device_tier import DeviceTier

log = logging.getLogger(__name__)


class SequenceStore:
    def __init__(
        self,
        chain: TierChain,
        metrics: CacheMetrics,
        limits: Limits,
        default_policy: CompressionPolicy = PRESETS["default"],
    ) -> None:
        self.chain = chain
        chain.residents = self
        self.metrics = metrics
        self.limits = limits
        self.default_policy = default_policy
        self.sequences: dict[tuple[str, str, str], StoredSequence] = {}
        # Bytes held by puts in progress (`PutSession._restage`), and the streamed puts
        # waiting for room to stage (`reserve_staging`), first come first served.
        self.staged_bytes = 0
        self._staging_waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()
        # The last generation handed out; generations of writes not committed yet.
        self.generation = 0
        self.pending: set[int] = set()
        self._cleanups: set[asyncio.Task] = set()
        self._fallback_logged: set[ModelShape] = set()
        metrics.watch(self)  # totals (bytes, sequences, ratio) are read at scrape time

    @property
    def device(self) -> DeviceTier:
        return self.chain.device

    @property
    def xp(self) -> ModuleType:
        return self.device.xp

    def to_device(self, array: np.ndarray) -> Any:
        return array if self.xp is np else self.xp.asarray(array)

    def resolve_policy(self, name_or_json: str, shape: ModelShape) -> CompressionPolicy:
        """A client's policy: a preset name or policy JSON (never a server-side path).

        Empty means the server's default (the operator may give it as a file path). A
        calibrated `default` serves the model it was calibrated for; any other model gets
        the uncalibrated fallback (logged once per shape; Lookup shows which).

        A transform policy needs its calibration artifact here: FailedPreconditionError
        naming the hash when the server lacks it or holds it corrupt, InvalidArgumentError
        when it does not fit the model (`minicache_server.artifacts`)."""
        policy = requested_policy(name_or_json) if name_or_json else self.default_policy
        try:
            chosen = policy_for_model(policy, shape)
        except ValueError as exc:
            raise InvalidArgumentError(f"policy: {clipped(str(exc), 200)}") from None
        artifacts.check_policy(chosen, shape)
        if chosen is not policy and shape not in self._fallback_logged:
            self._fallback_logged.add(shape)
            log.info(
                "default policy does not fit this model; using the fallback",
                extra={
                    "model_shape": f"{shape.num_layers}x{shape.kv_heads}x{shape.head_dim}",
                    "fallback": chosen.name,
                    "reason": policy.unfit_reason(shape),
                },
            )
        return chosen

    async def load_artifacts(self, tenant: str, header: SequenceHeader) -> None:
        """Read and verify, on a thread, the calibration artifact a write will need
        (its policy's, or for an extension the sequence's), so that the write's checks on
        the event loop find it in memory. What is wrong is left to those checks."""
        if header.start_token == 0:
            if not header.policy:
                return  # the default policy's was loaded at start
            try:
                policy = requested_policy(header.policy)
            except CacheError:
                return
        else:
            ref = header.sequence
            held = self.sequences.get((tenant, ref.model_id, ref.sequence_id))
            if held is None:
                return
            policy = held.policy
        await artifacts.preload(policy)

    def find(self, tenant: str, ref: SequenceRef) -> StoredSequence:
        sequence = self.sequences.get((tenant, ref.model_id, ref.sequence_id))
        if sequence is None:
            self.metrics.misses.inc(reason="unknown_sequence")
            raise NotFoundError(
                f"sequence {sequence_label(ref.model_id, ref.sequence_id)} is not held"
            )
        return sequence

    # -- the servicer's calls ---------------------------------------------------------

    def begin_put(self, tenant: str, header: SequenceHeader, streamed: bool = True) -> PutSession:
        return PutSession(self, tenant, header, streamed)

    def prefetch(
        self, tenant: str, query: PrefetchQuery
    ) -> AsyncIterator[SequenceHeader | RestoredLayer | StoredEntry]:
        return reads.prefetch(self, tenant, query)

    def lookup(self, tenant: str, ref: SequenceRef) -> LookupResult:
        return reads.lookup(self, tenant, ref)

    async def delete(self, tenant: str, ref: SequenceRef) -> bool:
        try:
            sequence = self.find(tenant, ref)
        except NotFoundError:
            return False
        await self.drop(sequence)
        return True

    def stats(self, tenant: str) -> StatsResult:
        return accounting.stats(self.chain, self.limits, self.sequences.values(), tenant)

    def put_result(self, sequence: StoredSequence) -> PutResult:
        return accounting.put_result(sequence)

    def check_quota(self, tenant: str, adding: int, replacing: StoredSequence | None) -> None:
        accounting.check_quota(self.limits, self.sequences.values(), tenant, adding, replacing)

    async def recover(self) -> recovery.RecoveryReport:
        """At start: serve again what the persistent tiers hold (`store/recovery.py`)."""
        return await recovery.recover(self)

    async def write_down(self, time_limit_s: float) -> write_down.WriteDownReport:
        """At a graceful stop: move what lives only on the device to the persistent
        tier below it, within `time_limit_s` (`store/write_down.py`)."""
        return await write_down.write_down(self, time_limit_s)

    async def close(self) -> None:
        if self._cleanups:
            await asyncio.gather(*self._cleanups, return_exceptions=True)
        for tier in self.chain.tiers:
            await tier.close()

    # -- staging of writes in progress --------------------------------------------------

    async def reserve_staging(self, nbytes: int, wait_s: float) -> bool:
        """Count `nbytes` more as staged once they fit the staging budget (the device
        budget), after the writes that asked before: True; False when `wait_s` passed
        first. A caller cancelled while it waits takes nothing."""
        waiter = (nbytes, asyncio.get_running_loop().create_future())
        self._staging_waiters.append(waiter)
        self.staging_released()  # granted at once when it fits and no one is ahead
        if waiter[1].done():
            return True
        try:
            async with asyncio.timeout(wait_s):
                await waiter[1]
        except BaseException as exc:
            if waiter[1].done() and not waiter[1].cancelled():
                self.staged_bytes -= nbytes  # granted as the wait ended: given back
            else:
                waiter[1].cancel()
            self.staging_released()
            if isinstance(exc, TimeoutError):
                return False
            raise
        return True

    @property
    def staging_waiting(self) -> int:
        """How many streamed puts wait for room to stage (read by metrics scrapes on
        their own thread: the queue is copied first)."""
        return sum(not future.done() for _, future in list(self._staging_waiters))

    def staging_released(self) -> None:
        """Staging was given back: let in the waiting writes that now fit, in order."""
        budget = self.device.budget_bytes
        waiters = self._staging_waiters
        while waiters:
            nbytes, future = waiters[0]
            if future.done():
                waiters.popleft()
            elif self.staged_bytes + nbytes <= budget:
                waiters.popleft()
                self.staged_bytes += nbytes
                future.set_result(None)
            else:
                break

    # -- generations of writes in progress ----------------------------------------------

    def begin_generation(self) -> int:
        self.generation += 1
        self.pending.add(self.generation)
        return self.generation

    def end_generation(self, generation: int, discard: list[EntryKey]) -> None:
        """The write of `generation` committed or failed; `discard`: its entries to
        delete (a failure). The device's are freed at once, the rest in the background
        (nothing reads them: their generation is no sequence's)."""
        self.pending.discard(generation)
        for key in discard:
            self.device.pop(key)
        lower = [key for key in discard if self.chain.locate(key) is not None]
        if lower:
            task = asyncio.get_running_loop().create_task(self.chain.delete(lower))
            self._cleanups.add(task)
            task.add_done_callback(self._cleanups.discard)

    # -- what the chain asks (`tiers.chain.Residents`) ------------------------------------

    def is_busy(self, key: EntryKey, own: int | None) -> bool:
        if key.generation == own:
            return False
        if key.generation in self.pending:
            return True
        sequence = self.sequences.get(key[:3])
        return (
            sequence is not None
            and sequence.generation == key.generation
            and sequence.lock.locked()
        )

    def is_live(self, key: EntryKey) -> bool:
        if key.generation in self.pending:
            return True
        sequence = self.sequences.get(key[:3])
        return sequence is not None and sequence.generation == key.generation

    async def persisting(self, key: EntryKey, tier: StorageTier) -> None:
        """Before an entry lands in a persistent tier: its sequence's manifest there
        (a write in progress writes its manifests when it commits)."""
        sequence = self.sequences.get(key[:3])
        if sequence is not None and sequence.generation == key.generation:
            await self._write_manifest(sequence, tier)

    async def _write_manifest(self, sequence: StoredSequence, tier: StorageTier) -> None:
        if sequence.manifests.get(tier.name) != sequence.state:
            await tier.put_manifest(sequence.name, encode_manifest(sequence))
            sequence.manifests[tier.name] = sequence.state

    # -- entries ------------------------------------------------------------------------

    async def place(
        self, key: EntryKey, entry: LayerGroupEntry, size: int, own: int, what: str
    ) -> None:
        """Place a write's entry in the chain; the domain error when it cannot."""
        async with self.chain.lock:
            try:
                await self.chain.place(key, entry, size, own)
            except (NoRoomError, TierUnavailableError) as exc:
                raise room_error(exc, f"{what} was not stored") from None

    async def entry(
        self, sequence: StoredSequence, group: int, promote: bool = True
    ) -> LayerGroupEntry:
        """The group's entry from whichever tier holds it. Caller holds the sequence's
        lock. An entry lost or failing verification loses the whole sequence: it is
        dropped and the read is a miss (`NotFoundError`)."""
        try:
            try:
                entry = await self.chain.read(sequence.key(group), promote)
            except TierUnavailableError as exc:
                raise UnavailableError(f"the entry's tier is down: {exc}") from None
            if entry.layers != sequence.groups[group].layers or entry.tokens != sequence.tokens:
                raise CorruptEntryError("entry does not belong to this sequence")
        except CorruptEntryError as exc:
            lost = isinstance(exc, LostEntryError)
            if not lost:
                self.metrics.corrupt_entries.inc()
            self.metrics.misses.inc(reason="lost_entry" if lost else "corrupt_entry")
            log.warning(
                "entry unusable; sequence dropped",
                extra={
                    "model_id": sequence.model_id,
                    "sequence_id": sequence.sequence_id,
                    "error": str(exc),
                },
            )
            await self.drop(sequence)
            raise NotFoundError(
                f"sequence {sequence_label(sequence.model_id, sequence.sequence_id)} was lost: "
                f"an entry is unusable ({exc}); recompute it"
            ) from None
        return entry

    # -- manifests and drops ------------------------------------------------------------

    async def write_manifests(self, sequence: StoredSequence) -> None:
        """The sequence's manifest in every persistent tier that holds one of its
        entries (where it is stale or missing)."""
        keys = sequence.entry_keys()
        for tier in self.chain.persistent:
            if any(tier.contains(key) for key in keys):
                try:
                    await self._write_manifest(sequence, tier)
                except TierUnavailableError as exc:
                    raise UnavailableError(f"the write was not stored: {exc}") from None

    async def delete_manifests(self, sequence: StoredSequence) -> None:
        for tier in self.chain.persistent:
            if tier.name in sequence.manifests:
                try:
                    await tier.delete_manifest(sequence.name)
                except TierUnavailableError as exc:
                    log.warning("manifest not deleted", extra={"error": str(exc)})
        sequence.manifests.clear()

    async def drop(self, sequence: StoredSequence) -> None:
        """Forget a sequence and free its entries and manifests in every tier."""
        if self.sequences.get(sequence.name) is sequence:
            del self.sequences[sequence.name]
        await self.chain.delete(sequence.entry_keys())
        await self.delete_manifests(sequence)
