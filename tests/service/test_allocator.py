"""The cache server's malloc settings (minicache_server.allocator): on glibc, a fixed
mmap threshold and two arenas, set at start unless the operator's env var sets that
parameter; a buffer of the size a put stages is then given back to the system when it
is freed. Each case runs in a child process: mallopt changes the whole process."""

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
