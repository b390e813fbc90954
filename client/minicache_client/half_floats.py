"""float16 <-> float32 casts on NumPy, bit for bit equal to `astype`, a few times faster.

NumPy converts float16 one value at a time (about 1.5 ns a value on the 2-core
benchmark machine, more than the rest of a KIVI restore together), while every
compressed layer passes through float32 on its way in and out. Here:

- `float16_to_float32`: one table look-up per value (the 65,536 float32 values of every
  float16 bit pattern, 256 KiB, stays in cache);
- `float32_to_float16_into`: rounding to nearest even done on the bit patterns with a
  few whole-array integer operations, in chunks that stay in cache. Values below the
  smallest normal float16 are rounded by one float addition, the way the FPU rounds
  subnormals; a chunk holding a value at or beyond float16's overflow threshold, an
  infinity or a NaN is converted by NumPy itself, so those keep NumPy's exact results.

CuPy's casts already run at memory speed on the device: callers use these on NumPy
arrays only (`array_namespace.widen_to_float32` / `narrow_from_float32` choose).
"""

from __future__ import annotations

import threading

import numpy as np

# Values per chunk of `float32_to_float16_into`: 256 KiB of uint32 scratch per array,
# measured fastest between 2**14 and 2**20 on the benchmark machine.
CHUNK_VALUES = 1 << 16

_U32 = np.uint32
# |x| bit patterns: the smallest normal float16 (2**-14), and 2**16, where every value
# overflows (those between 65520 and 2**16 round up to infinity in the normal path).
_SMALLEST_NORMAL = _U32(0x38800000)
_OVERFLOW = _U32(0x47800000)
# Re-biases the exponent (127 -> 15) and adds half a unit of the kept mantissa less one:
# with the kept mantissa's lowest bit added too, the shift by 13 rounds to nearest even.
_REBIAS_AND_HALF = _U32(0xC8000FFF)
# 0.5 as float32: adding it to a tiny value rounds it to float16's subnormal spacing
# (2**-24), and its bit pattern subtracted leaves the float16 bits.
_SUBNORMAL_MAGIC = np.float32(0.5)
_SUBNORMAL_MAGIC_BITS = _U32(0x3F000000)

FLOAT32_OF_HALF = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
FLOAT32_OF_HALF = FLOAT32_OF_HALF.astype(np.float32)
_THREAD_SCRATCH = threading.local()


def float16_to_float32(array: np.ndarray) -> np.ndarray:
    """float32 copy of a float16 NumPy array, equal to `array.astype(np.float32)`."""
    bits = np.ascontiguousarray(array).view(np.uint16)
    out = np.empty(array.shape, dtype=np.float32)
    flat_bits, flat_out = bits.reshape(-1), out.reshape(-1)
    for first in range(0, flat_bits.size, CHUNK_VALUES):
        last = first + CHUNK_VALUES
        np.take(FLOAT32_OF_HALF, flat_bits[first:last], out=flat_out[first:last])
    return out


def float32_to_float16(array: np.ndarray) -> np.ndarray:
    """float16 copy of a float32 NumPy array, equal to `array.astype(np.float16)`."""
    out = np.empty(array.shape, dtype=np.float16)
    float32_to_float16_into(array, out)
    return out


def float32_to_float16_into(array: np.ndarray, out: np.ndarray) -> None:
    """Write `array` (float32) rounded to float16 into `out` (float16, same shape, any
    strides), equal to `out[...] = array.astype(np.float16)`."""
    if array.shape != out.shape:
        raise ValueError(f"shapes differ: {array.shape} into {out.shape}")
    if not out.flags.c_contiguous:
        out[...] = float32_to_float16(array)
        return
    source = np.ascontiguousarray(array, dtype=np.float32).reshape(-1)
    target = out.reshape(-1).view(np.uint16)
    size = source.size
    magnitude, half, sign = _scratch()
    for first in range(0, size, CHUNK_VALUES):
        last = min(size, first + CHUNK_VALUES)
        count = last - first
        chunk = _half_bits(source[first:last], magnitude[:count], half[:count], sign[:count])
        target[first:last] = chunk


def _scratch() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This thread's three uint32 work arrays of `CHUNK_VALUES` (allocated once: a fresh
    256 KiB array per call would cost page faults of its own)."""
    arrays = getattr(_THREAD_SCRATCH, "arrays", None)
    if arrays is None:
        arrays = _THREAD_SCRATCH.arrays = tuple(np.empty(CHUNK_VALUES, _U32) for _ in range(3))
    return arrays


def _half_bits(values: np.ndarray, magnitude, half, sign) -> np.ndarray:
    """float16 bit patterns (in `half`, uint32) of float32 `values`."""
    bits = values.view(_U32)
    np.bitwise_and(bits, _U32(0x7FFFFFFF), out=magnitude)
    if magnitude.max() >= _OVERFLOW:
        with np.errstate(over="ignore"):  # overflow to infinity is the cast's answer
            half[...] = values.astype(np.float16).view(np.uint16)
        return half
    np.right_shift(magnitude, _U32(13), out=half)
    np.bitwise_and(half, _U32(1), out=half)
    np.add(half, _REBIAS_AND_HALF, out=half)
    np.add(half, magnitude, out=half)
    np.right_shift(half, _U32(13), out=half)
    if magnitude.min() < _SMALLEST_NORMAL:
        tiny = np.flatnonzero(magnitude < _SMALLEST_NORMAL)
        rounded = magnitude[tiny].view(np.float32) + _SUBNORMAL_MAGIC
        half[tiny] = rounded.view(_U32) - _SUBNORMAL_MAGIC_BITS
    np.right_shift(bits, _U32(16), out=sign)
    np.bitwise_and(sign, _U32(0x8000), out=sign)
    np.bitwise_or(half, sign, out=half)
    return half
