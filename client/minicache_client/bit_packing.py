"""Packing of b-bit codes (b in 2, 3, 4, 8) into bytes: a little-endian bit stream.

Code i occupies bits [i*b, (i+1)*b) of the stream; byte k holds stream bits
[8k, 8k + 8). Quantized KV packs one row per (head, token): `row_bytes(head_dim, b)`
bytes, the row's codes padded with zeros to a multiple of 8 codes so that every row
starts on a byte. Restores read packed rows straight into float offsets from the
middle code (`code_offsets`) with one table look-up per byte.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from minicache_client.array_namespace import array_namespace

SUPPORTED_BITS = (2, 3, 4, 8)


def packed_size(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def padded_codes(head_dim: int) -> int:
    """Codes per packed row: `head_dim` rounded up to a multiple of 8."""
    return -(-head_dim // 8) * 8


def row_bytes(head_dim: int, bits: int) -> int:
    return padded_codes(head_dim) * bits // 8


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


def pack_rows(codes: Any, bits: int) -> Any:
    """uint8 codes `[..., head_dim]` → packed rows `[..., row_bytes(head_dim, bits)]`."""
    xp = array_namespace(codes)
    *lead, head_dim = codes.shape
    width = padded_codes(head_dim)
    if width != head_dim:
        padded = xp.zeros((*lead, width), dtype=xp.uint8)
        padded[..., :head_dim] = codes
        codes = padded
    return pack_codes(codes, bits).reshape(*lead, width * bits // 8)


@functools.cache
def _byte_offsets(bits: int, xp: Any) -> Any:
    """Table `[256, 8 // bits]` on `xp`'s device: the offsets from the middle code of
    each code in a byte."""
    per_byte = 8 // bits
    byte = np.arange(256, dtype=np.uint16)[:, None]
    codes = (byte >> (np.arange(per_byte) * bits)) & ((1 << bits) - 1)
    return xp.asarray((codes - ((1 << bits) - 1) / 2).astype(np.float32))


def code_offsets(packed: Any, bits: int, head_dim: int) -> Any:
    """Packed rows `[..., row_bytes]` → float32 `[..., head_dim]` of code - (2**bits - 1) / 2."""
    xp = array_namespace(packed)
    lead = packed.shape[:-1]
    if bits == 3:
        # Eight 3-bit codes per three bytes: one 24-bit word each.
        triples = packed.reshape(*lead, -1, 3).astype(xp.uint32)
        words = triples[..., 0] | (triples[..., 1] << 8) | (triples[..., 2] << 16)
        codes = (words[..., None] >> xp.arange(0, 24, 3, dtype=xp.uint32)) & 7
        offsets = codes.astype(xp.float32).reshape(*lead, -1) - 3.5
    else:
        table = _byte_offsets(bits, xp)
        offsets = xp.take(table, packed, axis=0).reshape(*lead, -1)
    return offsets if offsets.shape[-1] == head_dim else offsets[..., :head_dim]
