"""Sequence manifests: what Lookup and Prefetch need of a sequence, kept beside its
entries in the persistent tiers (disk, Redis) so that a restarted server finds it.

Encoding: `xxh3-64 of the rest (u64, LE) | msgpack map` with the fields of
`StoredSequence` that describe it (ids, generation, shape, dtype, policy JSON, the
layers of each group, tokens, fp16 bytes, tag, each entry's stored bytes). A manifest
that fails its checksum or does not describe a consistent sequence raises
`CorruptEntryError`. A manifest only says what to look for: recovery still finds every
entry in a tier, of the recorded size, and every read verifies the entry itself.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import xxhash

from minicache_client.entry import CorruptEntryError
from minicache_client.policy import CompressionPolicy
from minicache_server.store.sequences import StoredSequence

MANIFEST_VERSION = 1
_CHECKSUM = struct.Struct("<Q")


def encode_manifest(sequence: StoredSequence) -> bytes:
    body = msgpack.packb(
        {
            "version": MANIFEST_VERSION,
            "tenant": sequence.tenant,
            "model_id": sequence.model_id,
            "sequence_id": sequence.sequence_id,
            "generation": sequence.generation,
            "num_layers": sequence.num_layers,
            "kv_heads": sequence.kv_heads,
            "head_dim": sequence.head_dim,
            "dtype": sequence.dtype,
            "policy": sequence.policy.to_json(),
            "groups": [list(group.layers) for group in sequence.groups],
            "tokens": sequence.tokens,
            "fp16_bytes": sequence.fp16_bytes,
            "tag": sequence.tag,
            "entry_bytes": list(sequence.entry_bytes),
        }
    )
    return _CHECKSUM.pack(xxhash.xxh3_64_intdigest(body)) + body


def decode_manifest(data: bytes) -> StoredSequence:
    """The sequence a manifest describes; `CorruptEntryError` when it cannot be trusted."""
    view = memoryview(data)
    if len(view) < _CHECKSUM.size:
        raise CorruptEntryError("manifest is truncated")
    body = view[_CHECKSUM.size :]
    if _CHECKSUM.unpack_from(view)[0] != xxhash.xxh3_64_intdigest(body):
        raise CorruptEntryError("manifest checksum mismatch")
    try:
        fields: dict[str, Any] = msgpack.unpackb(body)
        if fields.get("version") != MANIFEST_VERSION:
            raise CorruptEntryError(f"manifest version {fields.get('version')!r} is not known")
        policy = CompressionPolicy.from_json(fields["policy"])
        groups = policy.resolve_layer_groups(fields["num_layers"])
        sequence = StoredSequence(
            tenant=fields["tenant"],
            model_id=fields["model_id"],
            sequence_id=fields["sequence_id"],
            generation=int(fields["generation"]),
            num_layers=int(fields["num_layers"]),
            kv_heads=int(fields["kv_heads"]),
            head_dim=int(fields["head_dim"]),
            dtype=fields["dtype"],
            policy=policy,
            groups=groups,
            tokens=int(fields["tokens"]),
            entry_bytes=[int(size) for size in fields["entry_bytes"]],
            fp16_bytes=int(fields["fp16_bytes"]),
            tag=bytes(fields["tag"]),
        )
    except (KeyError, TypeError, ValueError, msgpack.UnpackException) as exc:
        raise CorruptEntryError(f"manifest is malformed: {exc}") from None
    if [list(group.layers) for group in groups] != fields["groups"] or len(
        sequence.entry_bytes
    ) != len(groups):
        raise CorruptEntryError("manifest's layer groups do not match its policy")
    return sequence
