"""The codecs on CuPy arrays (the device tier on a GPU) agree with NumPy (CI's path)."""

from __future__ import annotations

import numpy as np
import pytest

from minicache_client.entry import decode_entry, encode_entry
from minicache_client.policy import PRESETS
from minicache_client.restore import restore_group
from minicache_client.sequence_encoder import SequenceEncoder

pytestmark = pytest.mark.gpu
LAYERS, HEADS, TOKENS, DIM = 30, 3, 300, 64
# Integer and IEEE-rounded arithmetic only: the same bits on both devices.
EXACT = ("none", "kivi4", "kivi4_sink", "kivi2")


@pytest.fixture(scope="module")
def cupy():
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            pytest.skip("no CUDA device")
    except cupy.cuda.runtime.CUDARuntimeError:
        pytest.skip("no CUDA device")
    return cupy


def _encode(policy: str, layers: list, xp) -> SequenceEncoder:
    encoder = SequenceEncoder(
        PRESETS[policy], num_layers=LAYERS, kv_heads=HEADS, head_dim=DIM, dtype="float16"
    )
    for start in (0, 200, 257):  # a prefill, then two decode-sized chunks
        end = {0: 200, 200: 257, 257: TOKENS}[start]
        for layer, (keys, values) in enumerate(layers):
            encoder.put_layer(
                layer, xp.asarray(keys[:, start:end]), xp.asarray(values[:, start:end]), start == 0
            )
    return encoder


@pytest.mark.parametrize("policy", [*EXACT, "paper", "paper_kivi4", "average", "default"])
def test_gpu_encode_and_restore_match_the_host(cupy, policy: str) -> None:
    rng = np.random.default_rng(7)
    layers = [
        tuple(rng.standard_normal((HEADS, TOKENS, DIM)).astype(np.float16) for _ in range(2))
        for _ in range(LAYERS)
    ]
    host = _encode(policy, layers, np)
    device = _encode(policy, layers, cupy)
    assert device.compression_ratio() == host.compression_ratio()
    for host_entry, device_entry in zip(host.entries, device.entries, strict=True):
        on_device = restore_group(device_entry, 0, TOKENS, "float16")
        assert isinstance(on_device[0][1], cupy.ndarray)
        from_bytes = restore_group(decode_entry(encode_entry(device_entry)), 0, TOKENS, "float16")
        for (_, keys, values), (_, host_keys, host_values), (_, byte_keys, byte_values) in zip(
            on_device, restore_group(host_entry, 0, TOKENS, "float16"), from_bytes, strict=True
        ):
            for got, want, decoded in (
                (keys, host_keys, byte_keys),
                (values, host_values, byte_values),
            ):
                got = cupy.asnumpy(got)
                if policy in EXACT:
                    np.testing.assert_array_equal(got, want)
                    np.testing.assert_array_equal(got, decoded)
                    continue
                # Transcendental functions and reductions may differ in the last bit
                # between devices (and so between the device's restore and the host's
                # restore of the same bytes).
                for other in (want, decoded):
                    np.testing.assert_allclose(
                        got.astype(np.float32), other.astype(np.float32), rtol=2e-2, atol=2e-2
                    )
