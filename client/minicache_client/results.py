"""What the cache service answers: results of a put, a lookup and the tenant's stats.

Plain frozen dataclasses built from the protobuf responses, so callers never handle
protobuf messages. Byte counts are stored bytes (the checksummed entries, metadata
included) next to `fp16_bytes`, the same KV held uncompressed in fp16: the baseline of
every compression ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

from minicache_client.proto import cache_service_pb2 as pb
from minicache_client.wire import dtype_from_wire


def _ratio(fp16_bytes: int, stored_bytes: int) -> float:
    return fp16_bytes / stored_bytes if stored_bytes else 0.0


@dataclass(frozen=True)
class PutResult:
    """A sequence after a put or an append."""

    tokens: int  # tokens the sequence holds now
    stored_bytes: int  # bytes its stored entries take
    fp16_bytes: int  # the same KV in fp16

    @property
    def compression_ratio(self) -> float:
        """fp16 bytes per stored byte (0.0 while nothing is stored)."""
        return _ratio(self.fp16_bytes, self.stored_bytes)

    @classmethod
    def from_proto(cls, response: pb.PutResponse) -> PutResult:
        return cls(
            tokens=response.tokens,
            stored_bytes=response.stored_bytes,
            fp16_bytes=response.fp16_bytes,
        )


@dataclass(frozen=True)
class LookupResult:
    """A held sequence: its shape and where its stored entries live.

    Every layer is `[kv_heads, tokens, head_dim]` in `dtype`; a layer group is one
    stored entry (one layer, or a merged pair)."""

    tokens: int
    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    device_bytes: int  # stored bytes in the device tier
    overflow_bytes: int  # stored bytes in the tiers below the device (disk, Redis)
    device_groups: int
    overflow_groups: int
    fp16_bytes: int
    policy: str = ""  # the sequence's compression policy, as JSON
    tag: bytes = b""  # the content label set by the last write (b"": none)

    @property
    def stored_bytes(self) -> int:
        return self.device_bytes + self.overflow_bytes

    @property
    def compression_ratio(self) -> float:
        return _ratio(self.fp16_bytes, self.stored_bytes)

    @classmethod
    def from_proto(cls, response: pb.LookupResponse) -> LookupResult:
        header = response.header
        return cls(
            tokens=header.end_token,
            num_layers=header.num_layers,
            kv_heads=header.kv_heads,
            head_dim=header.head_dim,
            dtype=dtype_from_wire(header.dtype, "lookup header dtype"),
            device_bytes=response.device_bytes,
            overflow_bytes=response.overflow_bytes,
            device_groups=response.device_groups,
            overflow_groups=response.overflow_groups,
            fp16_bytes=response.fp16_bytes,
            policy=header.policy,
            tag=header.tag,
        )


@dataclass(frozen=True)
class StatsResult:
    """The caller's tenant on one server; `device_budget_bytes` is the server's."""

    sequences: int
    tokens: int
    device_bytes: int
    overflow_bytes: int
    fp16_bytes: int
    quota_bytes: int  # 0: no quota
    device_budget_bytes: int
    overflow_available: bool

    @property
    def stored_bytes(self) -> int:
        return self.device_bytes + self.overflow_bytes

    @property
    def compression_ratio(self) -> float:
        return _ratio(self.fp16_bytes, self.stored_bytes)

    @classmethod
    def from_proto(cls, response: pb.StatsResponse) -> StatsResult:
        return cls(
            sequences=response.sequences,
            tokens=response.tokens,
            device_bytes=response.device_bytes,
            overflow_bytes=response.overflow_bytes,
            fp16_bytes=response.fp16_bytes,
            quota_bytes=response.quota_bytes,
            device_budget_bytes=response.device_budget_bytes,
            overflow_available=response.overflow_available,
        )
