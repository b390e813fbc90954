"""How every RPC of both services is received and how it ends, in one place.

`add_service(server, service, servicer, outcomes)` registers each method of a service's
descriptor on a `grpc.aio` or threaded server, instead of the generated
`add_..._to_server`, with:

- a request deserializer that never raises: bytes that do not parse as the request
  message (truncated, random, wrong wire types, invalid UTF-8 in a string field) become
  an `UndecodableRequest`, answered INVALID_ARGUMENT when the method reaches it. (A
  deserializer that raises makes grpc answer UNKNOWN or INTERNAL and log a traceback.)
- one wrapper around the servicer's method, so a servicer is protobuf in, domain call,
  protobuf out: `RpcOutcomes` times the call, counts it by status code
  (`requests.inc(method=, code=)`, `request_seconds.observe(seconds, method=)`), maps a
  domain error to its code (`status_of`, by default the `minicache_client.errors`
  class's), bounds the details to `MAX_DETAILS_BYTES`, and logs a refusal as one bounded
  INFO line. A caller that cancels or leaves is counted as CANCELLED, not logged as an
  error; anything unexpected is INTERNAL with no detail, its traceback in the log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass

from minicache_client.errors import CacheError, InvalidArgumentError, clipped

log = logging.getLogger(__name__)

# Status details and the refusal's log line: a few hundred bytes, whatever the request.
MAX_DETAILS_BYTES = 320
INTERNAL_DETAILS = "internal error (the server's log has details)"
# How long a call whose caller cancelled waits for grpc to cancel it.
CALLER_GONE_WAIT_S = 5.0

# (request_streaming, response_streaming) -> the handler factory of that shape.
HANDLER_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


@dataclass(frozen=True)
class UndecodableRequest:
    """What the deserializer gives for bytes that are not a request message."""

    message_type: str
    reason: str


class UndecodableRequestError(InvalidArgumentError):
    """The request's bytes are not a valid message of its type."""


def response_serializer(response: Any) -> bytes:
    """A response message's encoding; bytes pass through, so a method may yield
    messages it serialized itself (`wire.serialized_layer_chunks`)."""
    return response if isinstance(response, bytes) else response.SerializeToString()


def request_deserializer(message_class: type) -> Callable[[bytes], Any]:
    """`message_class.FromString` that returns an `UndecodableRequest` instead of raising."""

    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            return UndecodableRequest(message_class.DESCRIPTOR.full_name, str(exc))

    return parse


def decoded(request: Any) -> Any:
    """`request`, or UndecodableRequestError when its bytes did not parse."""
    if isinstance(request, UndecodableRequest):
        # The parser's reason quotes the type and the fault (e.g. bad UTF-8), never data.
        raise UndecodableRequestError(
            f"the request is not a valid {request.message_type} message: {request.reason}"
        )
    return request


class RequestMetrics(Protocol):
    """The request metrics a service keeps (`CacheMetrics` has them)."""

    requests: Any  # .inc(method=..., code=...)
    request_seconds: Any  # .observe(seconds, method=...)


def cache_error_status(error: Exception) -> grpc.StatusCode | None:
    """The status code of a `minicache_client.errors` error; None for anything else."""
    return error.code if isinstance(error, CacheError) else None


def forget_frames(error: BaseException) -> None:
    """Drop the tracebacks of `error` and of the errors it was raised from or during.

    Called once a refusal is logged, before `abort`: grpc keeps the error that `abort`
    raises in a reference cycle with the call's state, which only the collector's full
    pass (rare: it counts objects, not bytes) frees; that error's context is `error`,
    whose traceback keeps every frame of the failed method, with its locals, alive as
    long. A put refused mid-stream kept its staged layers (megabytes) that way: a
    server refusing puts under load grew by gigabytes between full passes."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        current.__traceback__ = None
        pending += [current.__cause__, current.__context__]


class RpcOutcomes:
    """How the calls of one service end: their status codes, metrics and log lines.

    `status_of(error)` maps a domain error to its code, None meaning a bug (INTERNAL).
    `metrics`: None when the service keeps no request metrics."""

    def __init__(
        self,
        metrics: RequestMetrics | None = None,
        status_of: Callable[[Exception], grpc.StatusCode | None] = cache_error_status,
        logger: logging.Logger = log,
    ) -> None:
        self.metrics = metrics
        self.status_of = status_of
        self.log = logger

    def record(self, method: str, code: grpc.StatusCode, started: float) -> None:
        if self.metrics is not None:
            self.metrics.requests.inc(method=method, code=code.name)
            self.metrics.request_seconds.observe(time.perf_counter() - started, method=method)

    def status(self, method: str, error: Exception) -> tuple[grpc.StatusCode, str]:
        """The status code and details answering `error`; a bug is logged here, with
        its traceback, whether or not the caller is still there to get INTERNAL."""
        code = error.code if isinstance(error, UndecodableRequestError) else self.status_of(error)
        if code is None:
            self.log.error("request failed", extra={"method": method}, exc_info=error)
            return grpc.StatusCode.INTERNAL, INTERNAL_DETAILS
        return code, clipped(str(error), MAX_DETAILS_BYTES)

    def refused(self, method: str, code: grpc.StatusCode, details: str, started: float) -> None:
        """A call answered with an error status."""
        if code is not grpc.StatusCode.INTERNAL:
            self.log.info(
                "request refused", extra={"method": method, "code": code.name, "error": details}
            )
        self.record(method, code, started)

    def cancelled(self, method: str, started: float) -> None:
        """The caller cancelled or left (or its deadline passed): not the server's fault."""
        self.log.debug("request cancelled by its caller", extra={"method": method})
        self.record(method, grpc.StatusCode.CANCELLED, started)


