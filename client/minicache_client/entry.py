"""The stored form of compressed KV, and its checksummed binary format.

One `LayerGroupEntry` holds one sequence's keys and values for one layer group: a
single layer, or a pair of adjacent layers merged for keys and/or values. Inside:

- `TokenStream`: a `[kv_heads, tokens, head_dim]` tensor as leading sink tokens
  (16-bit), quantized blocks of tokens, and a 16-bit tail of recent tokens. Without
  quantization everything sits in the tail, in the input dtype (bit-exact).
- `MergedStream`: one side (keys or values) of a merged pair: the shared direction
  as a `TokenStream`, both layers' magnitudes `[2, kv_heads, tokens]`, the retained
  (unmerged) tokens of both layers with their (head, token) positions, and the most
  recent tokens not merged yet (`recent`, both layers, in the entry's dtype).

Binary format (version 2): `b"MCKV"`, one version byte, the CRC-32 of the body
(uint32, little-endian), then the body: msgpack of the entry with arrays as raw
buffers. `decode_entry` verifies all of it; a mismatch raises `CorruptEntryError`
and no data is returned. `stored_bytes` is the length of that encoding: everything
stored, metadata included.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from minicache_client.array_namespace import KV_DTYPES, to_numpy

FORMAT_MAGIC = b"MCKV"
FORMAT_VERSION = 2
_HEADER = struct.Struct("<4sBI")

STREAM_MODES = ("per_channel", "per_token")


class CorruptEntryError(ValueError):
    """A stored entry failed verification (checksum, version or structure)."""


def _empty(kv_heads: int, head_dim: int, dtype: Any) -> np.ndarray:
    return np.zeros((kv_heads, 0, head_dim), dtype=dtype)


@dataclass
class QuantizedBlock:
    """`tokens` consecutive tokens as packed b-bit codes with float16 scale and center.

    A code c restores as center + (c - (2**bits - 1) / 2) * scale.

    Codes are laid out `[kv_heads, tokens, head_dim]`, row-major. Statistics:
    per_channel: `[kv_heads, 1, head_dim]`; per_token: `[kv_heads, tokens, head_dim // group]`.
    """

    tokens: int
    codes: Any
    scale: Any
    center: Any


@dataclass
class TokenStream:
    """A `[kv_heads, tokens, head_dim]` tensor: sink tokens, quantized blocks, tail.

    `group_size` counts tokens (per_channel) or channels (per_token). Tokens leave the
    tail in blocks of `block_tokens` once more than `window` newer tokens follow them;
    the first `sink_capacity` tokens stay in `sink` at 16-bit.
    """

    kv_heads: int
    head_dim: int
    storage_dtype: str
    bits: int | None = None
    mode: str = "per_token"
    group_size: int = 32
    block_tokens: int = 32
    sink_capacity: int = 0
    window: int = 0
    sink: Any = None
    blocks: list[QuantizedBlock] = field(default_factory=list)
    tail: Any = None

    def __post_init__(self) -> None:
        carrier = np.uint16 if self.storage_dtype == "bfloat16" else self.storage_dtype
        if self.sink is None:
            self.sink = _empty(self.kv_heads, self.head_dim, carrier)
        if self.tail is None:
            self.tail = _empty(self.kv_heads, self.head_dim, carrier)

    @property
    def tokens(self) -> int:
        return self.sink.shape[1] + self.blocked_tokens + self.tail.shape[1]

    @property
    def blocked_tokens(self) -> int:
        return sum(block.tokens for block in self.blocks)

    @property
    def frozen_tokens(self) -> int:
        """Leading tokens whose restored values can no longer change (not in the tail)."""
        if self.bits is None:
            return self.tokens
        return self.sink.shape[1] + self.blocked_tokens


@dataclass
class MergedStream:
    method: str
    direction: TokenStream
    magnitudes: Any = None
    threshold: float | None = None
    side: str = "most_distinct"
    sink_tokens: int = 0
    retained_heads: Any = None
    retained_tokens: Any = None
    retained: Any = None
    # The last tokens, unmerged: `[2, kv_heads, n, head_dim]`, n <= window. They
    # follow the `direction.tokens` merged ones and are merged once they fall out of
    # the window.
    window: int = 0
    recent: Any = None

    @property
    def merged_tokens(self) -> int:
        return self.direction.tokens

    @property
    def recent_tokens(self) -> int:
        return 0 if self.recent is None else int(self.recent.shape[2])

    @property
    def tokens(self) -> int:
        return self.merged_tokens + self.recent_tokens

    @property
    def frozen_tokens(self) -> int:
        # Recent tokens change when they are merged.
        return self.direction.frozen_tokens

    @property
    def retained_count(self) -> int:
        return 0 if self.retained_tokens is None else int(self.retained_tokens.shape[0])


Side = list[TokenStream] | MergedStream


@dataclass
class LayerGroupEntry:
    layers: tuple[int, ...]
    dtype: str
    kv_heads: int
    head_dim: int
    keys: Side
    values: Side

    def __post_init__(self) -> None:
        self.layers = tuple(self.layers)

    @property
    def tokens(self) -> int:
        return _side_tokens(self.keys)

    @property
    def frozen_tokens(self) -> int:
        return min(_side_frozen(self.keys), _side_frozen(self.values))


def _side_tokens(side: Side) -> int:
    return side.tokens if isinstance(side, MergedStream) else side[0].tokens


def _side_frozen(side: Side) -> int:
    if isinstance(side, MergedStream):
        return side.frozen_tokens
    return min(stream.frozen_tokens for stream in side)


_TYPES = {cls.__name__: cls for cls in (QuantizedBlock, TokenStream, MergedStream, LayerGroupEntry)}


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        plain = {"__type__": type(obj).__name__}
        for f in dataclasses.fields(obj):
            plain[f.name] = _to_plain(getattr(obj, f.name))
        return plain
    if isinstance(obj, (list, tuple)):
        return [_to_plain(item) for item in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if hasattr(obj, "__array__") and not isinstance(obj, (str, bytes)):
        array = np.ascontiguousarray(to_numpy(obj))
        return {"__array__": [array.dtype.str, list(array.shape)], "data": array.data}
    return obj


def _from_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        if "__array__" in obj:
            dtype, shape = obj["__array__"]
            return np.frombuffer(obj["data"], dtype=np.dtype(dtype)).reshape(shape)
        if "__type__" in obj:
            cls = _TYPES[obj["__type__"]]
            return cls(**{k: _from_plain(v) for k, v in obj.items() if k != "__type__"})
        return {k: _from_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_plain(item) for item in obj]
    return obj


def encode_entry(entry: LayerGroupEntry) -> bytes:
    body = msgpack.packb(_to_plain(entry), use_bin_type=True)
    return _HEADER.pack(FORMAT_MAGIC, FORMAT_VERSION, zlib.crc32(body)) + body


def decode_entry(data: bytes | memoryview) -> LayerGroupEntry:
    """Verify and decode an entry; arrays are read-only views into `data`."""
    data = memoryview(data)
    if len(data) < _HEADER.size:
        raise CorruptEntryError(f"entry is {len(data)} bytes, shorter than its header")
    magic, version, checksum = _HEADER.unpack_from(data)
    if magic != FORMAT_MAGIC:
        raise CorruptEntryError("not a MiniCache entry (bad magic)")
    if version != FORMAT_VERSION:
        raise CorruptEntryError(f"entry format version {version} is not supported")
    body = data[_HEADER.size :]
    if zlib.crc32(body) != checksum:
        raise CorruptEntryError("entry checksum mismatch")
    try:
        entry = _from_plain(msgpack.unpackb(body, raw=False))
    except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
        raise CorruptEntryError(f"entry body is malformed: {exc}") from exc
    if not isinstance(entry, LayerGroupEntry):
        raise CorruptEntryError("entry body is not a layer group entry")
    validate_entry(entry)
    return entry


def stored_bytes(entry: LayerGroupEntry) -> int:
    """Bytes the entry takes when stored: its full encoding, metadata included."""
    return len(encode_entry(entry))


def fp16_bytes(entry: LayerGroupEntry) -> int:
    """Bytes of the same KV held uncompressed in fp16: the compression-ratio baseline."""
    return 2 * len(entry.layers) * entry.kv_heads * entry.tokens * entry.head_dim * 2


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise CorruptEntryError(message)


def _validate_stream(stream: TokenStream, kv_heads: int, head_dim: int) -> None:
    _check(isinstance(stream, TokenStream), "stream has the wrong type")
    _check(
        (stream.kv_heads, stream.head_dim) == (kv_heads, head_dim),
        "stream shape disagrees with its entry",
    )
    _check(stream.mode in STREAM_MODES, f"unknown stream mode {stream.mode!r}")
    for part in (stream.sink, stream.tail):
        _check(
            part.ndim == 3 and part.shape[0] == kv_heads and part.shape[2] == head_dim,
            "stream part has the wrong shape",
        )
    for block in stream.blocks:
        _check(stream.bits is not None, "quantized block in an unquantized stream")
        elements = kv_heads * block.tokens * head_dim
        _check(block.codes.size == (elements * stream.bits + 7) // 8, "block codes truncated")
        _check(block.scale.shape == block.center.shape, "block statistics disagree")


def validate_entry(entry: LayerGroupEntry) -> None:
    """Structural checks of a decoded entry; raises CorruptEntryError."""
    _check(entry.dtype in KV_DTYPES, f"unknown KV dtype {entry.dtype!r}")
    _check(len(entry.layers) in (1, 2), "a layer group holds one or two layers")
    tokens = None
    for side in (entry.keys, entry.values):
        if isinstance(side, MergedStream):
            _check(len(entry.layers) == 2, "merged stream in a single-layer entry")
            _validate_stream(side.direction, entry.kv_heads, entry.head_dim)
            merged = side.merged_tokens
            if side.magnitudes is not None:
                _check(
                    side.magnitudes.shape == (2, entry.kv_heads, merged),
                    "magnitudes disagree with the direction",
                )
            if side.recent is not None:
                _check(
                    side.recent.ndim == 4
                    and side.recent.shape[:2] == (2, entry.kv_heads)
                    and side.recent.shape[3] == entry.head_dim,
                    "recent tokens have the wrong shape",
                )
                _check(side.recent_tokens <= side.window, "more recent tokens than the window")
            if side.retained_count:
                _check(
                    side.retained.shape == (2, side.retained_count, entry.head_dim),
                    "retained tokens disagree with their positions",
                )
                _check(int(side.retained_tokens.max()) < merged, "retained token out of range")
                _check(
                    int(side.retained_heads.max()) < entry.kv_heads, "retained head out of range"
                )
            count = side.tokens
        else:
            _check(
                isinstance(side, list) and len(side) == len(entry.layers),
                "one stream per layer expected",
            )
            for stream in side:
                _validate_stream(stream, entry.kv_heads, entry.head_dim)
            count = side[0].tokens
            _check(all(stream.tokens == count for stream in side), "layers disagree on tokens")
        _check(tokens is None or tokens == count, "keys and values disagree on tokens")
        tokens = count
