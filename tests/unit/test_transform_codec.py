"""The transform codec (`minicache_client.codecs.TransformCoded`), beyond the rules of
the codec matrix (test_codec_matrix.py runs its rows there too):

- appending token by token, or in uneven chunks, stores other blocks than one chunk but
  the same codes, so it restores bit-identically;
- a coded token is quantized to the nearest step on the calibrated basis: its restore
  error is what the step and the dropped components allow; sink and recent tokens are
  restored bit-exactly;
- keys are coded with RoPE undone at their positions, with each layer's own table;
- both entropy coders, every KV dtype; `restore_group` equals `restore` of each layer;
- the stored form round-trips, and corruption under a valid checksum is an error
  (CorruptEntryError at decode where the structure shows it, a ValueError at restore
  where only the coded stream does), never wrong tensors;
- an artifact of another shape is refused, a missing one is named by its hash.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kv_samples import (
    KV_DTYPES,
    as_float32,
    assert_bit_equal,
    finite_bit_patterns,
    random_kv,
)
from transform_samples import sample_artifact, transform_policy

from minicache_client import entropy
from minicache_client.array_namespace import CARRIER_DTYPES, narrow_from_float32
from minicache_client.codecs import TransformCoded, codecs_for_group
from minicache_client.codecs import transform as transform_module
from minicache_client.codecs.transform import CODE_BLOCK, CODE_CHUNK_TOKENS
from minicache_client.entropy import CODERS
from minicache_client.entry import (
    CorruptEntryError,
    LayerGroupEntry,
    decode_entry,
    encode_entry,
    stored_bytes,
)
from minicache_client.rope import RopeTable
from minicache_client.transform_artifact import (
    ARTIFACTS,
    ArtifactError,
    ArtifactRegistry,
    MissingArtifactError,
)

NUM_LAYERS, HEADS, DIM = 4, 2, 16
GROUPS = ((0, 1), (2, 3))
SINK, WINDOW, TOKENS = 3, 5, 64
STEP = 0.05
KINDS = ("keys", "values")


def _inv_freq(theta: float, rotary_dim: int = DIM) -> np.ndarray:
    return (1.0 / theta ** (np.arange(0, rotary_dim, 2) / rotary_dim)).astype(np.float32)


# Every layer its own table: plain, another base, YaRN-like scaling, partial rotary.
ROPE = (
    RopeTable(_inv_freq(10000.0)),
    RopeTable(_inv_freq(500.0)),
    RopeTable(_inv_freq(10000.0) / 4, attention_scaling=1.25),
    RopeTable(_inv_freq(10000.0, DIM // 2)),
)


@functools.cache
def artifact(coder: str, rank_fraction: float = 1.0) -> str:
    """The hash of a registered random artifact over NUM_LAYERS x HEADS x DIM."""
    return sample_artifact(
        NUM_LAYERS,
        HEADS,
        DIM,
        GROUPS,
        coder=coder,
        rank_fraction=rank_fraction,
        step=STEP,
        seed=17,
        rope=ROPE,
    )[1]


def new_codec(
    coder: str,
    kind: str,
    dtype: str,
    *,
    group: int = 1,
    rank_fraction: float = 1.0,
    sink: int = SINK,
    window: int = WINDOW,
    code_block: int = 1,
) -> TransformCoded:
    layers = GROUPS[group]
    return TransformCoded(
        HEADS,
        DIM,
        dtype,
        artifact=artifact(coder, rank_fraction),
        kind=kind,
        first_layer=layers[0],
        layer_total=len(layers),
        sink_capacity=sink,
        window=window,
        code_block=code_block,
    )


def sample(seed: int, dtype: str, tokens: int = TOKENS, layers: int = 2) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [random_kv(rng, (HEADS, tokens, DIM), dtype) for _ in range(layers)]


def fed(codec: TransformCoded, layers: list[np.ndarray], chunks: list[int]) -> TransformCoded:
    start = 0
    for size in chunks:
        codec.append([layer[:, start : start + size] for layer in layers])
        start += size
    return codec


def uneven(tokens: int) -> list[int]:
    sizes, cycle = [], (5, 1, 12, 2, 9, 3, 1, 1)
    while sum(sizes) < tokens:
        sizes.append(min(cycle[len(sizes) % len(cycle)], tokens - sum(sizes)))
    return sizes


CHUNKINGS = {
    "token_by_token": lambda tokens: [1] * tokens,
    "uneven": uneven,
    "prefill_then_tokens": lambda tokens: [20] + [1] * (tokens - 20),
}


def side_of(codec: TransformCoded):
    found = ARTIFACTS.get(codec.artifact)
    return found.group_for(codec.layers)[1].side(codec.kind), found


def stored_codes(codec: TransformCoded) -> np.ndarray:
    """int32 `[coded tokens, rank]`, decoded block by block from the stored form."""
    side, found = side_of(codec)
    parts = [np.zeros((0, side.rank), dtype=np.int32)]
    byte_start = token_start = 0
    for byte_end, token_end, peak in zip(
        codec.block_bytes, codec.block_tokens, codec.block_peaks, strict=True
    ):
        block = codec.stream[byte_start:byte_end]
        parts.append(
            entropy.decode(block, int(peak), int(token_end) - token_start, side.scales, found.coder)
        )
        byte_start, token_start = int(byte_end), int(token_end)
    return np.concatenate(parts)


def entry_of(keys: TransformCoded, values: TransformCoded) -> LayerGroupEntry:
    return LayerGroupEntry(keys.layers, keys.dtype, HEADS, DIM, keys=[keys], values=[values])


def assert_same_restores(actual: TransformCoded, expected: TransformCoded) -> None:
    for dtype in KV_DTYPES:
        for got, want in zip(
            actual.restore_group(0, expected.tokens, dtype),
            expected.restore_group(0, expected.tokens, dtype),
            strict=True,
        ):
            assert_bit_equal(got, want)


# -- chunking ----------------------------------------------------------------------------


@pytest.mark.parametrize("code_block", (1, CODE_BLOCK))
@pytest.mark.parametrize("chunking", sorted(CHUNKINGS))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize("coder", CODERS)
def test_appends_in_any_chunks_restore_what_one_chunk_restores(
    coder: str, dtype: str, kind: str, chunking: str, code_block: int
) -> None:
    layers = sample(1, dtype)
    build = functools.partial(new_codec, coder, kind, dtype, code_block=code_block)
    whole = fed(build(), layers, [TOKENS])
    chunked = fed(build(), layers, CHUNKINGS[chunking](TOKENS))
    assert (chunked.tokens, chunked.frozen_tokens) == (whole.tokens, whole.frozen_tokens)
    past_window = TOKENS - SINK - WINDOW
    assert whole.coded_tokens == past_window - past_window % code_block
    # Other blocks...
    assert whole.block_tokens.size == 1 < chunked.block_tokens.size
    # ...holding the same codes, and the same exact tokens.
    np.testing.assert_array_equal(stored_codes(chunked), stored_codes(whole))
    assert_bit_equal(chunked.sink, whole.sink)
    assert_bit_equal(chunked.recent, whole.recent)
    assert_same_restores(chunked, whole)
    assert_same_restores(chunked, decode_entry(encode_entry(entry_of(whole, whole))).keys[0])


@pytest.mark.parametrize("code_block", (1, 3, CODE_BLOCK))
def test_a_seal_codes_every_token_past_the_window(code_block: int) -> None:
    # Sealed after a prefill, then decoded token by token (sealing again at the end):
    # the same codes and restores as one sealed chunk, wherever the blocks fall.
    layers = sample(21, "bfloat16")
    build = functools.partial(new_codec, "rans", "keys", "bfloat16", code_block=code_block)
    whole = fed(build(), layers, [TOKENS])
    whole.seal()
    assert whole.coded_tokens == TOKENS - SINK - WINDOW
    assert whole.frozen_tokens == TOKENS - WINDOW
    stepwise = fed(build(), layers, [21])
    stepwise.seal()
    assert stepwise.coded_tokens == 21 - SINK - WINDOW
    fed(stepwise, [layer[:, 21:] for layer in layers], [1] * (TOKENS - 21))
    past_window = TOKENS - 21
    assert stepwise.coded_tokens == 21 - SINK - WINDOW + past_window - past_window % code_block
    stepwise.seal()
    stepwise.seal()  # nothing more to code
    np.testing.assert_array_equal(stored_codes(stepwise), stored_codes(whole))
    assert_same_restores(stepwise, whole)
    # A seal with nothing past the window codes nothing.
    short = fed(build(), layers, [SINK + WINDOW])
    short.seal()
    assert short.coded_tokens == 0 and short.block_tokens.size == 0


@settings(max_examples=15, deadline=None)
@given(chunks=st.lists(st.integers(0, 9), min_size=1, max_size=40))
def test_any_chunking_codes_the_same(chunks: list[int]) -> None:
    layers = sample(2, "bfloat16", 40)
    chunks = [*chunks, 40]
    ends = np.minimum(np.cumsum(chunks), 40)
    sizes = np.diff(ends, prepend=0).tolist()
    whole = fed(new_codec("rans", "keys", "bfloat16", group=0, code_block=CODE_BLOCK), layers, [40])
    chunked = fed(
        new_codec("rans", "keys", "bfloat16", group=0, code_block=CODE_BLOCK), layers, sizes
    )
    assert (chunked.tokens, chunked.frozen_tokens) == (whole.tokens, whole.frozen_tokens)
    np.testing.assert_array_equal(stored_codes(chunked), stored_codes(whole))
    assert_same_restores(chunked, whole)


def test_a_zero_token_append_changes_nothing() -> None:
    layers = sample(3, "float16")
    codec = fed(new_codec("zlib", "values", "float16"), layers, [30])
    before = encode_entry(entry_of(codec, codec))
    codec.append([layer[:, :0] for layer in layers])
    assert encode_entry(entry_of(codec, codec)) == before


@pytest.mark.parametrize("coder", CODERS)
def test_frozen_tokens_never_change_on_later_appends(coder: str) -> None:
    layers = sample(4, "float32")
    codec = new_codec(coder, "keys", "float32", code_block=CODE_BLOCK)
    history = []
    start = 0
    for end in (1, 3, 4, 9, 10, 11, 30, 31, TOKENS):
        fed(codec, [layer[:, start:end] for layer in layers], [end - start])
        start = end
        # Tokens leave the window in whole blocks (no seal here).
        past_window = max(0, end - SINK - WINDOW)
        coded = past_window - past_window % CODE_BLOCK
        assert codec.frozen_tokens == SINK + coded or end <= SINK
        restored = codec.restore_group(0, end, "float32")
        for frozen, earlier in history:
            for now, then in zip(restored, earlier, strict=True):
                assert_bit_equal(now[:, :frozen], then[:, :frozen])
        history.append((codec.frozen_tokens, restored))


# -- what a restore holds -----------------------------------------------------------------


def rope_undone(codec: TransformCoded, layers: list[np.ndarray], dtype: str) -> np.ndarray:
    """float64 `[tokens, group dim]`: the vectors the codec projects (keys with RoPE
    undone at each token's position), the artifact's layout."""
    wide = [as_float32(layer, dtype) for layer in layers]
    if codec.kind == "keys":
        wide = [
            ROPE[layer].rotate(x, 0, inverse=True)
            for layer, x in zip(codec.layers, wide, strict=True)
        ]
    return np.stack(wide).transpose(2, 0, 1, 3).reshape(wide[0].shape[1], -1).astype(np.float64)


@pytest.mark.parametrize("rank_fraction", (1.0, 0.5))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("coder", CODERS)
def test_coded_tokens_are_quantized_to_the_nearest_step(
    coder: str, kind: str, rank_fraction: float
) -> None:
    dtype = "float32"
    layers = sample(5, dtype)
    codec = fed(new_codec(coder, kind, dtype, rank_fraction=rank_fraction), layers, [TOKENS])
    side, _ = side_of(codec)
    coded = slice(SINK, SINK + codec.coded_tokens)
    vectors = rope_undone(codec, layers, dtype)[coded]
    basis, mean = side.basis.astype(np.float64), side.mean.astype(np.float64)
    exact = (vectors - mean) @ basis / side.step
    codes = stored_codes(codec)
    # The nearest step, but where float32 sums may round the other way at a half step.
    differ = codes != np.rint(exact)
    assert np.abs(codes - np.rint(exact)).max(initial=0) <= 1
    assert (np.abs(np.abs(exact[differ] - np.trunc(exact[differ])) - 0.5) < 1e-3).all()
    assert differ.mean() < 1e-3

    # The restore error: the quantization (at most half a step per kept component,
    # through a basis orthonormal to float16 precision) plus the dropped components.
    restored = codec.restore_group(0, TOKENS, "float32")
    error = rope_undone(codec, restored, dtype)[coded] - vectors
    residual = vectors - mean
    dropped = residual - (residual @ basis) @ basis.T
    spread = np.linalg.norm(basis, ord=2)
    bound = side.step / 2 * np.sqrt(side.rank) * spread + np.linalg.norm(dropped, axis=1)
    norms = np.linalg.norm(error, axis=1)
    assert (norms <= bound * (1 + 1e-4) + 1e-4).all()
    assert norms.min() > 0
    if rank_fraction == 1.0:
        # Full rank: within the quantization cell; far below the KV's own size.
        assert norms.max() <= 1.01 * side.step / 2 * np.sqrt(side.rank)
        assert norms.max() < 0.2 * np.linalg.norm(vectors, axis=1).min()


@pytest.mark.parametrize("coder", CODERS)
@pytest.mark.parametrize("dtype, outlier", [("float16", 2e3), ("bfloat16", 1e5), ("float32", 1e7)])
def test_outlier_tokens_restore_within_the_step(dtype: str, outlier: float, coder: str) -> None:
    # Tokens far beyond what calibration saw (codes beyond any rANS alphabet, beyond
    # int16) are coded as exactly as the others, whatever the chunking.
    layers = sample(19, dtype, 40)
    for layer in layers:
        wide = as_float32(layer, dtype)
        wide[:, SINK::6] *= outlier
        layer[...] = narrow_from_float32(wide, dtype)
    whole = fed(new_codec(coder, "values", dtype), layers, [40])
    stepwise = fed(new_codec(coder, "values", dtype), layers, [1] * 40)
    assert int(whole.block_peaks.max()) > 1 << 15
    np.testing.assert_array_equal(stored_codes(stepwise), stored_codes(whole))
    assert_same_restores(stepwise, whole)
    side, _ = side_of(whole)
    coded = slice(SINK, 40 - WINDOW)
    vectors = rope_undone(whole, layers, dtype)[coded]
    error = rope_undone(whole, whole.restore_group(0, 40, "float32"), "float32")[coded] - vectors
    # Half a step per component, what the float16 basis misses of the token (~1e-3 of
    # it: large for an outlier), and float32 rounding of the large coefficients.
    residual = vectors - side.mean
    basis = side.basis.astype(np.float64)
    missed = np.linalg.norm(residual - (residual @ basis) @ basis.T, axis=1)
    norms = np.linalg.norm(vectors, axis=1)
    bound = 1.01 * side.step / 2 * np.sqrt(side.rank) + missed + 1e-6 * norms * np.sqrt(side.rank)
    assert (np.linalg.norm(error, axis=1) <= bound).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # overflow, NaN in the product
@pytest.mark.parametrize("value", [1e10, 3e38, np.inf, np.nan])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kv_beyond_32_bit_codes_is_refused_and_changes_nothing(dtype: str, value: float) -> None:
    # A code that does not fit int32 would wrap (1e12 restored as 0.2): the append
    # raises instead, and the codec holds what it held.
    layers = sample(20, dtype, 30)
    codec = fed(new_codec("zlib", "values", dtype), layers, [12])
    before = encode_entry(entry_of(codec, codec))
    wide = as_float32(layers[1], dtype)
    wide[:, 20] = value
    layers[1] = narrow_from_float32(wide, dtype)
    with pytest.raises(ValueError, match="32 bits"):
        fed(codec, [layer[:, 12:] for layer in layers], [18])
    assert encode_entry(entry_of(codec, codec)) == before
    # The tokens before it can still be appended.
    fed(codec, [layer[:, 12:20] for layer in layers], [8])
    assert codec.tokens == 20


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", KV_DTYPES)
def test_sink_and_recent_tokens_restore_bit_exactly(dtype: str, kind: str) -> None:
    rng = np.random.default_rng(6)
    layers = sample(6, dtype, 40)
    # Any finite value in the sink (subnormals, -0.0, the extremes): never coded.
    for layer in layers:
        layer[:, :SINK] = finite_bit_patterns(rng, (HEADS, SINK, DIM), dtype)
    codec = new_codec("rans", kind, dtype)
    for end in (2, 7, 8, 9, 25, 40):
        fed(codec, [layer[:, codec.tokens : end] for layer in layers], [end - codec.tokens])
        restored = codec.restore_group(0, end, dtype)
        exact = [(0, min(end, SINK)), (max(SINK, end - WINDOW), end)]
        for got, layer in zip(restored, layers, strict=True):
            for start, stop in exact:
                assert_bit_equal(got[:, start:stop], layer[:, start:stop])
        assert codec.frozen_tokens == max(min(end, SINK), end - WINDOW)
        if end - WINDOW > SINK:
            assert not np.array_equal(
                restored[0][:, SINK : end - WINDOW], layers[0][:, SINK : end - WINDOW]
            )


@pytest.mark.parametrize("sink, window", [(0, 0), (0, 4), (5, 0), (100, 0)])
def test_any_sink_and_window(sink: int, window: int) -> None:
    layers = sample(7, "float16", 30)
    whole = fed(new_codec("zlib", "keys", "float16", sink=sink, window=window), layers, [30])
    stepwise = fed(new_codec("zlib", "keys", "float16", sink=sink, window=window), layers, [1] * 30)
    assert whole.coded_tokens == max(0, 30 - sink - window)
    assert whole.frozen_tokens == min(30, sink) + whole.coded_tokens
    np.testing.assert_array_equal(stored_codes(stepwise), stored_codes(whole))
    assert_same_restores(stepwise, whole)


@pytest.mark.parametrize("group", (0, 1))
@pytest.mark.parametrize("dtype", KV_DTYPES)
def test_keys_are_coded_with_rope_undone_at_their_positions(dtype: str, group: int) -> None:
    # Keys whose RoPE-free vectors lie on the artifact's lattice (mean + basis @ k * step)
    # come back as exactly those codes, at every position and with each layer's table,
    # whether they arrive in one chunk or token by token; coded as values (no RoPE
    # undone) they do not.
    rng = np.random.default_rng(8)
    probe = new_codec("rans", "keys", dtype, group=group)
    side, _ = side_of(probe)
    lattice = rng.integers(-3, 4, size=(TOKENS, side.rank))
    vectors = side.mean + (lattice * side.step).astype(np.float32) @ side.basis.T
    free = vectors.reshape(TOKENS, 2, HEADS, DIM).transpose(1, 2, 0, 3)
    layers = [
        narrow_from_float32(ROPE[layer].rotate(free[which], 0), dtype)
        for which, layer in enumerate(probe.layers)
    ]
    coded = lattice[SINK : TOKENS - WINDOW]
    for chunks in ([TOKENS], [1] * TOKENS, uneven(TOKENS)):
        codec = fed(new_codec("rans", "keys", dtype, group=group), layers, chunks)
        np.testing.assert_array_equal(stored_codes(codec), coded)
        restored = codec.restore_group(0, TOKENS, "float32")
        for got, layer in zip(restored, layers, strict=True):
            np.testing.assert_allclose(got, as_float32(layer, dtype), rtol=0, atol=2e-2)
    as_values = fed(new_codec("rans", "values", dtype, group=group), layers, [TOKENS])
    assert (stored_codes(as_values) != coded).mean() > 0.5


# -- restore ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize("coder", CODERS)
def test_restore_group_equals_restore_of_each_layer_and_any_range(
    coder: str, dtype: str, kind: str
) -> None:
    layers = sample(9, dtype)
    chunks = [17, 1, 1, 30, 15]
    codec = fed(new_codec(coder, kind, dtype), layers, chunks)
    grouped = codec.restore_group(0, TOKENS, dtype)
    assert len(grouped) == 2
    as_float = codec.restore_group(0, TOKENS, "float32")
    coded_end = SINK + codec.coded_tokens
    ranges = [
        (0, 0),
        (0, 1),
        (0, SINK),
        (SINK - 1, SINK + 1),
        (SINK, coded_end),
        (16, 18),
        (coded_end - 1, coded_end + 1),
        (10, 60),
        (TOKENS - 1, TOKENS),
        (0, TOKENS),
    ]
    for start, end in ranges:
        part = codec.restore_group(start, end, dtype)
        for which in range(2):
            assert part[which].shape == (HEADS, end - start, DIM)
            assert part[which].dtype == CARRIER_DTYPES[dtype]
            assert_bit_equal(part[which], grouped[which][:, start:end])
            # One layer at a time, the other first or not at all (the decoded
            # coefficients are reused between the layers of one range).
            assert_bit_equal(codec.restore(which, start, end, dtype), part[which])
            fresh = fed(new_codec(coder, kind, dtype), layers, chunks)
            assert_bit_equal(fresh.restore(which, start, end, dtype), part[which])
    for other in KV_DTYPES:
        for got, wide in zip(codec.restore_group(0, TOKENS, other), as_float, strict=True):
            assert_bit_equal(got, narrow_from_float32(wide, other))


@pytest.mark.parametrize("coder", CODERS)
def test_a_restore_of_the_whole_group_keeps_no_decoded_coefficients(coder: str) -> None:
    # A server restores every entry it holds a whole group at a time: what one restore
    # decodes (float32 coefficients of every coded token) must go with its answer, or
    # each entry the device tier holds keeps many times its stored bytes.
    tokens, dtype = 4096, "float16"
    layers = sample(12, dtype, tokens)
    warm = fed(new_codec(coder, "values", dtype, window=0), layers, [tokens])
    warm.restore_group(0, tokens, dtype)  # the artifact and its tables, loaded once
    codec = fed(new_codec(coder, "values", dtype, window=0), layers, [tokens])
    coefficients = codec.coded_tokens * side_of(codec)[0].rank * 4
    assert coefficients >= 1 << 19
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(3):
            restored = codec.restore_group(0, tokens, dtype)
            assert [layer.shape for layer in restored] == [(HEADS, tokens, DIM)] * 2
            del restored
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < coefficients // 8, f"{kept} bytes kept after restores of the whole group"
    # Single layers still share one decode, and restore what the group restore does.
    single = [codec.restore(which, 0, tokens, dtype) for which in range(2)]
    for got, want in zip(single, codec.restore_group(0, tokens, dtype), strict=True):
        assert_bit_equal(got, want)


# -- the stored form ----------------------------------------------------------------------


def sample_entry(coder: str, dtype: str, chunks: list[int] | None = None) -> LayerGroupEntry:
    keys, values = sample(10, dtype), sample(11, dtype)
    chunks = chunks or [40, 1, 1, 7]
    return entry_of(
        fed(new_codec(coder, "keys", dtype), keys, chunks),
        fed(new_codec(coder, "values", dtype), values, chunks),
    )


@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize("coder", CODERS)
def test_entries_round_trip(coder: str, dtype: str) -> None:
    entry = sample_entry(coder, dtype)
    data = encode_entry(entry)
    assert stored_bytes(entry) == len(data)
    decoded = decode_entry(data)
    assert encode_entry(decoded) == data
    assert (decoded.layers, decoded.tokens, decoded.frozen_tokens) == (
        entry.layers,
        entry.tokens,
        entry.frozen_tokens,
    )
    for got, want in zip(decoded.codecs(), entry.codecs(), strict=True):
        assert_same_restores(got, want)
    # The decoded entry (read-only views) keeps appending like the original.
    more_keys, more_values = sample(12, dtype, 9), sample(13, dtype, 9)
    for target in (entry, decoded):
        fed(target.keys[0], more_keys, [4, 1, 4])
        fed(target.values[0], more_values, [4, 1, 4])
    assert encode_entry(decoded) == encode_entry(entry)


def laplace_bits(codes: np.ndarray, scales: np.ndarray) -> float:
    """Bits of `codes` under the Laplace of each component's scale, integrated over
    each integer's interval: what an ideal entropy coder of the artifact spends."""
    scale = np.maximum(scales.astype(np.float64), 0.02)
    upper = np.abs(codes) + 0.5
    lower = np.maximum(np.abs(codes) - 0.5, 0)
    mass = np.where(
        codes == 0,
        1 - np.exp(-0.5 / scale),
        0.5 * (np.exp(-lower / scale) - np.exp(-upper / scale)),
    )
    return float(-np.log2(mass).sum())


@pytest.mark.parametrize("chunks", ([TOKENS], [20, 1, 1, 1, 21, 12, 8]), ids=("one", "several"))
def test_rans_codes_at_the_rate_of_the_calibrated_model(chunks: list[int]) -> None:
    # Codes drawn from the artifact's own model: rANS spends what the model says (its
    # buckets of similar scale cost a fraction of a percent), less than zlib.
    rng = np.random.default_rng(18)
    side, _ = side_of(new_codec("rans", "values", "float32"))
    drawn = np.rint(rng.laplace(0, side.scales, (TOKENS, side.rank))).astype(np.int32)
    vectors = side.mean + (drawn * side.step).astype(np.float32) @ side.basis.T
    layers = list(vectors.reshape(TOKENS, 2, HEADS, DIM).transpose(1, 2, 0, 3))
    sizes = {}
    for coder in CODERS:
        codec = fed(new_codec(coder, "values", "float32"), layers, chunks)
        np.testing.assert_array_equal(stored_codes(codec), drawn[SINK : TOKENS - WINDOW])
        sizes[coder] = codec.stream.nbytes
    ideal = laplace_bits(drawn[SINK : TOKENS - WINDOW], side.scales) / 8
    assert ideal <= sizes["rans"] <= 1.03 * ideal + 8 * len(chunks)
    assert sizes["rans"] < 0.8 * sizes["zlib"]


def assert_error_or_same(entry: LayerGroupEntry, original: LayerGroupEntry, what: str) -> None:
    """Decoding raises CorruptEntryError or the restore raises a ValueError, or the
    entry restores exactly the original tensors: never other tensors."""
    try:
        decoded = decode_entry(encode_entry(entry))
        restored = [codec.restore_group(0, decoded.tokens, "float32") for codec in decoded.codecs()]
    except ValueError:  # CorruptEntryError and ArtifactError are ValueErrors
        return
    expected = [codec.restore_group(0, original.tokens, "float32") for codec in original.codecs()]
    for got, want in zip(restored, expected, strict=True):
        for got_layer, want_layer in zip(got, want, strict=True):
            assert np.array_equal(got_layer, want_layer), f"{what}: restored other tensors"


def test_a_flipped_zlib_stream_byte_is_an_error_never_other_tensors() -> None:
    original = sample_entry("zlib", "float16", [20, 1, 1, 1, 14, 12])
    stream = original.keys[0].stream
    rng = np.random.default_rng(14)
    positions = sorted({0, 1, stream.size - 1, *rng.integers(0, stream.size, 150).tolist()})
    for position in positions:
        for flip in (0x01, 0x80, 0xFF):
            entry = copy.deepcopy(original)
            corrupted = entry.keys[0].stream.copy()
            corrupted[position] ^= flip
            entry.keys[0].stream = corrupted
            assert_error_or_same(entry, original, f"byte {position} ^ {flip:#x}")


def test_a_flipped_rans_stream_byte_is_mostly_an_error() -> None:
    # rANS bytes carry no redundancy: the entry's checksum guards them. Under a
    # recomputed checksum, a block that does not end where its encoder began, or
    # decodes codes beyond its peak, is an error; a flip that keeps both (about one in
    # ten, mostly the lowest bit of a word) decodes to other codes.
    original = sample_entry("rans", "float16", [20, 1, 1, 1, 14, 12])
    expected = original.keys[0].restore_group(0, original.tokens, "float32")
    stream = original.keys[0].stream
    rng = np.random.default_rng(14)
    outcomes = {"error": 0, "same": 0, "other": 0}
    for position in rng.integers(0, stream.size, 300).tolist():
        corrupted = stream.copy()
        corrupted[position] ^= 1 << int(rng.integers(0, 8))
        entry = copy.deepcopy(original)
        entry.keys[0].stream = corrupted
        decoded = decode_entry(encode_entry(entry))
        try:
            restored = decoded.keys[0].restore_group(0, decoded.tokens, "float32")
        except ValueError:
            outcomes["error"] += 1
            continue
        same = all(np.array_equal(a, b) for a, b in zip(restored, expected, strict=True))
        outcomes["same" if same else "other"] += 1
    assert outcomes["error"] >= 0.8 * sum(outcomes.values()), outcomes


def structural_changes(codec: TransformCoded):
    """(description, change of a copy of `codec`) that the structure check catches."""
    blocks = codec.block_bytes.size
    assert blocks >= 3

    def swapped(name: str):
        def change(c: TransformCoded) -> None:
            array = getattr(c, name).copy()
            array[[0, 1]] = array[[1, 0]]
            setattr(c, name, array)

        return change

    def shifted(name: str, delta: int, index: int = -1):
        def change(c: TransformCoded) -> None:
            array = getattr(c, name).copy()
            array[index] += delta
            setattr(c, name, array)

        return change

    yield "block byte ends swapped", swapped("block_bytes")
    yield "block token ends swapped", swapped("block_tokens")
    yield "last block ends past the stream", shifted("block_bytes", 1)
    yield "last block ends before the stream", shifted("block_bytes", -1)
    yield (
        "a block ends where the one before it does",
        lambda c: setattr(c, "block_bytes", np.insert(c.block_bytes[1:], 0, c.block_bytes[1])),
    )
    yield (
        "an empty block",
        lambda c: setattr(c, "block_tokens", np.insert(c.block_tokens, 1, c.block_tokens[0])),
    )
    yield "a negative peak", lambda c: setattr(c, "block_peaks", -c.block_peaks - 1)
    yield (
        "peaks of another width",
        lambda c: setattr(c, "block_peaks", c.block_peaks.astype(np.int64)),
    )
    yield (
        "token ends of another width",
        lambda c: setattr(c, "block_tokens", c.block_tokens.astype(np.int32)),
    )
    yield "one peak too many", lambda c: setattr(c, "block_peaks", np.append(c.block_peaks, 1))
    yield (
        "a stream of words",
        lambda c: setattr(c, "stream", c.stream[: c.stream.size // 4 * 4].view(np.uint32)),
    )
    yield "a stream of another shape", lambda c: setattr(c, "stream", c.stream[None])
    yield "a token less in the sink", lambda c: setattr(c, "sink", c.sink[:, :, 1:].copy())
    yield "no sink", lambda c: setattr(c, "sink", c.sink[:, :, :0].copy())
    yield "a sink larger than its room", lambda c: setattr(c, "sink_capacity", SINK - 1)
    yield "sink of another layer count", lambda c: setattr(c, "sink", c.sink[:1].copy())
    yield "recent of another dtype", lambda c: setattr(c, "recent", c.recent.astype(np.float32))
    yield "layer_total 0", lambda c: setattr(c, "layer_total", 0)
    yield "a negative window", lambda c: setattr(c, "window", -1)
    for value in (0, -8, None, 8.0, True):
        yield f"code_block={value!r}", lambda c, value=value: setattr(c, "code_block", value)
    yield "kind 'queries'", lambda c: setattr(c, "kind", "queries")
    yield "artifact hash in capitals", lambda c: setattr(c, "artifact", c.artifact.upper())
    for value in (None, -1, 0.5, "0", [0], True):
        yield f"first_layer={value!r}", lambda c, value=value: setattr(c, "first_layer", value)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("coder", CODERS)
def test_structurally_inconsistent_codecs_are_corrupt(coder: str, kind: str) -> None:
    # Encoded from the changed codec: the checksum is valid, the structure is not.
    entry = sample_entry(coder, "float16", [20, 1, 1, 1, 14, 12])
    index = KINDS.index(kind)
    for what, change in structural_changes(entry.codecs()[index]):
        changed = copy.deepcopy(entry)
        change(changed.codecs()[index])
        try:
            data = encode_entry(changed)
        except (TypeError, ValueError):
            continue  # not even encodable
        with pytest.raises(CorruptEntryError):
            decode_entry(data)
            pytest.fail(f"{what}: decoded")


@pytest.mark.parametrize("coder", CODERS)
def test_blocks_or_peaks_that_disagree_with_the_stream_are_errors(coder: str) -> None:
    # Consistent in structure, wrong in content: only decoding the stream shows it.
    original = sample_entry(coder, "float16", [20, 1, 1, 1, 14, 12])

    def moved_token(c: TransformCoded) -> None:
        c.block_tokens = c.block_tokens + np.where(np.arange(c.block_tokens.size) == 0, 1, 0)

    def moved_byte(c: TransformCoded) -> None:
        c.block_bytes = c.block_bytes + np.where(np.arange(c.block_bytes.size) == 0, 4, 0)

    changes = {"a token moved between blocks": moved_token, "bytes moved": moved_byte}
    for peak in (0, 1, 7, 8, 127, 128, 255, 1 << 20):
        changes[f"peaks {peak}"] = lambda c, peak=peak: setattr(
            c, "block_peaks", np.full_like(c.block_peaks, peak)
        )
    for what, change in changes.items():
        entry = copy.deepcopy(original)
        change(entry.keys[0])
        assert_error_or_same(entry, original, what)


# -- artifacts ----------------------------------------------------------------------------


def test_an_artifact_of_another_shape_is_refused() -> None:
    digest = artifact("rans")
    layers = sample(15, "float16", 20)
    for heads, dim in ((HEADS + 1, DIM), (HEADS, DIM * 2)):
        codec = TransformCoded(
            heads, dim, "float16", artifact=digest, layer_total=2, sink_capacity=0, window=0
        )
        wrong = [np.zeros((heads, 1, dim), dtype=np.float16)] * 2
        with pytest.raises(ValueError, match="KV heads"):
            codec.append(wrong)
    # Layers that are no group of the artifact.
    for first, total in ((1, 2), (0, 3), (0, 1), (3, 2)):
        codec = TransformCoded(
            HEADS,
            DIM,
            "float16",
            artifact=digest,
            first_layer=first,
            layer_total=total,
            sink_capacity=0,
            window=0,
        )
        with pytest.raises(ArtifactError, match="no transform for layers"):
            codec.append([layers[0][:, :1]] * total)


@pytest.mark.parametrize("digest", ["", "0" * 63, "G" * 64, "A" * 64, None, 7])
def test_a_codec_needs_an_artifact_hash(digest: object) -> None:
    with pytest.raises(ValueError, match="SHA-256"):
        TransformCoded(HEADS, DIM, "float16", artifact=digest)


def test_a_missing_artifact_is_named_by_its_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = hashlib.sha256(b"no such artifact").hexdigest()
    layers = sample(16, "float16", 20)
    codec = TransformCoded(
        HEADS, DIM, "float16", artifact=missing, layer_total=2, sink_capacity=3, window=4
    )
    # The first append looks the artifact up, coded or not, and changes nothing.
    with pytest.raises(MissingArtifactError, match=missing) as raised:
        codec.append([layer[:, :1] for layer in layers])
    assert raised.value.digest == missing
    assert codec.tokens == 0

    # A stored entry decodes without its artifact (its structure is checked), and
    # restoring its coded tokens names the artifact.
    entry = sample_entry("zlib", "float16")
    digest = entry.keys[0].artifact
    monkeypatch.setattr(transform_module, "ARTIFACTS", ArtifactRegistry())
    decoded = decode_entry(encode_entry(entry))
    assert_bit_equal(decoded.keys[0].restore(0, 0, SINK, "float16"), entry.keys[0].sink[0])
    with pytest.raises(MissingArtifactError, match=digest):
        decoded.keys[0].restore(0, 0, decoded.tokens, "float16")


def test_codecs_for_a_transform_group_follow_the_plan() -> None:
    digest = artifact("rans")
    policy = transform_policy(digest, groups=GROUPS, sink_tokens=4, window=6)
    groups = policy.resolve_layer_groups(NUM_LAYERS)
    assert [group.layers for group in groups] == list(GROUPS)
    for group in groups:
        for kind in KINDS:
            (codec,) = codecs_for_group(
                group, kind, None, dtype="bfloat16", kv_heads=HEADS, head_dim=DIM
            )
            assert isinstance(codec, TransformCoded)
            assert (codec.artifact, codec.kind, codec.layers) == (digest, kind, group.layers)
            assert (codec.sink_capacity, codec.window, codec.dtype) == (4, 6, "bfloat16")
            assert codec.layer_count == len(group.layers)


@pytest.mark.parametrize("coder", CODERS)
def test_a_block_is_coded_in_chunks_as_in_one_pass(coder: str, monkeypatch) -> None:
    # The encoder codes a chunk of tokens at a time, each an entropy block of its own:
    # the codes and every restore are those of one pass over the whole block, whatever
    # the chunk, and no block holds more tokens than a chunk.
    dtype, tokens = "float16", 200
    keys, values = sample(13, dtype, tokens), sample(15, dtype, tokens)
    encoded = {}
    for chunk in (10**6, CODE_CHUNK_TOKENS, 8, 24):
        monkeypatch.setattr(transform_module, "CODE_CHUNK_TOKENS", chunk)
        sides = [
            fed(new_codec(coder, kind, dtype, window=0), layers, [tokens])
            for kind, layers in zip(KINDS, (keys, values), strict=True)
        ]
        for side in sides:
            assert side.coded_tokens == tokens - SINK  # one append, coded at once
            sizes = np.diff(side.block_tokens, prepend=0)
            assert sizes.max() <= chunk and side.block_tokens.size == -(-sizes.sum() // chunk)
        encoded[chunk] = sides
    one_pass = encoded.pop(10**6)
    for sides in encoded.values():
        for side, whole in zip(sides, one_pass, strict=True):
            np.testing.assert_array_equal(stored_codes(side), stored_codes(whole))
            assert_same_restores(side, whole)
        decoded = decode_entry(encode_entry(entry_of(*sides)))  # and after the wire
        assert_same_restores(decoded.keys[0], one_pass[0])
        assert_same_restores(decoded.values[0], one_pass[1])


def test_coding_a_long_block_holds_a_chunk_of_float32_steps() -> None:
    # Coding 4,096 tokens in one pass peaked at 7x the block in float32 (widened,
    # transposed, centred, padded, projected at once); in chunks, 3x (the int32 codes,
    # the float16 tokens, the coded bytes).
    dtype, tokens = "float16", 4096
    layers = sample(14, dtype, tokens)
    block_float32 = 2 * HEADS * tokens * DIM * 4  # the group's block, widened
    fed(new_codec("rans", "values", dtype, window=0), layers, [64])  # the artifact, loaded
    codec = new_codec("rans", "values", dtype, window=0)
    tracemalloc.start()
    try:
        fed(codec, layers, [tokens])  # one block
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert codec.coded_tokens == tokens - SINK
    assert peak < 4 * block_float32, f"{peak} bytes at the peak of coding"


def test_restoring_a_wide_group_holds_one_run_of_blocks_at_a_time() -> None:
    # A group of many layers (the shipped default has 15) restores a run of blocks
    # (about CODE_CHUNK_TOKENS tokens) at a time, each layer of it in float32 narrowed
    # into its output before the next: beyond the outputs it holds one run's codes and
    # coefficients, not the whole range's, nor every layer in float32.
    layers, tokens, dtype = 8, 2048, "float16"
    _, digest = sample_artifact(num_layers=layers, groups=(tuple(range(layers)),), seed=3)
    codec = TransformCoded(
        HEADS, DIM, dtype, artifact=digest, kind="keys", layer_total=layers, window=0
    )
    fed(codec, sample(16, dtype, tokens, layers), [tokens])
    codec.restore_group(0, tokens, dtype)  # the artifact's tables, built once
    coefficients = codec.coded_tokens * layers * HEADS * DIM * 4  # full rank, float32
    outputs = layers * HEADS * tokens * DIM * 2
    tracemalloc.start()
    try:
        restored = codec.restore_group(0, tokens, dtype)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert codec.block_tokens.size == tokens // CODE_CHUNK_TOKENS
    assert sum(layer.nbytes for layer in restored) == outputs
    # Measured: the outputs and 0.3x the coefficients of the whole range; decoding the
    # range at once held its codes and coefficients too (2.9x the coefficients), and
    # every layer in float32 as well, 3.6x.
    assert peak < outputs + coefficients // 2, peak
