"""Array code runs on NumPy (CPU, CI) or CuPy (GPU) through one namespace.

KV dtypes are named by string: "float32", "float16", "bfloat16". NumPy and CuPy have
no bfloat16, so bfloat16 tensors are carried as uint16 bit patterns and widened to
float32 by a 16-bit shift.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

import numpy as np

from minicache_client import half_floats

KV_DTYPES = ("float32", "float16", "bfloat16")

# The NumPy dtype that carries each KV dtype.
CARRIER_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(np.uint16),
}


@functools.cache
def _cupy() -> ModuleType | None:
    try:
        import cupy
    except ImportError:
        return None
    return cupy


def array_namespace(*arrays: Any) -> ModuleType:
    """NumPy, or CuPy when any of `arrays` is a CuPy array."""
    cupy = _cupy()
    if cupy is not None and any(isinstance(a, cupy.ndarray) for a in arrays):
        return cupy
    return np


def to_numpy(array: Any) -> np.ndarray:
    """A host copy of a CuPy array; NumPy arrays are returned as they are."""
    cupy = _cupy()
    if cupy is not None and isinstance(array, cupy.ndarray):
        return cupy.asnumpy(array)
    return np.asarray(array)


@functools.cache
def _array_types() -> tuple[type, ...]:
    cupy = _cupy()
    return (np.ndarray,) if cupy is None else (np.ndarray, cupy.ndarray)


def is_array(value: Any) -> bool:
    """A NumPy or CuPy array."""
    return isinstance(value, _array_types())


def is_writeable(array: Any) -> bool:
    """Whether `array` may be written (CuPy arrays have no such flag: always)."""
    return getattr(array.flags, "writeable", True)


def check_kv_dtype(dtype: str) -> str:
    if dtype not in KV_DTYPES:
        raise ValueError(f"unsupported KV dtype {dtype!r}; expected one of {', '.join(KV_DTYPES)}")
    return dtype


def widen_to_float32(array: Any, dtype: str) -> Any:
    """float32 view of a tensor carried as `dtype` (bfloat16 as uint16 bits)."""
    xp = array_namespace(array)
    if dtype == "bfloat16":
        return (array.astype(xp.uint32) << 16).view(xp.float32)
    if dtype == "float16" and xp is np:
        return half_floats.float16_to_float32(array)
    return array.astype(xp.float32, copy=False)


def narrow_from_float32(array: Any, dtype: str) -> Any:
    """float32 → carrier of `dtype`; bfloat16 rounds to nearest even, like torch."""
    xp = array_namespace(array)
    if dtype == "bfloat16":
        wide = xp.ascontiguousarray(array, dtype=xp.float32)
        bits = wide.view(xp.uint32)
        rounded = ((bits + xp.uint32(0x7FFF) + ((bits >> 16) & xp.uint32(1))) >> 16).astype(
            xp.uint16
        )
        # A NaN is truncated, not rounded (rounding could carry into the exponent); one
        # whose payload sat only in the dropped bits becomes a quiet NaN.
        truncated = bits >> 16
        nan = xp.where(truncated & 0x7F, truncated, truncated | 0x40).astype(xp.uint16)
        return xp.where(xp.isnan(wide), nan, rounded)
    if dtype == "float16" and xp is np:
        return half_floats.float32_to_float16(array)
    return array.astype(CARRIER_DTYPES[dtype], copy=False)


def narrow_into(array: Any, out: Any, dtype: str) -> None:
    """Write float32 `array` into `out`, a carrier array of `dtype` of the same shape
    (any strides): `out[...] = narrow_from_float32(array, dtype)` without the copy
    where the cast can write in place."""
    if dtype == "float16" and array_namespace(array, out) is np:
        half_floats.float32_to_float16_into(array, out)
    else:
        out[...] = narrow_from_float32(array, dtype)


def recast(array: Any, stored: str, wanted: str) -> Any:
    """A tensor carried as `stored` in the carrier of `wanted` (itself when they agree)."""
    if stored == wanted:
        return array
    return narrow_from_float32(widen_to_float32(array, stored), wanted)
