"""Writes: a put or append in progress (`PutSession`) and its commit.

A write from token 0 (new, or replacing) encodes layers as they complete (on a
thread while the next chunks are read, at most `MAX_QUEUED_LAYERS` waiting; on the event
loop when the policy stores tokens raw, which keeps the assembled arrays without a
copy) and places each layer group's entry in the tier chain as soon as the group is
whole, under a generation of its own that nothing reads until the commit switches the
sequence to it (`SequenceStore.pending` marks it in use, so no one else demotes or drops
its entries). What a put holds in memory while it streams is its raw layers (being
assembled, waiting for the encoder or for a merge partner): its staging, bounded by the
device budget for each put and for all puts in progress together; a put waits for its
encoder rather than be refused for what the encoder still holds. Before its first layer,
a streamed put reserves the staging it will need at most (`peak_staging`), waiting
behind the puts that came first for up to `STAGING_WAIT_S`: under load, puts queue for
the staging instead of taking it from each other and being refused mid-stream (an
Append, whose bytes arrived in one message, takes what is free). A write that
fails or is cancelled leaves the sequence as it was; the entries it placed are deleted.

An extension (from the tokens held) keeps its raw tokens until the commit, then
appends them to every group:

- every group on the device and room for the new tokens there: in place (a decode
  step's few tokens on the event loop);
- else (groups below the device, or a sequence larger than the device budget): each
  group's entry is copied (read from its tier without promotion), extended, and placed
  through the chain under a new generation like a new write; the commit switches to it
  and deletes the old generation. A failure before the switch deletes the new entries
  and leaves the old ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from minicache_client.array_namespace import CARRIER_DTYPES
from minicache_client.entry import (
    LayerGroupEntry,
    decode_entry,
    encode_entry,
    fp16_bytes,
    stored_bytes,
)
from minicache_client.errors import (
    CacheError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    ResourceExhaustedError,
    UnavailableError,
)
from minicache_client.policy import ModelShape
from minicache_client.sequence_encoder import SequenceEncoder, check_finite
from minicache_client.transform_artifact import ArtifactError
from minicache_client.wire import LayerAssembler
from minicache_server import artifacts
from minicache_server.domain import LayerChunk, SequenceHeader
from minicache_server.store.sequences import StoredSequence, sequence_label
from minicache_server.tiers.base import EntryKey, TierUnavailableError
from minicache_server.tiers.chain import NoRoomError
from minicache_server.tiers.device_tier import compact

if TYPE_CHECKING:
    from minicache_server.store.sequence_store import SequenceStore

# No policy stores a KV value in less than one bit (2-bit quantization of both layers
# of a merged pair): what a header declares can be refused before any byte arrives.
MIN_STORED_BITS_PER_VALUE = 1
# Room reserved per group, beyond the new tokens' raw size, for an in-place extension:
# an entry's metadata and array padding may grow by a few bytes as it grows.
METADATA_GROWTH_BYTES = 256


def room_error(exc: NoRoomError | TierUnavailableError, what: str) -> CacheError:
    """The domain error of a placement that failed: retry can help, or cannot."""
    if isinstance(exc, TierUnavailableError) or exc.retryable:
        return UnavailableError(f"{what}: {exc}")
    return ResourceExhaustedError(f"{what}: {exc}")


# Layers of a put that may wait for the encoder while the next chunks are read.
MAX_QUEUED_LAYERS = 2
# How long a streamed put waits for its staging before it is refused UNAVAILABLE.
STAGING_WAIT_S = 30.0


@contextlib.contextmanager
def _tensor_errors() -> Iterator[None]:
    """The engine's checks of the tensors (ValueError) as INVALID_ARGUMENT; a
    calibration artifact that cannot be used as its refusal (FAILED_PRECONDITION)."""
    try:
        yield
    except ValueError as exc:
        if isinstance(exc, CacheError):
            raise
        if isinstance(exc, ArtifactError):
            raise artifacts.refusal(exc) from None
        raise InvalidArgumentError(str(exc)) from None


class PutSession:
    """One write in progress (see the module docstring)."""

    def __init__(
        self, store: SequenceStore, tenant: str, header: SequenceHeader, streamed: bool = True
    ) -> None:
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
        # A streamed put reserves its staging before its first layer (an Append's
        # bytes are in memory already, in its one message: it takes what is free).
        self.queues = streamed
        self.reserved = 0
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
            self.groups = tuple(encoder.group for encoder in self.encoder.encoders)
        else:
            self._check_extension(header)
            self.encoder = None
        self._check_declared_size()
        self.assembler = LayerAssembler(
            header.num_layers, header.kv_heads, self.end - self.start, header.head_dim, self.dtype
        )
        self.layers: dict[int, tuple[Any, Any]] = {}
        # A new write's entries, placed in the chain as their groups complete.
        self.generation = store.begin_generation() if self.encoder is not None else None
        self.encoded_layers: set[int] = set()
        self.queued: set[int] = set()  # handed to the encoder, not encoded yet
        self.encoding: asyncio.Future | None = None  # the last of those jobs
        self.placed: dict[int, int] = {}  # group -> stored bytes
        self.committed = False

    def __enter__(self) -> PutSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.encoding is not None:
            if not self.encoding.done():
                self.encoding.cancel()  # a failed or cancelled put: nothing more is placed
            elif not self.encoding.cancelled():
                self.encoding.exception()  # seen here: asyncio would log it as unretrieved
        self._end_reservation()
        self._restage(0)
        if self.generation is not None:
            placed = [self.key(group) for group in self.placed]
            self.store.end_generation(self.generation, [] if self.committed else placed)

    def key(self, group: int) -> EntryKey:
        return EntryKey(self.tenant, self.model_id, self.sequence_id, self.generation, group)

    def _check_declared_size(self) -> None:
        """Refuse a write whose header alone shows it cannot fit: a layer larger than
        the staging allowed (the device budget), or more than every tier together
        holds."""
        store = self.store
        budget = store.device.budget_bytes
        what = (
            f"{self.end - self.start} tokens x {self.shape[0]} layers x {self.shape[1]} heads "
            f"x {self.shape[2]} in {self.dtype}"
        )
        if self.layer_bytes > budget:
            raise ResourceExhaustedError(
                f"one layer of this put ({what}) takes {self.layer_bytes} bytes, more than "
                f"the device budget of {budget} bytes that bounds a put's staging"
            )
        raw = self.layer_bytes * self.shape[0]
        if self.encoder is None and raw > budget:
            raise ResourceExhaustedError(
                f"this extension ({what}) holds {raw} raw bytes until it commits, more "
                f"than the device budget of {budget} bytes that bounds a put's staging"
            )
        capacity = store.chain.capacity()
        if capacity is None:
            return
        stores_raw = self.policy.stores_raw
        values = raw // CARRIER_DTYPES[self.dtype].itemsize
        least = raw if stores_raw else values * MIN_STORED_BITS_PER_VALUE // 8
        if least > capacity:
            tiers = " + ".join(f"{tier.name} {tier.budget_bytes}" for tier in store.chain.tiers)
            raise ResourceExhaustedError(
                f"this put ({what}) stores at least {least} bytes, more than every tier "
                f"together holds ({tiers} bytes)"
            )

    def peak_staging(self) -> int:
        """The most raw bytes this put stages at once when its layers come in order: a
        new write, its largest group's layers waiting for the group to complete plus
        the layers queued for the encoder (all its layers when fewer), at most the
        device budget; an extension, all its layers (held until the commit)."""
        if self.encoder is None:
            return self.shape[0] * self.layer_bytes
        largest = max(len(group.layers) for group in self.groups)
        layers = min(self.shape[0], largest + MAX_QUEUED_LAYERS)
        return min(layers * self.layer_bytes, self.store.device.budget_bytes)

    async def _reserve(self) -> None:
        peak = self.peak_staging()
        if not await self.store.reserve_staging(peak, STAGING_WAIT_S):
            budget = self.store.device.budget_bytes
            raise UnavailableError(
                f"puts in progress stage {self.store.staged_bytes} bytes of the {budget} "
                f"this server allows for them, and this put's {peak} did not fit within "
                f"{STAGING_WAIT_S:g} s; retry shortly"
            )
        self.reserved = peak

    def _end_reservation(self) -> None:
        """From now on only what this put stages counts; the rest of its reservation
        goes to the writes waiting for it."""
        if self.reserved > self.staged:
            self.store.staged_bytes -= self.reserved - self.staged
            self.store.staging_released()
        self.reserved = 0

    def _fits(self, staged: int) -> bool:
        """Whether this put could stage `staged` bytes now without a refusal."""
        budget = self.store.device.budget_bytes
        held, wanted = max(self.staged, self.reserved), max(staged, self.reserved)
        return wanted <= budget and self.store.staged_bytes - held + wanted <= budget

    def _restage(self, staged: int) -> None:
        """Hold `staged` bytes of staging: at most the device budget for this put, and
        for every put in progress together (beyond that a retry can help). What the put
        reserved counts whatever it stages below that."""
        store = self.store
        budget = store.device.budget_bytes
        held, wanted = max(self.staged, self.reserved), max(staged, self.reserved)
        others = store.staged_bytes - held
        if wanted > held:
            if wanted > budget:
                raise ResourceExhaustedError(
                    f"this put stages {staged} bytes as it streams, more than the device "
                    f"budget of {budget} bytes: the sequence does not fit this server"
                )
            if others + wanted > budget:
                raise UnavailableError(
                    f"puts in progress stage {others} bytes of the {budget} this server "
                    "allows for them; retry shortly"
                )
        store.staged_bytes = others + wanted
        self.staged = staged
        if wanted < held:
            store.staging_released()

    def _staging(self) -> int:
        """The raw layers this put holds now: being assembled, waiting for a merge
        partner, or held for an extension."""
        assembler = self.assembler
        assembling = sum(1 for layer in assembler.filled if layer not in assembler.complete)
        waiting = len(self.encoder.pending) if self.encoder is not None else 0
        return (assembling + len(self.queued) + waiting + len(self.layers)) * self.layer_bytes

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
        # Its new tokens are encoded with the policy's artifact (after a restart, the
        # server may no longer hold it): refused before anything changes.
        artifacts.check_policy(existing.policy, ModelShape(*held))
        self.policy = existing.policy

    async def add_chunk(self, chunk: LayerChunk) -> None:
        size = len(chunk.keys) + len(chunk.values)
        if size > self.store.limits.max_chunk_bytes:
            raise ResourceExhaustedError(
                f"chunk of {size} bytes is above the limit of {self.store.limits.max_chunk_bytes}"
            )
        if chunk.layer < self.shape[0] and chunk.layer not in self.assembler.filled:
            # A new layer: its room is taken before its bytes are copied (after the
            # encoder caught up, if the layers it still holds leave no room; a streamed
            # put's first layer waits for the staging it reserves).
            if self.queues and not self.assembler.filled and not self.reserved:
                await self._reserve()
            if self.queued and not self._fits(self.staged + self.layer_bytes):
                await self.encoded()
            self._restage(self.staged + self.layer_bytes)
        layer = self.assembler.add(chunk)
        if layer is None:
            return
        keys, values = (self.store.to_device(array) for array in layer)
        if self.encoder is None:
            with _tensor_errors():
                for name, array in (("keys", keys), ("values", values)):
                    check_finite(array, self.dtype, f"layer {chunk.layer} {name}")
            self.layers[chunk.layer] = (keys, values)  # applied at commit, all or nothing
            self._restage(self._staging())
            return
        # The encoder (which checks the tensors too) works on a thread while this reads
        # the next chunks; a few layers at most wait for it.
        if self.queued and (
            len(self.queued) >= MAX_QUEUED_LAYERS
            or not self._fits(self._staging() + self.layer_bytes)
        ):
            await self.encoded()  # waiting on the encoder never refuses a put
        self.queued.add(chunk.layer)
        self._restage(self._staging())
        self.encoding = asyncio.ensure_future(
            self._encode(chunk.layer, keys, values, self.encoding)
        )

    async def _encode(self, layer: int, keys: Any, values: Any, previous: Any) -> None:
        """Encode one layer after the layers before it, then place complete groups."""
        if previous is not None:
            await previous
        # The assembled arrays are this put's own: the encoder may keep them. Stored
        # raw, it keeps them as they are (one masked pass to check them, no copy), work
        # too small for a trip to a thread, which would cost more than it does.
        encode = functools.partial(
            self.encoder.put_layer, layer, keys, values, self.seal, owned=True
        )
        with _tensor_errors():
            if self.policy.stores_raw:
                encode()
            else:
                await asyncio.to_thread(encode)
        self.queued.discard(layer)
        self.encoded_layers.add(layer)
        self._restage(self._staging())
        await self._place_complete_groups()

    async def encoded(self) -> None:
        """Wait until every layer handed to the encoder is encoded and placed; the
        first failure among them raises here."""
        if self.encoding is not None:
            await self.encoding

    async def _place_complete_groups(self) -> None:
        """Place every group whose layers are all encoded and that is not placed yet."""
        for group, layer_group in enumerate(self.groups):
            if group in self.placed or not self.encoded_layers.issuperset(layer_group.layers):
                continue
            entry = self.encoder.entries[group]
            size = stored_bytes(entry)
            await self.store.place(self.key(group), entry, size, self.generation, "this put")
            self.placed[group] = size

    async def commit(self) -> StoredSequence:
        self._end_reservation()  # every layer arrived: only what it still holds counts
        await self.encoded()
        missing = self.assembler.missing_layers()
        if missing:
            shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
            raise FailedPreconditionError(f"put ended with layers missing: {shown}")
        if self.encoder is not None:
            sequence = await commit_new(self.store, self)
        else:
            sequence = await commit_extension(self.store, self)
        self.committed = True
        return sequence


async def commit_new(store: SequenceStore, session: PutSession) -> StoredSequence:
    encoder = session.encoder
    if encoder.pending:
        raise FailedPreconditionError(f"layers {sorted(encoder.pending)} wait for a partner")
    layers, heads, dim = session.shape
    sequence = StoredSequence(
        tenant=session.tenant,
        model_id=session.model_id,
        sequence_id=session.sequence_id,
        generation=session.generation,
        num_layers=layers,
        kv_heads=heads,
        head_dim=dim,
        dtype=session.dtype,
        policy=session.policy,
        groups=session.groups,
        tokens=session.end,
        entry_bytes=[session.placed[group] for group in range(len(session.groups))],
        fp16_bytes=sum(fp16_bytes(entry) for entry in encoder.entries),
        tag=session.tag,
    )
    store.check_quota(session.tenant, sequence.stored_bytes, session.existing)
    async with sequence.lock:
        await store.write_manifests(sequence)
        replaced = store.sequences.get(sequence.name)
        store.sequences[sequence.name] = sequence
        if replaced is not None:
            # Its manifests where the new one was not written go with it.
            replaced.manifests = {
                tier: state
                for tier, state in replaced.manifests.items()
                if tier not in sequence.manifests
            }
            await store.drop(replaced)
    return sequence


async def commit_extension(store: SequenceStore, session: PutSession) -> StoredSequence:
    """Append the session's tokens to every group (see the module docstring)."""
    sequence = session.existing
    async with sequence.lock:
        if store.sequences.get(sequence.name) is not sequence or (sequence.tokens != session.start):
            raise FailedPreconditionError(
                "the sequence changed while this extension was sent; look it up and retry"
            )
        itemsize = CARRIER_DTYPES[sequence.dtype].itemsize
        growth = (session.end - session.start) * sequence.num_layers * 2 * itemsize
        growth *= sequence.kv_heads * sequence.head_dim
        store.check_quota(sequence.tenant, growth, None)
        if not await _extend_in_place(store, session, sequence, growth):
            await _extend_through_chain(store, session, sequence)
        sequence.tokens = session.end
        sequence.tag = session.tag
    return sequence