# -- asyncio servers ---------------------------------------------------------------------


async def _decoded_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield decoded(request)


async def _caller_gone(outcomes: RpcOutcomes, name: str, started: float) -> None:
    """A send failed because the caller cancelled: count it, then wait for grpc, which
    cancels this task once it has seen the cancel (failing now would make grpc log the
    failed send as a server error)."""
    outcomes.cancelled(name, started)
    await asyncio.sleep(CALLER_GONE_WAIT_S)


async def _aio_refuse(
    outcomes: RpcOutcomes,
    name: str,
    context: grpc.aio.ServicerContext,
    error: Exception,
    started: float,
) -> None:
    code, details = outcomes.status(name, error)
    forget_frames(error)
    try:
        await context.abort(code, details)
    except grpc.aio.AbortError:  # the status went out
        outcomes.refused(name, code, details, started)
        raise
    except asyncio.CancelledError:
        outcomes.cancelled(name, started)
        raise
    except Exception:
        # The status could not be sent: the caller cancelled (a request stream that a
        # cancel cut short ends like a complete one, so the method failed first).
        await _caller_gone(outcomes, name, started)
        raise


async def _written(context: grpc.aio.ServicerContext, response: Any) -> bool:
    """Send one response; False when grpc could not (the caller cancelled)."""
    try:
        await context.write(response)
    except (asyncio.CancelledError, grpc.aio.AbortError):
        raise
    except Exception:  # grpc's failed send operation: the call is over
        return False
    return True


def _aio_behaviour(
    outcomes: RpcOutcomes, name: str, method: Callable, request_streaming: bool, streams: bool
) -> Callable:
    def argument(request: Any) -> Any:
        return _decoded_stream(request) if request_streaming else decoded(request)

    if streams:
        # A coroutine that writes each response itself, so that a write the caller's
        # cancel made fail is seen here, not by grpc.
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> None:
            started = time.perf_counter()
            try:
                responses = method(argument(request), context)
                async for response in responses:
                    if not await _written(context, response):
                        break
                else:
                    outcomes.record(name, grpc.StatusCode.OK, started)
                    return
            except asyncio.CancelledError:
                outcomes.cancelled(name, started)
                raise
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _aio_refuse(outcomes, name, context, exc, started)
            await responses.aclose()
            await _caller_gone(outcomes, name, started)

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        try:
            response = await method(argument(request), context)
        except asyncio.CancelledError:
            outcomes.cancelled(name, started)
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _aio_refuse(outcomes, name, context, exc, started)
        else:
            outcomes.record(name, grpc.StatusCode.OK, started)
            return response

    return unary


# -- threaded servers --------------------------------------------------------------------


def _decoded_iterator(requests: Iterator[Any]) -> Iterator[Any]:
    for request in requests:
        yield decoded(request)


def _sync_behaviour(
    outcomes: RpcOutcomes, name: str, method: Callable, request_streaming: bool, streams: bool
) -> Callable:
    def argument(request: Any) -> Any:
        return _decoded_iterator(request) if request_streaming else decoded(request)

    def refuse(context: grpc.ServicerContext, error: Exception, started: float) -> None:
        code, details = outcomes.status(name, error)
        forget_frames(error)
        if not context.is_active():  # the caller left: nobody to answer
            outcomes.cancelled(name, started)
            return
        outcomes.refused(name, code, details, started)
        context.abort(code, details)

    if streams:

        def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            started = time.perf_counter()
            try:
                yield from method(argument(request), context)
            except GeneratorExit:  # grpc stopped asking for responses: the caller left
                outcomes.cancelled(name, started)
                raise
            except Exception as exc:
                refuse(context, exc, started)
                return
            if context.is_active():
                outcomes.record(name, grpc.StatusCode.OK, started)
            else:
                outcomes.cancelled(name, started)

        return stream

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        started = time.perf_counter()
        try:
            response = method(argument(request), context)
        except Exception as exc:
            refuse(context, exc, started)
            return None
        if context.is_active():
            outcomes.record(name, grpc.StatusCode.OK, started)
        else:
            outcomes.cancelled(name, started)
        return response

    return unary


def add_service(
    server: grpc.Server | grpc.aio.Server,
    service: ServiceDescriptor,
    servicer: Any,
    outcomes: RpcOutcomes,
) -> None:
    """Register every method of `service` (the servicer's method of the same name) on
    `server`, each behind `request_deserializer` and the `RpcOutcomes` wrapper."""
    is_aio = isinstance(server, grpc.aio.Server)
    behaviour_of = _aio_behaviour if is_aio else _sync_behaviour
    handlers = {}
    for method in service.methods:
        shape = (method.client_streaming, method.server_streaming)
        behaviour = behaviour_of(outcomes, method.name, getattr(servicer, method.name), *shape)
        handlers[method.name] = HANDLER_FACTORIES[shape](
            behaviour,
            request_deserializer=request_deserializer(GetMessageClass(method.input_type)),
            response_serializer=response_serializer,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)
