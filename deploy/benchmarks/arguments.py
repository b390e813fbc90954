"""Command-line argument types shared by the benchmark scripts beside this file."""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def write_report(args: argparse.Namespace, benchmark: str, started: float, **fields) -> None:
    """Write `--json` (when given): the benchmark's name, the machine, the arguments,
    `fields` (the figures, with the baseline of the same run) and the wall time."""
    if not args.json:
        return
    report = {
        "benchmark": benchmark,
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "config": {key: value for key, value in vars(args).items() if key != "json"},
        **fields,
        "wall_seconds": time.perf_counter() - started,
    }
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.json}")
