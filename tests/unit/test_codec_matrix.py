"""One test matrix over the codec registry (`minicache_client.codecs.CODECS`).

Every configuration in `ROWS` runs in every KV dtype (bfloat16 carried as uint16), in
several GQA shapes and chunkings, against the rules every codec keeps (codecs/base.py,
entry.py, docs/design.md sections 3 and 5):

- appending token by token, or in uneven chunks, stores exactly what one chunk stores
  (the same encoding, so the same restore), unsealed and sealed at the same token; a
  row whose codec stores its blocks as the tokens arrived (`Row.chunked_blocks`: the
  transform codec codes each append's tokens as one block) restores bit-exactly what
  one chunk restores instead;
- lossless rows restore bit-exactly; every row restores into another dtype as its
  float32 restore narrowed to that dtype;
- a merged pair retains the units its retention side asks for, and restores them
  bit-exactly;
- `stored_bytes` is the encoding's length, decode(encode) restores the same tensors,
  `restore_group` equals `restore_layer` of each layer;
- a corrupt encoding (flipped byte, other version, truncation, bad magic, or a
  structurally inconsistent entry under a valid checksum) raises `CorruptEntryError`
  and nothing else.

A codec added to `CODECS` fails `test_every_registered_codec_has_rows` until it has rows
here. The last section runs every policy preset end to end through `SequenceEncoder`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import msgpack
import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st
from kv_samples import KV_DTYPES, as_float32, assert_bit_equal, random_kv
from transform_samples import sample_artifact, transform_policy

from minicache_client.array_namespace import CARRIER_DTYPES, narrow_from_float32, widen_to_float32
from minicache_client.codecs import (
    CODECS,
    PAIR_CODECS,
    Codec,
    KiviStream,
    MergedPair,
    RawStream,
    SlerpMerge,
    TransformCoded,
)
from minicache_client.codecs.slerp_merge import distance_threshold, retained_mask, slerp_merge
from minicache_client.entry import (
    FORMAT_MAGIC,
    FORMAT_VERSION,
    CorruptEntryError,
    LayerGroupEntry,
    decode_entry,
    encode_entry,
    stored_bytes,
)
from minicache_client.policy import (
    PRESETS,
    CompressionPolicy,
    LayerBits,
    MergePlan,
    ModelShape,
    PairMerge,
    Quantization,
    Retention,
    policy_for_model,
)
from minicache_client.restore import restore_group, restore_layer
from minicache_client.sequence_encoder import SequenceEncoder
from minicache_client.transform_artifact import ARTIFACTS

# -- rows: codec configurations -----------------------------------------------------------

Build = Callable[..., Codec]


@dataclass(frozen=True)
class Row:
    """`build(kv_heads, head_dim, dtype, kind="keys")`: a new, empty codec of this
    configuration for one side (`kind`: "keys" or "values")."""

    build: Build
    # Restores every token bit-exactly.
    lossless: bool = False
    # The stored blocks follow the appends (each append's tokens coded as one block):
    # other chunkings store other encodings that restore bit-exactly the same tensors.
    chunked_blocks: bool = False


def raw(kv_heads: int, head_dim: int, dtype: str, kind: str = "keys") -> Codec:
    return RawStream(kv_heads, head_dim, dtype)


def kivi(bits: int, mode: str, *, sink: int = 0, window: int = 0) -> Build:
    def build(kv_heads: int, head_dim: int, dtype: str, kind: str = "keys") -> Codec:
        return KiviStream(
            kv_heads,
            head_dim,
            dtype,
            bits=bits,
            mode=mode,
            group_size=min(32, head_dim),
            block_tokens=16,
            sink_capacity=sink,
            window=window,
        )

    return build


def pair(merge: PairMerge, direction: Build) -> Build:
    def build(kv_heads: int, head_dim: int, dtype: str, kind: str = "keys") -> Codec:
        return CODECS[merge.method].for_pair(merge, direction(kv_heads, head_dim, dtype, kind))

    return build


@functools.cache
def transform_artifact(kv_heads: int, head_dim: int, layers: int, coder: str, rank: int) -> str:
    """The hash of a random artifact with one group of `layers` layers, registered."""
    dim = layers * kv_heads * head_dim
    return sample_artifact(
        num_layers=layers,
        kv_heads=kv_heads,
        head_dim=head_dim,
        groups=(tuple(range(layers)),),
        coder=coder,
        rank_fraction=min(rank, dim) / dim,
    )[1]


def transform(
    coder: str, *, layers: int = 2, sink: int = 2, window: int = 4, rank: int = 192
) -> Build:
    """`rank`: components kept (all of them in groups of fewer dimensions): the rules
    hold at any rank, and a full-rank basis of the larger shapes (8 x 128 x 2 layers)
    would only make the matrix slower."""

    def build(kv_heads: int, head_dim: int, dtype: str, kind: str = "keys") -> Codec:
        return TransformCoded(
            kv_heads,
            head_dim,
            dtype,
            artifact=transform_artifact(kv_heads, head_dim, layers, coder, rank),
            kind=kind,
            layer_total=layers,
            sink_capacity=sink,
            window=window,
        )

    return build


DIRECTIONS = {"raw": raw, "kivi": kivi(4, "per_channel", sink=2)}

MERGES = {
    "slerp_most_distinct": PairMerge(0, retention=Retention(gamma=0.1)),
    "slerp_least_distinct": PairMerge(
        0, t=0.3, retention=Retention(gamma=0.1, side="least_distinct")
    ),
    "slerp_fraction": PairMerge(
        0, retention=Retention(fraction=0.2, side="least_distinct", sink_tokens=3)
    ),
    "slerp_all_retained": PairMerge(0, retention=Retention(fraction=1.0)),
    "slerp_no_retention": PairMerge(0, retention=None),
    "slerp_window": PairMerge(0, retention=Retention(gamma=0.1), window=6),
    "average": PairMerge(0, method="average", retention=None),
    "average_window": PairMerge(0, method="average", retention=None, window=5),
}


def codec_rows() -> dict[str, Row]:
    rows = {"raw": Row(raw, lossless=True)}
    for bits in (2, 3, 4, 8):
        for mode in ("per_channel", "per_token"):
            rows[f"kivi{bits}_{mode}"] = Row(kivi(bits, mode))
    rows["kivi4_per_channel_sink_window"] = Row(kivi(4, "per_channel", sink=4, window=5))
    rows["kivi3_per_token_sink_window"] = Row(kivi(3, "per_token", sink=3, window=7))
    for merge_name, merge in MERGES.items():
        every_unit_retained = merge.retention is not None and merge.retention.fraction == 1.0
        for direction_name, direction in DIRECTIONS.items():
            rows[f"{merge_name}_{direction_name}"] = Row(
                pair(merge, direction), lossless=every_unit_retained
            )
    rows["transform_rans"] = Row(transform("rans"), chunked_blocks=True)
    rows["transform_zlib_no_sink_no_window"] = Row(
        transform("zlib", sink=0, window=0), chunked_blocks=True
    )
    rows["transform_rans_3_layers_low_rank"] = Row(
        transform("rans", layers=3, sink=3, window=7, rank=24), chunked_blocks=True
    )
    return rows


ROWS = codec_rows()

# (kv_heads, head_dim, tokens): GQA shapes; head_dim 12 pads every packed row.
SHAPES = {
    "3x64": (3, 64, 37),
    "2x32": (2, 32, 100),
    "1x256": (1, 256, 45),
    "8x128": (8, 128, 40),
    "2x12": (2, 12, 61),
}


def uneven(tokens: int) -> list[int]:
    sizes, sizes_cycle = [], (5, 1, 12, 2, 9, 3)
    while sum(sizes) < tokens:
        sizes.append(min(sizes_cycle[len(sizes) % len(sizes_cycle)], tokens - sum(sizes)))
    return sizes


CHUNKINGS = {"token_by_token": lambda tokens: [1] * tokens, "uneven": uneven}


def row_codec_name(row: str) -> str:
    return ROWS[row].build(2, 32, "float16").name


def rows_where(condition: Callable[[Codec], bool]) -> list[str]:
    return [row for row in sorted(ROWS) if condition(ROWS[row].build(2, 32, "float16"))]


def retains(codec: Codec) -> bool:
    return isinstance(codec, SlerpMerge) and codec.retention is not None


# -- encoding helpers ---------------------------------------------------------------------


def seed_of(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


def sample(
    row: str, dtype: str, shape: str, *, wide: bool = False
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Keys and values of every layer the row's codec holds, `[kv_heads, tokens, head_dim]`.

    `wide`: every 7th token 1e5 times larger, beyond the float16 range (float32 and
    bfloat16 only)."""
    heads, dim, tokens = SHAPES[shape]
    layer_count = ROWS[row].build(heads, dim, dtype).layer_count
    rng = np.random.default_rng(seed_of(row, dtype, shape, wide))
    scale = np.ones((1, tokens, 1), dtype=np.float32)
    if wide:
        scale[:, 3::7] = 1e5

    def layer(side_scale: float) -> np.ndarray:
        normal = rng.standard_normal((heads, tokens, dim)).astype(np.float32)
        return narrow_from_float32(normal * scale * side_scale, dtype)

    keys = [layer(1.0) for _ in range(layer_count)]
    values = [layer(0.3) for _ in range(layer_count)]
    return keys, values


