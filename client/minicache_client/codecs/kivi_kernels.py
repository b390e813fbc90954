"""Compiled KIVI kernels (Numba) for NumPy arrays: restore and encode in one pass.

KIVI's restore and encode are a few arithmetic operations per value. As NumPy
operations each is a pass over memory of its own, and NumPy converts float16 one value
at a time, so on a CPU the array path runs at about a fifth of a plain copy
(docs/results.md, "Engine throughput"). These kernels do the same arithmetic in
compiled loops, value by value:

- `dequantize_kernel`: packed codes -> the output carrier;
- `extremes_kernel`: the min and max of every quantization group of a carrier tensor;
- `quantize_kernel`: a carrier tensor -> packed codes, given the stored statistics.

Each builds (once, `functools.cache`) a kernel for its constants (bit width, channels
per group, carrier), so every inner loop has fixed bounds and compiles to vector
instructions; kernels taking them as arguments measured 3-4x slower.

The arrays are one head's, `[tokens, ...]`, and KV travels as bit patterns (uint16 for
float16 and bfloat16, uint32 for float32; `carrier_bits`). Two layouts, as `kivi.py`
stores them:

- per token (`columns` channels per group): codes, statistics and values are read as
  flat groups, `codes [groups, columns // codes_per_byte]`, `scale [groups]`, values
  `[groups, columns]` (a reshape of `[tokens, head_dim]`);
- per channel: `codes [tokens, head_dim // codes_per_byte]` with `stat_rows[token]`, the
  block of each token, into `scale [blocks, head_dim]`.

`usable` says when they apply: NumPy arrays, 2-, 4- or 8-bit codes, rows without
padding (head_dim a multiple of 8) and groups of whole bytes; CuPy arrays and every
other case take the array-namespace path in `kivi.py`. The results equal that path bit
for bit (tests/unit/test_kivi_kernels.py runs both on the same data): the same float32
operations in the same order, no fused multiply-add (Numba's default without
fastmath), float16 rounded to nearest even with subnormals, as NumPy rounds. A value
the kernel does not round itself (a float16 overflow, an infinity, a NaN) makes a
restore kernel return False, and the caller takes the array path for that range.

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


def usable(xp: Any, bits: int, head_dim: int, columns: int) -> bool:
    """Whether the kernels run this stream (`columns`: channels per group, 1 per
    channel)."""
    return (
        xp is np
        and bits in KERNEL_BITS
        and head_dim % 8 == 0
        and (columns == 1 or columns % (8 // bits) == 0)
    )


def carrier_bits(array: np.ndarray, dtype: str) -> tuple[int, np.ndarray]:
    """(kind, the bit-pattern view of `array`, a carrier of `dtype`)."""
    kind, unsigned = CARRIERS[dtype]
    return kind, array.view(unsigned)


@numba.njit(inline="always")
def _widen(pattern, kind):
    """A carrier's bit pattern as float32 (float16 through the exact table)."""
    if kind == 0:
        return FLOAT32_OF_HALF[pattern]
    if kind == 1:
        return np.uint32(np.uint32(pattern) << np.uint32(16)).view(np.float32)
    return np.uint32(pattern).view(np.float32)


@numba.njit(inline="always")
def _narrow(value, kind):
    """(bit pattern of float32 `value` in the carrier, whether it needs the array
    path). float16: rounded to nearest even, subnormals too; bfloat16 likewise."""
    bits32 = np.float32(value).view(np.uint32)
    magnitude = bits32 & np.uint32(0x7FFFFFFF)
    if kind == 0:
        # Normal: re-bias the exponent, round the mantissa to nearest even.
        odd = (magnitude >> np.uint32(13)) & np.uint32(1)
        half = (magnitude + np.uint32(0xC8000FFF) + odd) >> np.uint32(13)
        # Below 2**-14: a multiple of 2**-24, rounded to nearest even (clamped first,
        # so converting a large value, unused then, is defined).
        small = min(abs(value), np.float32(1.0))
        tiny = np.uint32(np.rint(small * np.float32(16777216.0)))
        if magnitude < np.uint32(0x38800000):
            half = tiny
        sign = (bits32 >> np.uint32(16)) & np.uint32(0x8000)
        return half | sign, magnitude >= np.uint32(0x47800000)
    if kind == 1:
        odd = (bits32 >> np.uint32(16)) & np.uint32(1)
        rounded = (bits32 + np.uint32(0x7FFF) + odd) >> np.uint32(16)
        return rounded, magnitude > np.uint32(0x7F800000)
    return bits32, False


