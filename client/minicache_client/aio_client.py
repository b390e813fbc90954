"""`AsyncCacheClient`: the asyncio client of one cache server (grpc.aio).

The same calls as `CacheClient`, as coroutines: `prefetch` is an async iterator of
(layer, keys, values), `open_put` an `AsyncPutStream` (`await send_layer(...)`, `await
finish()`). The channel is created on first use, inside the running event loop, and
closed by `await close()` or `async with`. Deadlines, typed errors and tensor shapes are
those of `CacheClient`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Generator, Sequence
from types import TracebackType
from typing import Any

import grpc
import numpy as np

from minicache_client.cache_client import check_timeout, health_stub, serving_status, typed_errors
from minicache_client.channel import ClientConfig, call_metadata, create_aio_channel
from minicache_client.errors import (
    CacheError,
    DeadlineExceededError,
    FailedPreconditionError,
    error_from_rpc,
)
from minicache_client.proto import cache_service_pb2 as pb
from minicache_client.proto import cache_service_pb2_grpc
from minicache_client.protocol import (
    ArtifactStream,
    PrefetchPlan,
    PrefetchStream,
    PutProgress,
    append_request,
    artifact_request,
    carried_layers,
    check_count,
    sequence_header,
    sequence_ref,
)
from minicache_client.results import LookupResult, PutResult, StatsResult
from minicache_client.transform_artifact import ARTIFACTS, ArtifactRegistry

# How long past its call's deadline a fetch from another thread waits for the loop.
LOOP_GRACE_S = 5.0


def _write_error(exc: grpc.RpcError) -> CacheError:
    """The typed error of a failed write.

    grpc.aio replaces the server's status with INTERNAL "Internal error from Core" when a
    write races with the server ending the call (grpc/grpc#36066); the server's own code
    is lost then, and the message says so instead of blaming the server."""
    debug = exc.debug_error_string() if hasattr(exc, "debug_error_string") else ""
    if exc.code() == grpc.StatusCode.INTERNAL and "execute_batch" in (debug or ""):
        return CacheError(
            "INTERNAL: the server ended the put while layers were still being sent, and "
            "grpc.aio lost its status (grpc/grpc#36066); the sync CacheClient reports it"
        )
    return error_from_rpc(exc)


class AsyncPutStream:
    """A put of tokens [start_token, end_token) of every layer, sent layer by layer.

    `await send_layer(layer, keys, values)` with keys and values `[kv_heads, end_token -
    start_token, head_dim]`, once per layer in any order; `await finish()` ends the
    stream and returns the server's `PutResult`; `abort()` cancels the put (the server
    discards the partial write). Use it as `async with client.open_put(...) as stream:`
    (finishes on normal exit, the result in `stream.result`; aborts on an exception) or
    as `stream = await client.open_put(...)`.
    """

    def __init__(
        self,
        stub: cache_service_pb2_grpc.CacheServiceStub,
        header: pb.SequenceHeader,
        *,
        max_chunk_bytes: int,
        timeout: float,
        metadata: Any,
    ) -> None:
        self._progress = PutProgress(header, max_chunk_bytes)
        self._header = header
        self._call = stub.Put(timeout=timeout, metadata=metadata)
        self._started = False
        self._closed = False
        self.result: PutResult | None = None

    async def _start(self) -> AsyncPutStream:
        if not self._started:
            self._started = True
            await self._write(pb.PutRequest(header=self._header))
        return self

    def __await__(self) -> Generator[Any, None, AsyncPutStream]:
        return self._start().__await__()

    async def _failure(self) -> CacheError:
        if self._call.cancelled():
            return FailedPreconditionError("the put was aborted")
        try:
            await self._call
        except grpc.RpcError as exc:
            return error_from_rpc(exc)
        return FailedPreconditionError("the server ended the put before every layer was sent")

    async def _write(self, request: pb.PutRequest) -> None:
        try:
            await self._call.write(request)
        except asyncio.InvalidStateError:  # the call is already over: its status tells why
            raise await self._failure() from None
        except grpc.RpcError as exc:
            raise _write_error(exc) from exc

    async def send_layer(self, layer: int, keys: Any, values: Any) -> None:
        """Send one layer: keys and values `[kv_heads, tokens, head_dim]` (NumPy, CuPy or
        torch, in the header's dtype). Raises the call's typed error if it failed."""
        if self._closed:
            raise FailedPreconditionError("the put stream is already finished or aborted")
        await self._start()
        for request in self._progress.layer_requests(layer, keys, values):
            await self._write(request)

    async def finish(self) -> PutResult:
        """End the stream and wait for the server's answer (within the call's deadline)."""
        if self.result is not None:
            return self.result
        missing = self._progress.missing_layers()
        if missing:
            self.abort()
            raise FailedPreconditionError(
                f"finish() before layers {missing} were sent; the put was aborted"
            )
        if self._call.cancelled():
            raise FailedPreconditionError("the put was aborted")
        self._closed = True
        with typed_errors():
            await self._call.done_writing()
            response = await self._call
        self.result = PutResult.from_proto(response)
        return self.result

    def abort(self) -> None:
        """Cancel the put; the server discards the partial write. Idempotent."""
        self._closed = True
        self._call.cancel()

    async def __aenter__(self) -> AsyncPutStream:
        return await self._start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            await self.finish()
        else:
            self.abort()


class AsyncCacheClient:
    """asyncio client of one cache server; `async with` (or `await close()`)."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self._metadata = call_metadata(config)
        self._channel: grpc.aio.Channel | None = None
        self._stub: cache_service_pb2_grpc.CacheServiceStub | None = None
        # The registry that fetches through this client and the function it calls.
        self._artifact_fetch: tuple[ArtifactRegistry, Any] | None = None

    @property
    def target(self) -> str:
        return self.config.target

    def _service(self) -> cache_service_pb2_grpc.CacheServiceStub:
        # Created on first use: a grpc.aio channel belongs to the loop it is made in.
        if self._channel is None or self._stub is None:
            self._channel = create_aio_channel(self.config)
            self._stub = cache_service_pb2_grpc.CacheServiceStub(self._channel)
        return self._stub

    async def close(self) -> None:
        """Close the channel; a registry that fetched through this client stops."""
        if self._artifact_fetch is not None:
            (registry, fetch), self._artifact_fetch = self._artifact_fetch, None
            if registry.fetch is fetch:
                registry.fetch = None
        if self._channel is not None:
            channel, self._channel, self._stub = self._channel, None, None
            await channel.close()

    async def __aenter__(self) -> AsyncCacheClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _timeout(self, timeout_s: float | None) -> float:
        return check_timeout(timeout_s, self.config.timeout_s)

    async def put(
        self,
        model_id: str,
        sequence_id: str,
        layers: Sequence[tuple[Any, Any]],
        *,
        dtype: str,
        start_token: int = 0,
        policy: str = "",
        seal: bool = False,
        tag: bytes = b"",
        timeout_s: float | None = None,
    ) -> PutResult:
        """`CacheClient.put`: every layer `[kv_heads, tokens, head_dim]` in one stream."""
        timeout = self._timeout(timeout_s)
        start_token = check_count("start_token", start_token)
        carried, shape = carried_layers(layers, dtype)
        header = sequence_header(
            model_id,
            sequence_id,
            num_layers=len(carried),
            kv_heads=shape.kv_heads,
            head_dim=shape.head_dim,
            dtype=dtype,
            start_token=start_token,
            end_token=start_token + shape.tokens,
            policy=policy,
            seal=seal,
            tag=tag,
        )
        stream = AsyncPutStream(
            self._service(),
            header,
            max_chunk_bytes=self.config.max_chunk_bytes,
            timeout=timeout,
            metadata=self._metadata,
        )
        try:
            await stream
            for layer, (keys, values) in enumerate(carried):
                await stream.send_layer(layer, keys, values)
        except BaseException:
            stream.abort()
            raise
        return await stream.finish()

    def open_put(
        self,
        model_id: str,
        sequence_id: str,
        *,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: str,
        start_token: int = 0,
        end_token: int,
        policy: str = "",
        seal: bool = False,
        tag: bytes = b"",
        timeout_s: float | None = None,
    ) -> AsyncPutStream:
        """`CacheClient.open_put`: layers `[kv_heads, end_token - start_token, head_dim]`
        sent with `await stream.send_layer(...)`. Call it inside the event loop; the
        deadline covers the whole stream, from now until `finish()` returns."""
        header = sequence_header(
            model_id,
            sequence_id,
            num_layers=num_layers,
            kv_heads=kv_heads,
            head_dim=head_dim,
            dtype=dtype,
            start_token=start_token,
            end_token=end_token,
            policy=policy,
            seal=seal,
            tag=tag,
        )
        return AsyncPutStream(
            self._service(),
            header,
            max_chunk_bytes=self.config.max_chunk_bytes,
            timeout=self._timeout(timeout_s),
            metadata=self._metadata,
        )

    async def append(
        self,
        model_id: str,
        sequence_id: str,
        layers: Sequence[tuple[Any, Any]],
        *,
        dtype: str,
        start_token: int,
        tag: bytes = b"",
        timeout_s: float | None = None,
    ) -> PutResult:
        """`CacheClient.append`: a few tokens `[kv_heads, tokens, head_dim]` per layer."""
        timeout = self._timeout(timeout_s)
        request = append_request(
            model_id,
            sequence_id,
            layers,
            dtype=dtype,
            start_token=start_token,
            max_message_bytes=self.config.max_message_bytes,
            tag=tag,
        )
        with typed_errors():
            response = await self._service().Append(
                request, timeout=timeout, metadata=self._metadata
            )
        return PutResult.from_proto(response)

    def prefetch(
        self,
        model_id: str,
        sequence_id: str,
        *,
        start_token: int = 0,
        end_token: int | None = None,
        first_layer: int = 0,
        last_layer: int | None = None,
        wire_form: str = "restored",
        dtype: str | None = None,
        timeout_s: float | None = None,
    ) -> AsyncIterator[tuple[int, np.ndarray, np.ndarray]]:
        """`CacheClient.prefetch` as an async iterator: (layer, keys, values), keys and
        values `[kv_heads, end_token - start_token, head_dim]`, ascending layers, each as
        soon as it is complete. Call it inside the event loop: the call starts now and its
        deadline covers the whole stream. Leaving the loop early: wrap the iterator in
        `contextlib.aclosing` so that the call is cancelled at once."""
        timeout = self._timeout(timeout_s)
        plan = PrefetchPlan.create(
            model_id,
            sequence_id,
            start_token=start_token,
            end_token=end_token,
            first_layer=first_layer,
            last_layer=last_layer,
            wire_form=wire_form,
            dtype=dtype,
        )
        call = self._service().Prefetch(plan.request(), timeout=timeout, metadata=self._metadata)
        return self._received_layers(call, plan.stream())

    @staticmethod
    async def _received_layers(
        call: Any, stream: PrefetchStream
    ) -> AsyncIterator[tuple[int, np.ndarray, np.ndarray]]:
        try:
            with typed_errors():
                async for response in call:
                    if response.WhichOneof("item") == "entry":
                        # Verifying and restoring an entry is CPU work: off the loop.
                        completed = await asyncio.to_thread(stream.feed, response)
                    else:
                        completed = stream.feed(response)
                    for layer in completed:
                        yield layer
            stream.finish()
        finally:
            call.cancel()  # a no-op once the call is over

    async def prefetch_layers(
        self, model_id: str, sequence_id: str, **prefetch_args: Any
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """(keys, values) of every requested layer, in order: `prefetch`, collected."""
        return [
            (keys, values)
            async for _, keys, values in self.prefetch(model_id, sequence_id, **prefetch_args)
        ]

    async def lookup(
        self, model_id: str, sequence_id: str, *, timeout_s: float | None = None
    ) -> LookupResult:
        request = pb.LookupRequest(sequence=sequence_ref(model_id, sequence_id))
        with typed_errors():
            response = await self._service().Lookup(
                request, timeout=self._timeout(timeout_s), metadata=self._metadata
            )
        return LookupResult.from_proto(response)

    async def delete(
        self, model_id: str, sequence_id: str, *, timeout_s: float | None = None
    ) -> bool:
        request = pb.DeleteRequest(sequence=sequence_ref(model_id, sequence_id))
        with typed_errors():
            response = await self._service().Delete(
                request, timeout=self._timeout(timeout_s), metadata=self._metadata
            )
        return response.deleted

    async def stats(self, *, timeout_s: float | None = None) -> StatsResult:
        with typed_errors():
            response = await self._service().Stats(
                pb.StatsRequest(), timeout=self._timeout(timeout_s), metadata=self._metadata
            )
        return StatsResult.from_proto(response)

    async def get_artifact(self, digest: str, *, timeout_s: float | None = None) -> bytes:
        """`CacheClient.get_artifact`: the calibration artifact file of `digest`,
        checked to hash to it (CorruptArtifactError otherwise)."""
        timeout = self._timeout(timeout_s)
        stream = ArtifactStream(digest)
        call = self._service().GetArtifact(
            artifact_request(digest), timeout=timeout, metadata=self._metadata
        )
        try:
            with typed_errors():
                async for response in call:
                    stream.feed(response)
        finally:
            call.cancel()  # a no-op once the call is over
        return stream.finish()

    def use_for_artifacts(self, registry: ArtifactRegistry = ARTIFACTS) -> None:
        """`CacheClient.use_for_artifacts`: `registry` fetches the artifacts it lacks
        through this client, until `close()`. Call it inside the client's event loop:
        the fetch runs there, for a restore on another thread (this client restores
        compressed entries off the loop); a restore on the loop's own thread that needs
        a fetch raises FailedPreconditionError rather than block the loop."""
        loop = asyncio.get_running_loop()

        def fetch(digest: str) -> bytes:
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                raise FailedPreconditionError(
                    f"calibration artifact {digest} must be fetched, which would block the "
                    "event loop: restore off the loop, or await get_artifact() first and "
                    "add it to the registry"
                )
            future = asyncio.run_coroutine_threadsafe(self.get_artifact(digest), loop)
            try:  # the call has its deadline; this bounds a loop that stopped running
                return future.result(self.config.timeout_s + LOOP_GRACE_S)
            except TimeoutError:
                future.cancel()
                raise DeadlineExceededError(
                    f"calibration artifact {digest}: the client's event loop did not "
                    "fetch it in time"
                ) from None

        registry.fetch = fetch
        self._artifact_fetch = (registry, fetch)

    async def health(self, *, timeout_s: float | None = None) -> str:
        """The server's overall status (grpc.health.v1): "SERVING" or "NOT_SERVING"."""
        self._service()
        stub, health_pb2 = health_stub(self._channel)
        with typed_errors():
            response = await stub.Check(
                health_pb2.HealthCheckRequest(service=""),
                timeout=self._timeout(timeout_s),
                metadata=self._metadata,
            )
        return serving_status(health_pb2, response)
