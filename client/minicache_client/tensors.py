"""KV tensors in and out of the client: NumPy, CuPy or torch in; NumPy out.

`as_carrier` turns a caller's tensor into the NumPy carrier array of its KV dtype that
goes on the wire (bfloat16 as uint16 bit patterns). torch is never imported here: a
tensor is recognised only when the caller has already imported torch, by looking the
module up in `sys.modules`. `to_torch` (which does import torch, when called) turns a
received carrier array back into a torch tensor, bfloat16 included.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import numpy as np

from minicache_client.array_namespace import KV_DTYPES, to_numpy
from minicache_client.errors import InvalidArgumentError
from minicache_client.wire import carrier_of


def check_dtype(dtype: str) -> str:
    if dtype not in KV_DTYPES:
        raise InvalidArgumentError(f"dtype must be one of {', '.join(KV_DTYPES)} (got {dtype!r})")
    return dtype


def is_torch_tensor(array: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(array, torch.Tensor)


def _torch_to_numpy(tensor: Any, dtype: str) -> np.ndarray:
    torch = sys.modules["torch"]
    expected = getattr(torch, dtype)
    if tensor.dtype != expected:
        raise InvalidArgumentError(
            f"tensor dtype {tensor.dtype} does not match dtype {dtype!r}; convert it with "
            f".to(torch.{dtype}) or pass dtype={str(tensor.dtype).removeprefix('torch.')!r}"
        )
    # .cpu() is the one host copy of a GPU tensor; a CPU tensor is shared, not copied.
    tensor = tensor.detach().cpu()
    if dtype == "bfloat16":
        # NumPy has no bfloat16: reinterpret the same 16 bits as an integer carrier.
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def as_carrier(array: Any, dtype: str) -> np.ndarray:
    """The NumPy carrier of `array` in KV dtype `dtype`, any shape (a layer's keys or
    values are `[kv_heads, tokens, head_dim]`).

    Accepts NumPy and CuPy arrays in the carrier dtype (float32, float16, or uint16 bit
    patterns for bfloat16) and torch tensors of the dtype itself (torch.bfloat16 for
    "bfloat16"), on any device. No cast is made: a dtype that does not carry `dtype`
    raises InvalidArgumentError. Host arrays are returned without a copy.
    """
    check_dtype(dtype)
    if is_torch_tensor(array):
        host = _torch_to_numpy(array, dtype)
    else:
        host = to_numpy(array)
    carrier = carrier_of(dtype)
    if host.dtype == carrier:
        return host
    if host.dtype.newbyteorder("<") == carrier:
        # The right type in big-endian byte order: the wire is little-endian.
        return host.astype(carrier)
    raise InvalidArgumentError(
        f"array dtype {host.dtype} does not carry {dtype!r} (expected {carrier}"
        + (", the uint16 bit patterns of bfloat16" if dtype == "bfloat16" else "")
        + ")"
    )


def to_torch(array: np.ndarray, dtype: str, device: Any = None) -> Any:
    """A torch tensor of KV dtype `dtype` from its NumPy carrier `array` (same shape).

    bfloat16 bit patterns become torch.bfloat16. On the CPU the tensor shares memory with
    `array` when it is writable; a read-only array (one received from the server) is
    copied first, since torch tensors are always writable. With a `device`, the tensor
    is copied there.
    """
    import torch

    check_dtype(dtype)
    carrier = carrier_of(dtype)
    if array.dtype != carrier:
        raise InvalidArgumentError(
            f"array dtype {array.dtype} does not carry {dtype!r} (expected {carrier})"
        )
    on_cpu = device is None or torch.device(device).type == "cpu"
    if not array.flags.writeable and on_cpu:
        array = array.copy()
    bits = array.view(np.int16) if dtype == "bfloat16" else array
    with warnings.catch_warnings():
        # Read-only and bound for another device: the copy to the device is the tensor
        # the caller gets, so the shared read-only buffer is never written.
        warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning)
        tensor = torch.from_numpy(bits)
    if dtype == "bfloat16":
        tensor = tensor.view(torch.bfloat16)
    return tensor if device is None else tensor.to(device)