# An extension of at most this many tokens (a decode step or a few) is applied on the
# event loop: less work than a trip to a thread costs (except with a transform policy).
INLINE_EXTENSION_TOKENS = 16


def _apply(session: PutSession, sequence: StoredSequence, entries: list[LayerGroupEntry]) -> None:
    """Append the session's raw tokens to `entries` (one per group, in group order)."""
    encoder = SequenceEncoder(
        sequence.policy,
        num_layers=sequence.num_layers,
        kv_heads=sequence.kv_heads,
        head_dim=sequence.head_dim,
        dtype=sequence.dtype,
        entries=entries,
    )
    for layer in range(sequence.num_layers):
        keys, values = session.layers[layer]
        encoder.put_layer(layer, keys, values, session.seal)


async def _extend_in_place(
    store: SequenceStore, session: PutSession, sequence: StoredSequence, growth: int
) -> bool:
    """The in-place path: False (nothing changed) when some group is below the device
    or the device cannot make room for the growth."""
    device = store.device
    keys = sequence.entry_keys()
    reserve = growth + METADATA_GROWTH_BYTES * len(keys)
    async with store.chain.lock:
        # Asked under the chain's lock: a demotion that began before this extension
        # locked the sequence finishes (and takes entries off the device) while the
        # extension waits for the lock.
        if not all(device.contains(key) for key in keys):
            return False
        try:
            await store.chain.make_room(0, reserve, None)
        except NoRoomError:
            return False
        except TierUnavailableError as exc:
            raise UnavailableError(f"the device tier is full and {exc}") from None
        entries = [device.peek(key, touch=True) for key in keys]
        if any(entry is None for entry in entries):
            return False  # nothing applied yet: the chain path extends them below
        # A transform policy codes a block of tokens every few steps (products over a
        # basis of megabytes): never on the loop.
        small = session.end - session.start <= INLINE_EXTENSION_TOKENS
        if small and sequence.policy.transform is None:
            _apply(session, sequence, entries)
        else:
            await asyncio.to_thread(_apply, session, sequence, entries)
        sizes = [stored_bytes(entry) for entry in entries]
        for key, size in zip(keys, sizes, strict=True):
            device.resize(key, size)
    sequence.entry_bytes = sizes
    sequence.fp16_bytes = sum(fp16_bytes(entry) for entry in entries)
    return True


