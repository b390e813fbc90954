"""Tensors in and out of the client: NumPy, CuPy and torch to the wire carrier, bfloat16
as uint16 bits, no silent casts, no torch import unless the caller brought torch."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from minicache_client.array_namespace import widen_to_float32
from minicache_client.errors import InvalidArgumentError
from minicache_client.tensors import as_carrier, to_torch

SHAPE = (2, 5, 8)  # [kv_heads, tokens, head_dim]
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.mark.parametrize(("dtype", "carrier"), [("float32", np.float32), ("float16", np.float16)])
def test_numpy_in_its_carrier_is_passed_without_a_copy(dtype: str, carrier: type) -> None:
    array = np.arange(np.prod(SHAPE), dtype=carrier).reshape(SHAPE)
    out = as_carrier(array, dtype)
    assert out is array


def test_bfloat16_bits_in_uint16_are_accepted() -> None:
    bits = np.arange(80, dtype=np.uint16).reshape(SHAPE)
    assert as_carrier(bits, "bfloat16") is bits


@pytest.mark.parametrize(
    ("array_dtype", "dtype"),
    [
        (np.float32, "float16"),
        (np.float16, "float32"),
        (np.float32, "bfloat16"),
        (np.int16, "bfloat16"),
        (np.float64, "float32"),
    ],
)
def test_a_dtype_that_does_not_carry_is_refused(array_dtype: type, dtype: str) -> None:
    with pytest.raises(InvalidArgumentError, match=f"does not carry '{dtype}'"):
        as_carrier(np.zeros(SHAPE, dtype=array_dtype), dtype)


def test_unknown_dtype_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="dtype must be one of"):
        as_carrier(np.zeros(SHAPE, dtype=np.float16), "int8")


def test_big_endian_input_becomes_little_endian() -> None:
    values = np.linspace(-3, 3, 80, dtype=np.float32).reshape(SHAPE)
    out = as_carrier(values.astype(">f4"), "float32")
    assert out.dtype == np.dtype("<f4")
    np.testing.assert_array_equal(out, values)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_torch_cpu_tensor_shares_memory(dtype: str) -> None:
    tensor = torch.randn(SHAPE).to(TORCH_DTYPES[dtype])
    out = as_carrier(tensor, dtype)
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, tensor.numpy())
    tensor[0, 0, 0] = 42
    assert out[0, 0, 0] == 42  # a view, not a copy


def test_torch_bfloat16_becomes_its_bit_patterns() -> None:
    tensor = torch.randn(SHAPE).to(torch.bfloat16)
    out = as_carrier(tensor, "bfloat16")
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, tensor.view(torch.int16).numpy().view(np.uint16))
    # The bits widen to exactly the values torch holds.
    np.testing.assert_array_equal(widen_to_float32(out, "bfloat16"), tensor.float().numpy())


def test_torch_tensor_that_requires_grad_is_detached() -> None:
    tensor = torch.randn(SHAPE, requires_grad=True)
    np.testing.assert_array_equal(as_carrier(tensor, "float32"), tensor.detach().numpy())


def test_torch_non_contiguous_tensor_keeps_its_values() -> None:
    tensor = torch.randn(5, 2, 8).to(torch.bfloat16).transpose(0, 1)  # [2, 5, 8], strided
    assert not tensor.is_contiguous()
    out = as_carrier(tensor, "bfloat16")
    assert out.shape == SHAPE
    np.testing.assert_array_equal(widen_to_float32(out, "bfloat16"), tensor.float().numpy())


def test_torch_dtype_mismatch_says_how_to_convert() -> None:
    with pytest.raises(InvalidArgumentError, match=r"\.to\(torch\.float16\)"):
        as_carrier(torch.zeros(SHAPE, dtype=torch.float32), "float16")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_to_torch_round_trips_bit_exactly(dtype: str) -> None:
    tensor = torch.randn(SHAPE).to(TORCH_DTYPES[dtype])
    back = to_torch(as_carrier(tensor, dtype), dtype)
    assert back.dtype == TORCH_DTYPES[dtype]
    assert torch.equal(back, tensor)


def test_to_torch_copies_read_only_arrays_without_warning() -> None:
    received = np.frombuffer(np.arange(80, dtype=np.float16).tobytes(), dtype=np.float16)
    received = received.reshape(SHAPE)
    assert not received.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensor = to_torch(received, "float16")
    tensor[0, 0, 0] = 7  # writable, and the received bytes are untouched
    assert received[0, 0, 0] == 0


def test_to_torch_shares_writable_arrays() -> None:
    array = np.zeros(SHAPE, dtype=np.float32)
    tensor = to_torch(array, "float32")
    tensor[1, 2, 3] = 5
    assert array[1, 2, 3] == 5


def test_to_torch_refuses_a_wrong_carrier() -> None:
    with pytest.raises(InvalidArgumentError, match="does not carry 'bfloat16'"):
        to_torch(np.zeros(SHAPE, dtype=np.float16), "bfloat16")


def test_importing_the_sdk_does_not_import_torch() -> None:
    code = (
        "import sys, numpy as np, minicache_client\n"
        "from minicache_client.tensors import as_carrier\n"
        "as_carrier(np.zeros((1, 2, 4), np.float16), 'float16')\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
def test_cupy_arrays_are_copied_to_the_host() -> None:
    cupy = pytest.importorskip("cupy")
    if cupy.cuda.runtime.getDeviceCount() == 0:
        pytest.skip("no CUDA device")
    device = cupy.arange(80, dtype=cupy.float16).reshape(SHAPE)
    out = as_carrier(device, "float16")
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, cupy.asnumpy(device))


@pytest.mark.gpu
def test_torch_cuda_bfloat16_is_copied_to_the_host() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    tensor = torch.randn(SHAPE, device="cuda").to(torch.bfloat16)
    out = as_carrier(tensor, "bfloat16")
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(widen_to_float32(out, "bfloat16"), tensor.float().cpu().numpy())
    back = to_torch(out, "bfloat16", device="cuda")
    assert back.device.type == "cuda"
    assert torch.equal(back, tensor)