def encode(
    row: str,
    dtype: str,
    shape: str,
    chunks: list[int],
    *,
    seal: bool = False,
    thresholds: list[float | None] | None = None,
    wide: bool = False,
) -> LayerGroupEntry:
    """An entry of the row's codec for keys and values, fed `chunks` tokens at a time.

    `thresholds`: the retention thresholds to start from (keys, values), as another
    entry fixed them."""
    heads, dim, _ = SHAPES[shape]
    codecs = [ROWS[row].build(heads, dim, dtype, kind) for kind in ("keys", "values")]
    for codec, threshold in zip(codecs, thresholds or [None, None], strict=True):
        if threshold is not None:
            codec.threshold = threshold
    for codec, layers in zip(codecs, sample(row, dtype, shape, wide=wide), strict=True):
        start = 0
        for size in chunks:
            codec.append([layer[:, start : start + size] for layer in layers])
            start += size
        if seal:
            codec.seal()
    return LayerGroupEntry(
        layers=tuple(range(codecs[0].layer_count)),
        dtype=dtype,
        kv_heads=heads,
        head_dim=dim,
        keys=[codecs[0]],
        values=[codecs[1]],
    )


def one_chunk(row: str, dtype: str, shape: str, *, seal: bool = False) -> LayerGroupEntry:
    return encode(row, dtype, shape, [SHAPES[shape][2]], seal=seal)


