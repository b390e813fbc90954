"""The cache server's malloc settings (minicache_server.allocator): on glibc, a fixed
mmap threshold and two arenas, set at start unless the operator's env var sets that
parameter; a buffer of the size a put stages is then given back to the system when it
is freed, and the free holes that smaller buffers leave in the heaps go back at the next
periodic trim. Each case runs in a child process: mallopt changes the whole process."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from minicache_server.allocator import ARENA_MAX, MMAP_THRESHOLD_BYTES

pytestmark = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="mallopt's parameters are glibc's"
)

CHILD = """
import json, sys
import numpy as np
from minicache_server.allocator import tune_allocator

def resident_mib():
    with open("/proc/self/status") as status:
        return next(int(l.split()[1]) for l in status if l.startswith("VmRSS")) / 1024

applied = tune_allocator(json.loads(sys.argv[1]))
# A larger buffer freed first (with glibc's default, that raises the mmap threshold
# above it), then layer-sized buffers (1.5 MiB, as a put of 2048 tokens stages) with
# small objects (2 KiB: malloc's, not Python's small-object allocator) made in between
# and kept, then the buffers freed: each was mapped and is unmapped, none stays. With
# glibc's defaults all 300 MiB stay resident, in holes of the heap.
np.ones(8 << 20, dtype=np.uint8).sum()
before = resident_mib()
buffers, small = [], []
for index in range(200):
    buffers.append(np.ones(3 << 18, dtype=np.uint16))
    small.append(bytes(2048) + index.to_bytes(4, "little"))
peak = resident_mib()
del buffers
print(json.dumps({"applied": applied, "grown": peak - before, "kept": resident_mib() - before}))
"""


def run_child(environ: dict[str, str]) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(environ)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout)


def test_the_server_maps_large_buffers_and_gives_them_back() -> None:
    result = run_child({})
    assert result["applied"] == {
        "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD_BYTES,
        "MALLOC_ARENA_MAX": ARENA_MAX,
    }
    assert result["grown"] > 200, result  # 300 MiB of buffers were resident
    assert result["kept"] < 30, result


def test_an_operators_malloc_env_var_wins() -> None:
    result = run_child({"MALLOC_ARENA_MAX": "8"})
    assert result["applied"] == {"MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD_BYTES}


TRIM_CHILD = """
import asyncio, json
import numpy as np
from minicache_server.allocator import trim_periodically, tune_allocator

def resident_mib():
    with open("/proc/self/status") as status:
        return next(int(l.split()[1]) for l in status if l.startswith("VmRSS")) / 1024

async def main():
    tune_allocator({})
    trimming = asyncio.create_task(trim_periodically(0.1))
    before = resident_mib()
    # Buffers below the mmap threshold (96 KiB: a block's float32 codes) come from the
    # heap; the small objects made between them and kept pin the heap's top, so when the
    # buffers are freed their memory is a hole that glibc does not give back by itself.
    buffers, small = [], []
    for index in range(3000):
        buffers.append(np.ones(96 << 8, dtype=np.float32))
        small.append(bytes(2048) + index.to_bytes(4, "little"))
    grown = resident_mib() - before
    del buffers
    await asyncio.sleep(0.5)  # several trims
    kept = resident_mib() - before
    trimming.cancel()
    print(json.dumps({"grown": grown, "kept": kept}))

asyncio.run(main())
"""


def test_the_periodic_trim_gives_back_the_heaps_free_holes() -> None:
    done = subprocess.run(
        [sys.executable, "-c", TRIM_CHILD], capture_output=True, text=True, timeout=120, check=True
    )
    result = json.loads(done.stdout)
    assert result["grown"] > 250, result  # 288 MiB of buffers were resident
    assert result["kept"] < 30, result
