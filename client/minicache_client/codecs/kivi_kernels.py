"""Compiled KIVI kernels (Numba) for NumPy arrays: one pass over memory per step.

KIVI's restore and encode are a few arithmetic operations per value. As NumPy
operations each is a pass over memory of its own, and NumPy converts float16 one value
at a time, so on a CPU the array path runs at a fifth of a plain copy (docs/results.md,
"Engine throughput"). These kernels do the same arithmetic in compiled loops, a row
(one head, one token) at a time:

- `dequantize_kernel`: packed rows -> the output carrier;
- `extremes_kernel`: the min and max of every quantization group of a carrier tensor;
- `quantize_kernel`: a carrier tensor -> packed rows, given the stored statistics.

Each builds (once, `functools.cache`) a kernel for its constants (bit width, channels
per statistic, carrier), so every inner loop has fixed bounds and steps and compiles to
vector instructions; a kernel taking them as arguments measured 3-4x slower.

Arrays here are one head's: rows `[tokens, ...]`; KV travels as bit patterns (uint16
for float16 and bfloat16, uint32 for float32), so one compiled loop serves each. A statistic is addressed by its row
(`stat_rows[token]`: the token itself per token, its block per channel) and its column
(`channel // group_size`: `group_size` 1 per channel). Carriers: `CARRIER_KINDS`.

`kivi.py` calls them for NumPy arrays with 2-, 4- or 8-bit codes (`usable`); CuPy
arrays and 3-bit codes take the array-namespace path. The results equal that path bit
for bit (tests/unit/test_kivi_kernels.py runs both on the same data): the same float32
operations in the same order, no fused multiply-add (Numba's default without
fastmath), float16 rounded to nearest even with subnormals, as NumPy rounds. A result
the kernel does not round itself (an infinity, a NaN, a float16 overflow) makes
a restore kernel return False and the caller takes the array path for that range.

Each kernel compiles on first use for its argument types (about a second) and is
cached on disk by Numba (beside this file, or under `NUMBA_CACHE_DIR`).
"""

from __future__ import annotations

import functools
from typing import Any

import numba
import numpy as np

from minicache_client.half_floats import FLOAT32_OF_HALF

KERNEL_BITS = (2, 4, 8)
# Carrier dtype name -> (the kernels' code for it, the unsigned type of its bits).
CARRIERS = {"float16": (0, np.uint16), "bfloat16": (1, np.uint16), "float32": (2, np.uint32)}

_jit = numba.njit(cache=True, nogil=True, boundscheck=False)


def usable(xp: Any, bits: int) -> bool:
    return xp is np and bits in KERNEL_BITS


def carrier_bits(array: np.ndarray, dtype: str) -> tuple[int, np.ndarray]:
    """(kind, the bit-pattern view of `array`, a carrier of `dtype`)."""
    kind, unsigned = CARRIERS[dtype]
    return kind, array.view(unsigned)


@numba.njit(inline="always")
def _widen_row(row, kind, wide):
    """One carrier row (bit patterns) as float32 (float16 through the exact table)."""
    wide_bits = wide.view(np.uint32)
    if kind == 0:
        for channel in range(row.shape[0]):
            wide[channel] = FLOAT32_OF_HALF[row[channel]]
    elif kind == 1:
        for channel in range(row.shape[0]):
            wide_bits[channel] = np.uint32(row[channel]) << np.uint32(16)
    else:
        for channel in range(row.shape[0]):
            wide_bits[channel] = row[channel]