def thresholds_of(entry: LayerGroupEntry) -> list[float | None]:
    return [getattr(codec, "threshold", None) for codec in entry.codecs()]


def assert_same_restores(actual: LayerGroupEntry, expected: LayerGroupEntry) -> None:
    for got, want in zip(restore_group(actual), restore_group(expected), strict=True):
        assert got[0] == want[0]
        assert_bit_equal(got[1], want[1])
        assert_bit_equal(got[2], want[2])


def assert_same_entry(actual: LayerGroupEntry, expected: LayerGroupEntry) -> None:
    assert (actual.tokens, actual.frozen_tokens) == (expected.tokens, expected.frozen_tokens)
    assert encode_entry(actual) == encode_entry(expected)
    assert_same_restores(actual, expected)


def assert_stores_like(row: str, chunked: LayerGroupEntry, whole: LayerGroupEntry) -> None:
    """`chunked`, fed the tokens of `whole` in other chunks, stores what it stores: the
    same encoding, or (`Row.chunked_blocks`) other blocks restoring the same tensors."""
    if not ROWS[row].chunked_blocks:
        assert_same_entry(chunked, whole)
        return
    assert (chunked.tokens, chunked.frozen_tokens) == (whole.tokens, whole.frozen_tokens)
    assert_same_restores(chunked, whole)
    assert_same_restores(decode_entry(encode_entry(chunked)), whole)


# -- the registry is covered --------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CODECS))
def test_every_registered_codec_has_rows(name: str) -> None:
    rows = [row for row in ROWS if row_codec_name(row) == name]
    assert rows, f"codec {name!r} is registered in CODECS but has no rows in ROWS: add them"
    if name in PAIR_CODECS:
        directions = {ROWS[row].build(2, 32, "float16").direction.name for row in rows}
        assert directions >= {"raw", "kivi"}, f"{name!r} needs rows with a raw and a kivi direction"


def test_every_row_names_a_registered_codec() -> None:
    for row in ROWS:
        codec = ROWS[row].build(2, 32, "float16")
        assert CODECS[codec.name] is type(codec)
        assert codec.tokens == 0 and codec.frozen_tokens == 0


# -- chunking ------------------------------------------------------------------------------


