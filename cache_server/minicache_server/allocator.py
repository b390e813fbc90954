"""glibc's malloc, set at start so that the memory a request frees goes back to the system.

A request's large buffers (a put's layers, a group's float32 coefficients while it is
coded or restored: megabytes each) are freed when it ends. With glibc's defaults,
freeing one mmapped buffer raises the threshold below which buffers come from the heap
instead, so the next ones are carved from the heaps of up to 8 arenas per core (one
each for the encoder threads), freed memory stays there, fragmented, and the resident
size of a cache server under load climbs in a sawtooth far above what it holds. A fixed
mmap threshold (buffers of 256 KiB and more are mapped, and unmapped when freed) and two
arenas keep it near what live requests and held entries use.

Buffers below the threshold (a block's codes and scales, a message's bytes: kilobytes to
a few hundred) still come from the heaps, between small objects that live on, and glibc
gives back only the free memory at the top of a heap: under load the free holes in the
middle grow to hundreds of MiB that stay resident after the load is gone. The server
therefore asks malloc every `MINICACHE_MEMORY_TRIM_S` seconds to give the free pages of
every heap back (`malloc_trim(0)`, `trim_periodically`): a few ms per hundred MiB
freed, microseconds when there is nothing to give back.

An operator's own MALLOC_ARENA_MAX or MALLOC_MMAP_THRESHOLD_ env var wins: that setting
is left alone. Elsewhere than glibc (musl, macOS) nothing is changed.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import os
import sys
from collections.abc import Mapping

# mallopt parameters (glibc's malloc.h) and the values set, by the env var that sets
# the same parameter.
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 256 << 10
ARENA_MAX = 2
SETTINGS = {
    "MALLOC_MMAP_THRESHOLD_": (M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
    "MALLOC_ARENA_MAX": (M_ARENA_MAX, ARENA_MAX),
}


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):  # glibc only
            return None
    except OSError:
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    libc.malloc_trim.argtypes = (ctypes.c_size_t,)
    libc.malloc_trim.restype = ctypes.c_int
    return libc


def tune_allocator(environ: Mapping[str, str] | None = None) -> dict[str, int]:
    """Set the mmap threshold and arena count this module describes; returns what was
    set, by env var name (empty when not glibc, or when `environ` set both)."""
    environ = os.environ if environ is None else environ
    libc = _glibc()
    if libc is None:
        return {}
    applied = {}
    for name, (parameter, value) in SETTINGS.items():
        if name not in environ and libc.mallopt(parameter, value) == 1:
            applied[name] = value
    return applied


def trim_free_memory() -> bool:
    """Give the free pages of every malloc heap back to the system (glibc's
    `malloc_trim(0)`); True when some memory went back. False elsewhere than glibc."""
    libc = _glibc()
    return libc is not None and libc.malloc_trim(0) == 1


async def trim_periodically(interval_s: float) -> None:
    """`trim_free_memory` every `interval_s` seconds (on a thread: it holds each heap's
    lock while it walks it), until cancelled; returns at once elsewhere than glibc."""
    if _glibc() is None:
        return
    while True:
        await asyncio.sleep(interval_s)
        await asyncio.to_thread(trim_free_memory)
