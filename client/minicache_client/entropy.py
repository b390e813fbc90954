"""Entropy coding of integer transform coefficients.

`rans`: range asymmetric numeral systems from the `constriction` package, each
component modelled as a discretized Laplace distribution centred on 0 whose scale was
measured at calibration (`scales`, in steps). Components are put in buckets of similar
scale (a ratio of 2^(1/4) between buckets, a fraction of a percent of rate lost), and
each bucket's codes are coded with one table-driven categorical model, several times
faster than a model evaluated per symbol. `zlib`: the codes as int8/int16/int32 bytes
(the narrowest that holds the block's peak), component-major, DEFLATE level 6; no
model, kept as the measured alternative (deploy/benchmarks/compression_throughput.py
compares them per byte and per second). `rans` stores a block whose peak is beyond
`_RANS_MAX_PEAK` as `zlib` does.

Codes are `[tokens, components]` int32. A coded block is bytes; its `peak` (the largest
absolute code) is stored beside it and bounds the rANS alphabet.
"""

from __future__ import annotations

import functools
import zlib
from typing import Any

import numpy as np

CODERS = ("rans", "zlib")
# A Laplace scale below this models a component that is 0 almost always.
_MIN_SCALE = 0.02
_BUCKETS_PER_OCTAVE = 4
# The smallest probability a model gives any symbol of its alphabet: a code the
# calibration never saw still costs only ~40 bits, never fails.
_FLOOR = 1e-12
# A block whose largest code is beyond this is stored as zlib by the rans coder too: its
# alphabet (2 * bound + 1 probabilities per bucket, each model cached) would take
# seconds to build, megabytes to keep, and from about 2^22 cannot be normalized at all.
# Only outliers far beyond what calibration saw get there.
_RANS_MAX_PEAK = (1 << 12) - 1


def _width(peak: int) -> type[np.signedinteger]:
    """The integer type of a zlib block's codes."""
    return np.int8 if peak < 1 << 7 else np.int16 if peak < 1 << 15 else np.int32


def _buckets(scales: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(bucket level, component indices) of each bucket, in order of scale; a level
    stands for the scale 2^(level / 4)."""
    clamped = np.maximum(scales.astype(np.float64), _MIN_SCALE)
    levels = np.round(np.log2(clamped) * _BUCKETS_PER_OCTAVE).astype(np.int64)
    return [(int(level), np.flatnonzero(levels == level)) for level in np.unique(levels)]


def _bound(peak: int) -> int:
    """The alphabet's half width for a block's peak: a power of two, so that the few
    models a coder builds are cached and reused."""
    return max(8, 1 << (peak + 1).bit_length())


@functools.lru_cache(maxsize=2048)
def _model(level: int, bound: int) -> Any:
    """Categorical over the symbols -bound .. bound (shifted to 0 .. 2 bound): the
    Laplace of scale 2^(level / 4) integrated over each integer's interval."""
    import constriction

    scale = 2.0 ** (level / _BUCKETS_PER_OCTAVE)
    edges = np.arange(-bound, bound + 2, dtype=np.float64) - 0.5
    tail = 0.5 * np.exp(-np.abs(edges) / scale)
    cdf = np.where(edges < 0, tail, 1 - tail)
    probabilities = np.maximum(np.diff(cdf), _FLOOR)
    return constriction.stream.model.Categorical(probabilities / probabilities.sum(), perfect=False)


def encode(codes: np.ndarray, scales: np.ndarray, coder: str) -> tuple[bytes, int]:
    """(bytes, peak) of int32 `codes [tokens, components]`."""
    peak = int(np.abs(codes).max(initial=0))
    if coder == "zlib" or peak > _RANS_MAX_PEAK:
        return zlib.compress(np.ascontiguousarray(codes.T, dtype=_width(peak)).tobytes(), 6), peak
    import constriction

    stack = constriction.stream.stack.AnsCoder()
    # A stack: the last bucket goes in first, so that decoding reads them in order.
    bound = _bound(peak)
    for level, columns in reversed(_buckets(scales)):
        symbols = np.ascontiguousarray(codes[:, columns], dtype=np.int32).reshape(-1) + bound
        stack.encode_reverse(symbols, _model(level, bound))
    return stack.get_compressed().tobytes(), peak


def decode(data: Any, peak: int, tokens: int, scales: np.ndarray, coder: str) -> np.ndarray:
    """int32 `[tokens, components]` from `encode`'s bytes. Raises ValueError on bytes
    that do not decode to that many codes."""
    components = int(scales.size)
    if coder == "zlib" or peak > _RANS_MAX_PEAK:
        count = tokens * components
        narrow = _width(peak)
        try:
            raw = zlib.decompress(bytes(data))
        except zlib.error as exc:
            raise ValueError(f"coded block does not inflate: {exc}") from None
        if len(raw) != count * np.dtype(narrow).itemsize:
            raise ValueError("coded block inflates to the wrong length")
        return np.frombuffer(raw, dtype=narrow).reshape(components, tokens).T.astype(np.int32)
    import constriction

    if len(data) % 4:
        raise ValueError("a rANS block is whole 32-bit words")
    codes = np.empty((tokens, components), dtype=np.int32)
    try:
        stack = constriction.stream.stack.AnsCoder(np.frombuffer(bytes(data), dtype=np.uint32))
        bound = _bound(peak)
        for level, columns in _buckets(scales):
            symbols = stack.decode(_model(level, bound), tokens * columns.size)
            codes[:, columns] = np.asarray(symbols, dtype=np.int32).reshape(tokens, -1) - bound
    except Exception as exc:  # constriction raises its own error types
        raise ValueError(f"coded block does not decode: {exc}") from None
    # A block that decodes to its codes and holds nothing more ends where its encoder
    # began. rANS has no redundancy: bytes corrupted under a valid entry checksum (the
    # guard of their content) mostly fail this, but not always.
    if not stack.is_empty() or np.abs(codes).max(initial=0) > peak:
        raise ValueError("coded block does not decode to its codes (corrupt stream or peak)")
    return codes
