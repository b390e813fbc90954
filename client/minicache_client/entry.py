"""The stored form of compressed KV, and its checksummed binary format.

One `LayerGroupEntry` holds one sequence's keys and values for one layer group (a
single layer, or a merged pair): per side, a list of codecs (`minicache_client.codecs`)
that together cover the group's layers in order. A codec's dataclass fields are its
stored form.

Binary format (version 3, docs/design.md "Stored format"):

    b"MCKV" | version u8 | 3 zero bytes | xxh3-64 of everything after it (u64 LE)
    | metadata length (u32 LE) | metadata (msgpack) | zero padding to 8 bytes
    | the arrays' raw buffers, in metadata order, each padded to 8 bytes

The metadata holds the entry's fields and every codec's plain fields; an array field
is `{"__array__": index}` into the metadata's `arrays` list of [dtype, shape]. The
length of the encoding is known without encoding the arrays (`stored_bytes`), and
`decode_entry` verifies magic, version, checksum and structure before it returns
anything: arrays are read-only views into the verified buffer. A mismatch raises
`CorruptEntryError` and no data is returned.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import xxhash

from minicache_client.array_namespace import KV_DTYPES, is_array, to_numpy
from minicache_client.codecs import CODECS, Codec, CorruptEntryError
from minicache_client.codecs.base import is_codec

FORMAT_MAGIC = b"MCKV"
FORMAT_VERSION = 3
_HEADER = struct.Struct("<4sB3xQ")
_META_LENGTH = struct.Struct("<I")
_ALIGN = 8

__all__ = [
    "FORMAT_MAGIC",
    "FORMAT_VERSION",
    "CorruptEntryError",
    "LayerGroupEntry",
    "decode_entry",
    "encode_entry",
    "fp16_bytes",
    "stored_bytes",
]


@dataclass
class LayerGroupEntry:
    """`keys`, `values`: codecs covering `layers` in order (their `layer_count`s sum
    to the group's size)."""

    layers: tuple[int, ...]
    dtype: str
    kv_heads: int
    head_dim: int
    keys: list[Codec]
    values: list[Codec]

    def __post_init__(self) -> None:
        self.layers = tuple(self.layers)

    @property
    def tokens(self) -> int:
        return self.keys[0].tokens

    @property
    def frozen_tokens(self) -> int:
        return min(codec.frozen_tokens for codec in (*self.keys, *self.values))

    def codecs(self) -> list[Codec]:
        return [*self.keys, *self.values]

    def arrays(self) -> list[Any]:
        return [array for codec in self.codecs() for array in codec.arrays()]

    def locate(self, layer: int) -> tuple[tuple[Codec, int], tuple[Codec, int]]:
        """(codec, index inside it) of `layer` for keys and for values."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} is not in this entry (layers {self.layers})")
        position = self.layers.index(layer)
        return _locate(self.keys, position), _locate(self.values, position)


def _locate(side: list[Codec], position: int) -> tuple[Codec, int]:
    for codec in side:
        if position < codec.layer_count:
            return codec, position
        position -= codec.layer_count
    raise ValueError("the entry's codecs do not cover its layers")


def _padding(size: int) -> int:
    return -size % _ALIGN


def _codec_to_plain(codec: Codec, arrays: list[Any]) -> dict[str, Any]:
    plain: dict[str, Any] = {"codec": codec.name}
    for name in codec.field_names():
        value = getattr(codec, name)
        if is_array(value):
            arrays.append(value)
            value = {"__array__": len(arrays) - 1}
        elif is_codec(value):
            value = _codec_to_plain(value, arrays)
        elif isinstance(value, np.generic):
            value = value.item()
        plain[name] = value
    return plain


def _layout(entry: LayerGroupEntry) -> tuple[bytes, list[Any]]:
    """The packed metadata and the arrays, in order."""
    arrays: list[Any] = []
    meta = {
        "layers": list(entry.layers),
        "dtype": entry.dtype,
        "kv_heads": entry.kv_heads,
        "head_dim": entry.head_dim,
        "keys": [_codec_to_plain(codec, arrays) for codec in entry.keys],
        "values": [_codec_to_plain(codec, arrays) for codec in entry.values],
    }
    meta["arrays"] = [[a.dtype.str, list(a.shape)] for a in arrays]
    return msgpack.packb(meta, use_bin_type=True), arrays


def _data_start(meta_length: int) -> int:
    start = _HEADER.size + _META_LENGTH.size + meta_length
    return start + _padding(start)


def stored_bytes(entry: LayerGroupEntry) -> int:
    """Length of the entry's encoding (metadata included), without encoding its arrays."""
    meta, arrays = _layout(entry)
    return _data_start(len(meta)) + sum(a.nbytes + _padding(a.nbytes) for a in arrays)


def encode_entry(entry: LayerGroupEntry) -> bytes:
    meta, arrays = _layout(entry)
    offset = _data_start(len(meta))
    out = bytearray(offset + sum(a.nbytes + _padding(a.nbytes) for a in arrays))
    _META_LENGTH.pack_into(out, _HEADER.size, len(meta))
    out[_HEADER.size + _META_LENGTH.size : _HEADER.size + _META_LENGTH.size + len(meta)] = meta
    target = np.frombuffer(out, dtype=np.uint8)
    for array in arrays:
        host = np.ascontiguousarray(to_numpy(array))
        target[offset : offset + host.nbytes] = host.reshape(-1).view(np.uint8)
        offset += host.nbytes + _padding(host.nbytes)
    body = memoryview(out)[_HEADER.size :]
    _HEADER.pack_into(out, 0, FORMAT_MAGIC, FORMAT_VERSION, xxhash.xxh3_64_intdigest(body))
    return bytes(out)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise CorruptEntryError(message)


def _codec_from_plain(plain: Any, arrays: list[np.ndarray]) -> Codec:
    _check(isinstance(plain, dict), "codec is not a mapping")
    cls = CODECS.get(plain.get("codec"))
    _check(cls is not None, f"unknown codec {str(plain.get('codec'))[:40]!r}")
    names = {field.name for field in dataclasses.fields(cls)}
    fields = {key: value for key, value in plain.items() if key != "codec"}
    _check(set(fields) == names, f"{cls.name} codec has the wrong fields")
    for key, value in fields.items():
        if isinstance(value, dict) and "codec" in value:
            fields[key] = _codec_from_plain(value, arrays)
        elif isinstance(value, dict) and "__array__" in value:
            index = value["__array__"]
            _check(isinstance(index, int) and 0 <= index < len(arrays), "bad array reference")
            fields[key] = arrays[index]
    try:
        codec = cls(**fields)
    except (TypeError, ValueError, KeyError) as exc:
        raise CorruptEntryError(f"{cls.name} codec is malformed: {exc}") from None
    return codec


def _arrays_from(data: memoryview, specs: Any, offset: int) -> list[np.ndarray]:
    _check(isinstance(specs, list), "array list is malformed")
    arrays = []
    for spec in specs:
        try:
            dtype, shape = np.dtype(spec[0]), tuple(int(n) for n in spec[1])
            count = int(np.prod(shape, dtype=np.int64))
            _check(min(shape, default=0) >= 0, "negative array dimension")
            size = count * dtype.itemsize
            _check(dtype.kind in "fiub" and offset + size <= len(data), "array out of bounds")
            array = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
        except (TypeError, ValueError, IndexError) as exc:
            raise CorruptEntryError(f"array is malformed: {exc}") from None
        arrays.append(array)
        offset += size + _padding(size)
    _check(offset == len(data), "entry length disagrees with its arrays")
    return arrays


def decode_entry(data: bytes | bytearray | memoryview) -> LayerGroupEntry:
    """Verify and decode an entry; arrays are read-only views into `data`."""
    data = memoryview(data).toreadonly()
    if len(data) < _HEADER.size + _META_LENGTH.size:
        raise CorruptEntryError(f"entry is {len(data)} bytes, shorter than its header")
    magic, version, checksum = _HEADER.unpack_from(data)
    if magic != FORMAT_MAGIC:
        raise CorruptEntryError("not a MiniCache entry (bad magic)")
    if version != FORMAT_VERSION:
        raise CorruptEntryError(
            f"entry format version {version} is not supported (this build reads version "
            f"{FORMAT_VERSION}): the entry was written by another release; recompute it"
        )
    if bytes(data[5:8]) != bytes(3):
        raise CorruptEntryError("entry header's reserved bytes are not zero")
    if xxhash.xxh3_64_intdigest(data[_HEADER.size :]) != checksum:
        raise CorruptEntryError("entry checksum mismatch")
    (meta_length,) = _META_LENGTH.unpack_from(data, _HEADER.size)
    meta_start = _HEADER.size + _META_LENGTH.size
    _check(meta_start + meta_length <= len(data), "metadata length out of bounds")
    try:
        meta = msgpack.unpackb(data[meta_start : meta_start + meta_length], raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise CorruptEntryError(f"entry metadata is malformed: {exc}") from None
    _check(isinstance(meta, dict), "entry metadata is not a mapping")
    try:
        arrays = _arrays_from(data, meta["arrays"], _data_start(meta_length))
        entry = LayerGroupEntry(
            layers=tuple(meta["layers"]),
            dtype=meta["dtype"],
            kv_heads=meta["kv_heads"],
            head_dim=meta["head_dim"],
            keys=[_codec_from_plain(plain, arrays) for plain in meta["keys"]],
            values=[_codec_from_plain(plain, arrays) for plain in meta["values"]],
        )
    except (KeyError, TypeError) as exc:
        raise CorruptEntryError(f"entry metadata is malformed: {exc}") from None
    validate_entry(entry)
    return entry


def validate_entry(entry: LayerGroupEntry) -> None:
    """Structural checks of a decoded entry; raises CorruptEntryError."""
    _check(entry.dtype in KV_DTYPES, f"unknown KV dtype {str(entry.dtype)[:20]!r}")
    _check(
        all(isinstance(layer, int) and layer >= 0 for layer in entry.layers)
        and len(set(entry.layers)) == len(entry.layers) >= 1,
        "entry layers are malformed",
    )
    tokens = None
    for side in (entry.keys, entry.values):
        _check(isinstance(side, list) and side, "entry side holds no codec")
        _check(
            sum(codec.layer_count for codec in side) == len(entry.layers),
            "codecs do not cover the entry's layers",
        )
        position = 0
        for codec in side:
            _check(
                (codec.kv_heads, codec.head_dim, codec.dtype)
                == (entry.kv_heads, entry.head_dim, entry.dtype),
                f"{codec.name} codec disagrees with its entry's shape or dtype",
            )
            # A codec that names its layers (transform) must name the ones it covers.
            covered = entry.layers[position : position + codec.layer_count]
            _check(
                getattr(codec, "layers", covered) == covered,
                f"{codec.name} codec names layers other than its entry's",
            )
            position += codec.layer_count
            try:
                codec.check()
            except (TypeError, ValueError, AttributeError, IndexError) as exc:
                if isinstance(exc, CorruptEntryError):
                    raise
                raise CorruptEntryError(f"{codec.name} codec is malformed: {exc}") from None
            _check(tokens is None or codec.tokens == tokens, "codecs disagree on tokens")
            tokens = codec.tokens


def fp16_bytes(entry: LayerGroupEntry) -> int:
    """Bytes of the same KV held uncompressed in fp16: the compression-ratio baseline."""
    return 2 * len(entry.layers) * entry.kv_heads * entry.tokens * entry.head_dim * 2