@functools.cache
def dequantize_kernel(bits: int, columns: int, kind: int):
    """kernel(codes, stat_rows, scale, center, out) -> bool: center + offset * scale of
    every code, rounded into `out` (carrier bits); False, with `out` partly written, when
    a value needs the array path. Per token (`columns` > 1) the arrays are flat groups
    and `stat_rows` is unused."""
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    middle = np.float32(mask / 2)

    @_jit
    def per_token(codes, stat_rows, scale, center, out):
        special = False
        offsets = np.empty(columns, np.float32)
        for group in range(codes.shape[0]):
            step, shift = scale[group], center[group]
            if per_byte == 4:
                # 2-bit: four codes a byte leave too few bytes a group for the fused
                # loop to vectorize (measured 2.5x slower); unpack the group first.
                for j in range(columns // per_byte):
                    byte = np.int32(codes[group, j])
                    for lane in range(per_byte):
                        code = (byte >> (lane * bits)) & mask
                        offsets[j * per_byte + lane] = np.float32(code) - middle
                for channel in range(columns):
                    pattern, needs_array = _narrow(shift + offsets[channel] * step, kind)
                    special |= needs_array
                    out[group, channel] = pattern
                continue
            for j in range(columns // per_byte):
                byte = np.int32(codes[group, j])
                for lane in range(per_byte):
                    offset = np.float32((byte >> (lane * bits)) & mask) - middle
                    pattern, needs_array = _narrow(shift + offset * step, kind)
                    special |= needs_array
                    out[group, j * per_byte + lane] = pattern
        return not special

    @_jit
    def per_channel(codes, stat_rows, scale, center, out):
        special = False
        for token in range(codes.shape[0]):
            row = stat_rows[token]
            for j in range(codes.shape[1]):
                byte = np.int32(codes[token, j])
                for lane in range(per_byte):
                    channel = j * per_byte + lane
                    offset = np.float32((byte >> (lane * bits)) & mask) - middle
                    value = center[row, channel] + offset * scale[row, channel]
                    pattern, needs_array = _narrow(value, kind)
                    special |= needs_array
                    out[token, channel] = pattern
        return not special

    return per_channel if columns == 1 else per_token


@functools.cache
def extremes_kernel(kind: int, columns: int, block_tokens: int):
    """kernel(tokens, low, high): float32 min and max of every group of `tokens`
    (carrier bits). Per token: flat groups `[groups, columns]` into `[groups]`; per
    channel (`columns` 1): `[tokens, head_dim]` into `[blocks, head_dim]` over blocks of
    `block_tokens` rows."""

    @_jit
    def per_token(tokens, low, high):
        for group in range(tokens.shape[0]):
            smallest = largest = _widen(tokens[group, 0], kind)
            for channel in range(1, columns):
                value = _widen(tokens[group, channel], kind)
                smallest = min(smallest, value)
                largest = max(largest, value)
            low[group] = smallest
            high[group] = largest

    @_jit
    def per_channel(tokens, low, high):
        for token in range(tokens.shape[0]):
            block = token // block_tokens
            first = token % block_tokens == 0
            for channel in range(tokens.shape[1]):
                value = _widen(tokens[token, channel], kind)
                if first:
                    low[block, channel] = value
                    high[block, channel] = value
                else:
                    low[block, channel] = min(low[block, channel], value)
                    high[block, channel] = max(high[block, channel], value)

    return per_channel if columns == 1 else per_token


@numba.njit(inline="always")
def _code(value, shift, step, middle, top):
    code = np.rint((value - shift) / step + middle)
    return np.uint32(min(max(code, np.float32(0)), top))


@functools.cache
def quantize_kernel(bits: int, columns: int, kind: int):
    """kernel(tokens, stat_rows, center, step, codes): the codes of `tokens` (carrier
    bits), clip(rint((x - center) / step + middle), 0, 2**bits - 1) in float32 against
    the stored statistics (`step` is the scale, 1 where it is 0), packed into `codes`.
    Layouts as `dequantize_kernel`'s."""
    per_byte = 8 // bits
    top = np.float32((1 << bits) - 1)
    middle = np.float32(((1 << bits) - 1) / 2)

    @_jit
    def per_token(tokens, stat_rows, center, step, codes):
        for group in range(tokens.shape[0]):
            shift, size = center[group], step[group]
            for j in range(columns // per_byte):
                byte = np.uint32(0)
                for lane in range(per_byte):
                    value = _widen(tokens[group, j * per_byte + lane], kind)
                    byte |= _code(value, shift, size, middle, top) << np.uint32(lane * bits)
                codes[group, j] = np.uint8(byte)

    @_jit
    def per_channel(tokens, stat_rows, center, step, codes):
        for token in range(tokens.shape[0]):
            row = stat_rows[token]
            for j in range(codes.shape[1]):
                byte = np.uint32(0)
                for lane in range(per_byte):
                    channel = j * per_byte + lane
                    value = _widen(tokens[token, channel], kind)
                    code = _code(value, center[row, channel], step[row, channel], middle, top)
                    byte |= code << np.uint32(lane * bits)
                codes[token, j] = np.uint8(byte)

    return per_channel if columns == 1 else per_token
