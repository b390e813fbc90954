"""What every merge of two adjacent layers shares: the merged direction, stored by an
inner stream codec (`raw` or `kivi`) once for both layers, and the `window` most recent
tokens held unmerged (both layers, exact) until `window` newer tokens follow them.

Merging the recent tokens is what costs at decode time (they draw most of the
attention); a window of 0 (the paper) merges every token as it arrives. Tokens leave
the window in order, so appending token by token merges the same tokens as one chunk.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from minicache_client.array_namespace import (
    CARRIER_DTYPES,
    array_namespace,
    narrow_from_float32,
    recast,
    widen_to_float32,
)
from minicache_client.codecs.base import Codec, check_stored, concat_tokens
from minicache_client.policy import PairMerge


@dataclass
class MergedPair(Codec):
    """`direction`: the stream codec of the merged tokens; `recent`:
    `[2, kv_heads, n, head_dim]` (n <= window) unmerged tokens that follow them."""

    layer_count: ClassVar[int] = 2

    kv_heads: int
    head_dim: int
    dtype: str
    direction: Codec
    window: int = 0
    recent: Any = None

    def __post_init__(self) -> None:
        if self.recent is None:
            self.recent = array_namespace().zeros(
                (2, self.kv_heads, 0, self.head_dim), dtype=CARRIER_DTYPES[self.dtype]
            )

    @classmethod
    def for_pair(cls, merge: PairMerge, direction: Codec) -> MergedPair:
        """An empty pair for the policy's `merge`, its direction stored by `direction`."""
        return cls(direction.kv_heads, direction.head_dim, direction.dtype, direction, merge.window)

    @property
    def merged_tokens(self) -> int:
        return self.direction.tokens

    @property
    def tokens(self) -> int:
        return self.merged_tokens + int(self.recent.shape[2])

    @property
    def frozen_tokens(self) -> int:
        # Recent tokens change when they are merged.
        return self.direction.frozen_tokens

    # -- encoding -------------------------------------------------------------------

    def append(self, chunk: Sequence[Any]) -> None:
        xp = array_namespace(*chunk)
        recent = concat_tokens(self.recent, xp.stack(list(chunk)), axis=2)
        leaving = int(recent.shape[2]) - self.window
        if leaving <= 0:
            self.recent = recent
            return
        self.recent = recent[:, :, leaving:].copy()
        first = self.merged_tokens
        x = widen_to_float32(recent[0, :, :leaving], self.dtype)
        y = widen_to_float32(recent[1, :, :leaving], self.dtype)
        merged = self.merge(x, y, recent[:, :, :leaving], first)
        self.direction.append([narrow_from_float32(merged, self.direction.dtype)])

    def seal(self) -> None:
        self.direction.seal()

    @abstractmethod
    def merge(self, x: Any, y: Any, originals: Any, first_token: int) -> Any:
        """float32 direction `[kv_heads, n, head_dim]` of tokens first_token.. of both
        layers (`x`, `y`: float32; `originals`: `[2, kv_heads, n, head_dim]` as
        stored); records whatever else the method keeps per token."""

    # -- decoding -------------------------------------------------------------------

    def prepare(self, shared: Any, start: int, end: int) -> Any:
        """Work both layers' restores share (e.g. the direction's norms)."""
        return None

    @abstractmethod
    def expand(self, shared: Any, prepared: Any, which: int, start: int, end: int) -> Any:
        """float32 layer `which` of merged tokens [start, end) from the restored
        direction `shared` (which both layers read: never modified)."""

    def _layers(self, whiches: Sequence[int], start: int, end: int, dtype: str) -> list[Any]:
        xp = array_namespace(self.recent, *self.direction.arrays())
        boundary = self.merged_tokens
        merged_end = min(end, boundary)
        shared = prepared = None
        if start < merged_end:
            shared = self.direction.restore_float32(0, start, merged_end)
            prepared = self.prepare(shared, start, merged_end)
        layers = []
        for which in whiches:
            out = xp.empty((self.kv_heads, end - start, self.head_dim), CARRIER_DTYPES[dtype])
            if shared is not None:
                layer = self.expand(shared, prepared, which, start, merged_end)
                out[:, : merged_end - start] = narrow_from_float32(layer, dtype)
            if end > boundary:
                lo = max(start, boundary)
                recent = self.recent[which, :, lo - boundary : end - boundary]
                out[:, lo - start :] = recast(recent, self.dtype, dtype)
            layers.append(out)
        return layers

    def restore(self, which: int, start: int, end: int, dtype: str) -> Any:
        return self._layers([which], start, end, dtype)[0]

    def restore_group(self, start: int, end: int, dtype: str) -> list[Any]:
        return self._layers([0, 1], start, end, dtype)

    def check(self) -> None:
        check_stored(isinstance(self.direction, Codec), "merged direction has no codec")
        check_stored(
            self.direction.layer_count == 1
            and (self.direction.kv_heads, self.direction.head_dim, self.direction.dtype)
            == (self.kv_heads, self.head_dim, self.dtype),
            "merged direction disagrees with its pair",
        )
        self.direction.check()
        check_stored(
            self.recent.ndim == 4
            and self.recent.shape[:2] == (2, self.kv_heads)
            and self.recent.shape[3] == self.head_dim
            and self.recent.dtype == CARRIER_DTYPES[self.dtype],
            "recent tokens have the wrong shape",
        )
        check_stored(
            isinstance(self.window, int) and 0 <= self.recent.shape[2] <= self.window,
            "more recent tokens than the window",
        )
