"""What the cache server's domain takes and gives, free of protobuf.

`SequenceStore` is called with these and answers with them (or with
`minicache_client.results`' `PutResult`, `LookupResult`, `StatsResult`, the client's own
view of the same answers); `service/messages.py` converts them from and to the wire's
messages, so the store and the tiers import no protobuf module.

- `SequenceRef`: a sequence of the caller's tenant, ids already valid
  (`minicache_client.protocol.check_id`).
- `SequenceHeader`: a write's header (Put, Append), or the first part of a prefetch.
- `LayerChunk`: tokens `[token_offset, token_offset + tokens)` of one layer, keys and
  values `[kv_heads, tokens, head_dim]` each as little-endian carrier bytes.
- `PrefetchQuery`: which tokens and layers a prefetch wants, and in which form.
- `RestoredLayer`, `StoredEntry`: what a prefetch yields after its header.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SequenceRef:
    model_id: str
    sequence_id: str


@dataclass(frozen=True)
class SequenceHeader:
    """Tokens [start_token, end_token) of `num_layers` layers of `[kv_heads, tokens,
    head_dim]` in `dtype` ("float32", "float16" or "bfloat16").

    `policy`: a preset name or policy JSON ("" for the server's default) in a write,
    the sequence's policy JSON in a compressed prefetch. `seal`: encode the last tokens
    too (no more will come). `tag`: opaque label of the content once a write commits
    (b"" clears it). Dimensions are checked against the server's limits by the store."""

    sequence: SequenceRef
    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    start_token: int
    end_token: int
    policy: str = ""
    seal: bool = False
    tag: bytes = b""


@dataclass(frozen=True)
class LayerChunk:
    layer: int
    token_offset: int
    tokens: int
    keys: bytes
    values: bytes


@dataclass(frozen=True)
class PrefetchQuery:
    """Tokens [start_token, end_token) of layers [first_layer, end_layer).

    `end_token` None: to the last token held; `end_layer` None: to the last layer.
    `compressed`: the stored entries as they are, else restored layers. `dtype`
    None: the sequence's."""

    sequence: SequenceRef
    start_token: int = 0
    end_token: int | None = None
    first_layer: int = 0
    end_layer: int | None = None
    compressed: bool = False
    dtype: str | None = None


@dataclass(frozen=True)
class RestoredLayer:
    """One restored layer: keys and values NumPy `[kv_heads, tokens, head_dim]` in the
    carrier of `dtype`."""

    layer: int
    keys: Any
    values: Any
    dtype: str


@dataclass(frozen=True)
class StoredEntry:
    """A stored layer group's checksummed encoding (`minicache_client.entry`)."""

    layers: tuple[int, ...]
    data: bytes
