"""Typed errors of the cache service, shared by server and client.

The server raises these in its domain code; the servicer maps them to gRPC status codes
through `STATUS_CODES` (design.md section 7), and the client SDK maps a status code back
to the same class, so callers catch `NotFoundError` rather than inspect an RpcError.
"""

from __future__ import annotations

import grpc


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
