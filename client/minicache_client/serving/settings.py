"""What both services' settings objects share: the error, value parsers, and reading a
settings dataclass from flags over env vars.

Each service has one frozen dataclass of settings and its own env prefix, given here as
`env_name` (field name -> variable: `MINICACHE_<NAME>` for the cache server,
`MINICACHE_WORKER_<NAME>` for the worker). A flag wins over its env var, which wins over
the default. A missing or bad value stops start-up with the variable's name in the
message (`SettingsError`; one `except` catches either service's).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}
_TYPES = {"bool": bool, "int": int, "float": float, "str": str}


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the env var."""


def parse_size(text: str) -> int:
    """Bytes from `1048576`, `512MiB`, `2GB`, `64k` (binary units with `i`)."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (use e.g. 1073741824, 512MiB, 2GiB)")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    if "i" in unit:
        scale = 1024 ** ("kmgt".index(unit[0]) + 1)
    else:
        scale = _UNITS[unit.rstrip("b")] if unit != "b" else 1
    return int(number * scale)


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r} (use 1/0, true/false)")


def split_address(address: str) -> tuple[str, int]:
    """(host, port) of "host:port" ("[::1]:80" gives "::1"; an empty host "0.0.0.0")."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise SettingsError(f"address {address!r} must be host:port")
    return host.strip("[]") or "0.0.0.0", int(port)


def flag_name(field_name: str) -> str:
    return f"--{field_name.replace('_', '-')}"


def add_setting_flags(
    parser: argparse.ArgumentParser, settings_class: type, env_name: Callable[[str], str]
) -> argparse.ArgumentParser:
    """One flag per field of `settings_class` (default None: an unset flag falls back to
    the env var)."""
    for f in fields(settings_class):
        parser.add_argument(
            flag_name(f.name),
            dest=f.name,
            default=None,
            help=f"env {env_name(f.name)}, default {f.default!r}",
        )
    return parser


def setting_values(
    settings_class: type,
    args: argparse.Namespace,
    environ: Mapping[str, str],
    env_name: Callable[[str], str],
) -> dict[str, Any]:
    """The fields set by a flag or else by an env var, converted to their types: sizes
    for `*_bytes` fields (`parse_size`), `parse_bool` for booleans."""
    values = {}
    for f in fields(settings_class):
        kind = _TYPES[f.type] if isinstance(f.type, str) else f.type
        text = getattr(args, f.name, None)
        if text is None:
            text = environ.get(env_name(f.name))
        if text is not None:
            values[f.name] = _convert(f.name, kind, text, env_name)
    return values


def _convert(name: str, kind: type, text: str, env_name: Callable[[str], str]) -> Any:
    try:
        if name.endswith("_bytes"):
            return parse_size(text)
        if kind is bool:
            return parse_bool(text)
        return kind(text)
    except ValueError as exc:
        raise SettingsError(f"{env_name(name)}: {exc}") from None
