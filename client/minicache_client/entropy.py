"""Entropy coding of integer transform coefficients.

`rans`: range asymmetric numeral systems from the `constriction` package, each
component modelled as a quantized Laplace distribution centred on 0 whose scale was
measured at calibration (`scales`, in steps). `zlib`: the codes as int8/int16 bytes,
component-major, DEFLATE level 6; no model, kept as the measured alternative
(deploy/benchmarks/compression_throughput.py compares them per byte and per second).

Codes are `[tokens, components]` int32. A coded block is bytes; its `peak` (the largest
absolute code) is stored beside it and bounds the rANS alphabet.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

CODERS = ("rans", "zlib")
# A Laplace scale below this models a component that is 0 almost always; constriction
# needs a positive scale.
_MIN_SCALE = 0.02


def _tiled(scales: np.ndarray, tokens: int) -> np.ndarray:
    return np.tile(np.maximum(scales.astype(np.float64), _MIN_SCALE), tokens)


def encode(codes: np.ndarray, scales: np.ndarray, coder: str) -> tuple[bytes, int]:
    """(bytes, peak) of int32 `codes [tokens, components]`."""
    peak = int(np.abs(codes).max(initial=0))
    if coder == "zlib":
        narrow = np.int8 if peak < 128 else np.int16
        return zlib.compress(np.ascontiguousarray(codes.T, dtype=narrow).tobytes(), 6), peak
    import constriction

    model = constriction.stream.model.QuantizedLaplace(-peak - 1, peak + 1)
    coder_ = constriction.stream.stack.AnsCoder()
    flat = np.ascontiguousarray(codes, dtype=np.int32).reshape(-1)
    coder_.encode_reverse(flat, model, np.zeros(flat.size), _tiled(scales, codes.shape[0]))
    return coder_.get_compressed().tobytes(), peak


def decode(data: Any, peak: int, tokens: int, scales: np.ndarray, coder: str) -> np.ndarray:
    """int32 `[tokens, components]` from `encode`'s bytes. Raises ValueError on bytes
    that do not decode to that many codes."""
    components = int(scales.size)
    count = tokens * components
    if coder == "zlib":
        narrow = np.int8 if peak < 128 else np.int16
        try:
            raw = zlib.decompress(bytes(data))
        except zlib.error as exc:
            raise ValueError(f"coded block does not inflate: {exc}") from None
        if len(raw) != count * np.dtype(narrow).itemsize:
            raise ValueError("coded block inflates to the wrong length")
        return np.frombuffer(raw, dtype=narrow).reshape(components, tokens).T.astype(np.int32)
    import constriction

    words = np.frombuffer(bytes(data), dtype=np.uint32)
    model = constriction.stream.model.QuantizedLaplace(-peak - 1, peak + 1)
    try:
        decoder = constriction.stream.stack.AnsCoder(words)
        flat = decoder.decode(model, np.zeros(count), _tiled(scales, tokens))
    except Exception as exc:  # constriction raises its own error types
        raise ValueError(f"coded block does not decode: {exc}") from None
    return np.asarray(flat, dtype=np.int32).reshape(tokens, components)
