"""Write and read throughput of the cache server's local-disk tier against plain files.

The entries of one sequence (synthetic KV in SmolLM2's shape, `--tokens` tokens, each
`--policies` policy) are encoded once; then, in one run on the same directory
(`--dir`, default a temporary directory):

- tier write: `DiskTier.put_encoded` of every entry (a file per entry: temporary file,
  write, fsync, rename, directory fsync), tier read: `DiskTier.get_encoded` of every
  entry (read, check the name it was written under, verify the checksum, decode);
- baselines on the same bytes: plain write (each encoding to its own file, write and
  fsync, no rename), plain read (`Path.read_bytes` of those files), and a plain copy
  (`shutil.copyfile` of one file holding all of them).

GB/s of stored bytes, median (best) of `--repeats`; reads find the files in the page
cache (nothing is dropped), as a server reading back what it just demoted would.

    python deploy/benchmarks/disk_tier.py
    python deploy/benchmarks/disk_tier.py --dir /mnt/nvme/bench --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from arguments import positive_int, write_report  # beside this script
from service_throughput import synthetic_kv

from minicache_client.entry import encode_entry
from minicache_client.policy import PRESETS
from minicache_client.sequence_encoder import SequenceEncoder
from minicache_server.tiers.base import EntryKey
from minicache_server.tiers.disk_tier import DiskTier


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="DiskTier write/read GB/s next to plain file write, read and copy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--tokens", type=positive_int, default=2048, help="tokens of KV")
    parser.add_argument("--policies", nargs="+", default=["none", "kivi4"], choices=sorted(PRESETS))
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed runs")
    parser.add_argument("--dir", help="directory to write in (default: a temporary one)")
    parser.add_argument("--json", metavar="PATH", help="write every timing as JSON here")
    return parser


def encodings(policy: str, tokens: int) -> list[bytes]:
    layers = synthetic_kv(30, 3, tokens, 64, seed=0)
    encoder = SequenceEncoder(
        PRESETS[policy], num_layers=30, kv_heads=3, head_dim=64, dtype="float16"
    )
    for layer, (keys, values) in enumerate(layers):
        encoder.put_layer(layer, keys, values, seal=True)
    return [encode_entry(entry) for entry in encoder.entries]


def timed(run: Callable[[], object], repeats: int) -> list[float]:
    run()
    seconds = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - began)
    return seconds


def plain_write(folder: Path, data: list[bytes]) -> None:
    for index, value in enumerate(data):
        with open(folder / f"plain-{index}", "wb") as file:
            file.write(value)
            file.flush()
            os.fsync(file.fileno())


def plain_read(folder: Path, count: int) -> None:
    for index in range(count):
        (folder / f"plain-{index}").read_bytes()


def measure(policy: str, data: list[bytes], folder: Path, repeats: int) -> dict:
    tier = DiskTier(folder / "tier", budget_bytes=1 << 40)
    keys = [EntryKey("bench", "model", policy, 1, group) for group in range(len(data))]

    def tier_write() -> None:
        async def run() -> None:
            for key, value in zip(keys, data, strict=True):
                await tier.put_encoded(key, value)

        asyncio.run(run())

    def tier_read() -> None:
        async def run() -> None:
            for key in keys:
                if await tier.get_encoded(key) is None:
                    raise RuntimeError(f"{key} was not read back")

        asyncio.run(run())

    joined = folder / "joined"
    joined.write_bytes(b"".join(data))
    rows = {
        "tier write": timed(tier_write, repeats),
        "tier read": timed(tier_read, repeats),
        "plain write": timed(lambda: plain_write(folder, data), repeats),
        "plain read": timed(lambda: plain_read(folder, len(data)), repeats),
        "plain copy": timed(lambda: shutil.copyfile(joined, folder / "copied"), repeats),
    }
    size = sum(len(value) for value in data)
    return {
        "stored_bytes": size,
        "entries": len(data),
        "rows": {
            name: {
                "seconds": seconds,
                "median_gbps": size / statistics.median(seconds) / 1e9,
                "best_gbps": size / min(seconds) / 1e9,
            }
            for name, seconds in rows.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as workdir:
        for policy in args.policies:
            folder = Path(workdir) / policy
            folder.mkdir()
            results[policy] = measure(policy, encodings(policy, args.tokens), folder, args.repeats)
    print(f"{'policy':<8}{'what':<13}{'GB/s (best)':>17}{'/plain':>9}{'/copy':>8}")
    for policy, result in results.items():
        rows = result["rows"]
        copy = rows["plain copy"]["median_gbps"]
        for name, row in rows.items():
            plain = rows["plain " + name.split()[-1]]["median_gbps"] if "tier" in name else None
            print(
                f"{policy:<8}{name:<13}{row['median_gbps']:>8.3f} ({row['best_gbps']:.3f})"
                f"{'' if plain is None else format(row['median_gbps'] / plain, '.2f'):>9}"
                f"{row['median_gbps'] / copy:>8.2f}"
            )
        print(f"{'':<8}{result['entries']} entries, {result['stored_bytes']:,} stored bytes")
    write_report(
        args,
        "disk_tier",
        started,
        baseline="plain write/read of the same encodings and a copy of one file of them",
        policies=results,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
