"""What the persistent tiers (disk, Redis) share: entries kept as their checksummed
encoding (`minicache_client.entry.encode_entry`), bound to their key.

A stored value is `name length (u16, LE) | entry_name(key) (UTF-8) | encoding`. A value
read back is checked twice before anything of it is used: the name inside must be the
key it was read under (a valid entry copied or renamed to another key is refused), and
`decode_entry` verifies the encoding's checksum and structure. Either failure is a
`CorruptEntryError`. Encoding and decoding run on a worker thread. The tier is charged
the encoding's length (`stored_bytes`), never the binding.
"""

from __future__ import annotations

import asyncio
import struct
from abc import abstractmethod
from collections.abc import Iterable

from minicache_client.entry import CorruptEntryError, LayerGroupEntry, decode_entry, encode_entry
from minicache_server.tiers.base import EntryKey, IndexedTier, entry_name

NAME_LENGTH = struct.Struct("<H")


def bind(name: str, data: bytes | memoryview) -> list[bytes | memoryview]:
    """The parts of a stored value (written one after the other, never joined)."""
    encoded = name.encode()
    return [NAME_LENGTH.pack(len(encoded)) + encoded, data]


def bound_name(value: bytes | memoryview) -> tuple[str, int] | None:
    """(name, offset of the encoding) of a stored value; None when malformed."""
    view = memoryview(value)
    if len(view) < NAME_LENGTH.size:
        return None
    length = NAME_LENGTH.unpack_from(view)[0]
    end = NAME_LENGTH.size + length
    if len(view) < end:
        return None
    try:
        return bytes(view[NAME_LENGTH.size : end]).decode(), end
    except UnicodeDecodeError:
        return None


def unbind(name: str, value: bytes | memoryview) -> memoryview:
    """The encoding inside `value`; `CorruptEntryError` when it is bound to another name."""
    found = bound_name(value)
    if found is None or found[0] != name:
        raise CorruptEntryError("stored value was not written under its key")
    return memoryview(value)[found[1] :]


class EncodedTier(IndexedTier):
    """An indexed tier whose values are bound encodings (see the module docstring).
    Subclasses move the bytes: `write`, `read`, `remove`."""

    persistent = True

    @abstractmethod
    async def write(self, name: str, parts: list[bytes | memoryview]) -> None:
        """Store the value made of `parts` under `name`, durably, replacing any."""

    @abstractmethod
    async def read(self, name: str) -> bytes | memoryview | None:
        """The value stored under `name`, None when absent."""

    @abstractmethod
    async def remove(self, names: list[str]) -> None:
        """Forget the values under `names` (absent ones ignored)."""

    async def put(self, key: EntryKey, entry: LayerGroupEntry, size: int) -> None:
        data = await asyncio.to_thread(encode_entry, entry)
        await self.put_encoded(key, data)

    async def put_encoded(self, key: EntryKey, data: bytes | memoryview) -> None:
        """Store an entry's encoding as it is (a demotion between two encoded tiers)."""
        name = entry_name(key)
        await self.write(name, bind(name, data))
        self._indexed(key, len(data))

    async def get_encoded(self, key: EntryKey) -> tuple[LayerGroupEntry, memoryview] | None:
        """The entry, verified, and the encoding it was decoded from."""
        name = entry_name(key)
        value = await self.read(name)
        if value is None:
            self._unindexed(key)
            return None
        data = unbind(name, value)
        entry = await asyncio.to_thread(decode_entry, data)
        self._touched(key)
        return entry, data

    async def get(self, key: EntryKey) -> LayerGroupEntry | None:
        found = await self.get_encoded(key)
        return None if found is None else found[0]

    async def delete(self, keys: Iterable[EntryKey]) -> None:
        keys = list(keys)
        if not keys:
            return
        # Out of the index first: a value whose removal failed is never served again.
        for key in keys:
            self._unindexed(key)
        await self.remove([entry_name(key) for key in keys])
