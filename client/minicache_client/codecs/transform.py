"""`transform`: cross-layer transform coding of one side of a group of consecutive layers.

A token's KV over the group's layers, heads and channels is one vector (keys with RoPE
undone at the token's position). It is projected on the group's calibrated mean and
orthonormal basis (minicache_client.transform_artifact), the coefficients are quantized
with one uniform step, and the integer codes are entropy coded (minicache_client.entropy)
in blocks. Restore decodes, multiplies back, adds the mean and re-applies RoPE.

The first `sink_capacity` tokens and the `window` most recent ones are held exact (in
`sink` and `recent`, `[layers, kv_heads, tokens, head_dim]`); tokens are coded when a
whole block of `code_block` of them has left the window (`seal`, the end of a bulk put,
codes every token past the window). Every token is quantized on its own and projected
at a fixed place of a fixed-shape product, so appending token by token restores exactly
what one chunk restores; only the blocks of the coded stream differ.

Stored: the exact parts, the concatenated coded blocks (`stream`), and per block its
end in bytes, its end in coded tokens and its largest absolute code. The artifact is
named by hash; the process's registry (`transform_artifact.ARTIFACTS`) must hold it to
encode or restore.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from minicache_client import entropy
from minicache_client.array_namespace import (
    CARRIER_DTYPES,
    array_namespace,
    narrow_into,
    recast,
    to_numpy,
    widen_to_float32,
)
from minicache_client.codecs.base import Codec, check_stored, concat_tokens
from minicache_client.transform_artifact import ARTIFACTS, HASH_PATTERN, SideTransform

KINDS = ("keys", "values")
# Tokens are projected and restored in products of this many rows, aligned on the coded
# token index: BLAS sums in an order that depends on the shape of the product (one row
# goes through gemv, small products through other kernels), so a token's coefficients
# would otherwise depend on which tokens shared its product (the block it was coded in,
# the range restored).
_TILE = 8
# Tokens leave the exact window in whole blocks of this many by default (a seal codes a
# partial one): coding a token reads the group's whole basis (megabytes), so a decode
# step that coded its one token would pay that read every step; a block of 8 pays about
# the same read for 8 tokens. On average 3.5 more tokens wait exact than the window holds.
CODE_BLOCK = _TILE
# Tokens coded together through the float32 steps of one block (a multiple of _TILE).
CODE_CHUNK_TOKENS = 32 * _TILE


def _tiled_product(rows: np.ndarray, first: int, matrix: np.ndarray) -> np.ndarray:
    """float32 `rows @ matrix`, `rows[i]` being coded token `first + i`: every row is
    computed at row `(first + i) % _TILE` of a `[_TILE, k] @ matrix` product, whatever
    `first` and the number of rows."""
    count = rows.shape[0]
    lead = first % _TILE
    tiles = -(-(lead + count) // _TILE)
    padded = np.zeros((tiles * _TILE, rows.shape[1]), dtype=np.float32)
    padded[lead : lead + count] = rows
    product = np.matmul(padded.reshape(tiles, _TILE, -1), matrix)
    return product.reshape(tiles * _TILE, -1)[lead : lead + count]


def _grown(array: Any, *values: int) -> np.ndarray:
    return np.append(to_numpy(array), np.asarray(values, dtype=array.dtype))


@dataclass
class TransformCoded(Codec):
    name: ClassVar[str] = "transform"
    # A code beyond 32 bits (KV far outside the calibrated range) is refused.
    may_refuse: ClassVar[bool] = True

    kv_heads: int
    head_dim: int
    dtype: str
    artifact: str = ""
    kind: str = "keys"
    first_layer: int = 0
    layer_total: int = 1
    sink_capacity: int = 16
    window: int = 32
    code_block: int = CODE_BLOCK
    sink: Any = None
    recent: Any = None
    stream: Any = None
    block_bytes: Any = None
    block_tokens: Any = None
    block_peaks: Any = None

    def __post_init__(self) -> None:
        if not (isinstance(self.artifact, str) and HASH_PATTERN.fullmatch(self.artifact)):
            raise ValueError("transform codec needs its artifact's SHA-256 hash")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        for name, least in (
            ("first_layer", 0),
            ("layer_total", 1),
            ("sink_capacity", 0),
            ("window", 0),
            ("code_block", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        xp = array_namespace(*(a for a in (self.sink, self.recent) if a is not None))
        empty = (self.layer_total, self.kv_heads, 0, self.head_dim)
        carrier = CARRIER_DTYPES[self.dtype]
        if self.sink is None:
            self.sink = xp.zeros(empty, dtype=carrier)
        if self.recent is None:
            self.recent = xp.zeros(empty, dtype=carrier)
        if self.stream is None:
            self.stream = np.zeros(0, dtype=np.uint8)
            self.block_bytes = np.zeros(0, dtype=np.int64)
            self.block_tokens = np.zeros(0, dtype=np.int64)
            self.block_peaks = np.zeros(0, dtype=np.int32)
        # The last coefficients decoded, (start, end, array), kept only between restores
        # of single layers (a compressed cache restores a group one layer a call). Not
        # stored; dropped on append and by a restore of every layer (`_restore_coded`).
        self._decoded: tuple[int, int, Any] | None = None

    @property
    def layer_count(self) -> int:  # type: ignore[override]
        return self.layer_total

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(range(self.first_layer, self.first_layer + self.layer_total))

    @property
    def coded_tokens(self) -> int:
        return int(self.block_tokens[-1]) if self.block_tokens.size else 0

    @property
    def tokens(self) -> int:
        return int(self.sink.shape[2]) + self.coded_tokens + int(self.recent.shape[2])

    @property
    def frozen_tokens(self) -> int:
        return int(self.sink.shape[2]) + self.coded_tokens

    def _transform(self) -> tuple[SideTransform, Any, str]:
        """(the side's transform, the group's RoPE tables, the coder)."""
        artifact = ARTIFACTS.get(self.artifact)
        if (artifact.shape.kv_heads, artifact.shape.head_dim) != (self.kv_heads, self.head_dim):
            raise ValueError(
                f"artifact {self.artifact[:12]} is for {artifact.shape.kv_heads} KV heads x "
                f"{artifact.shape.head_dim} dims, not {self.kv_heads} x {self.head_dim}"
            )
        _, group = artifact.group_for(self.layers)
        return (
            group.side(self.kind),
            [artifact.rope[layer] for layer in self.layers],
            artifact.coder,
        )

    # -- encoding -------------------------------------------------------------------

    def append(self, chunk: Sequence[Any]) -> None:
        xp = array_namespace(*chunk)
        tokens = xp.stack(list(chunk))  # [layers, kv_heads, n, head_dim]
        # An append that fails (a missing or unfit artifact) leaves the codec as it was:
        # the exact parts are only ever replaced by new arrays.
        held = self.sink, self.recent
        # The artifact is looked up on every append, coded or not: a missing or unfit
        # one fails the first append, not the one that fills a block.
        self._transform()
        try:
            room = self.sink_capacity - int(self.sink.shape[2])
            if room > 0:
                self.sink = concat_tokens(self.sink, tokens[:, :, :room], axis=2)
                tokens = tokens[:, :, room:]
            if tokens.shape[2]:
                self.recent = concat_tokens(self.recent, tokens, axis=2)
            self._code_ready(seal=False)
        except BaseException:
            self.sink, self.recent = held
            raise

    def seal(self) -> None:
        """End of a bulk put: every token beyond the window is coded, a partial block too."""
        self._code_ready(seal=True)

    def _code_ready(self, seal: bool) -> None:
        ready = int(self.recent.shape[2]) - self.window
        if not seal:
            ready -= ready % self.code_block
        if ready > 0:
            self._code(ready)

    def _code(self, count: int) -> None:
        """Code the first `count` tokens of `recent`, in blocks of at most
        `CODE_CHUNK_TOKENS`.

        A chunk of tokens at a time through the float32 steps and the entropy coder: a
        2,048-token block of a 15-layer group held over 100 MiB of float32 steps at
        once, and its int32 codes alone were 13-14 MiB (the shipped default, ranks 1,636
        and 1,785). Every step is per token and the product is tiled by coded token
        index, so the codes are those of one pass; a restore of the whole group decodes
        a run of blocks of about this size at a time (`_restore_into`)."""
        self._decoded = None
        side, rope, coder = self._transform()
        blocks, token_ends, byte_ends, peaks = [], [], [], []
        coded, size = self.coded_tokens, int(to_numpy(self.stream).size)
        for first in range(0, count, CODE_CHUNK_TOKENS):
            last = min(count, first + CODE_CHUNK_TOKENS)
            codes = self._quantized(side, rope, first, last).astype(np.int32)
            data, peak = entropy.encode(codes, side.scales, coder)
            size += len(data)
            blocks.append(np.frombuffer(data, dtype=np.uint8))
            token_ends.append(coded + last)
            byte_ends.append(size)
            peaks.append(peak)
        self.stream = np.concatenate([to_numpy(self.stream), *blocks])
        self.block_bytes = _grown(self.block_bytes, *byte_ends)
        self.block_tokens = _grown(self.block_tokens, *token_ends)
        self.block_peaks = _grown(self.block_peaks, *peaks)
        self.recent = self.recent[:, :, count:].copy()

    def _quantized(self, side: SideTransform, rope: list[Any], first: int, last: int) -> Any:
        """float32 quantization steps, rounded, of tokens [first, last) of `recent`."""
        exact = widen_to_float32(self.recent[:, :, first:last], self.dtype)
        if self.kind == "keys":
            position = self.frozen_tokens + first
            exact = array_namespace(exact).stack(
                [
                    table.rotate(layer, position, inverse=True)
                    for table, layer in zip(rope, exact, strict=True)
                ]
            )
        # [tokens, layers * heads * channels], the artifact's layout.
        vectors = to_numpy(exact).transpose(2, 0, 1, 3).reshape(last - first, -1)
        steps = _tiled_product(vectors - side.mean, self.coded_tokens + first, side.basis)
        steps /= np.float32(side.step)
        # float32 below 2^31 rounds to an int32; beyond (or NaN), a cast would wrap.
        if not (np.abs(steps) < 2.0**31).all():
            raise ValueError(
                "KV too far beyond the artifact's calibrated range: a transform code "
                "does not fit 32 bits"
            )
        return np.rint(steps, out=steps)

    # -- decoding -------------------------------------------------------------------

    def _decode_codes(self, start: int, end: int, side: SideTransform, coder: str) -> Any:
        """int32 codes `[end - start, rank]` of coded tokens [start, end)."""
        # The coded stream is decoded on the host, also when a GPU tier holds it.
        ends, byte_ends = to_numpy(self.block_tokens), to_numpy(self.block_bytes)
        stream, peaks = to_numpy(self.stream), to_numpy(self.block_peaks)
        first = int(np.searchsorted(ends, start, side="right"))
        last = int(np.searchsorted(ends, end - 1, side="right"))
        parts = []
        for block in range(first, last + 1):
            block_start = int(ends[block - 1]) if block else 0
            byte_start = int(byte_ends[block - 1]) if block else 0
            parts.append(
                entropy.decode(
                    stream[byte_start : int(byte_ends[block])],
                    int(peaks[block]),
                    int(ends[block]) - block_start,
                    side.scales,
                    coder,
                )
            )
        offset = start - (int(ends[first - 1]) if first else 0)
        codes = parts[0] if len(parts) == 1 else np.concatenate(parts)  # one block: no copy
        return codes[offset : offset + end - start]

    def _block_runs(self, start: int, end: int) -> list[tuple[int, int]]:
        """Coded tokens [start, end) cut at block ends into runs of at least
        `CODE_CHUNK_TOKENS` tokens (the last may be shorter): each block is decoded by
        one run only."""
        ends = to_numpy(self.block_tokens)
        first = int(np.searchsorted(ends, start, side="right"))
        last = int(np.searchsorted(ends, end - 1, side="right"))
        runs, run_start = [], start
        for block_end in ends[first : last + 1].tolist():
            run_end = min(end, block_end)
            if run_end - run_start >= CODE_CHUNK_TOKENS or run_end == end:
                runs.append((run_start, run_end))
                run_start = run_end
        return runs

    def _restore_coded(self, layer_positions: Sequence[int], start: int, end: int) -> Iterator[Any]:
        """float32 `[kv_heads, end - start, head_dim]` of coded tokens [start, end) for
        each of `layer_positions` (indices into the group), one at a time: the caller
        narrows each into its output before the next is made.

        The decoded coefficients (float32, `[tokens, rank]`: several times the stored
        bytes) are kept for the next call only when this one restores some of the
        group's layers, for the others of the same range. A restore of every layer keeps
        nothing: a server's device tier holds its entries for long, and keeping the
        coefficients of each one it restored grew its memory to gigabytes beyond its
        budget."""
        side, rope, coder = self._transform()
        if self._decoded is not None and self._decoded[:2] == (start, end):
            coefficients = self._decoded[2]
        else:
            coefficients = self._decode_codes(start, end, side, coder).astype(np.float32)
            coefficients *= np.float32(side.step)
        whole_group = len(layer_positions) >= self.layer_total
        self._decoded = None if whole_group else (start, end, coefficients)
        width = self.kv_heads * self.head_dim
        for which in layer_positions:
            rows = slice(which * width, (which + 1) * width)
            vectors = _tiled_product(coefficients, start, side.basis[rows].T) + side.mean[rows]
            layer = vectors.reshape(end - start, self.kv_heads, self.head_dim).transpose(1, 0, 2)
            if self.kind == "keys":
                layer = rope[which].rotate(layer, int(self.sink.shape[2]) + start)
            yield layer

    def _restore_into(
        self, outs: list[Any], which: Sequence[int], start: int, end: int, dtype: str
    ) -> None:
        xp = array_namespace(self.sink)
        sink_end = int(self.sink.shape[2])
        coded_end = sink_end + self.coded_tokens
        for part, lo, hi in (
            ("sink", 0, sink_end),
            ("coded", sink_end, coded_end),
            ("recent", coded_end, self.tokens),
        ):
            a, b = max(start, lo), min(end, hi)
            if a >= b:
                continue
            if part == "coded":
                # Every layer of the group: a run of whole blocks at a time, so that only
                # their codes and coefficients are held, not the whole range's. Some
                # layers: the whole range, its coefficients kept for the next layers.
                runs = (
                    self._block_runs(a - lo, b - lo)
                    if len(which) >= self.layer_total
                    else [(a - lo, b - lo)]
                )
                for first, last in runs:
                    layers = self._restore_coded(which, first, last)
                    for out, layer in zip(outs, layers, strict=True):
                        narrow_into(
                            xp.asarray(layer), out[:, lo + first - start : lo + last - start], dtype
                        )
                continue
            held = getattr(self, part)
            for out, index in zip(outs, which, strict=True):
                out[:, a - start : b - start] = recast(
                    held[index, :, a - lo : b - lo], self.dtype, dtype
                )

    def _restore(self, which: Sequence[int], start: int, end: int, dtype: str) -> list[Any]:
        xp = array_namespace(self.sink)
        outs = [
            xp.empty((self.kv_heads, end - start, self.head_dim), dtype=CARRIER_DTYPES[dtype])
            for _ in which
        ]
        self._restore_into(outs, which, start, end, dtype)
        return outs

    def restore(self, which: int, start: int, end: int, dtype: str) -> Any:
        return self._restore([which], start, end, dtype)[0]

    def restore_group(self, start: int, end: int, dtype: str) -> list[Any]:
        """Every layer of the group, the coded blocks decoded once."""
        return self._restore(range(self.layer_total), start, end, dtype)

    def check(self) -> None:
        carrier = CARRIER_DTYPES[self.dtype]
        shape = (self.layer_total, self.kv_heads)
        for part in (self.sink, self.recent):
            check_stored(
                part.ndim == 4
                and part.shape[:2] == shape
                and part.shape[3] == self.head_dim
                and part.dtype == carrier,
                "exact tokens of a transform codec have the wrong shape or dtype",
            )
        check_stored(self.sink.shape[2] <= self.sink_capacity, "more sink tokens than room")
        blocks = self.block_bytes.size
        check_stored(
            self.stream.ndim == 1
            and self.stream.dtype == np.uint8
            and self.block_tokens.shape == self.block_peaks.shape == (blocks,)
            and self.block_bytes.dtype == self.block_tokens.dtype == np.int64
            and self.block_peaks.dtype == np.int32,
            "coded blocks of a transform codec are malformed",
        )
        if blocks:
            byte_ends, token_ends = to_numpy(self.block_bytes), to_numpy(self.block_tokens)
            check_stored(
                bool((np.diff(byte_ends, prepend=0) > 0).all())
                and bool((np.diff(token_ends, prepend=0) > 0).all())
                and int(byte_ends[-1]) == self.stream.size
                and bool((to_numpy(self.block_peaks) >= 0).all()),
                "coded blocks of a transform codec are out of order",
            )
            check_stored(self.sink.shape[2] == self.sink_capacity, "coded tokens before the sink")
