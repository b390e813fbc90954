"""Packing of b-bit codes (b in 2, 3, 4, 8) into bytes, little-endian within a byte.

Codes are uint8 arrays with values below 2**b; the packed form holds
ceil(n * b / 8) bytes for n codes.
"""

from __future__ import annotations

from typing import Any

from minicache_client.array_namespace import array_namespace


def packed_size(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack_codes(codes: Any, bits: int) -> Any:
    """Flat uint8 codes → packed uint8 bytes."""
    xp = array_namespace(codes)
    codes = xp.ascontiguousarray(codes, dtype=xp.uint8).reshape(-1)
    if bits == 8:
        return codes
    if bits in (2, 4):
        per_byte = 8 // bits
        padded = xp.zeros(-(-codes.size // per_byte) * per_byte, dtype=xp.uint8)
        padded[: codes.size] = codes
        lanes = padded.reshape(-1, per_byte)
        packed = lanes[:, 0].copy()
        for lane in range(1, per_byte):
            packed |= lanes[:, lane] << (lane * bits)
        return packed
    # Any other width: spread each code into its bit planes, pack the planes.
    shifts = xp.arange(bits, dtype=xp.uint8)
    planes = (codes[:, None] >> shifts) & 1
    return xp.packbits(planes.reshape(-1), bitorder="little")


def unpack_codes(packed: Any, bits: int, count: int) -> Any:
    """Packed bytes → `count` flat uint8 codes."""
    xp = array_namespace(packed)
    if packed.size != packed_size(count, bits):
        raise ValueError(
            f"packed buffer holds {packed.size} bytes, expected {packed_size(count, bits)} "
            f"for {count} codes of {bits} bits"
        )
    if bits == 8:
        return packed
    if bits in (2, 4):
        mask = (1 << bits) - 1
        shifts = xp.arange(0, 8, bits, dtype=xp.uint8)
        return ((packed[:, None] >> shifts) & mask).reshape(-1)[:count]
    planes = xp.unpackbits(packed, count=count * bits, bitorder="little").reshape(count, bits)
    weights = (1 << xp.arange(bits, dtype=xp.uint8)).astype(xp.uint8)
    return (planes * weights).sum(axis=1, dtype=xp.uint8)
