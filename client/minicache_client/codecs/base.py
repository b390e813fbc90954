"""The codec interface: one compression method, its stored form, encoder and decoder.

A codec instance holds one side (keys or values) of one layer group of one sequence:
the stored form is the instance's dataclass fields (arrays and plain values), so
`minicache_client.entry` can write and read any codec without knowing it. Tokens
arrive in order, in chunks of any size; a codec stores the same whether they came as
one chunk or one token at a time (`append`), except that `seal` (end of a bulk put)
may close partial blocks.

Shapes: a chunk is one `[kv_heads, n, head_dim]` tensor per layer of the group, in the
carrier dtype of the entry's KV dtype (bfloat16 as uint16); restores are
`[kv_heads, end - start, head_dim]`.
"""

from __future__ import annotations

import dataclasses
import functools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

from minicache_client.array_namespace import array_namespace, is_array, is_writeable


class CorruptEntryError(ValueError):
    """A stored entry failed verification (checksum, version or structure)."""


def check_stored(condition: bool, message: str) -> None:
    """Structural check of a decoded stored form."""
    if not condition:
        raise CorruptEntryError(message)


def concat_tokens(first: Any, second: Any, axis: int) -> Any:
    """`first` then `second` along the token axis, as a new array (a codec never
    aliases a caller's buffer)."""
    if first is None or first.shape[axis] == 0:
        return second.copy()
    return array_namespace(first, second).concatenate([first, second], axis=axis)


def extend_tokens(held: Any, new: Any, backing: tuple[Any, Any] | None) -> tuple[Any, Any]:
    """`held` then `new` along the token axis (1), and the (buffer, view) to pass back
    next time. While `held` is still the view a previous call returned and its buffer
    has room, `new` is written behind it: an append costs its own tokens, not the
    history's. A new buffer gets an eighth more room (at least 16 tokens) than it needs,
    so the history is copied once per eighth of growth; memory beyond the stored tokens
    is at most that room."""
    count, extra = held.shape[1], new.shape[1]
    if backing is not None and backing[1] is held and backing[0].shape[1] >= count + extra:
        buffer = backing[0]
    else:
        room = count + extra + max(16, (count + extra) // 8)
        buffer = array_namespace(held, new).empty(
            (held.shape[0], room, *held.shape[2:]), dtype=held.dtype
        )
        buffer[:, :count] = held
    buffer[:, count : count + extra] = new
    view = buffer[:, : count + extra]
    return view, (buffer, view)


def _address(array: Any) -> int:
    interface = getattr(array, "__array_interface__", None) or array.__cuda_array_interface__
    return interface["data"][0]


def has_spare_room(array: Any) -> bool:
    """Whether `array` is a view `extend_tokens` returned: a prefix, along the token
    axis, of a larger writeable buffer, kept on purpose for the next append."""
    base = getattr(array, "base", None)
    return (
        is_array(base)
        and is_writeable(array)
        and base.ndim == array.ndim >= 2
        and base.shape[0] == array.shape[0]
        and base.shape[2:] == array.shape[2:]
        and base.shape[1] >= array.shape[1]
        and base.strides == array.strides
        and _address(base) == _address(array)
    )


# Field values that are never codecs: told apart by their exact type, which is much
# cheaper than `isinstance` against an abstract base class on every field walk.
_PLAIN_TYPES = frozenset({int, float, str, bool, bytes, tuple, list, type(None)})


def is_codec(value: Any) -> bool:
    return type(value) not in _PLAIN_TYPES and isinstance(value, Codec)


@functools.cache
def _field_names(codec_class: type) -> tuple[str, ...]:
    return tuple(field.name for field in dataclasses.fields(codec_class))


class Codec(ABC):
    """One side (keys or values) of one layer group, as stored.

    Subclasses are dataclasses; every field is stored. `name` is the registry name."""

    name: ClassVar[str]
    # Layers of the group one instance holds: 1 for stream codecs, 2 for pair merges.
    layer_count: ClassVar[int] = 1
    # Whether `append` may refuse valid finite KV (the encoder then snapshots the group
    # first, to roll every codec back; see `snapshot`).
    may_refuse: ClassVar[bool] = False

    kv_heads: int
    head_dim: int
    # The KV dtype of the entry ("float32", "float16", "bfloat16").
    dtype: str

    @property
    @abstractmethod
    def tokens(self) -> int:
        """Tokens held."""

    @property
    @abstractmethod
    def frozen_tokens(self) -> int:
        """Leading tokens whose restored values can no longer change."""

    @abstractmethod
    def append(self, chunk: Sequence[Any]) -> None:
        """The next tokens: `layer_count` tensors `[kv_heads, n, head_dim]`."""

    def adopt(self, chunk: Sequence[Any]) -> bool:
        """Optional hook: take the first tokens as they are, without a copy, from a
        caller that hands over arrays it will not touch again. False (the default): the
        caller appends them instead."""
        return False

    def seal(self) -> None:  # noqa: B027 - optional hook: most codecs keep nothing open
        """End of a bulk put: close partial blocks. Later appends start new ones."""

    @abstractmethod
    def restore(self, which: int, start: int, end: int, dtype: str) -> Any:
        """Tokens [start, end) of layer `which`, in the carrier of `dtype`."""

    def restore_float32(self, which: int, start: int, end: int) -> Any:
        """float32 `[kv_heads, end - start, head_dim]` of layer `which` of the group."""
        return self.restore(which, start, end, "float32")

    def restore_group(self, start: int, end: int, dtype: str) -> list[Any]:
        """Every layer of the group; merges decode their shared part once here."""
        return [self.restore(which, start, end, dtype) for which in range(self.layer_count)]

    @abstractmethod
    def check(self) -> None:
        """Raise CorruptEntryError when the stored form is inconsistent."""

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The stored fields, in order (cached: `dataclasses.fields` is slow on the
        paths every append and every size count take)."""
        return _field_names(cls)

    def arrays(self) -> list[Any]:
        """Every array the codec holds (for byte counts and device moves)."""
        found = []
        for name in self.field_names():
            value = getattr(self, name)
            if is_array(value):
                found.append(value)
            elif is_codec(value):
                found.extend(value.arrays())
        return found

    def snapshot(self) -> dict[str, Any]:
        """The stored fields as they are now (nested codecs' too), for `roll_back`: an
        append replaces arrays or writes behind the held tokens, never inside them."""
        return {
            name: value.snapshot() if is_codec(value) else value
            for name in self.field_names()
            for value in (getattr(self, name),)
        }

    def roll_back(self, snapshot: dict[str, Any]) -> None:
        """Undo the appends since `snapshot` was taken."""
        for name, value in snapshot.items():
            held = getattr(self, name)
            if is_codec(held):
                held.roll_back(value)
            else:
                setattr(self, name, value)

    def map_arrays(self, convert) -> None:
        """Replace every array with `convert(array)`, in place (nested codecs too)."""
        for name in self.field_names():
            value = getattr(self, name)
            if is_array(value):
                setattr(self, name, convert(value))
            elif is_codec(value):
                value.map_arrays(convert)
