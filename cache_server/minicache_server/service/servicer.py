"""CacheService servicer: protobuf in, `SequenceStore` call, protobuf out.

`messages` converts each request to the domain's types (checking its form) and each
answer back; the store never sees protobuf.

Nothing here handles errors, timing or metrics: `add_cache_service` registers the
methods through `minicache_client.serving.rpc_methods`, whose one wrapper maps the
domain errors (`minicache_client.errors`) to their status codes, answers undecodable
requests INVALID_ARGUMENT, counts cancellations and answers anything else INTERNAL
(`cache_status`: a calibration artifact's error is FAILED_PRECONDITION).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from minicache_client.errors import (
    CacheError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
)
from minicache_client.proto import cache_service_pb2 as pb
from minicache_client.proto import cache_service_pb2_grpc as pb_grpc
from minicache_client.serving.auth import TokenAuth
from minicache_client.serving.rpc_methods import RpcOutcomes, add_service, cache_error_status
from minicache_client.transform_artifact import ArtifactError
from minicache_server import artifacts
from minicache_server.metrics import CacheMetrics
from minicache_server.service import messages
from minicache_server.store import SequenceStore

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["CacheService"]
EMPTY_PUT_REQUEST = "empty PutRequest (neither header nor chunk)"
# A streamed put that sends nothing for this long is ended: it holds staging (and its
# reservation) that other puts wait for.
PUT_IDLE_S = 60.0


async def _arriving(requests: AsyncIterator[Any], idle_s: float) -> AsyncIterator[Any]:
    """The rest of a client stream; DeadlineExceededError when `idle_s` pass without a
    message."""
    while True:
        try:
            async with asyncio.timeout(idle_s):
                request = await anext(requests, None)
        except TimeoutError:
            raise DeadlineExceededError(
                f"the put sent nothing for {idle_s:g} s and was ended; write it again"
            ) from None
        if request is None:
            return
        yield request


class CacheServicer(pb_grpc.CacheServiceServicer):
    def __init__(self, store: SequenceStore, auth: TokenAuth) -> None:
        self.store = store
        self.auth = auth

    async def Put(
        self, request_iterator: AsyncIterator[pb.PutRequest], context: grpc.aio.ServicerContext
    ) -> pb.PutResponse:
        tenant = self.auth.tenant_of(context)
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None:
            raise FailedPreconditionError("the put stream ended without a header")
        item = first.WhichOneof("item")
        if item == "chunk":
            raise FailedPreconditionError("a chunk arrived before the put's header")
        if item != "header":
            raise InvalidArgumentError(EMPTY_PUT_REQUEST)
        header = messages.sequence_header(first.header)
        await self.store.load_artifacts(tenant, header)
        with self.store.begin_put(tenant, header) as session:
            async for request in _arriving(requests, PUT_IDLE_S):
                item = request.WhichOneof("item")
                if item == "chunk":
                    await session.add_chunk(messages.layer_chunk(request.chunk))
                elif item == "header":
                    raise FailedPreconditionError("a put carries exactly one header")
                else:
                    raise InvalidArgumentError(EMPTY_PUT_REQUEST)
            sequence = await session.commit()
        return messages.put_response(self.store.put_result(sequence))

    async def Append(
        self, request: pb.AppendRequest, context: grpc.aio.ServicerContext
    ) -> pb.PutResponse:
        tenant = self.auth.tenant_of(context)
        if not request.HasField("header"):
            raise InvalidArgumentError("an append needs its header")
        if request.header.start_token == 0:
            raise InvalidArgumentError(
                "an append extends a held sequence: start_token must be the tokens held"
            )
        header = messages.sequence_header(request.header)
        await self.store.load_artifacts(tenant, header)
        with self.store.begin_put(tenant, header, streamed=False) as session:
            for chunk in request.layers:
                await session.add_chunk(messages.layer_chunk(chunk))
            sequence = await session.commit()
        return messages.put_response(self.store.put_result(sequence))

    async def Prefetch(
        self, request: pb.PrefetchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PrefetchResponse]:
        tenant = self.auth.tenant_of(context)
        chunk_bytes = self.store.limits.max_chunk_bytes
        async for part in self.store.prefetch(tenant, messages.prefetch_query(request)):
            for response in messages.prefetch_responses(part, chunk_bytes):
                yield response

    async def Lookup(
        self, request: pb.LookupRequest, context: grpc.aio.ServicerContext
    ) -> pb.LookupResponse:
        tenant = self.auth.tenant_of(context)
        ref = messages.sequence_ref(request.sequence)
        return messages.lookup_response(ref, self.store.lookup(tenant, ref))

    async def Delete(
        self, request: pb.DeleteRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteResponse:
        tenant = self.auth.tenant_of(context)
        deleted = await self.store.delete(tenant, messages.sequence_ref(request.sequence))
        return pb.DeleteResponse(deleted=deleted)

    async def Stats(
        self, request: pb.StatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.StatsResponse:
        return messages.stats_response(self.store.stats(self.auth.tenant_of(context)))

    async def GetArtifact(
        self, request: pb.GetArtifactRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GetArtifactResponse]:
        # Artifacts are model calibration, not tenant data: any known token will do.
        self.auth.tenant_of(context)
        data = await artifacts.artifact_bytes(request.digest)
        for response in messages.artifact_responses(data, self.store.limits.max_chunk_bytes):
            yield response


def cache_status(error: Exception) -> grpc.StatusCode | None:
    """The status code of a domain error; an artifact problem that reached the wrapper
    unconverted (from deep in a codec) is FAILED_PRECONDITION, never INTERNAL."""
    if isinstance(error, ArtifactError) and not isinstance(error, CacheError):
        return grpc.StatusCode.FAILED_PRECONDITION
    return cache_error_status(error)


def add_cache_service(
    server: grpc.aio.Server, store: SequenceStore, auth: TokenAuth, metrics: CacheMetrics
) -> CacheServicer:
    """Register the CacheService on `server`; every call is timed and counted in
    `metrics` (`minicache_requests_total`, `minicache_request_seconds`)."""
    servicer = CacheServicer(store, auth)
    add_service(server, SERVICE, servicer, RpcOutcomes(metrics, cache_status, logger=log))
    return servicer
