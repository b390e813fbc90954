"""CacheService servicer: protobuf in, `SequenceStore` call, protobuf out.

Domain errors (`minicache_client.errors`) become their status codes in `_reply_error`;
anything else is a bug, logged with its traceback and answered INTERNAL with no detail.
Nothing here ever lets an exception escape as UNKNOWN.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc

from minicache_client.errors import CacheError, FailedPreconditionError, InvalidArgumentError
from minicache_client.proto import cache_service_pb2 as pb
from minicache_client.proto import cache_service_pb2_grpc as pb_grpc
from minicache_client.serving.auth import TokenAuth
from minicache_server.metrics import CacheMetrics
from minicache_server.sequence_store import SequenceStore

log = logging.getLogger(__name__)


class CacheServicer(pb_grpc.CacheServiceServicer):
    def __init__(self, store: SequenceStore, auth: TokenAuth, metrics: CacheMetrics) -> None:
        self.store = store
        self.auth = auth
        self.metrics = metrics

    async def _reply_error(
        self, context: grpc.aio.ServicerContext, method: str, exc: Exception
    ) -> None:
        if isinstance(exc, CacheError):
            code, details = exc.code, str(exc)
            log.info(
                "request refused", extra={"method": method, "code": code.name, "error": details}
            )
        else:
            code, details = grpc.StatusCode.INTERNAL, "internal error (logged by the server)"
            log.error("request failed", extra={"method": method}, exc_info=exc)
        self.metrics.requests.inc(method=method, code=code.name)
        await context.abort(code, details)

    def _done(self, method: str, started: float) -> None:
        self.metrics.requests.inc(method=method, code="OK")
        self.metrics.request_seconds.observe(time.perf_counter() - started, method=method)

    async def Put(
        self, request_iterator: AsyncIterator[pb.PutRequest], context: grpc.aio.ServicerContext
    ) -> pb.PutResponse:
        started = time.perf_counter()
        try:
            tenant = self.auth.tenant_of(context)
            session = None
            async for request in request_iterator:
                item = request.WhichOneof("item")
                if item == "header":
                    if session is not None:
                        raise FailedPreconditionError("a put carries exactly one header")
                    session = self.store.begin_put(tenant, request.header)
                elif item == "chunk":
                    if session is None:
                        raise FailedPreconditionError("a chunk arrived before the put's header")
                    await session.add_chunk(request.chunk)
                else:
                    raise InvalidArgumentError("empty PutRequest (neither header nor chunk)")
            if session is None:
                raise FailedPreconditionError("the put stream ended without a header")
            sequence = await session.commit()
            response = self.store.response_for(sequence)
        except asyncio.CancelledError:
            self.metrics.requests.inc(method="Put", code="CANCELLED")
            raise
        except Exception as exc:
            await self._reply_error(context, "Put", exc)
        self._done("Put", started)
        return response

    async def Append(
        self, request: pb.AppendRequest, context: grpc.aio.ServicerContext
    ) -> pb.PutResponse:
        started = time.perf_counter()
        try:
            tenant = self.auth.tenant_of(context)
            if not request.HasField("header"):
                raise InvalidArgumentError("an append needs its header")
            if request.header.start_token == 0:
                raise InvalidArgumentError(
                    "an append extends a held sequence: start_token must be the tokens held"
                )
            session = self.store.begin_put(tenant, request.header)
            for chunk in request.layers:
                await session.add_chunk(chunk)
            sequence = await session.commit()
            response = self.store.response_for(sequence)
        except Exception as exc:
            await self._reply_error(context, "Append", exc)
        self._done("Append", started)
        return response

    async def Prefetch(
        self, request: pb.PrefetchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PrefetchResponse]:
        started = time.perf_counter()
        try:
            tenant = self.auth.tenant_of(context)
            async for message in self.store.prefetch(tenant, request):
                if isinstance(message, pb.SequenceHeader):
                    yield pb.PrefetchResponse(header=message)
                elif isinstance(message, pb.LayerChunk):
                    yield pb.PrefetchResponse(chunk=message)
                else:
                    yield pb.PrefetchResponse(entry=message)
        except asyncio.CancelledError:
            self.metrics.requests.inc(method="Prefetch", code="CANCELLED")
            raise
        except Exception as exc:
            await self._reply_error(context, "Prefetch", exc)
        self._done("Prefetch", started)

    async def Lookup(
        self, request: pb.LookupRequest, context: grpc.aio.ServicerContext
    ) -> pb.LookupResponse:
        started = time.perf_counter()
        try:
            response = self.store.lookup(self.auth.tenant_of(context), request.sequence)
        except Exception as exc:
            await self._reply_error(context, "Lookup", exc)
        self._done("Lookup", started)
        return response

    async def Delete(
        self, request: pb.DeleteRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteResponse:
        started = time.perf_counter()
        try:
            deleted = await self.store.delete(self.auth.tenant_of(context), request.sequence)
        except Exception as exc:
            await self._reply_error(context, "Delete", exc)
        self._done("Delete", started)
        return pb.DeleteResponse(deleted=deleted)

    async def Stats(
        self, request: pb.StatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.StatsResponse:
        started = time.perf_counter()
        try:
            response = self.store.stats(self.auth.tenant_of(context))
        except Exception as exc:
            await self._reply_error(context, "Stats", exc)
        self._done("Stats", started)
        return response
