"""`CacheClient`: the synchronous client of one cache server.

Every call has a deadline (`ClientConfig.timeout_s`, or a call's `timeout_s`) and every
failed call raises the typed error of its status code (`minicache_client.errors`), never
a bare `grpc.RpcError`. KV goes in as NumPy, CuPy or torch tensors and comes out as
NumPy arrays, each layer's keys and values `[kv_heads, tokens, head_dim]` in the
carrier of their dtype (bfloat16 as uint16 bit patterns; `tensors.to_torch` makes
torch tensors of them).

`PutStream` is a put streamed while the layers are produced (a prefill): the caller's
thread turns each layer into chunks and queues them, and gRPC sends them from its own
thread, so the next layer is computed while the previous one is on the wire.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any

import grpc
import numpy as np

from minicache_client.channel import SERVICE_NAME, ChannelClient, ClientConfig
from minicache_client.errors import CacheError, FailedPreconditionError, error_from_rpc
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
    put_requests,
    sequence_header,
    sequence_ref,
)
from minicache_client.results import LookupResult, PutResult, StatsResult
from minicache_client.transform_artifact import ARTIFACTS, ArtifactRegistry
from minicache_client.wire import tokens_per_chunk

# Chunks a streamed put may queue ahead of the network: about this many bytes.
PUT_BUFFER_BYTES = 64 << 20


@contextlib.contextmanager
def typed_errors() -> Iterator[None]:
    """Failed calls inside raise the typed error of their status code."""
    try:
        yield
    except grpc.RpcError as exc:
        raise error_from_rpc(exc) from exc


def check_timeout(timeout_s: float | None, default: float) -> float:
    if timeout_s is None:
        return default
    if (
        isinstance(timeout_s, bool)
        or not isinstance(timeout_s, (int, float))
        or not math.isfinite(timeout_s)
        or timeout_s <= 0
    ):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    return float(timeout_s)


def health_stub(channel: Any) -> tuple[Any, Any]:
    """The grpc.health.v1 stub and its module (package grpcio-health-checking)."""
    try:
        from grpc_health.v1 import health_pb2, health_pb2_grpc
    except ImportError as exc:
        raise ImportError(
            "health() needs the grpcio-health-checking package: pip install grpcio-health-checking"
        ) from exc
    return health_pb2_grpc.HealthStub(channel), health_pb2


def serving_status(health_pb2: Any, response: Any) -> str:
    """The status name: "SERVING", "NOT_SERVING" (others by their protobuf name)."""
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


_END = object()


class PutStream:
    """A put of tokens [start_token, end_token) of every layer, sent layer by layer.

    `send_layer(layer, keys, values)` with keys and values `[kv_heads, end_token -
    start_token, head_dim]`, once per layer in any order, from one thread; `finish()`
    ends the stream and returns the server's `PutResult`. The write becomes visible only
    when every layer arrived; `abort()` cancels it and the server discards what it got.
    As a context manager: finishes on normal exit (the result is `self.result`), aborts
    on an exception.
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
        self._requests: queue.Queue[Any] = queue.Queue(
            maxsize=max(2, PUT_BUFFER_BYTES // max_chunk_bytes)
        )
        self._stopped = threading.Event()
        self._closed = False
        self.result: PutResult | None = None
        self._future = stub.Put.future(self._request_stream(), timeout=timeout, metadata=metadata)
        self._future.add_done_callback(lambda _: self._stopped.set())
        self._enqueue(pb.PutRequest(header=header))

    def _request_stream(self) -> Iterator[pb.PutRequest]:
        # Runs on gRPC's thread; it ends on the end marker, or once the call is over.
        while True:
            try:
                request = self._requests.get(timeout=0.1)
            except queue.Empty:
                if self._stopped.is_set():
                    return
                continue
            if request is _END:
                return
            yield request

    def _failure(self) -> CacheError:
        if self._future.cancelled():
            return FailedPreconditionError("the put was aborted")
        exc = self._future.exception()
        if isinstance(exc, grpc.RpcError):
            return error_from_rpc(exc)
        return FailedPreconditionError("the server ended the put before every layer was sent")

    def _enqueue(self, request: Any) -> None:
        # Blocks while the queue is full (the network is behind), never past the call.
        while True:
            if self._future.done():
                raise self._failure()
            try:
                self._requests.put(request, timeout=0.05)
                return
            except queue.Full:
                continue

    def send_layer(self, layer: int, keys: Any, values: Any) -> None:
        """Queue one layer: keys and values `[kv_heads, tokens, head_dim]` (NumPy, CuPy
        or torch, in the header's dtype). Raises the call's typed error if it failed."""
        if self._closed:
            raise FailedPreconditionError("the put stream is already finished or aborted")
        for request in self._progress.layer_requests(layer, keys, values):
            self._enqueue(request)

    def finish(self) -> PutResult:
        """End the stream and wait for the server's answer (within the call's deadline)."""
        if self.result is not None:
            return self.result
        missing = self._progress.missing_layers()
        if missing:
            self.abort()
            raise FailedPreconditionError(
                f"finish() before layers {missing} were sent; the put was aborted"
            )
        self._enqueue(_END)
        self._closed = True
        try:
            response = self._future.result()
        except grpc.FutureCancelledError:
            raise FailedPreconditionError("the put was aborted") from None
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        self.result = PutResult.from_proto(response)
        return self.result

    def abort(self) -> None:
        """Cancel the put; the server discards the partial write. Idempotent."""
        self._closed = True
        self._stopped.set()
        self._future.cancel()

    def __enter__(self) -> PutStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()


class CacheClient(ChannelClient):
    """Synchronous client of one cache server; a context manager (or call `close()`)."""

    def __init__(self, config: ClientConfig) -> None:
        super().__init__(config)
        self._stub = cache_service_pb2_grpc.CacheServiceStub(self._channel)
        # Put with requests serialized by `put_requests` (one copy of the KV each).
        self._put_serialized = self._channel.stream_unary(
            f"/{SERVICE_NAME}/Put",
            request_serializer=None,
            response_deserializer=pb.PutResponse.FromString,
        )
        # The registry that fetches through this client (`use_for_artifacts`).
        self._artifact_registry: ArtifactRegistry | None = None

    def close(self) -> None:
        """Close the channel; a registry that fetched through this client stops."""
        registry, self._artifact_registry = self._artifact_registry, None
        if registry is not None and registry.fetch == self.get_artifact:
            registry.fetch = None
        super().close()

    def _timeout(self, timeout_s: float | None) -> float:
        return check_timeout(timeout_s, self.config.timeout_s)

    def put(
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
        """Write tokens [start_token, start_token + tokens) of every layer in one stream.

        `layers`: (keys, values) per layer, each `[kv_heads, tokens, head_dim]` in the
        carrier of `dtype`. From token 0 this writes (or replaces) the sequence with
        `policy` (empty: the server's default); from the tokens held, it extends it.
        `seal` closes partial quantization blocks (the end of a prefill). `tag` (bytes,
        at most 64) labels the sequence's content once the write commits, e.g. a digest
        of its tokens; `lookup` returns it. Every write sets it: without one it is
        cleared. A failed or aborted write leaves the previous tag.
        """
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
        # Fails now, not inside gRPC's request thread, when a token exceeds a chunk.
        tokens_per_chunk(shape.kv_heads, shape.head_dim, dtype, self.config.max_chunk_bytes)
        requests = put_requests(header, carried, dtype, self.config.max_chunk_bytes)
        with typed_errors():
            response = self._put_serialized(requests, timeout=timeout, metadata=self._metadata)
        return PutResult.from_proto(response)

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
    ) -> PutStream:
        """Start a put of tokens [start_token, end_token) of `num_layers` layers, each
        `[kv_heads, end_token - start_token, head_dim]`, sent with `send_layer`. The
        deadline covers the whole stream, from now until `finish()` returns. `tag`: as
        in `put`, set when the stream commits."""
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
        return PutStream(
            self._stub,
            header,
            max_chunk_bytes=self.config.max_chunk_bytes,
            timeout=self._timeout(timeout_s),
            metadata=self._metadata,
        )

    def append(
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
        """Extend a sequence by a few (decode-step) tokens of every layer in one message.

        `layers`: (keys, values) per layer, `[kv_heads, tokens, head_dim]`; `start_token`
        must equal the tokens held. Larger extensions go through `put(start_token=...)`.
        `tag`: the content label after the append, as in `put` (empty clears it).
        """
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
            response = self._stub.Append(request, timeout=timeout, metadata=self._metadata)
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
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Tokens [start_token, end_token) of layers [first_layer, last_layer], as
        (layer, keys, values) in ascending layer order, each as soon as it is complete.

        keys and values are `[kv_heads, end_token - start_token, head_dim]` NumPy arrays
        in `dtype` (default: the sequence's; bfloat16 as uint16 bits), read-only where
        they view received bytes. `end_token` None: to the last token held;
        `last_layer` None: to the last layer. `wire_form="compressed"` receives the
        stored entries, verifies their checksums and restores here (less traffic, client
        CPU); a corrupt entry raises CorruptDataError and yields nothing of it. A
        transform policy's entries restore with its calibration artifact: one this
        process lacks raises FailedPreconditionError naming its hash, unless
        `use_for_artifacts()` made the registry fetch it from the server.
        The call starts now; its deadline covers the whole stream.
        """
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
        call = self._stub.Prefetch(plan.request(), timeout=timeout, metadata=self._metadata)
        return self._received_layers(call, plan.stream())

    @staticmethod
    def _received_layers(
        call: Any, stream: PrefetchStream
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        try:
            with typed_errors():
                for response in call:
                    yield from stream.feed(response)
            stream.finish()
        finally:
            call.cancel()  # a no-op once the call is over

    def prefetch_layers(
        self, model_id: str, sequence_id: str, **prefetch_args: Any
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """(keys, values) of every requested layer, in order: `prefetch`, collected."""
        return [
            (keys, values)
            for _, keys, values in self.prefetch(model_id, sequence_id, **prefetch_args)
        ]

    def lookup(
        self, model_id: str, sequence_id: str, *, timeout_s: float | None = None
    ) -> LookupResult:
        """The sequence's shape and storage; NotFoundError if it is not held."""
        request = pb.LookupRequest(sequence=sequence_ref(model_id, sequence_id))
        with typed_errors():
            response = self._stub.Lookup(
                request, timeout=self._timeout(timeout_s), metadata=self._metadata
            )
        return LookupResult.from_proto(response)

    def delete(self, model_id: str, sequence_id: str, *, timeout_s: float | None = None) -> bool:
        """Drop the sequence from every tier; False if it was not held."""
        request = pb.DeleteRequest(sequence=sequence_ref(model_id, sequence_id))
        with typed_errors():
            response = self._stub.Delete(
                request, timeout=self._timeout(timeout_s), metadata=self._metadata
            )
        return response.deleted

    def stats(self, *, timeout_s: float | None = None) -> StatsResult:
        """The caller's tenant on this server."""
        with typed_errors():
            response = self._stub.Stats(
                pb.StatsRequest(), timeout=self._timeout(timeout_s), metadata=self._metadata
            )
        return StatsResult.from_proto(response)

    def get_artifact(self, digest: str, *, timeout_s: float | None = None) -> bytes:
        """The calibration artifact file whose SHA-256 is `digest` (64 lowercase hex
        digits), as the server holds it: what restoring a transform policy's compressed
        wire form needs. Raises NotFoundError when the server holds none of that hash,
        InvalidArgumentError for a malformed hash, CorruptArtifactError
        (`minicache_client.transform_artifact`) when the bytes do not hash to `digest`.
        The deadline covers the whole stream (a file of tens of MB)."""
        timeout = self._timeout(timeout_s)
        stream = ArtifactStream(digest)
        call = self._stub.GetArtifact(
            artifact_request(digest), timeout=timeout, metadata=self._metadata
        )
        try:
            with typed_errors():
                for response in call:
                    stream.feed(response)
        finally:
            call.cancel()  # a no-op once the call is over
        return stream.finish()

    def use_for_artifacts(self, registry: ArtifactRegistry = ARTIFACTS) -> None:
        """Make `registry` (default: the process's, which the codecs use) fetch the
        calibration artifacts it lacks from this server (`get_artifact`) and keep them in
        its first writable directory, so that a compressed prefetch of a transform
        policy restores here. Until `close()`, which undoes it."""
        registry.fetch = self.get_artifact
        self._artifact_registry = registry

    def health(self, *, timeout_s: float | None = None) -> str:
        """The server's overall status (grpc.health.v1): "SERVING" or "NOT_SERVING"."""
        stub, health_pb2 = health_stub(self._channel)
        with typed_errors():
            response = stub.Check(
                health_pb2.HealthCheckRequest(service=""),
                timeout=self._timeout(timeout_s),
                metadata=self._metadata,
            )
        return serving_status(health_pb2, response)
