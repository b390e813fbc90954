"""`kivi`: KIVI-style asymmetric min/max quantization of one layer's tokens.

Keys per channel (`mode="per_channel"`: one scale and center per (head, channel) over
a block of `block_tokens` tokens), values per token (`mode="per_token"`: one per
(head, token, group of `group_size` channels)). The first `sink_capacity` tokens stay
exact in `sink` (their outliers would widen the first block's range), the `window`
most recent ones exact in `tail`; tokens leave the tail in whole blocks once more
than `window` newer tokens follow them.

Stored layout, vectorized: every quantized token is one packed row per head in
`codes` `[kv_heads, quantized, row_bytes]`; statistics are contiguous arrays
(`scale`, `center`: per_channel `[kv_heads, blocks, head_dim]` with `block_ends`, the
cumulative token count of the blocks; per_token `[kv_heads, quantized, groups]`), so a
restore of any token range is a fixed number of array operations. A code c restores as
center + (c - (2**bits - 1) / 2) * scale; scale and center are float16 (float32 only
where float16 would overflow) and codes are computed against those stored values, so
the decoder reproduces exactly what the encoder intended.

The code here is array code (NumPy or CuPy). On NumPy, streams the compiled kernels
cover (`kivi_kernels.usable`: 2-, 4- and 8-bit codes, rows without padding) encode and
restore through them instead, with the same results bit for bit. They are imported on
first use (`compiled_kernels`), so Numba and its LLVM (58 MiB more resident) load only
into a process that runs a KIVI stream.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from minicache_client.array_namespace import (
    CARRIER_DTYPES,
    array_namespace,
    narrow_into,
    recast,
    widen_to_float32,
)
from minicache_client.bit_packing import (
    SUPPORTED_BITS,
    code_offsets,
    pack_rows,
    row_bytes,
)
from minicache_client.codecs.base import Codec, check_stored, concat_tokens, extend_tokens


@functools.cache
def compiled_kernels() -> ModuleType | None:
    """The module of KIVI's compiled kernels, imported the first time a stream asks;
    None where Numba is missing (it is a dependency; without it the array path runs)."""
    try:
        from minicache_client.codecs import kivi_kernels
    except ImportError:
        return None
    return kivi_kernels


MODES = ("per_channel", "per_token")


def _stored_statistic(values: Any) -> Any:
    """float16, or float32 where float16 would overflow: then every value that fits is
    still rounded to float16 first, so a value does not depend on its neighbours (nor
    on how tokens were chunked)."""
    xp = array_namespace(values)
    with np.errstate(over="ignore"):  # overflow is what the test below looks for
        as_fp16 = values.astype(xp.float16)
    fits = xp.isfinite(as_fp16)
    if bool(fits.all()):
        return as_fp16
    return xp.where(fits, as_fp16.astype(xp.float32), values.astype(xp.float32))


def _join_tokens(parts: Sequence[Any]) -> Any:
    """Concatenate along tokens (axis 1) in one copy, skipping empty parts; statistics
    of different dtypes are all widened to float32."""
    kept = [part for part in parts if part.shape[1]] or [parts[-1]]
    if len(kept) == 1:
        return kept[0]
    xp = array_namespace(*kept)
    if len({part.dtype for part in kept}) > 1:
        kept = [part.astype(xp.float32) for part in kept]
    return xp.concatenate(kept, axis=1)


def _statistics(low: Any, high: Any, bits: int) -> tuple[Any, Any, Any, Any]:
    """From group extremes: the stored (scale, center), and the float32 (center, step)
    that codes are computed against (step is the scale, 1 where the scale is 0)."""
    xp = array_namespace(low, high)
    # Statistics are few: float64 keeps (high - low) exact and free of overflow.
    low, high = low.astype(xp.float64), high.astype(xp.float64)
    levels = (1 << bits) - 1
    scale = _stored_statistic((high - low) / levels)
    center = _stored_statistic((high + low) / 2)
    step = scale.astype(xp.float32)
    return scale, center, center.astype(xp.float32), xp.where(step > 0, step, 1)


def quantize_blocks(tokens: Any, bits: int, mode: str, group_size: int, block_tokens: int):
    """Quantize float32 `[kv_heads, n, head_dim]` (n a multiple of `block_tokens`, or
    one partial block) with array operations. Returns (packed rows, scale, center) in
    the stored layout."""
    xp = array_namespace(tokens)
    heads, count, dim = tokens.shape
    if mode == "per_channel":
        block = min(block_tokens, count)
        grouped = tokens.reshape(heads, count // block, block, dim)
        reduce_axis = 2
    else:
        grouped = tokens.reshape(heads, count, dim // group_size, group_size)
        reduce_axis = 3
    low = grouped.min(axis=reduce_axis, keepdims=True)
    high = grouped.max(axis=reduce_axis, keepdims=True)
    scale, center, center32, step = _statistics(low, high, bits)
    levels = (1 << bits) - 1
    codes = xp.rint((grouped - center32) / step + levels / 2)
    codes = xp.clip(codes, 0, levels).astype(xp.uint8).reshape(heads, count, dim)
    return pack_rows(codes, bits), xp.squeeze(scale, reduce_axis), xp.squeeze(center, reduce_axis)


def quantize_blocks_compiled(
    tokens: np.ndarray, dtype: str, bits: int, mode: str, group_size: int, block_tokens: int
):
    """`quantize_blocks` by the compiled kernels, straight from the carrier of `dtype`
    (when `kivi_kernels.usable`): the same codes and statistics."""
    kernels = compiled_kernels()
    heads, count, dim = tokens.shape
    kind, carrier = kernels.carrier_bits(tokens, dtype)
    codes = np.empty((heads, count, row_bytes(dim, bits)), np.uint8)
    per_channel = mode == "per_channel"
    if per_channel:  # rows of tokens, statistics per block of rows and channel
        columns, block = 1, min(block_tokens, count)
        rows, stats_shape = count, (heads, count // block, dim)
        stat_rows = np.arange(count) // block
    else:  # flat groups of `group_size` channels, one statistic each
        columns, block = group_size, 0
        rows, stats_shape = count * (dim // group_size), (heads, count, dim // group_size)
        stat_rows = None

    def statistic(array: np.ndarray) -> np.ndarray:
        return array if per_channel else array.reshape(-1)

    low = np.empty(stats_shape, np.float32)
    high = np.empty_like(low)
    extremes = kernels.extremes_kernel(kind, columns, block)
    for head in range(heads):
        extremes(carrier[head].reshape(rows, -1), statistic(low[head]), statistic(high[head]))
    scale, center, center32, step = _statistics(low, high, bits)
    quantize = kernels.quantize_kernel(bits, columns, kind)
    for head in range(heads):
        quantize(
            carrier[head].reshape(rows, -1),
            stat_rows,
            statistic(center32[head]),
            statistic(step[head]),
            codes[head].reshape(rows, -1),
        )
    return codes, scale, center


@dataclass
class KiviStream(Codec):
    name: ClassVar[str] = "kivi"

    kv_heads: int
    head_dim: int
    dtype: str
    bits: int = 4
    mode: str = "per_token"
    group_size: int = 32
    block_tokens: int = 32
    sink_capacity: int = 0
    window: int = 0
    sink: Any = None
    codes: Any = None
    scale: Any = None
    center: Any = None
    block_ends: Any = None
    tail: Any = None

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.mode == "per_token" and self.head_dim % self.group_size:
            raise ValueError(
                f"value_group_size {self.group_size} does not divide head_dim {self.head_dim}"
            )
        carrier = CARRIER_DTYPES[self.dtype]
        empty = (self.kv_heads, 0, self.head_dim)
        xp = array_namespace(*(a for a in (self.sink, self.codes, self.tail) if a is not None))
        if self.sink is None:
            self.sink = xp.zeros(empty, dtype=carrier)
        if self.tail is None:
            self.tail = xp.zeros(empty, dtype=carrier)
        if self.codes is None:
            self.codes = xp.zeros(
                (self.kv_heads, 0, row_bytes(self.head_dim, self.bits)), dtype=xp.uint8
            )
            groups = (
                self.head_dim if self.mode == "per_channel" else self.head_dim // self.group_size
            )
            self.scale = xp.zeros((self.kv_heads, 0, groups), dtype=xp.float16)
            self.center = xp.zeros((self.kv_heads, 0, groups), dtype=xp.float16)
            self.block_ends = xp.zeros(0, dtype=xp.int64)
        # Spare room behind `codes` for appends (not stored; see `extend_tokens`).
        self._codes_backing = None

    @property
    def quantized_tokens(self) -> int:
        return int(self.codes.shape[1])

    @property
    def tokens(self) -> int:
        return int(self.sink.shape[1]) + self.quantized_tokens + int(self.tail.shape[1])

    @property
    def frozen_tokens(self) -> int:
        return int(self.sink.shape[1]) + self.quantized_tokens

    # -- encoding -------------------------------------------------------------------

    def append(self, chunk: Sequence[Any]) -> None:
        (array,) = chunk
        room = self.sink_capacity - int(self.sink.shape[1])
        if room > 0:
            self.sink = concat_tokens(self.sink, array[:, :room], axis=1)
            array = array[:, room:]
        if array.shape[1]:
            self.tail = concat_tokens(self.tail, array, axis=1)
        self._flush(seal=False)

    def seal(self) -> None:
        self._flush(seal=True)

    def _flush(self, seal: bool) -> None:
        ready = int(self.tail.shape[1]) - self.window
        if ready <= 0:
            return
        full = ready // self.block_tokens * self.block_tokens
        if full:
            self._quantize(full)
        if seal and ready > full:
            self._quantize(ready - full)

    def _quantize(self, count: int) -> None:
        """Move the tail's first `count` tokens (whole blocks, or one partial block)
        into the quantized arrays."""
        xp = array_namespace(self.tail)
        if self._compiled(xp):
            codes, scale, center = quantize_blocks_compiled(
                self.tail[:, :count],
                self.dtype,
                self.bits,
                self.mode,
                self.group_size,
                self.block_tokens,
            )
        else:
            codes, scale, center = quantize_blocks(
                widen_to_float32(self.tail[:, :count], self.dtype),
                self.bits,
                self.mode,
                self.group_size,
                self.block_tokens,
            )
        self.codes, self._codes_backing = extend_tokens(self.codes, codes, self._codes_backing)
        self.scale = _join_tokens([self.scale, scale])
        self.center = _join_tokens([self.center, center])
        if self.mode == "per_channel":
            blocks = scale.shape[1]
            size = count // blocks
            first = self.quantized_tokens - count
            ends = first + size * xp.arange(1, blocks + 1, dtype=xp.int64)
            self.block_ends = concat_tokens(self.block_ends, ends, axis=0)
        self.tail = self.tail[:, count:].copy()

    # -- decoding -------------------------------------------------------------------

    def _dequantize_into(self, out: Any, start: int, end: int, dtype: str) -> None:
        """Restore quantized tokens [start, end) (indices into the quantized part) into
        `out`, `[kv_heads, end - start, head_dim]` in the carrier of `dtype`."""
        xp = array_namespace(self.codes)
        if self._compiled(xp) and self._dequantize_compiled(out, start, end, dtype):
            return
        narrow_into(self._dequantize(start, end), out, dtype)

    def _statistic_rows(self, start: int, end: int) -> tuple[Any, Any, Any]:
        """(scale, center, row of each token in them) for quantized tokens [start, end)."""
        xp = array_namespace(self.codes)
        if self.mode == "per_token":
            rows = xp.arange(end - start)
            return self.scale[:, start:end], self.center[:, start:end], rows
        ends = self.block_ends
        first = int(xp.searchsorted(ends, start, side="right"))
        last = int(xp.searchsorted(ends, end - 1, side="right")) + 1
        # The block of each token, counted from `first`.
        rows = xp.searchsorted(ends[first:last], xp.arange(start, end), side="right")
        return self.scale[:, first:last], self.center[:, first:last], rows

    def _compiled(self, xp: Any) -> bool:
        """Whether the compiled kernels encode and restore this stream."""
        kernels = compiled_kernels()
        return kernels is not None and kernels.usable(xp, self.bits, self.head_dim, self._columns())

    def _columns(self) -> int:
        """Channels per statistic: 1 per channel, the group size per token."""
        return 1 if self.mode == "per_channel" else self.group_size

    def _dequantize_compiled(self, out: Any, start: int, end: int, dtype: str) -> bool:
        """The kernels' restore; False when a value needs the array path."""
        scale, center, rows = self._statistic_rows(start, end)
        scale, center = scale.astype(np.float32), center.astype(np.float32)
        columns = self._columns()
        kernels = compiled_kernels()
        kind, target = kernels.carrier_bits(out, dtype)
        dequantize = kernels.dequantize_kernel(self.bits, columns, kind)
        # Per token the kernel reads flat groups: reshapes of one head's rows (views
        # of `out`, whose heads are each contiguous).
        shape = (-1, columns) if columns > 1 else (-1, self.head_dim)
        code_shape = (shape[0], shape[1] * self.bits // 8)
        return all(
            dequantize(
                self.codes[head, start:end].reshape(code_shape),
                rows,
                scale[head].reshape(-1) if columns > 1 else scale[head],
                center[head].reshape(-1) if columns > 1 else center[head],
                target[head].reshape(shape),
            )
            for head in range(self.kv_heads)
        )

    def _dequantize(self, start: int, end: int) -> Any:
        """Quantized tokens [start, end) as float32 `[kv_heads, end - start, head_dim]`,
        by array operations."""
        xp = array_namespace(self.codes)
        count = end - start
        offsets = code_offsets(self.codes[:, start:end], self.bits, self.head_dim)
        scale, center, rows = self._statistic_rows(start, end)
        scale, center = scale.astype(xp.float32), center.astype(xp.float32)
        if self.mode == "per_token":
            shaped = offsets.reshape(self.kv_heads, count, -1, self.group_size)
            shaped *= scale[..., None]
            shaped += center[..., None]
        elif count % self.block_tokens == 0 and bool(
            (rows == xp.arange(count) // self.block_tokens).all()
        ):
            # Whole blocks of one size: the statistics broadcast, no gather.
            shaped = offsets.reshape(self.kv_heads, scale.shape[1], self.block_tokens, -1)
            shaped *= scale[:, :, None]
            shaped += center[:, :, None]
        else:
            offsets *= scale[:, rows]
            offsets += center[:, rows]
        return offsets

    def _pieces(self, start: int, end: int):
        """(part, lo, hi, out_lo) for the parts of [start, end): sink, quantized, tail."""
        sink, quantized = int(self.sink.shape[1]), self.quantized_tokens
        bounds = (("sink", 0, sink), ("codes", sink, sink + quantized))
        bounds += (("tail", sink + quantized, self.tokens),)
        for part, first, last in bounds:
            lo, hi = max(start, first), min(end, last)
            if lo < hi:
                yield part, lo - first, hi - first, lo - start

    def restore(self, which: int, start: int, end: int, dtype: str) -> Any:
        xp = array_namespace(self.codes, self.sink, self.tail)
        out = xp.empty((self.kv_heads, end - start, self.head_dim), dtype=CARRIER_DTYPES[dtype])
        for part, lo, hi, at in self._pieces(start, end):
            if part == "codes":
                self._dequantize_into(out[:, at : at + hi - lo], lo, hi, dtype)
            else:
                out[:, at : at + hi - lo] = recast(getattr(self, part)[:, lo:hi], self.dtype, dtype)
        return out

    def check(self) -> None:
        heads, dim = self.kv_heads, self.head_dim
        check_stored(self.bits in SUPPORTED_BITS, f"unknown bit width {self.bits!r}")
        check_stored(self.mode in MODES, f"unknown quantization mode {self.mode!r}")
        check_stored(isinstance(self.group_size, int) and self.group_size >= 1, "bad group size")
        check_stored(
            isinstance(self.block_tokens, int) and self.block_tokens >= 1, "bad block size"
        )
        for part in (self.sink, self.tail):
            check_stored(
                part.ndim == 3
                and part.shape[0] == heads
                and part.shape[2] == dim
                and part.dtype == CARRIER_DTYPES[self.dtype],
                "exact tokens have the wrong shape or dtype",
            )
        quantized = self.quantized_tokens
        check_stored(
            self.codes.shape == (heads, quantized, row_bytes(dim, self.bits))
            and self.codes.dtype.name == "uint8",
            "codes have the wrong shape or dtype",
        )
        check_stored(
            self.scale.shape == self.center.shape
            and {self.scale.dtype.name, self.center.dtype.name} <= {"float16", "float32"},
            "scale and center disagree",
        )
        if self.mode == "per_channel":
            ends = self.block_ends
            check_stored(
                self.scale.shape == (heads, ends.shape[0], dim) and ends.dtype.kind in "iu",
                "statistics disagree with blocks",
            )
            steps = array_namespace(ends).diff(ends, prepend=0)
            check_stored(
                (int(ends[-1]) if ends.shape[0] else 0) == quantized and bool((steps > 0).all()),
                "block ends disagree with the quantized tokens",
            )
        else:
            check_stored(
                dim % self.group_size == 0
                and self.scale.shape == (heads, quantized, dim // self.group_size),
                "statistics disagree with the quantized tokens",
            )
