"""Reads: Prefetch (the header, then restored layers or stored entries) and Lookup.

Every group is read through the tier chain under the sequence's lock (so no one demotes
or replaces it meanwhile), from whichever tier holds it, verified there, and promoted
back to the device when room can be made (`TierChain.read`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from minicache_client.array_namespace import to_numpy
from minicache_client.entry import encode_entry
from minicache_client.errors import InvalidArgumentError, NotFoundError, OutOfRangeError
from minicache_client.policy import ModelShape
from minicache_client.restore import restore_group
from minicache_client.results import LookupResult
from minicache_server import artifacts
from minicache_server.domain import (
    PrefetchQuery,
    RestoredLayer,
    SequenceHeader,
    SequenceRef,
    StoredEntry,
)
from minicache_server.store.accounting import sequence_bytes

if TYPE_CHECKING:
    from minicache_server.store.sequence_store import SequenceStore


async def prefetch(
    store: SequenceStore, tenant: str, query: PrefetchQuery
) -> AsyncIterator[SequenceHeader | RestoredLayer | StoredEntry]:
    """Yields the answer's header, then the requested layers restored (in layer order)
    or, for the compressed form, the stored entries that hold them."""
    sequence = store.find(tenant, query.sequence)
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
            f"layers [{first}, {end_layer}) are outside the sequence's {sequence.num_layers} layers"
        )
    compressed = query.compressed
    dtype = sequence.dtype if query.dtype is None else query.dtype
    if compressed and dtype != sequence.dtype:
        raise InvalidArgumentError(
            "the compressed wire form carries the stored dtype: restore into another "
            "dtype on the client"
        )
    if not compressed and sequence.policy.transform is not None:
        # Restoring needs the policy's artifact (the compressed form does not: the
        # client restores it): refused before the header when the server lacks it.
        await artifacts.preload(sequence.policy)
        shape = ModelShape(sequence.num_layers, sequence.kv_heads, sequence.head_dim)
        artifacts.check_policy(sequence.policy, shape)
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
            if store.sequences.get(sequence.name) is not sequence:
                store.metrics.misses.inc(reason="deleted_during_prefetch")
                raise NotFoundError("the sequence was deleted or replaced during the prefetch")
            entry = await store.entry(sequence, group)
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


def lookup(store: SequenceStore, tenant: str, ref: SequenceRef) -> LookupResult:
    sequence = store.find(tenant, ref)
    split = sequence_bytes(store.chain, sequence)
    return LookupResult(
        tokens=sequence.tokens,
        num_layers=sequence.num_layers,
        kv_heads=sequence.kv_heads,
        head_dim=sequence.head_dim,
        dtype=sequence.dtype,
        device_bytes=split.device_bytes,
        overflow_bytes=split.lower_bytes,
        device_groups=split.device_groups,
        overflow_groups=len(sequence.groups) - split.device_groups,
        fp16_bytes=sequence.fp16_bytes,
        policy=sequence.policy.to_json(),
        tag=sequence.tag,
    )
