"""glibc's malloc, set at start so that the memory a request frees goes back to the system.

A request's large buffers (a put's layers, a group's float32 coefficients while it is
coded or restored: megabytes each) are freed when it ends. With glibc's defaults,
freeing one mmapped buffer raises the threshold below which buffers come from the heap
instead, so the next ones are carved from the heaps of up to 8 arenas per core (one
each for the encoder threads), freed memory stays there, fragmented, and the resident
size of a cache server under load climbs in a sawtooth far above what it holds. A fixed
mmap threshold (buffers of 256 KiB and more are mapped, and unmapped when freed) and two
arenas keep it near what live requests and held entries use.

An operator's own MALLOC_ARENA_MAX or MALLOC_MMAP_THRESHOLD_ env var wins: that setting
is left alone. Elsewhere than glibc (musl, macOS) nothing is changed.
"""

from __future__ import annotations

import ctypes
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


def _glibc_mallopt():
    """glibc's `mallopt`, or None when the C library is another."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version  # glibc only
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    version.restype = ctypes.c_char_p
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt


def tune_allocator(environ: Mapping[str, str] | None = None) -> dict[str, int]:
    """Set the mmap threshold and arena count this module describes; returns what was
    set, by env var name (empty when not glibc, or when `environ` set both)."""
    environ = os.environ if environ is None else environ
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return {}
    applied = {}
    for name, (parameter, value) in SETTINGS.items():
        if name not in environ and mallopt(parameter, value) == 1:
            applied[name] = value
    return applied
