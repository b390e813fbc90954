"""`raw`: one layer's tokens exactly as they arrived (the `none` policy, and the
direction of a merged pair that is not quantized)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from minicache_client.array_namespace import (
    CARRIER_DTYPES,
    array_namespace,
    recast,
    widen_to_float32,
)
from minicache_client.codecs.base import Codec, check_stored, extend_tokens


@dataclass
class RawStream(Codec):
    """`values`: `[kv_heads, tokens, head_dim]` in the carrier of `dtype`."""

    name: ClassVar[str] = "raw"

    kv_heads: int
    head_dim: int
    dtype: str
    values: Any = None

    def __post_init__(self) -> None:
        if self.values is None:
            self.values = array_namespace().zeros(
                (self.kv_heads, 0, self.head_dim), dtype=CARRIER_DTYPES[self.dtype]
            )
        # Spare room behind `values` for appends (not stored; see `extend_tokens`).
        self._backing = None

    @property
    def tokens(self) -> int:
        return int(self.values.shape[1])

    @property
    def frozen_tokens(self) -> int:
        return self.tokens

    def append(self, chunk: Sequence[Any]) -> None:
        (array,) = chunk
        self.values, self._backing = extend_tokens(self.values, array, self._backing)

    def adopt(self, chunk: Sequence[Any]) -> bool:
        (array,) = chunk
        if self.tokens:
            return False
        self.values, self._backing = array, None
        return True

    def restore(self, which: int, start: int, end: int, dtype: str) -> Any:
        held = self.values[:, start:end]
        return held.copy() if dtype == self.dtype else recast(held, self.dtype, dtype)

    def restore_float32(self, which: int, start: int, end: int) -> Any:
        # Without the copy `restore` makes: callers read it and build new arrays.
        return widen_to_float32(self.values[:, start:end], self.dtype)

    def check(self) -> None:
        check_stored(
            self.values.ndim == 3
            and self.values.shape[0] == self.kv_heads
            and self.values.shape[2] == self.head_dim
            and self.values.dtype == CARRIER_DTYPES[self.dtype],
            "exact tokens have the wrong shape or dtype",
        )
