"""Typed errors of the cache service, shared by server and client.

The server raises these in its domain code; each class's `code` is its gRPC status code
(design.md section 7), which one wrapper of every RPC sends
(`minicache_client.serving.rpc_methods`), and the client SDK maps a status code back to
the same class (`ERROR_FOR_STATUS`), so callers catch `NotFoundError` rather than
inspect an RpcError. Messages never carry unbounded client input: `clipped` cuts what
they quote.
"""

from __future__ import annotations

import grpc


def clipped(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-8 bytes (marked, with its length, when cut);
    always encodable, so it can go into status details or a log line."""
    data = text.encode("utf-8", "backslashreplace")
    if len(data) <= limit:
        return data.decode("utf-8")
    mark = f"... ({len(data)} bytes)"
    return data[: max(limit - len(mark), 0)].decode("utf-8", "ignore") + mark


class CacheError(Exception):
    """Base class of every error the cache service reports."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgumentError(CacheError, ValueError):
    """The request is malformed: shapes, dtypes, sizes, ids, values."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(CacheError, KeyError):
    """The sequence is not held (never written, deleted, expired or lost): recompute."""

    code = grpc.StatusCode.NOT_FOUND

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class OutOfRangeError(CacheError, IndexError):
    """A token or layer range outside what the sequence holds."""

    code = grpc.StatusCode.OUT_OF_RANGE


class FailedPreconditionError(CacheError):
    """Protocol steps out of order (a chunk before its header, a missing layer)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(CacheError):
    """The device budget (with no overflow tier) or the tenant's quota is full."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnauthenticatedError(CacheError):
    """No bearer token, or one the server does not know."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(CacheError):
    """The token is known but may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class UnavailableError(CacheError):
    """The server (or its overflow tier) cannot serve now; a retry can help."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(CacheError, TimeoutError):
    """The call did not finish within its deadline."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class CorruptDataError(CacheError):
    """Data that failed verification (a checksum); it was discarded, never returned."""

    code = grpc.StatusCode.DATA_LOSS


_ERRORS = (
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    FailedPreconditionError,
    ResourceExhaustedError,
    UnauthenticatedError,
    PermissionDeniedError,
    UnavailableError,
    DeadlineExceededError,
    CorruptDataError,
)

ERROR_FOR_STATUS: dict[grpc.StatusCode, type[CacheError]] = {e.code: e for e in _ERRORS}


def error_from_rpc(error: grpc.RpcError) -> CacheError:
    """The typed error for a failed call (`CacheError` itself for unexpected codes)."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    cls = ERROR_FOR_STATUS.get(code, CacheError)
    exc = cls(f"{code.name}: {details}")
    exc.code = code
    return exc
