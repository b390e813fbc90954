"""The CacheService's messages to and from the domain's types (`minicache_server.domain`,
`minicache_client.results`), so that `SequenceStore` never sees protobuf.

Requests are checked by `minicache_client.protocol`'s rules as they are converted (ids,
tags) and their enums resolved (dtype, wire form): a malformed message raises the
domain error the servicer's wrapper answers (`InvalidArgumentError`). What depends on
the server (its limits, the sequences it holds) is the store's to check.
"""

from __future__ import annotations

from collections.abc import Iterator

from minicache_client.errors import InvalidArgumentError
from minicache_client.proto import cache_service_pb2 as pb
from minicache_client.protocol import check_id, check_tag
from minicache_client.results import LookupResult, PutResult, StatsResult
from minicache_client.wire import DTYPE_TO_WIRE, dtype_from_wire, serialized_layer_chunks
from minicache_server import domain

WIRE_FORMS = (pb.WIRE_FORM_UNSPECIFIED, pb.WIRE_FORM_RESTORED, pb.WIRE_FORM_COMPRESSED)

# -- requests ---------------------------------------------------------------------------


def sequence_ref(message: pb.SequenceRef) -> domain.SequenceRef:
    return domain.SequenceRef(
        model_id=check_id(message.model_id, "model_id"),
        sequence_id=check_id(message.sequence_id, "sequence_id"),
    )


def sequence_header(message: pb.SequenceHeader) -> domain.SequenceHeader:
    """A Put's or Append's header."""
    sequence = sequence_ref(message.sequence)
    tag = check_tag(message.tag)
    return domain.SequenceHeader(
        sequence=sequence,
        num_layers=message.num_layers,
        kv_heads=message.kv_heads,
        head_dim=message.head_dim,
        dtype=dtype_from_wire(message.dtype),
        start_token=message.start_token,
        end_token=message.end_token,
        policy=message.policy,
        seal=message.seal,
        tag=tag,
    )


def layer_chunk(message: pb.LayerChunk) -> domain.LayerChunk:
    return domain.LayerChunk(
        layer=message.layer,
        token_offset=message.token_offset,
        tokens=message.tokens,
        keys=message.keys,
        values=message.values,
    )


def prefetch_query(message: pb.PrefetchRequest) -> domain.PrefetchQuery:
    """0 in `end_token` or `end_layer` means "to the last"; an unspecified dtype, the
    sequence's."""
    sequence = sequence_ref(message.sequence)
    if message.wire_form not in WIRE_FORMS:
        raise InvalidArgumentError(f"unknown wire_form {message.wire_form}")
    dtype = None
    if message.dtype != pb.DTYPE_UNSPECIFIED:
        dtype = dtype_from_wire(message.dtype)
    return domain.PrefetchQuery(
        sequence=sequence,
        start_token=message.start_token,
        end_token=message.end_token or None,
        first_layer=message.first_layer,
        end_layer=message.end_layer or None,
        compressed=message.wire_form == pb.WIRE_FORM_COMPRESSED,
        dtype=dtype,
    )


# -- answers ----------------------------------------------------------------------------


def sequence_ref_message(ref: domain.SequenceRef) -> pb.SequenceRef:
    return pb.SequenceRef(model_id=ref.model_id, sequence_id=ref.sequence_id)


def header_message(header: domain.SequenceHeader) -> pb.SequenceHeader:
    return pb.SequenceHeader(
        sequence=sequence_ref_message(header.sequence),
        num_layers=header.num_layers,
        kv_heads=header.kv_heads,
        head_dim=header.head_dim,
        dtype=DTYPE_TO_WIRE[header.dtype],
        start_token=header.start_token,
        end_token=header.end_token,
        policy=header.policy,
        seal=header.seal,
        tag=header.tag,
    )


def prefetch_responses(
    part: domain.SequenceHeader | domain.RestoredLayer | domain.StoredEntry,
    max_chunk_bytes: int,
) -> Iterator[pb.PrefetchResponse | bytes]:
    """One part of a prefetch as its messages: a layer (serialized here, with one copy
    of its KV), or an entry, in chunks of at most `max_chunk_bytes`."""
    if isinstance(part, domain.SequenceHeader):
        yield pb.PrefetchResponse(header=header_message(part))
    elif isinstance(part, domain.RestoredLayer):
        yield from serialized_layer_chunks(
            part.layer, part.keys, part.values, part.dtype, pb.PrefetchResponse, max_chunk_bytes
        )
    else:
        data = part.data
        for offset in range(0, len(data), max_chunk_bytes):
            entry = pb.EntryChunk(
                layers=list(part.layers),
                total_bytes=len(data),
                offset=offset,
                data=data[offset : offset + max_chunk_bytes],
            )
            yield pb.PrefetchResponse(entry=entry)


def artifact_responses(data: bytes, max_chunk_bytes: int) -> Iterator[pb.GetArtifactResponse]:
    """An artifact file as GetArtifact's messages, pieces of at most `max_chunk_bytes`."""
    for offset in range(0, len(data), max_chunk_bytes):
        yield pb.GetArtifactResponse(
            data=data[offset : offset + max_chunk_bytes], total_bytes=len(data), offset=offset
        )


def put_response(result: PutResult) -> pb.PutResponse:
    return pb.PutResponse(
        tokens=result.tokens, stored_bytes=result.stored_bytes, fp16_bytes=result.fp16_bytes
    )


def lookup_response(ref: domain.SequenceRef, result: LookupResult) -> pb.LookupResponse:
    """The sequence's header holds all its tokens, [0, tokens)."""
    return pb.LookupResponse(
        header=pb.SequenceHeader(
            sequence=sequence_ref_message(ref),
            num_layers=result.num_layers,
            kv_heads=result.kv_heads,
            head_dim=result.head_dim,
            dtype=DTYPE_TO_WIRE[result.dtype],
            start_token=0,
            end_token=result.tokens,
            policy=result.policy,
            tag=result.tag,
        ),
        device_bytes=result.device_bytes,
        overflow_bytes=result.overflow_bytes,
        device_groups=result.device_groups,
        overflow_groups=result.overflow_groups,
        fp16_bytes=result.fp16_bytes,
    )


def stats_response(result: StatsResult) -> pb.StatsResponse:
    return pb.StatsResponse(
        sequences=result.sequences,
        tokens=result.tokens,
        device_bytes=result.device_bytes,
        overflow_bytes=result.overflow_bytes,
        fp16_bytes=result.fp16_bytes,
        quota_bytes=result.quota_bytes,
        device_budget_bytes=result.device_budget_bytes,
        overflow_available=result.overflow_available,
    )
