"""What both services' settings objects share: the error, value parsers, the field that
carries a flag's help, reading a settings dataclass from flags over env vars, and the
effective settings with their secrets masked (`--print-config`).

Each service has one frozen dataclass of settings and its own env prefix, given here as
`env_name` (field name -> variable: `MINICACHE_<NAME>` for the cache server,
`MINICACHE_WORKER_<NAME>` for the worker). A flag wins over its env var, which wins over
the default. A missing or bad value stops start-up with the variable's name in the
message (`SettingsError`; one `except` catches either service's).

Every field is declared with `setting(default, "what it does")`; `add_setting_flags`
refuses a field without it, so each flag's `--help` says what it does, its unit (from
the name: `*_bytes` are sizes, `*_s` seconds), its default and its env var. Booleans are
switches (`--insecure`, `--no-insecure`); their env vars take 1/0, true/false, yes/no,
on/off.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import field, fields
from typing import Any
from urllib.parse import urlsplit, urlunsplit

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}
_TYPES = {"bool": bool, "int": int, "float": float, "str": str}
# Names of text settings that hold secrets even when a field forgets `secret=True` (not
# `*_file`: that is a path, and a file's contents are never printed).
_SECRET_NAME = re.compile(r"(^|_)(tokens?|password|passwd|secret|credentials?|api_key|auth)$")
MASK = "***"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the env var."""


def setting(default: Any, help: str, *, metavar: str | None = None, secret: bool = False) -> Any:
    """A settings field and its flag's help: `help` says what it does (the unit, default
    and env var are added by `add_setting_flags`); `secret` masks it in
    `masked_settings`."""
    return field(default=default, metadata={"help": help, "metavar": metavar, "secret": secret})


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


def _kind(f: Any) -> type:
    return _TYPES[f.type] if isinstance(f.type, str) else f.type


def _binary_size(size: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} bytes"


def flag_help(f: Any, env_name: Callable[[str], str]) -> str:
    """What the field's flag does, then its unit, default and env var."""
    what = f.metadata.get("help")
    if not what:
        raise TypeError(f"setting {f.name} has no help: declare it with setting(default, help)")
    kind, default = _kind(f), f.default
    env = env_name(f.name)
    if f.name.endswith("_bytes"):
        unit = "bytes, or 512MiB, 2GiB, 64k"
        shown = f"{default} = {_binary_size(default)}" if default else "0"
    elif kind is bool:
        unit, shown, env = "", "on" if default else "off", f"{env}=1/0 or true/false"
    else:
        unit = "seconds" if f.name.endswith("_s") else ""
        shown = "empty" if default == "" else repr(default) if kind is str else str(default)
    parts = [unit, f"default {shown}", f"env {env}"]
    return f"{what} [{'; '.join(p for p in parts if p)}]"


def _metavar(f: Any) -> str | None:
    if f.metadata.get("metavar"):
        return f.metadata["metavar"]
    if f.name.endswith("_bytes"):
        return "SIZE"
    if f.name.endswith("_s"):
        return "SECONDS"
    return {int: "N", float: "NUMBER"}.get(_kind(f))


def add_setting_flags(
    parser: argparse.ArgumentParser, settings_class: type, env_name: Callable[[str], str]
) -> argparse.ArgumentParser:
    """One flag per field of `settings_class` (default None: an unset flag falls back to
    the env var; booleans as `--name`/`--no-name` switches), and `--print-config`."""
    for f in fields(settings_class):
        help_text = flag_help(f, env_name).replace("%", "%%")
        if _kind(f) is bool:
            parser.add_argument(
                flag_name(f.name),
                dest=f.name,
                default=None,
                action=argparse.BooleanOptionalAction,
                help=help_text,
            )
        else:
            parser.add_argument(
                flag_name(f.name), dest=f.name, default=None, metavar=_metavar(f), help=help_text
            )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective settings (defaults, then env vars, then flags) as JSON, "
        f"with secrets shown as {MASK}, and exit 0; a bad value exits 2 naming its variable",
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
        given = getattr(args, f.name, None)
        if isinstance(given, bool):  # a switch
            values[f.name] = given
            continue
        text = given if given is not None else environ.get(env_name(f.name))
        if text is not None:
            values[f.name] = _convert(f.name, _kind(f), text, env_name)
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


def check_log_level(level: str, env_name: Callable[[str], str]) -> None:
    if level.upper() not in LOG_LEVELS:
        raise SettingsError(f"{env_name('log_level')}: must be one of {', '.join(LOG_LEVELS)}")


def _masked_url(value: str) -> str:
    """A URL with the password of its user info masked ("redis://u:***@host/0")."""
    try:
        parts = urlsplit(value)
        password = parts.password
    except ValueError:
        return MASK
    if not password:
        return value
    userinfo = f"{parts.username or ''}:{MASK}"
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{parts.netloc.rpartition('@')[2]}"))


def is_secret(f: Any) -> bool:
    """Declared secret, or a text setting named like one (`tokens`, `cache_token`,
    `redis_password`; not `max_tokens`, a number)."""
    return bool(f.metadata.get("secret")) or (_kind(f) is str and bool(_SECRET_NAME.search(f.name)))


def masked_settings(settings: Any) -> dict[str, Any]:
    """Every field of a settings object, secrets (tokens, passwords, a URL's password)
    shown as MASK when set; file settings show their path, never their contents."""
    shown: dict[str, Any] = {}
    for f in fields(settings):
        value = getattr(settings, f.name)
        if is_secret(f) and value:
            value = MASK
        elif isinstance(value, str) and "://" in value and "@" in value:
            value = _masked_url(value)
        shown[f.name] = value
    return shown


def config_json(settings: Any) -> str:
    """What `--print-config` prints: `masked_settings` as indented JSON."""
    return json.dumps(masked_settings(settings), indent=2)