@functools.cache
def dequantize_kernel(bits: int, columns: int, kind: int):
    """kernel(codes, stat_rows, scale, center, out) -> bool: restore packed rows `codes`
    `[tokens, row_bytes]` into `out` `[tokens, head_dim]` (carrier bits): center +
    offset * scale per value, rounded to the carrier. False, with `out` partly written,
    when a value needs the array path (float16 overflow, infinity or NaN)."""
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    middle = np.float32(mask / 2)

    @_jit
    def dequantize(codes, stat_rows, scale, center, out):
        dim = out.shape[1]
        offsets = np.empty(codes.shape[1] * per_byte, np.float32)
        values = np.empty(dim, np.float32)
        value_bits = values.view(np.uint32)
        special = False
        for token in range(codes.shape[0]):
            packed = codes[token]
            for j in range(packed.shape[0]):
                byte = np.int32(packed[j])
                for lane in range(per_byte):
                    code = (byte >> (lane * bits)) & mask
                    offsets[j * per_byte + lane] = np.float32(code) - middle
            # Explicit loops over fixed bounds: Numba's slice assignment is no
            # vector loop (measured 3x slower).
            steps, middles = scale[stat_rows[token]], center[stat_rows[token]]
            if columns == 1:
                for channel in range(dim):
                    values[channel] = middles[channel] + offsets[channel] * steps[channel]
            else:
                for group in range(steps.shape[0]):
                    step, middle_value = steps[group], middles[group]
                    for channel in range(group * columns, (group + 1) * columns):
                        values[channel] = middle_value + offsets[channel] * step
            target = out[token]
            if kind == 0:
                for channel in range(dim):
                    bits32 = value_bits[channel]
                    magnitude = bits32 & np.uint32(0x7FFFFFFF)
                    special |= magnitude >= np.uint32(0x47800000)
                    # Normal: re-bias the exponent, round the mantissa to nearest even.
                    odd = (magnitude >> np.uint32(13)) & np.uint32(1)
                    half = (magnitude + np.uint32(0xC8000FFF) + odd) >> np.uint32(13)
                    # Below 2**-14: a multiple of 2**-24, rounded to nearest even
                    # (clamped first, so converting a large value, unused, is defined).
                    small = min(abs(values[channel]), np.float32(1.0))
                    tiny = np.uint32(np.rint(small * np.float32(16777216.0)))
                    if magnitude < np.uint32(0x38800000):
                        half = tiny
                    sign = (bits32 >> np.uint32(16)) & np.uint32(0x8000)
                    target[channel] = np.uint16(half | sign)
            elif kind == 1:
                for channel in range(dim):
                    bits32 = value_bits[channel]
                    special |= (bits32 & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
                    odd = (bits32 >> np.uint32(16)) & np.uint32(1)
                    rounded = bits32 + np.uint32(0x7FFF) + odd
                    target[channel] = np.uint16(rounded >> np.uint32(16))
            else:
                for channel in range(dim):
                    target[channel] = value_bits[channel]
        return not special

    return dequantize


@functools.cache
def extremes_kernel(kind: int, columns: int, block_tokens: int):
    """kernel(tokens, low, high): min and max of every group of `tokens` `[tokens,
    head_dim]` (carrier bits) into float32 `low`/`high`: per token (`block_tokens` 0)
    `[tokens, head_dim // columns]`, per channel (`columns` 1) `[blocks, head_dim]`
    over blocks of `block_tokens` rows."""

    @_jit
    def extremes(tokens, low, high):
        count, dim = tokens.shape
        wide = np.empty(dim, np.float32)
        for token in range(count):
            _widen_row(tokens[token], kind, wide)
            if block_tokens:
                block = token // block_tokens
                if token % block_tokens == 0:
                    for channel in range(dim):
                        low[block, channel] = wide[channel]
                        high[block, channel] = wide[channel]
                else:
                    for channel in range(dim):
                        low[block, channel] = min(low[block, channel], wide[channel])
                        high[block, channel] = max(high[block, channel], wide[channel])
            else:
                for group in range(dim // columns):
                    first = group * columns
                    smallest = wide[first]
                    largest = wide[first]
                    for channel in range(first + 1, first + columns):
                        smallest = min(smallest, wide[channel])
                        largest = max(largest, wide[channel])
                    low[token, group] = smallest
                    high[token, group] = largest

    return extremes


@functools.cache
def quantize_kernel(bits: int, columns: int, kind: int):
    """kernel(tokens, stat_rows, center, step, codes): the codes of `tokens` `[tokens,
    head_dim]` (carrier bits) packed into `codes` `[tokens, row_bytes]`:
    clip(rint((x - center) / step + middle), 0, 2**bits - 1) in float32, against the
    stored statistics (`step` is the scale, 1 where it is 0)."""
    per_byte = 8 // bits
    top = np.float32((1 << bits) - 1)
    middle = np.float32(((1 << bits) - 1) / 2)

    @_jit
    def quantize(tokens, stat_rows, center, step, codes):
        count, dim = tokens.shape
        wide = np.empty(dim, np.float32)
        row_codes = np.zeros(codes.shape[1] * per_byte, np.uint8)
        for token in range(count):
            _widen_row(tokens[token], kind, wide)
            centers, steps = center[stat_rows[token]], step[stat_rows[token]]
            if columns == 1:
                for channel in range(dim):
                    code = np.rint((wide[channel] - centers[channel]) / steps[channel] + middle)
                    row_codes[channel] = np.uint8(min(max(code, np.float32(0)), top))
            else:
                for group in range(steps.shape[0]):
                    group_center, group_step = centers[group], steps[group]
                    for channel in range(group * columns, (group + 1) * columns):
                        code = np.rint((wide[channel] - group_center) / group_step + middle)
                        row_codes[channel] = np.uint8(min(max(code, np.float32(0)), top))
            packed = codes[token]
            for j in range(packed.shape[0]):
                byte = np.uint32(0)
                for lane in range(per_byte):
                    code_bits = np.uint32(row_codes[j * per_byte + lane])
                    byte |= code_bits << np.uint32(lane * bits)
                packed[j] = np.uint8(byte)

    return quantize
