"""The local-disk tier: one file per entry under a directory, within a byte budget.

Layout under `directory`: `entries/<xxh3-128 of the entry's name>` and
`manifests/<xxh3-128 of the sequence's manifest name>`; each file holds a bound value
(`encoded_tier.py`: the name it was written under, then the entry's checksummed
encoding or the manifest), so a file renamed or copied over another is refused when
read. Names are hashed because ids may be 256 characters each, longer than a file name
may be.

Writes are atomic and durable: a temporary file in the same directory, written and
fsync'd, `os.replace`d over the final name, then the directory fsync'd, so a crash
leaves the old file or the new one, never a torn one (temporary files left by a crash
are removed at start). Reads verify (`EncodedTier.get`); a file that fails is deleted
by the chain and the read is a miss. A file that vanished behind the server's back is a
miss as well. File I/O runs on worker threads.

The index (key -> stored bytes) is rebuilt at start by reading the name at the head of
each entry file; the budget counts stored bytes (the encodings), not file-system blocks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from pathlib import Path

import xxhash

from minicache_server.tiers.base import (
    EntryKey,
    SequenceName,
    TierUnavailableError,
    entry_name,
    manifest_name,
    parse_entry_name,
)
from minicache_server.tiers.encoded_tier import NAME_LENGTH, EncodedTier, bound_name, unbind

log = logging.getLogger(__name__)

TEMPORARY_PREFIX = ".tmp-"
# Longest head of an entry file read to find its name at start (a name is at most three
# escaped ids of 256 characters, two numbers and separators).
MAX_NAME_HEAD = NAME_LENGTH.size + 3 * 3 * 256 + 64


def file_name(name: str) -> str:
    return xxhash.xxh3_128_hexdigest(name.encode())


def write_atomically(path: Path, parts: list[bytes | memoryview]) -> None:
    """Temporary file, fsync, `os.replace`, directory fsync (see the module docstring)."""
    temporary = path.with_name(f"{TEMPORARY_PREFIX}{path.name}-{uuid.uuid4().hex}")
    try:
        with open(temporary, "wb") as file:
            for part in parts:
                file.write(part)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def read_file(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def remove_files(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
    if paths:
        fsync_directory(paths[0].parent)


class DiskTier(EncodedTier):
    """Entry files under `directory` within `budget_bytes` (see the module docstring)."""

    name = "disk"

    def __init__(self, directory: str | Path, budget_bytes: int) -> None:
        super().__init__()
        if budget_bytes <= 0:
            raise ValueError(f"disk budget must be > 0 bytes, got {budget_bytes}")
        self.directory = Path(directory)
        self.budget_bytes = budget_bytes
        self.entries = self.directory / "entries"
        self.manifest_dir = self.directory / "manifests"
        for folder in (self.entries, self.manifest_dir):
            folder.mkdir(parents=True, exist_ok=True)
            for leftover in folder.glob(f"{TEMPORARY_PREFIX}*"):
                leftover.unlink(missing_ok=True)
        # Every entry file found at start: key -> stored bytes (the index is filled from
        # it by `recover_entries`; the rest are orphans, removed by `remove_orphans`).
        self.found: dict[EntryKey, int] = self._scan()

    def _scan(self) -> dict[EntryKey, int]:
        found: dict[EntryKey, int] = {}
        for path in self.entries.iterdir():
            try:
                with open(path, "rb") as file:
                    head = file.read(MAX_NAME_HEAD)
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            bound = bound_name(head)
            key = None if bound is None else parse_entry_name(bound[0])
            if key is None or file_name(bound[0]) != path.name or size <= bound[1]:
                log.warning("unreadable file in the disk tier removed", extra={"path": str(path)})
                path.unlink(missing_ok=True)
                continue
            found[key] = size - bound[1]
        return found

    def _path(self, name: str) -> Path:
        return self.entries / file_name(name)

    async def _io(self, action: str, function, *args):
        try:
            result = await asyncio.to_thread(function, *args)
        except OSError as exc:
            if self.available:
                log.warning(
                    "disk tier unavailable",
                    extra={"directory": str(self.directory), "error": str(exc)},
                )
            self.available = False
            raise TierUnavailableError(f"disk tier unavailable during {action}: {exc}") from exc
        self.available = True
        return result

    async def write(self, name: str, parts: list[bytes | memoryview]) -> None:
        await self._io("write", write_atomically, self._path(name), parts)

    async def read(self, name: str) -> bytes | None:
        return await self._io("read", read_file, self._path(name))

    async def remove(self, names: list[str]) -> None:
        await self._io("delete", remove_files, [self._path(name) for name in names])

    async def recover_entries(self, keys: list[EntryKey]) -> dict[EntryKey, int]:
        held = {key: self.found[key] for key in keys if key in self.found}
        for key, size in held.items():
            self._indexed(key, size)
        return held

    async def remove_orphans(self) -> int:
        """Delete entry files found at start that no recovered sequence claimed."""
        orphans = [key for key in self.found if not self.contains(key)]
        await self.remove([entry_name(key) for key in orphans])
        self.found = {}
        return len(orphans)

    def _manifest_path(self, name: SequenceName) -> Path:
        return self.manifest_dir / file_name(manifest_name(name))

    async def put_manifest(self, name: SequenceName, data: bytes) -> None:
        text = manifest_name(name)
        parts = [NAME_LENGTH.pack(len(text.encode())) + text.encode(), data]
        await self._io("manifest write", write_atomically, self._manifest_path(name), parts)

    async def delete_manifest(self, name: SequenceName) -> None:
        await self._io("manifest delete", remove_files, [self._manifest_path(name)])

    async def manifests(self) -> list[bytes]:
        def load() -> list[bytes]:
            found = []
            for path in self.manifest_dir.iterdir():
                value = read_file(path)
                bound = None if value is None else bound_name(value)
                if bound is None or file_name(bound[0]) != path.name:
                    path.unlink(missing_ok=True)
                    continue
                found.append(bytes(unbind(bound[0], value)))
            return found

        return await self._io("recovery", load)
