"""The cache server's domain: sequences of tenants, their entries in the tiers.

Primitives (called by the gRPC servicer, one per RPC, with the protobuf-free types of
`minicache_server.domain`; the servicer converts the messages):

- `begin_put(tenant, header) -> PutSession`, then, inside `with session:`,
  `PutSession.add_chunk(chunk)` per chunk and `PutSession.commit()`: a write from token 0
  (new, or replacing) or from the tokens held (an extension). Layers are encoded as they
  complete (a merged pair as soon as both layers are in, raw layers dropped); nothing is
  visible before `commit`, and a failed or cancelled put leaves the sequence as it was.
  A header that declares more than the device budget can hold is refused at once; the
  bytes a put holds while it streams (layers being assembled, encoded entries, raw
  layers of an extension) are its staging, bounded by the device budget for each put
  and for all puts in progress together, released when the `with` block ends. A
  committed write sets the sequence's tag (opaque bytes, a label of its content) to
  the header's, empty clearing it; `lookup` returns it.
- `prefetch(tenant, query)`: async iterator of the answer's `SequenceHeader`, then
  `RestoredLayer`s or `StoredEntry`s.
- `lookup -> LookupResult`, `delete -> bool`, `stats -> StatsResult`; a commit's
  `put_result -> PutResult` (`minicache_client.results`, what the client gets too).

Entries live in the device tier under its byte budget; admission evicts least recently
used entries of idle sequences to Redis, freeing each only after Redis acknowledged. A
prefetch or extension of an overflowed entry promotes it back. An entry that fails
verification on its way back loses the whole sequence: it is deleted and reads miss.
Errors are the typed `minicache_client.errors` classes; the servicer maps them to codes.
Ids and tags arrive checked (`minicache_client.protocol`'s rules, the client's own, applied
as the messages are converted); policy text is checked here by the same rules.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from minicache_client.array_namespace import CARRIER_DTYPES, to_numpy
from minicache_client.entry import (
    CorruptEntryError,
    LayerGroupEntry,
    decode_entry,
    encode_entry,
    fp16_bytes,
)
from minicache_client.errors import (
    CacheError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    ResourceExhaustedError,
    UnavailableError,
    clipped,
)
from minicache_client.policy import (
    PRESETS,
    CompressionPolicy,
    LayerGroup,
    ModelShape,
    policy_for_model,
)
from minicache_client.protocol import requested_policy
from minicache_client.restore import restore_group
from minicache_client.results import LookupResult, PutResult, StatsResult
from minicache_client.sequence_encoder import SequenceEncoder, check_finite
from minicache_client.wire import LayerAssembler
from minicache_server.domain import (
    LayerChunk,
    PrefetchQuery,
    RestoredLayer,
    SequenceHeader,
    SequenceRef,
    StoredEntry,
)
from minicache_server.metrics import CacheMetrics
from minicache_server.tiers.device_tier import DeviceTier, EntryKey, held_bytes
from minicache_server.tiers.redis_tier import OverflowUnavailableError, RedisTier

log = logging.getLogger(__name__)

# No policy stores a KV value in less than one bit (2-bit quantization of both layers
# of a merged pair): what a header declares can be refused before any byte arrives.
MIN_STORED_BITS_PER_VALUE = 1


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
    """What the server knows of one committed sequence (its entries are in the tiers)."""

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
    # Overflowed groups: group index -> bytes of its encoding in Redis.
    overflow_bytes: dict[int, int] = field(default_factory=dict)
    fp16_bytes: int = 0
    # Opaque label of the content, set by the last committed write (b"": none).
    tag: bytes = b""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def name(self) -> tuple[str, str, str]:
        """The sequence's key in `SequenceStore.sequences` (and an `EntryKey`'s first three)."""
        return (self.tenant, self.model_id, self.sequence_id)

    def key(self, group: int) -> EntryKey:
        return EntryKey(*self.name, self.generation, group)

    def group_of(self, layer: int) -> int:
        for index, group in enumerate(self.groups):
            if layer in group.layers:
                return index
        raise OutOfRangeError(f"layer {layer} is out of range for {self.num_layers} layers")


class LostEntryError(CorruptEntryError):
    """An overflowed entry is no longer in Redis."""


def sequence_label(model_id: str, sequence_id: str) -> str:
    """`model_id/sequence_id` as messages show it (long ids cut)."""
    return f"{clipped(model_id, 48)}/{clipped(sequence_id, 64)}"


class PutSession:
    """One write in progress (see the module docstring)."""

    def __init__(self, store: SequenceStore, tenant: str, header: SequenceHeader) -> None:
        self.store = store
        self.tenant = tenant
        self.model_id = header.sequence.model_id
        self.sequence_id = header.sequence.sequence_id
        self.tag = header.tag
        limits = store.limits
        for name, value, limit in (
            ("num_layers", header.num_layers, limits.max_layers),
            ("kv_heads", header.kv_heads, limits.max_kv_heads),
            ("head_dim", header.head_dim, limits.max_head_dim),
        ):
            if value == 0:
                raise InvalidArgumentError(f"{name} must be >= 1")
            if value > limit:
                raise ResourceExhaustedError(f"{name} {value} is above this server's limit {limit}")
        self.dtype = header.dtype
        self.start, self.end = header.start_token, header.end_token
        if self.end <= self.start:
            raise InvalidArgumentError(
                f"token range [{self.start}, {self.end}) is empty or reversed"
            )
        if self.end > limits.max_tokens:
            raise ResourceExhaustedError(
                f"end_token {self.end} is above this server's limit of {limits.max_tokens} "
                "tokens per sequence"
            )
        self.seal = header.seal
        self.shape = (header.num_layers, header.kv_heads, header.head_dim)
        # One layer's keys and values as they arrive; the bytes this put stages now.
        self.layer_bytes = (
            2 * header.kv_heads * (self.end - self.start) * header.head_dim
        ) * CARRIER_DTYPES[self.dtype].itemsize
        self.staged = 0
        self.existing = store.sequences.get((tenant, self.model_id, self.sequence_id))
        if self.start == 0:
            self.policy = store.resolve_policy(header.policy, ModelShape(*self.shape))
            self.encoder = SequenceEncoder(
                self.policy,
                num_layers=header.num_layers,
                kv_heads=header.kv_heads,
                head_dim=header.head_dim,
                dtype=self.dtype,
            )
        else:
            self._check_extension(header)
            self.encoder = None
        self._check_declared_size()
        self.assembler = LayerAssembler(
            header.num_layers, header.kv_heads, self.end - self.start, header.head_dim, self.dtype
        )
        self.layers: dict[int, tuple[Any, Any]] = {}
        self.encoded_bytes = 0

    def __enter__(self) -> PutSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._restage(0)

    def _check_declared_size(self) -> None:
        """Refuse a write whose header alone shows it cannot fit the device budget."""
        budget = self.store.device.budget_bytes
        what = (
            f"{self.end - self.start} tokens x {self.shape[0]} layers x {self.shape[1]} heads "
            f"x {self.shape[2]} in {self.dtype}"
        )
        if self.layer_bytes > budget:
            raise ResourceExhaustedError(
                f"one layer of this put ({what}) takes {self.layer_bytes} bytes, more than "
                f"the device budget of {budget} bytes"
            )
        raw = self.layer_bytes * self.shape[0]
        stores_raw = self.encoder is None or (
            self.policy.merge is None and self.policy.quantization is None
        )
        # An extension holds its raw tokens until it commits.
        values = raw // CARRIER_DTYPES[self.dtype].itemsize
        least = raw if stores_raw else values * MIN_STORED_BITS_PER_VALUE // 8
        if least > budget:
            raise ResourceExhaustedError(
                f"this put ({what}) stores at least {least} bytes, more than the device "
                f"budget of {budget} bytes"
            )

    def _restage(self, staged: int) -> None:
        """Hold `staged` bytes of staging: at most the device budget for this put, and
        for every put in progress together (beyond that a retry can help)."""
        store = self.store
        budget = store.device.budget_bytes
        others = store.staged_bytes - self.staged
        if staged > self.staged:
            if staged > budget:
                raise ResourceExhaustedError(
                    f"this put stages {staged} bytes as it streams, more than the device "
                    f"budget of {budget} bytes: the sequence does not fit this server"
                )
            if others + staged > budget:
                raise UnavailableError(
                    f"puts in progress stage {others} bytes of the {budget} this server "
                    "allows for them; retry shortly"
                )
        store.staged_bytes = others + staged
        self.staged = staged

    def _staging(self) -> int:
        """The bytes this put holds now: raw layers (being assembled, waiting for a merge
        partner, or held for an extension) and the entries encoded so far."""
        assembler = self.assembler
        assembling = sum(1 for layer in assembler.filled if layer not in assembler.complete)
        waiting = len(self.encoder.pending) if self.encoder is not None else 0
        raw_layers = assembling + waiting + len(self.layers)
        return raw_layers * self.layer_bytes + self.encoded_bytes

    def _check_extension(self, header: SequenceHeader) -> None:
        existing = self.existing
        if existing is None:
            raise NotFoundError(
                f"sequence {sequence_label(self.model_id, self.sequence_id)} is not held: "
                "write it from token 0"
            )
        if self.start != existing.tokens:
            raise OutOfRangeError(
                f"sequence holds {existing.tokens} tokens: a put starts at 0 (replace) or "
                f"at {existing.tokens} (extend), not at {self.start}"
            )
        held = (existing.num_layers, existing.kv_heads, existing.head_dim)
        if self.shape != held or self.dtype != existing.dtype:
            raise InvalidArgumentError(
                f"extension of layers/heads/head_dim {self.shape} in {self.dtype} does not "
                f"match the sequence's {held} in {existing.dtype}"
            )
        if (
            header.policy
            and self.store.resolve_policy(header.policy, ModelShape(*held)) != existing.policy
        ):
            raise InvalidArgumentError("an extension cannot change the sequence's policy")
        self.policy = existing.policy

    async def add_chunk(self, chunk: LayerChunk) -> None:
        size = len(chunk.keys) + len(chunk.values)
        if size > self.store.limits.max_chunk_bytes:
            raise ResourceExhaustedError(
                f"chunk of {size} bytes is above the limit of {self.store.limits.max_chunk_bytes}"
            )
        if chunk.layer < self.shape[0] and chunk.layer not in self.assembler.filled:
            # A new layer: its room is taken before its bytes are copied.
            self._restage(self.staged + self.layer_bytes)
        layer = self.assembler.add(chunk)
        if layer is None:
            return
        keys, values = (self.store.to_device(array) for array in layer)
        try:
            for name, array in (("keys", keys), ("values", values)):
                check_finite(array, self.dtype, f"layer {chunk.layer} {name}")
            if self.encoder is None:
                self.layers[chunk.layer] = (keys, values)  # applied at commit, all or nothing
            else:
                await asyncio.to_thread(
                    self.encoder.put_layer, chunk.layer, keys, values, self.seal
                )
                self.encoded_bytes = sum(held_bytes(entry) for entry in self.encoder.entries)
        except ValueError as exc:  # the engine's checks of the tensors
            if isinstance(exc, CacheError):
                raise
            raise InvalidArgumentError(str(exc)) from None
        self._restage(self._staging())

    async def commit(self) -> StoredSequence:
        missing = self.assembler.missing_layers()
        if missing:
            shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
            raise FailedPreconditionError(f"put ended with layers missing: {shown}")
        if self.encoder is not None:
            return await self.store.commit_new(self)
        return await self.store.commit_extension(self)


class SequenceStore:
    def __init__(
        self,
        device_tier: DeviceTier,
        overflow: RedisTier | None,
        metrics: CacheMetrics,
        limits: Limits,
        default_policy: CompressionPolicy = PRESETS["default"],
    ) -> None:
        self.device = device_tier
        self.overflow = overflow
        self.metrics = metrics
        self.limits = limits
        self.default_policy = default_policy
        self.sequences: dict[tuple[str, str, str], StoredSequence] = {}
        # Bytes held by puts in progress (`PutSession._restage`).
        self.staged_bytes = 0
        self._generation = 0
        self._admission = asyncio.Lock()
        self._fallback_logged: set[ModelShape] = set()
        metrics.watch(self)  # totals (bytes, sequences, ratio) are read at scrape time

    @property
    def xp(self) -> ModuleType:
        return self.device.xp

    def to_device(self, array: np.ndarray) -> Any:
        return array if self.xp is np else self.xp.asarray(array)

    def resolve_policy(self, name_or_json: str, shape: ModelShape) -> CompressionPolicy:
        """A client's policy: a preset name or policy JSON (never a server-side path).

        Empty means the server's default (the operator may give it as a file path). A
        calibrated `default` serves the model it was calibrated for; any other model gets
        the uncalibrated fallback (logged once per shape; Lookup shows which)."""
        policy = requested_policy(name_or_json) if name_or_json else self.default_policy
        try:
            chosen = policy_for_model(policy, shape)
        except ValueError as exc:
            raise InvalidArgumentError(f"policy: {clipped(str(exc), 200)}") from None
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

    def begin_put(self, tenant: str, header: SequenceHeader) -> PutSession:
        return PutSession(self, tenant, header)

    def _find(self, tenant: str, ref: SequenceRef) -> StoredSequence:
        sequence = self.sequences.get((tenant, ref.model_id, ref.sequence_id))
        if sequence is None:
            self.metrics.misses.inc(reason="unknown_sequence")
            raise NotFoundError(
                f"sequence {sequence_label(ref.model_id, ref.sequence_id)} is not held"
            )
        return sequence

    # -- accounting ------------------------------------------------------------------

    def tenant_bytes(self, tenant: str) -> int:
        return sum(
            sum(self.sequence_bytes(sequence))
            for sequence in self.sequences.values()
            if sequence.tenant == tenant
        )

    def sequence_bytes(self, sequence: StoredSequence) -> tuple[int, int]:
        """(device bytes, overflow bytes) of a sequence."""
        device = sum(
            self.device.size_of(sequence.key(index))
            for index in range(len(sequence.groups))
            if sequence.key(index) in self.device
        )
        return device, sum(sequence.overflow_bytes.values())

    def _check_quota(self, tenant: str, adding: int, replacing: StoredSequence | None) -> None:
        quota = self.limits.tenant_quota_bytes
        if not quota:
            return
        held = self.tenant_bytes(tenant)
        if replacing is not None:
            held -= sum(self.sequence_bytes(replacing))
        if held + adding > quota:
            raise ResourceExhaustedError(
                f"tenant quota of {quota} bytes exceeded: {held} held, this write needs {adding}"
            )

    # -- tier movement ----------------------------------------------------------------

    def _busy(self, key: EntryKey, own: StoredSequence | None) -> bool:
        sequence = self.sequences.get(key[:3])
        if sequence is None or sequence.generation != key.generation:
            return False
        return sequence is not own and sequence.lock.locked()

    async def _evict_until(self, free_needed: int, own: StoredSequence | None = None) -> None:
        """Write least recently used entries to Redis until `free_needed` bytes are free.
        Must hold `self._admission`. Entries of busy sequences (a put or prefetch in
        progress) stay, except those of `own`, whose lock the caller holds."""
        if self.device.free_bytes() >= free_needed:
            return
        if self.overflow is None:
            raise ResourceExhaustedError(
                f"device tier budget of {self.device.budget_bytes} bytes is full "
                f"({self.device.used_bytes} held, {free_needed} needed) and no overflow "
                "tier is configured"
            )
        for key in self.device.coldest():
            if self.device.free_bytes() >= free_needed:
                return
            if self._busy(key, own):
                continue
            entry = self.device.get(key, touch=False)
            data = await asyncio.to_thread(encode_entry, entry)
            try:
                await self.overflow.put(key, data)
            except OverflowUnavailableError as exc:
                raise UnavailableError(
                    f"device tier is full and {exc}; the write was not stored"
                ) from None
            sequence = self.sequences.get(key[:3])
            if key not in self.device or sequence is None or sequence.generation != key.generation:
                # Deleted or replaced while Redis was writing: drop the orphan.
                await self._delete_overflow([key])
                continue
            self.device.pop(key)
            sequence.overflow_bytes[key.group] = len(data)
            self.metrics.evictions.inc()
        if self.device.free_bytes() < free_needed:
            # Transient: the room frees up as those requests finish, so a retry can help.
            raise UnavailableError(
                f"device tier budget of {self.device.budget_bytes} bytes cannot make room for "
                f"{free_needed} bytes now: the rest is held by requests in progress"
            )

    async def _delete_overflow(self, keys: list[EntryKey]) -> None:
        if self.overflow is None or not keys:
            return
        try:
            await self.overflow.delete(keys)
        except OverflowUnavailableError as exc:
            # Never served again (its generation is gone); a TTL, if set, reclaims it.
            log.warning("could not delete overflowed entries", extra={"error": str(exc)})

    async def _make_room(self, needed: int, own: StoredSequence | None) -> None:
        """Free `needed` bytes of the device tier. Must hold `self._admission`."""
        if needed > self.device.budget_bytes:
            raise ResourceExhaustedError(
                f"{needed} stored bytes do not fit the device tier budget of "
                f"{self.device.budget_bytes} bytes"
            )
        await self._evict_until(needed, own)

    async def _admit(
        self,
        sequence: StoredSequence,
        entries: dict[int, LayerGroupEntry],
        evict_own: bool = True,
    ) -> None:
        """Put `entries` (group index -> entry, not in the device tier yet) of `sequence`
        into the device tier, making room first. On an error nothing is admitted."""
        needed = sum(held_bytes(entry) for entry in entries.values())
        async with self._admission:
            await self._make_room(needed, sequence if evict_own else None)
            for index, entry in entries.items():
                self.device.put(sequence.key(index), entry)
                sequence.overflow_bytes.pop(index, None)

    async def _entry(
        self, sequence: StoredSequence, group: int, evict_own: bool = True
    ) -> LayerGroupEntry:
        """The group's entry, promoted from Redis if it overflowed. Caller holds the
        sequence's lock. `evict_own`: promotion may evict the sequence's other groups."""
        key = sequence.key(group)
        entry = self.device.get(key)
        if entry is not None:
            self.metrics.hits.inc(tier=self.device.name)
            return entry
        if group not in sequence.overflow_bytes or self.overflow is None:
            raise NotFoundError(f"entry {group} of the sequence is missing")
        try:
            try:
                data = await self.overflow.get(key)
            except OverflowUnavailableError as exc:
                raise UnavailableError(
                    f"entry is in the overflow tier, which is down: {exc}"
                ) from None
            if data is None:
                raise LostEntryError("entry is gone from Redis (evicted, expired or flushed)")
            entry = await asyncio.to_thread(decode_entry, data)
            if entry.layers != sequence.groups[group].layers or entry.tokens != sequence.tokens:
                raise CorruptEntryError("entry does not belong to this sequence")
        except CorruptEntryError as exc:
            lost = isinstance(exc, LostEntryError)
            if not lost:
                self.metrics.corrupt_entries.inc()
            self.metrics.misses.inc(reason="lost_entry" if lost else "corrupt_entry")
            log.warning(
                "overflowed entry unusable; sequence dropped",
                extra={
                    "model_id": sequence.model_id,
                    "sequence_id": sequence.sequence_id,
                    "error": str(exc),
                },
            )
            await self._drop(sequence)
            raise NotFoundError(
                f"sequence {sequence_label(sequence.model_id, sequence.sequence_id)} was lost: "
                f"an overflowed entry is unusable ({exc}); recompute it"
            ) from None
        self.metrics.hits.inc(tier="redis")
        await self._admit(sequence, {group: entry}, evict_own)
        self.metrics.promotions.inc()
        await self._delete_overflow([key])
        return entry

    async def _drop(self, sequence: StoredSequence) -> None:
        """Forget a sequence and free its entries in both tiers."""
        if self.sequences.get(sequence.name) is sequence:
            del self.sequences[sequence.name]
        for index in range(len(sequence.groups)):
            self.device.pop(sequence.key(index))
        await self._delete_overflow([sequence.key(index) for index in sequence.overflow_bytes])
        sequence.overflow_bytes.clear()

    # -- writes -----------------------------------------------------------------------

    async def commit_new(self, session: PutSession) -> StoredSequence:
        encoder = session.encoder
        if encoder.pending:
            raise FailedPreconditionError(f"layers {sorted(encoder.pending)} wait for a partner")
        entries = dict(enumerate(encoder.entries))
        self._generation += 1
        layers, heads, dim = session.shape
        sequence = StoredSequence(
            tenant=session.tenant,
            model_id=session.model_id,
            sequence_id=session.sequence_id,
            generation=self._generation,
            num_layers=layers,
            kv_heads=heads,
            head_dim=dim,
            dtype=session.dtype,
            policy=session.policy,
            groups=tuple(group_encoder.group for group_encoder in encoder.encoders),
            tokens=session.end,
            fp16_bytes=sum(fp16_bytes(entry) for entry in entries.values()),
            tag=session.tag,
        )
        self._check_quota(
            session.tenant, sum(held_bytes(e) for e in entries.values()), session.existing
        )
        async with sequence.lock:
            await self._admit(sequence, entries)
            replaced = self.sequences.get(sequence.name)
            self.sequences[sequence.name] = sequence
            if replaced is not None:
                await self._drop(replaced)
        return sequence

    async def commit_extension(self, session: PutSession) -> StoredSequence:
        """Append the session's tokens to every group. All groups are promoted and room
        for the new tokens is made first, so applying them cannot fail half-way."""
        sequence = session.existing
        async with sequence.lock:
            if self.sequences.get(sequence.name) is not sequence or (
                sequence.tokens != session.start
            ):
                raise FailedPreconditionError(
                    "the sequence changed while this extension was sent; look it up and retry"
                )
            groups = range(len(sequence.groups))
            entries = [await self._entry(sequence, index, evict_own=False) for index in groups]
            itemsize = CARRIER_DTYPES[sequence.dtype].itemsize
            growth = (session.end - session.start) * sequence.num_layers * 2 * itemsize
            growth *= sequence.kv_heads * sequence.head_dim
            self._check_quota(sequence.tenant, growth, None)
            encoder = SequenceEncoder(
                sequence.policy,
                num_layers=sequence.num_layers,
                kv_heads=sequence.kv_heads,
                head_dim=sequence.head_dim,
                dtype=sequence.dtype,
            )
            encoder.load_entries(entries)

            def apply() -> None:
                for layer in range(sequence.num_layers):
                    keys, values = session.layers[layer]
                    encoder.put_layer(layer, keys, values, session.seal)

            async with self._admission:
                # New tokens take at most their raw size: reserve it, then apply.
                await self._make_room(growth, None)
                await asyncio.to_thread(apply)
                for index, entry in enumerate(entries):
                    self.device.put(sequence.key(index), entry)
            sequence.tokens = session.end
            sequence.fp16_bytes = sum(fp16_bytes(entry) for entry in entries)
            sequence.tag = session.tag
        return sequence

    # -- reads ------------------------------------------------------------------------

    async def prefetch(
        self, tenant: str, query: PrefetchQuery
    ) -> AsyncIterator[SequenceHeader | RestoredLayer | StoredEntry]:
        """Yields the answer's header, then the requested layers restored (in layer
        order) or, for the compressed form, the stored entries that hold them."""
        sequence = self._find(tenant, query.sequence)
        start = query.start_token
        end = sequence.tokens if query.end_token is None else query.end_token
        if not start < end <= sequence.tokens:
            raise OutOfRangeError(
                f"token range [{start}, {end}) is outside the sequence's {sequence.tokens} tokens"
            )
        first = query.first_layer
        end_layer = sequence.num_layers if query.end_layer is None else query.end_layer
        if not first < end_layer <= sequence.num_layers:
            raise OutOfRangeError(
                f"layers [{first}, {end_layer}) are outside the sequence's "
                f"{sequence.num_layers} layers"
            )
        compressed = query.compressed
        dtype = sequence.dtype if query.dtype is None else query.dtype
        if compressed and dtype != sequence.dtype:
            raise InvalidArgumentError(
                "the compressed wire form carries the stored dtype: restore into another "
                "dtype on the client"
            )
        yield SequenceHeader(
            sequence=query.sequence,
            num_layers=sequence.num_layers,
            kv_heads=sequence.kv_heads,
            head_dim=sequence.head_dim,
            dtype=dtype,
            start_token=start,
            end_token=end,
            policy=sequence.policy.to_json() if compressed else "",
        )
        # Groups in layer order; a merged pair's direction is decoded once for both layers.
        groups = dict.fromkeys(sequence.group_of(layer) for layer in range(first, end_layer))
        for group in groups:
            async with sequence.lock:
                if self.sequences.get(sequence.name) is not sequence:
                    self.metrics.misses.inc(reason="deleted_during_prefetch")
                    raise NotFoundError("the sequence was deleted or replaced during the prefetch")
                entry = await self._entry(sequence, group)
                if compressed:
                    data = await asyncio.to_thread(encode_entry, entry)
                else:
                    restored = await asyncio.to_thread(restore_group, entry, start, end, dtype)
            if compressed:
                yield StoredEntry(layers=tuple(entry.layers), data=data)
                continue
            for layer, keys, values in restored:
                if first <= layer < end_layer:
                    yield RestoredLayer(layer, to_numpy(keys), to_numpy(values), dtype)

    def lookup(self, tenant: str, ref: SequenceRef) -> LookupResult:
        sequence = self._find(tenant, ref)
        device, overflow = self.sequence_bytes(sequence)
        return LookupResult(
            tokens=sequence.tokens,
            num_layers=sequence.num_layers,
            kv_heads=sequence.kv_heads,
            head_dim=sequence.head_dim,
            dtype=sequence.dtype,
            device_bytes=device,
            overflow_bytes=overflow,
            device_groups=len(sequence.groups) - len(sequence.overflow_bytes),
            overflow_groups=len(sequence.overflow_bytes),
            fp16_bytes=sequence.fp16_bytes,
            policy=sequence.policy.to_json(),
            tag=sequence.tag,
        )

    async def delete(self, tenant: str, ref: SequenceRef) -> bool:
        try:
            sequence = self._find(tenant, ref)
        except NotFoundError:
            return False
        await self._drop(sequence)
        return True

    def stats(self, tenant: str) -> StatsResult:
        mine = [s for s in self.sequences.values() if s.tenant == tenant]
        device = overflow = 0
        for sequence in mine:
            d, o = self.sequence_bytes(sequence)
            device, overflow = device + d, overflow + o
        return StatsResult(
            sequences=len(mine),
            tokens=sum(s.tokens for s in mine),
            device_bytes=device,
            overflow_bytes=overflow,
            fp16_bytes=sum(s.fp16_bytes for s in mine),
            quota_bytes=self.limits.tenant_quota_bytes,
            device_budget_bytes=self.device.budget_bytes,
            overflow_available=self.overflow is not None and self.overflow.available,
        )

    def put_result(self, sequence: StoredSequence) -> PutResult:
        """What a committed put or append answers."""
        device, overflow = self.sequence_bytes(sequence)
        return PutResult(
            tokens=sequence.tokens, stored_bytes=device + overflow, fp16_bytes=sequence.fp16_bytes
        )