@pytest.mark.parametrize("chunking", sorted(CHUNKINGS))
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize("row", sorted(ROWS))
def test_chunked_appends_store_what_one_chunk_stores(
    row: str, dtype: str, shape: str, chunking: str
) -> None:
    # A pair's first merged chunk fixes its retention threshold (checked by
    # test_the_first_merged_chunk_fixes_the_threshold); from the same threshold, every
    # token is decided the same however the tokens arrive.
    tokens = SHAPES[shape][2]
    whole = one_chunk(row, dtype, shape)
    chunks = CHUNKINGS[chunking](tokens)
    chunked = encode(row, dtype, shape, chunks, thresholds=thresholds_of(whole))
    assert_stores_like(row, chunked, whole)
    for entry in (whole, chunked):
        for codec in entry.codecs():
            codec.seal()
    assert_stores_like(row, chunked, whole)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("chunking", sorted(CHUNKINGS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("row", sorted(ROWS))
def test_chunking_does_not_matter_beyond_the_float16_range(
    row: str, dtype: str, chunking: str
) -> None:
    # Statistics and magnitudes fall back to float32 where float16 overflows; the
    # values that fit are stored the same whichever chunk brought the overflow.
    shape = "2x32"
    tokens = SHAPES[shape][2]
    whole = encode(row, dtype, shape, [tokens], wide=True)
    chunked = encode(
        row, dtype, shape, CHUNKINGS[chunking](tokens), thresholds=thresholds_of(whole), wide=True
    )
    assert_stores_like(row, chunked, whole)
    restored = restore_group(whole, dtype="float32")
    assert all(np.isfinite(tensor).all() for _, *tensors in restored for tensor in tensors)


@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize("row", sorted(ROWS))
def test_appends_after_a_seal_store_what_one_chunk_after_it_stores(row: str, dtype: str) -> None:
    shape, prefix = "2x32", 43
    tokens = SHAPES[shape][2]
    whole = encode(row, dtype, shape, [prefix], seal=True)
    for codec, layers in zip(whole.codecs(), sample(row, dtype, shape), strict=True):
        codec.append([layer[:, prefix:] for layer in layers])
    stepwise = encode(row, dtype, shape, [prefix], seal=True)
    for codec, layers in zip(stepwise.codecs(), sample(row, dtype, shape), strict=True):
        for token in range(prefix, tokens):
            codec.append([layer[:, token : token + 1] for layer in layers])
    assert whole.tokens == tokens
    assert_stores_like(row, stepwise, whole)


@pytest.mark.parametrize("row", sorted(ROWS))
def test_frozen_tokens_never_change_on_later_appends(row: str) -> None:
    dtype, shape = "float16", "2x32"
    tokens = SHAPES[shape][2]
    entry = encode(row, dtype, shape, [0])
    history = []
    start = 0
    for end in (5, 12, 13, 30, 31, 64, 65, tokens):
        for codec, layers in zip(entry.codecs(), sample(row, dtype, shape), strict=True):
            codec.append([layer[:, start:end] for layer in layers])
        start = end
        assert entry.frozen_tokens <= entry.tokens == end
        restored = restore_group(entry)
        for frozen, earlier in history:
            for (_, keys, values), (_, old_keys, old_values) in zip(restored, earlier, strict=True):
                assert_bit_equal(keys[:, :frozen], old_keys[:, :frozen])
                assert_bit_equal(values[:, :frozen], old_values[:, :frozen])
        history.append((entry.frozen_tokens, restored))


# -- restore -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize("row", sorted(row for row in ROWS if ROWS[row].lossless))
def test_lossless_rows_restore_bit_exactly(row: str, dtype: str, shape: str) -> None:
    keys, values = sample(row, dtype, shape)
    for seal in (False, True):
        restored = restore_group(one_chunk(row, dtype, shape, seal=seal))
        for which, (layer, restored_keys, restored_values) in enumerate(restored):
            assert layer == which
            assert_bit_equal(restored_keys, keys[which])
            assert_bit_equal(restored_values, values[which])


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize("row", sorted(ROWS))
def test_restore_group_ranges_and_other_dtypes_agree(row: str, dtype: str, shape: str) -> None:
    heads, dim, tokens = SHAPES[shape]
    entry = one_chunk(row, dtype, shape, seal=True)
    grouped = restore_group(entry)
    assert [layer for layer, _, _ in grouped] == list(entry.layers)
    for layer, keys, values in grouped:
        assert keys.shape == values.shape == (heads, tokens, dim)
        assert keys.dtype == values.dtype == CARRIER_DTYPES[dtype]
        single = restore_layer(entry, layer)
        assert_bit_equal(single[0], keys)
        assert_bit_equal(single[1], values)
        for start, end in ((0, 0), (0, 1), (3, 19), (15, 33), (16, 32), (tokens - 5, tokens)):
            part = restore_layer(entry, layer, start, end)
            assert_bit_equal(part[0], keys[:, start:end])
            assert_bit_equal(part[1], values[:, start:end])
        as_float = restore_layer(entry, layer, dtype="float32")
        for other in KV_DTYPES:
            converted = restore_layer(entry, layer, dtype=other)
            for got, wide in zip(converted, as_float, strict=True):
                assert_bit_equal(got, narrow_from_float32(wide, other))
    for (_, keys, values), (_, part_keys, part_values) in zip(
        grouped, restore_group(entry, 4, 9), strict=True
    ):
        assert_bit_equal(part_keys, keys[:, 4:9])
        assert_bit_equal(part_values, values[:, 4:9])


# -- retention -----------------------------------------------------------------------------


def merged_distances(codec: SlerpMerge, layers: list[np.ndarray], dtype: str) -> np.ndarray:
    """Angular distances d `[kv_heads, merged]` of the pair's merged tokens."""
    merged = codec.merged_tokens
    x, y = (widen_to_float32(layer[:, :merged], dtype) for layer in layers)
    return slerp_merge(x, y, codec.t)[2] / math.pi


def retained_units(codec: SlerpMerge) -> set[tuple[int, int]]:
    heads, tokens = codec.retained_heads.tolist(), codec.retained_tokens.tolist()
    return set(zip(heads, tokens, strict=True))


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize("row", rows_where(retains))
def test_retention_keeps_its_side_and_restores_it_exactly(row: str, dtype: str, shape: str) -> None:
    entry = one_chunk(row, dtype, shape, seal=True)
    restored = restore_group(entry)
    pairs = zip(entry.codecs(), sample(row, dtype, shape), strict=True)
    for kind, (codec, layers) in enumerate(pairs):
        retention = Retention(**codec.retention)
        distances = merged_distances(codec, layers, dtype)
        kept = retained_units(codec)
        assert len(kept) == codec.retained_count
        # Every unit is tested against the one stored threshold.
        mask = retained_mask(distances, codec.threshold, retention, 0)
        assert kept == set(zip(*(axis.tolist() for axis in np.nonzero(mask)), strict=True))
        sinks = {(h, t) for h in range(codec.kv_heads) for t in range(retention.sink_tokens)}
        assert sinks <= kept
        chosen = np.zeros(distances.shape, dtype=bool)
        for head, token in kept - sinks:
            chosen[head, token] = True
        others = ~chosen
        for head, token in sinks:
            others[head, token] = False
        if chosen.any() and others.any():
            if retention.side == "most_distinct":
                assert distances[chosen].min() >= distances[others].max()
            else:
                assert distances[chosen].max() <= distances[others].min()
        heads, tokens = codec.retained_heads, codec.retained_tokens
        for which, layer in enumerate(layers):
            assert_bit_equal(restored[which][1 + kind][heads, tokens], layer[heads, tokens])
            assert_bit_equal(codec.retained[which], layer[heads, tokens])


@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize("row", rows_where(retains))
def test_the_first_merged_chunk_fixes_the_threshold(row: str, dtype: str) -> None:
    shape, first = "2x32", 30
    entry = encode(row, dtype, shape, [first, 1, 1, 40, 28])
    for codec, layers in zip(entry.codecs(), sample(row, dtype, shape), strict=True):
        retention = Retention(**codec.retention)
        merged_first = first - codec.window
        x, y = (widen_to_float32(layer[:, :merged_first], dtype) for layer in layers)
        distances = slerp_merge(x, y, codec.t)[2] / math.pi
        assert codec.threshold == distance_threshold(distances, retention)


@pytest.mark.parametrize("row", rows_where(lambda codec: not retains(codec)))
def test_rows_without_retention_retain_nothing(row: str) -> None:
    entry = one_chunk(row, "float16", "3x64")
    for codec in entry.codecs():
        if isinstance(codec, SlerpMerge):
            assert codec.retained_count == 0 and codec.threshold is None
        else:
            assert not hasattr(codec, "retained")


# -- the stored form -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize("row", sorted(ROWS))
def test_encoding_round_trips(row: str, dtype: str, shape: str) -> None:
    for seal in (False, True):
        entry = one_chunk(row, dtype, shape, seal=seal)
        data = encode_entry(entry)
        assert stored_bytes(entry) == len(data)
        assert data[:4] == FORMAT_MAGIC and data[4] == FORMAT_VERSION
        decoded = decode_entry(data)
        assert (decoded.layers, decoded.dtype) == (entry.layers, entry.dtype)
        assert (decoded.kv_heads, decoded.head_dim) == (entry.kv_heads, entry.head_dim)
        assert (decoded.tokens, decoded.frozen_tokens) == (entry.tokens, entry.frozen_tokens)
        # Deterministic, and decoding loses nothing that is stored.
        assert encode_entry(decoded) == data
        assert stored_bytes(decoded) == len(data)
        assert_same_restores(decoded, entry)


@pytest.mark.parametrize("row", sorted(ROWS))
def test_a_decoded_entry_keeps_appending_like_the_original(row: str) -> None:
    dtype, shape = "bfloat16", "2x32"
    entry = encode(row, dtype, shape, [50])
    decoded = decode_entry(encode_entry(entry))
    for target in (entry, decoded):
        for codec, layers in zip(target.codecs(), sample(row, dtype, shape), strict=True):
            codec.append([layer[:, 50:] for layer in layers])
    assert_same_entry(decoded, entry)


# -- corruption ------------------------------------------------------------------------------

HEADER = struct.Struct("<4sB3xQ")  # magic, version, 3 zero bytes, xxh3-64
META_LENGTH = struct.Struct("<I")


def encoded_row(row: str, dtype: str = "float16") -> bytes:
    return encode_entry(one_chunk(row, dtype, "2x12", seal=True))


def reencoded(data: bytes, change: Callable[[dict], None]) -> bytes:
    """`data` with its metadata changed by `change`, under a valid checksum."""
    (meta_length,) = META_LENGTH.unpack_from(data, HEADER.size)
    meta_start = HEADER.size + META_LENGTH.size
    meta = msgpack.unpackb(data[meta_start : meta_start + meta_length], raw=False)
    arrays_start = meta_start + meta_length + (-(meta_start + meta_length) % 8)
    change(meta)
    packed = msgpack.packb(meta, use_bin_type=True)
    body = META_LENGTH.pack(len(packed)) + packed
    body += bytes(-(HEADER.size + len(body)) % 8) + data[arrays_start:]
    return HEADER.pack(FORMAT_MAGIC, FORMAT_VERSION, xxhash.xxh3_64_intdigest(body)) + body


def assert_corrupt_or_restorable(data: bytes, what: str) -> None:
    """Decoding raises CorruptEntryError, or the entry it returns restores."""
    try:
        entry = decode_entry(data)
    except CorruptEntryError:
        return
    except Exception as exc:
        pytest.fail(f"{what}: decode raised {type(exc).__name__}: {exc}")
    try:
        restored = [tensors for _, *tensors in restore_group(entry)]
        for layer in entry.layers:
            restored.append(restore_layer(entry, layer, 1, max(1, entry.tokens - 1), "float32"))
    except Exception as exc:
        pytest.fail(f"{what}: decoded, then restore raised {type(exc).__name__}: {exc}")
    for tensors in restored:
        for tensor in tensors:
            assert tensor.shape[0::2] == (entry.kv_heads, entry.head_dim), what


@pytest.mark.parametrize("row", sorted(ROWS))
def test_reencoding_unchanged_metadata_is_the_same_encoding(row: str) -> None:
    data = encoded_row(row)
    assert reencoded(data, lambda meta: None) == data


@settings(max_examples=30, deadline=None)
@given(data=st.data())
@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize("row", sorted(ROWS))
def test_any_flipped_byte_is_detected(row: str, dtype: str, data: st.DataObject) -> None:
    encoded = encoded_row(row, dtype)
    position = data.draw(st.integers(0, len(encoded) - 1), label="position")
    flip = data.draw(st.integers(1, 255), label="xor")
    corrupted = bytearray(encoded)
    corrupted[position] ^= flip
    # From the checksum (bytes 8-15) on, the checksum is what catches it.
    message = "checksum" if position >= 8 else None
    with pytest.raises(CorruptEntryError, match=message):
        decode_entry(bytes(corrupted))


@pytest.mark.parametrize("row", sorted(ROWS))
def test_every_body_byte_is_under_the_checksum(row: str) -> None:
    encoded = encoded_row(row)
    for position in range(HEADER.size, len(encoded)):
        corrupted = bytearray(encoded)
        corrupted[position] ^= 0x10
        with pytest.raises(CorruptEntryError, match="checksum"):
            decode_entry(bytes(corrupted))


@pytest.mark.parametrize("row", sorted(ROWS))
def test_another_version_is_refused_by_name(row: str) -> None:
    encoded = encoded_row(row)
    for version in (0, 1, FORMAT_VERSION - 1, FORMAT_VERSION + 1, 255):
        data = encoded[:4] + bytes([version]) + encoded[5:]
        with pytest.raises(CorruptEntryError, match=f"version {version} is not supported"):
            decode_entry(data)


@pytest.mark.parametrize("row", sorted(ROWS))
def test_truncated_extended_or_foreign_data_is_refused(row: str) -> None:
    encoded = encoded_row(row)
    for length in range(len(encoded)):
        with pytest.raises(CorruptEntryError):
            decode_entry(encoded[:length])
    for extra in (b"\x00", b"\x00" * 8, b"\xff" * 3):
        with pytest.raises(CorruptEntryError):
            decode_entry(encoded + extra)
    with pytest.raises(CorruptEntryError, match="magic"):
        decode_entry(b"XCKV" + encoded[4:])


def codec_paths(plain: dict, path: tuple = ()) -> Iterator[tuple[tuple, dict]]:
    """(path, codec mapping) of every codec in `plain`, nested ones included."""
    yield path, plain
    for key, value in plain.items():
        if isinstance(value, dict) and "codec" in value:
            yield from codec_paths(value, (*path, key))


def set_at(path: tuple, value: object) -> Callable[[dict], None]:
    """A metadata change: the item at `path` (keys and indices) becomes `value`."""

    def change(meta: dict) -> None:
        container = meta
        for key in path[:-1]:
            container = container[key]
        container[path[-1]] = copy.deepcopy(value)

    return change


BAD_VALUES = (None, -1, 0, 1, 3, 7, 2**40, 0.5, "float64", "", [], {}, True)
SAME_SIZE_DTYPES = {
    1: ("|u1", "|i1", "|b1"),
    2: ("<f2", "<u2", "<i2"),
    4: ("<f4", "<i4"),
    8: ("<i8", "<f8", "<u8"),
}


def shape_variants(shape: list[int]) -> list[list[int]]:
    """Other shapes with as many elements."""
    count = math.prod(shape)
    variants = [[count], [1, *shape], shape[::-1], [*shape, 1]]
    if len(shape) >= 2:
        variants.append([shape[0] * shape[1], *shape[2:]])
    return [variant for variant in variants if variant != shape]


def structural_corruptions(data: bytes) -> Iterator[tuple[str, Callable[[dict], None]]]:
    """(description, change) of metadata changes that keep the arrays' bytes valid."""
    (meta_length,) = META_LENGTH.unpack_from(data, HEADER.size)
    meta_start = HEADER.size + META_LENGTH.size
    meta = msgpack.unpackb(data[meta_start : meta_start + meta_length], raw=False)
    for key in ("layers", "dtype", "kv_heads", "head_dim"):
        for value in (*BAD_VALUES, [0, 0], [5]):
            yield f"entry {key}={value!r}", set_at((key,), value)
    for side in ("keys", "values"):
        yield f"{side}=[]", set_at((side,), [])
        yield f"{side} twice", set_at((side,), [meta[side][0]] * 2)
        for path, plain in codec_paths(meta[side][0]):
            owner = (side, 0, *path)
            where = ".".join(map(str, owner))
            for name in (*CODECS, "unknown", None):
                if name != plain["codec"]:
                    yield f"{where}.codec={name!r}", set_at((*owner, "codec"), name)
            for field, value in plain.items():
                if field == "codec":
                    continue
                for bad in BAD_VALUES:
                    yield f"{where}.{field}={bad!r}", set_at((*owner, field), bad)
                if isinstance(value, dict) and "__array__" in value:
                    for index in (value["__array__"] + 1, -1, len(meta["arrays"])):
                        reference = {"__array__": index}
                        yield (
                            f"{where}.{field} -> array {index}",
                            set_at((*owner, field), reference),
                        )
    for index, (dtype, shape) in enumerate(meta["arrays"]):
        for other in SAME_SIZE_DTYPES[np.dtype(dtype).itemsize]:
            if other != dtype:
                yield f"array {index} dtype {other}", set_at(("arrays", index), [other, shape])
        for variant in shape_variants(shape):
            yield f"array {index} shape {variant}", set_at(("arrays", index), [dtype, variant])
    yield "no arrays", set_at(("arrays",), [])
    yield "no entry fields", lambda meta: meta.clear()


@pytest.mark.parametrize("row", sorted(ROWS))
def test_structurally_inconsistent_entries_are_corrupt_never_another_error(row: str) -> None:
    data = encoded_row(row, "bfloat16")
    for what, change in structural_corruptions(data):
        assert_corrupt_or_restorable(reencoded(data, change), what)


@pytest.mark.parametrize("row", rows_where(lambda codec: hasattr(codec, "first_layer")))
def test_a_codec_naming_other_layers_than_its_entry_is_corrupt(row: str) -> None:
    # A transform codec names its layers: another group's (whose transform the
    # artifact may well hold) would restore with the wrong transform.
    data = encoded_row(row)
    for side in ("keys", "values"):
        for first in (1, 3, 2**40):
            with pytest.raises(CorruptEntryError):
                decode_entry(reencoded(data, set_at((side, 0, "first_layer"), first)))


@pytest.mark.parametrize("row", sorted(ROWS))
def test_an_unknown_codec_is_corrupt(row: str) -> None:
    def unknown(meta: dict) -> None:
        meta["values"][0]["codec"] = "zstd"

    with pytest.raises(CorruptEntryError, match="unknown codec 'zstd'"):
        decode_entry(reencoded(encoded_row(row), unknown))


def stored_arrays(
    codec: Codec, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """(field path, array) of every array a codec stores, nested codecs included."""
    for field in dataclasses.fields(codec):
        value = getattr(codec, field.name)
        if isinstance(value, Codec):
            yield from stored_arrays(value, (*path, field.name))
        elif isinstance(value, np.ndarray):
            yield (*path, field.name), value


@pytest.mark.parametrize("row", sorted(ROWS))
def test_an_array_one_token_short_is_corrupt(row: str) -> None:
    # Encoded from the changed entry: the checksum is valid, the structure is not.
    entry = one_chunk(row, "float16", "2x12", seal=True)
    shortened = 0
    for path, array in stored_arrays(entry.keys[0]):
        axis = min(1, array.ndim - 1)
        if array.shape[axis] == 0:
            continue
        changed = copy.deepcopy(entry)
        owner = changed.keys[0]
        for name in path[:-1]:
            owner = getattr(owner, name)
        setattr(owner, path[-1], np.delete(array, -1, axis=axis))
        with pytest.raises(CorruptEntryError):
            decode_entry(encode_entry(changed))
        shortened += 1
    assert shortened


# -- policies end to end ------------------------------------------------------------------

POLICY_LAYERS, POLICY_HEADS, POLICY_DIM = 30, 3, 64
PREFILL, DECODED = 50, 12
PRESET_NAMES = (
    "none",
    "kivi4",
    "kivi4_sink",
    "kivi2",
    "paper",
    "paper_kivi4",
    "average",
    "default",
)
CUSTOM_POLICIES = {
    policy.name: policy
    for policy in (
        CompressionPolicy(
            "pairs_keys_only_least",
            merge=MergePlan(
                pairs=(
                    PairMerge(
                        0,
                        values=False,
                        t=0.5,
                        retention=Retention(fraction=0.2, side="least_distinct"),
                    ),
                    PairMerge(4, keys=False, retention=Retention(gamma=0.1, sink_tokens=2)),
                )
            ),
        ),
        CompressionPolicy(
            "k3v2_sink_window",
            quantization=Quantization(
                3,
                2,
                key_group_size=16,
                value_group_size=8,
                window=8,
                sink_tokens=4,
                full_precision_layers=(0,),
            ),
        ),
        CompressionPolicy(
            "merge_from_2_kivi8",
            merge=MergePlan(start_layer=2, t=0.4, retention=Retention(fraction=0.1)),
            quantization=Quantization(8, 8, key_group_size=32, value_group_size=32),
        ),
        CompressionPolicy(
            "average_values_kivi4_window",
            merge=MergePlan(start_layer=1, keys=False, method="average", retention=None, window=4),
            quantization=Quantization(4, None, key_group_size=8, window=4),
        ),
    )
}
_TRANSFORM_PLAN = transform_policy(
    sample_artifact(
        POLICY_LAYERS,
        POLICY_HEADS,
        POLICY_DIM,
        groups=((0, 1, 2), (7, 8)),
        coder="zlib",
        step=0.25,
        seed=30,
    )[1],
    groups=((0, 1, 2), (7, 8)),
    sink_tokens=3,
    window=5,
).transform
CUSTOM_POLICIES["transform_kivi4"] = CompressionPolicy(
    "transform_kivi4",
    transform=_TRANSFORM_PLAN,
    quantization=Quantization(4, 4, key_group_size=16, value_group_size=16, sink_tokens=2),
)
CUSTOM_POLICIES["transform_paper"] = CompressionPolicy(
    "transform_paper",
    transform=_TRANSFORM_PLAN,
    merge=MergePlan(start_layer=16, retention=Retention(gamma=0.05)),
)
POLICIES = {**{name: PRESETS[name] for name in PRESET_NAMES}, **CUSTOM_POLICIES}


def test_every_preset_is_in_the_matrix() -> None:
    assert set(PRESETS) == set(PRESET_NAMES)


def policy_layers(name: str, dtype: str) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed_of(name, dtype))
    shape = (POLICY_HEADS, PREFILL + DECODED, POLICY_DIM)
    return [
        (random_kv(rng, shape, dtype), random_kv(rng, shape, dtype, 0.3))
        for _ in range(POLICY_LAYERS)
    ]


def transform_bounds(
    codec: TransformCoded, layers: list[tuple[np.ndarray, np.ndarray]], dtype: str
) -> np.ndarray:
    """Per token, the most a layer of `codec`'s group may be off after a restore: half
    a step per kept component, plus what the artifact's basis misses of the token (its
    dropped components: most of a random token for a calibrated, low-rank basis), times
    the RoPE scale for keys, plus 16-bit rounding."""
    artifact = ARTIFACTS.get(codec.artifact)
    side = artifact.group_for(codec.layers)[1].side(codec.kind)
    index = ("keys", "values").index(codec.kind)
    wide = [as_float32(layers[layer][index], dtype) for layer in codec.layers]
    if codec.kind == "keys":
        wide = [
            artifact.rope[layer].rotate(x, 0, inverse=True)
            for layer, x in zip(codec.layers, wide, strict=True)
        ]
    vectors = np.stack(wide).transpose(2, 0, 1, 3).reshape(wide[0].shape[1], -1)
    residual = vectors.astype(np.float64) - side.mean
    basis = side.basis.astype(np.float64)
    missed = np.linalg.norm(residual - (residual @ basis) @ basis.T, axis=1)
    scale = max(1.0, *(artifact.rope[layer].attention_scaling for layer in codec.layers))
    return scale * (1.01 * side.step / 2 * math.sqrt(side.rank) + missed) + 0.1


def error_bound(policy: CompressionPolicy, kind: str, layer: int, codec: Codec) -> str:
    if isinstance(codec, MergedPair):
        return "merged"
    if isinstance(codec, TransformCoded):
        return "transform"
    bits = policy.quantization.bits_for(kind, layer) if policy.quantization else None
    return "exact" if bits is None else f"bits{bits}"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policy_end_to_end(name: str, dtype: str) -> None:
    policy = POLICIES[name]
    layers = policy_layers(name, dtype)
    encoder = SequenceEncoder(
        policy, num_layers=POLICY_LAYERS, kv_heads=POLICY_HEADS, head_dim=POLICY_DIM, dtype=dtype
    )
    for layer, (keys, values) in enumerate(layers):
        encoder.put_layer(layer, keys[:, :PREFILL], values[:, :PREFILL], seal=True)
    for token in range(PREFILL, PREFILL + DECODED):
        for layer, (keys, values) in enumerate(layers):
            encoder.put_layer(layer, keys[:, token : token + 1], values[:, token : token + 1])

    tokens = PREFILL + DECODED
    assert encoder.fp16_bytes() == POLICY_LAYERS * 2 * POLICY_HEADS * tokens * POLICY_DIM * 2
    ratio = encoder.compression_ratio()
    if name == "none":
        assert 0.9 < ratio < 1.0
    elif policy.quantization is not None and policy.quantization.key_bits is not None:
        assert ratio > 1.3
    else:
        assert ratio >= 0.95

    restored = {}
    for entry in encoder.entries:
        data = encode_entry(entry)
        decoded = decode_entry(data)
        assert encode_entry(decoded) == data
        assert_same_restores(decoded, entry)
        for layer, keys, values in restore_group(decoded):
            restored[layer] = (keys, values)
    assert sorted(restored) == list(range(POLICY_LAYERS))

    for layer, originals in enumerate(layers):
        entry = encoder.entry_for(layer)
        for kind_index, (kind, (codec, which)) in enumerate(
            zip(("keys", "values"), entry.locate(layer), strict=True)
        ):
            original, result = originals[kind_index], restored[layer][kind_index]
            assert result.shape == original.shape and result.dtype == original.dtype
            x = as_float32(original, dtype).astype(np.float64)
            x_hat = as_float32(result, dtype).astype(np.float64)
            assert np.isfinite(x_hat).all()
            bound = error_bound(policy, kind, layer, codec)
            if bound == "exact":
                assert_bit_equal(result, original)
            elif bound == "transform":
                # Sink and window exact; a coded token within its quantization cell
                # and what the basis misses of it.
                sink, recent = codec.sink_capacity, tokens - codec.window
                assert_bit_equal(result[:, :sink], original[:, :sink])
                assert_bit_equal(result[:, recent:], original[:, recent:])
                per_token = np.linalg.norm(x - x_hat, axis=(0, 2))
                assert (per_token <= transform_bounds(codec, layers, dtype)).all()
                assert np.abs(x - x_hat)[:, sink:recent].max() > 0
            elif bound.startswith("bits"):
                # Loose: one whole step of the head's full range (plus 16-bit rounding).
                levels = (1 << int(bound[4:])) - 1
                head_range = x.max(axis=(1, 2), keepdims=True) - x.min(axis=(1, 2), keepdims=True)
                assert (np.abs(x - x_hat) <= head_range / levels + 1e-2).all()
                assert np.abs(x - x_hat).max() > 0
            else:
                # Merged: the partner's vector can point anywhere; the restored one is at
                # most both norms away (SLERP keeps |x|; the average is (x + y) / 2).
                partner = entry.layers[1 - which]
                y = as_float32(layers[partner][kind_index], dtype).astype(np.float64)
                norms = np.maximum(np.linalg.norm(x, axis=-1), np.linalg.norm(y, axis=-1))
                assert (np.linalg.norm(x - x_hat, axis=-1) <= 2.05 * norms + 0.1).all()
                if isinstance(codec, SlerpMerge) and codec.retained_count:
                    heads, positions = codec.retained_heads, codec.retained_tokens
                    assert_bit_equal(result[heads, positions], original[heads, positions])
                if isinstance(codec, SlerpMerge) and isinstance(codec.direction, RawStream):
                    kept = np.linalg.norm(x_hat, axis=-1) / np.maximum(
                        np.linalg.norm(x, axis=-1), 1e-6
                    )
                    np.testing.assert_allclose(kept, 1.0, rtol=1e-2)


def test_default_is_kept_for_its_model_and_falls_back_for_another() -> None:
    default = PRESETS["default"]
    assert policy_for_model(default, default.calibrated_for) is default
    assert policy_for_model(default, ModelShape(24, 2, 64)) is PRESETS["kivi4_sink"]


@pytest.mark.parametrize(
    "policy",
    [
        CompressionPolicy("pair_28", merge=MergePlan(pairs=(PairMerge(28),))),
        CompressionPolicy("bits_29", quantization=Quantization(layer_bits=(LayerBits(29, 2, 2),))),
        CompressionPolicy("exact_29", quantization=Quantization(full_precision_layers=(29,))),
        replace(PRESETS["default"], name="calibrated"),
    ],
    ids=lambda policy: policy.name,
)
def test_a_policy_naming_layer_29_is_refused_for_24_layers(policy: CompressionPolicy) -> None:
    assert policy_for_model(policy, ModelShape(30, 3, 64)) is policy
    with pytest.raises(ValueError, match="24"):
        policy_for_model(policy, ModelShape(24, 2, 64))