async def _extend_through_chain(
    store: SequenceStore, session: PutSession, sequence: StoredSequence
) -> None:
    entries = []
    for group in range(len(sequence.groups)):
        entry = await store.entry(sequence, group, promote=False)
        if store.device.contains(sequence.key(group)):
            # The live entry stays as it is until the switch: extend a copy.
            entry = await asyncio.to_thread(lambda e=entry: decode_entry(encode_entry(e)))
        entries.append(compact(entry, store.xp))
    await asyncio.to_thread(_apply, session, sequence, entries)
    generation = store.begin_generation()
    placed: list[EntryKey] = []
    try:
        sizes = []
        for group, entry in enumerate(entries):
            key = EntryKey(*sequence.name, generation, group)
            size = stored_bytes(entry)
            await store.place(key, entry, size, generation, "this extension")
            placed.append(key)
            sizes.append(size)
        old_keys = sequence.entry_keys()
        previous = (sequence.generation, sequence.tokens, sequence.entry_bytes)
        sequence.generation, sequence.tokens, sequence.entry_bytes = generation, session.end, sizes
        try:
            await store.write_manifests(sequence)
        except UnavailableError:
            sequence.generation, sequence.tokens, sequence.entry_bytes = previous
            raise
    except BaseException:
        store.end_generation(generation, placed)
        raise
    store.end_generation(generation, [])
    sequence.fp16_bytes = sum(fp16_bytes(entry) for entry in entries)
    await store.chain.delete(old_keys)
