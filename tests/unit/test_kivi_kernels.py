"""The compiled KIVI kernels equal the array path bit for bit.

The array path is what CuPy runs; on NumPy the kernels replace it for 2-, 4- and 8-bit
codes. Every stream here is encoded and restored twice, once each way, and compared
array by array and bit by bit."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from minicache_client.array_namespace import narrow_from_float32
from minicache_client.codecs import kivi_kernels
from minicache_client.codecs.kivi import KiviStream

SHAPES = [(2, 64, 32), (1, 12, 4), (3, 256, 64)]  # kv_heads, head_dim, group size


def carrier(values: np.ndarray, dtype: str) -> np.ndarray:
    return narrow_from_float32(values.astype(np.float32), dtype)


def encode(tokens: np.ndarray, dtype: str, chunks: list[int], compiled: bool, **config):
    """A stream fed `tokens` in chunks of the given sizes, then sealed."""
    kv_heads, _, head_dim = tokens.shape
    stream = KiviStream(kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, **config)
    with pytest.MonkeyPatch.context() as patch:
        if not compiled:
            patch.setattr(kivi_kernels, "usable", lambda *arguments: False)
        first = 0
        for size in chunks:
            stream.append([tokens[:, first : first + size]])
            first += size
        stream.seal()
        restores = {
            wanted: [
                stream.restore(0, lo, hi, wanted)
                for lo, hi in ((0, first), (first // 3, first - first // 4))
            ]
            for wanted in ("float16", "bfloat16", "float32")
        }
    return stream, restores


def assert_same(one: KiviStream, other: KiviStream, restores_one, restores_other) -> None:
    for name in ("sink", "codes", "scale", "center", "block_ends", "tail"):
        mine, theirs = getattr(one, name), getattr(other, name)
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape, name
        assert mine.tobytes() == theirs.tobytes(), name
    for wanted, pieces in restores_one.items():
        for mine, theirs in zip(pieces, restores_other[wanted], strict=True):
            assert mine.dtype == theirs.dtype and mine.tobytes() == theirs.tobytes(), wanted


@pytest.mark.parametrize("bits", kivi_kernels.KERNEL_BITS)
@pytest.mark.parametrize("mode", ["per_channel", "per_token"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize(("kv_heads", "head_dim", "group_size"), SHAPES)
def test_kernels_equal_the_array_path(bits, mode, dtype, kv_heads, head_dim, group_size):
    rng = np.random.default_rng(bits * 7 + head_dim)
    tokens = rng.standard_normal((kv_heads, 75, head_dim)) * 3
    tokens[:, :, 1] *= 40  # an outlier channel
    tokens[:, 10:20] *= 1e-6  # values whose restores are float16 subnormals
    tokens = carrier(tokens, dtype)
    config = dict(bits=bits, mode=mode, group_size=group_size, block_tokens=16)
    for chunks, extra in (([75], {}), ([3, 1, 40, 31], {"sink_capacity": 4, "window": 8})):
        compiled, compiled_restores = encode(tokens, dtype, chunks, True, **config, **extra)
        array, array_restores = encode(tokens, dtype, chunks, False, **config, **extra)
        assert compiled.quantized_tokens > 0
        assert_same(compiled, array, compiled_restores, array_restores)


def test_a_restore_beyond_float16_falls_back_to_the_array_path():
    # float32 KV far beyond float16's range, restored as float16: infinities, which
    # the kernel leaves to the array path.
    tokens = np.tile(np.linspace(-1e6, 1e6, 32, dtype=np.float32), (1, 4, 1))
    config = dict(bits=4, mode="per_token", group_size=32, block_tokens=4)
    compiled, compiled_restores = encode(tokens, "float32", [4], True, **config)
    array, array_restores = encode(tokens, "float32", [4], False, **config)
    assert_same(compiled, array, compiled_restores, array_restores)
    assert np.isinf(compiled_restores["float16"][0]).any()

    # One head of 4 tokens, one group each: flat groups.
    scale = compiled.scale[0].astype(np.float32).reshape(-1)
    center = compiled.center[0].astype(np.float32).reshape(-1)
    out = np.empty((4, 32), np.uint16)
    kernel = kivi_kernels.dequantize_kernel(4, 32, kivi_kernels.CARRIERS["float16"][0])
    assert kernel(compiled.codes[0], np.arange(4), scale, center, out) is False


def test_numba_loads_with_the_first_kivi_stream():
    """A process that never runs a KIVI stream (a server on the `default` transform
    policy) does not load Numba and its LLVM; the first KIVI encode does."""
    script = """
import sys
import subprocess
import sys

import numpy as np
import minicache_server.main
from minicache_client.codecs.kivi import KiviStream
assert "numba" not in sys.modules, "numba loaded at import"
stream = KiviStream(kv_heads=1, head_dim=64, dtype="float16")
stream.append([np.ones((1, 300, 64), np.float16)])
stream.seal()
assert "numba" in sys.modules, "the KIVI stream did not load its kernels"
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
