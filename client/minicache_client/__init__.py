"""MiniCache client SDK.

Light on purpose (NumPy, msgpack and grpcio; CuPy optional; never torch): the gRPC
clients of the cache service (`CacheClient`, `AsyncCacheClient`, `ShardedCacheClient`,
configured by `ClientConfig`), compression policies, the stored-entry format with its
checksum, and the decoder that restores KV from a stored entry. The encoder lives in the
server package (`minicache_server`). Failed calls raise the typed errors below; see
docs/client.md.
"""

from minicache_client.aio_client import AsyncCacheClient, AsyncPutStream
from minicache_client.cache_client import CacheClient, PutStream
from minicache_client.channel import ClientConfig
from minicache_client.errors import (
    CacheError,
    CorruptDataError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from minicache_client.results import LookupResult, PutResult, StatsResult
from minicache_client.sharding import ShardedCacheClient, UnreachableServerError
from minicache_client.worker_client import (
    Conversation,
    GeneratedToken,
    TurnResult,
    WorkerClient,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncCacheClient",
    "AsyncPutStream",
    "CacheClient",
    "CacheError",
    "ClientConfig",
    "Conversation",
    "CorruptDataError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "GeneratedToken",
    "InvalidArgumentError",
    "LookupResult",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "PutResult",
    "PutStream",
    "ResourceExhaustedError",
    "ShardedCacheClient",
    "StatsResult",
    "TurnResult",
    "UnauthenticatedError",
    "UnavailableError",
    "UnreachableServerError",
    "WorkerClient",
]
