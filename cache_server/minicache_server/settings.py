"""The cache server's settings: one object, read from flags and MINICACHE_* env vars.

A flag wins over its env var, which wins over the default. A missing or bad value stops
start-up with the variable's name in the message (`SettingsError`).
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}


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


@dataclass(frozen=True)
class ServerSettings:
    """Every setting, with its env var `MINICACHE_<NAME>` and flag `--<name>`."""

    # gRPC and metrics endpoints ("host:port"; metrics_listen "" disables metrics).
    listen: str = "127.0.0.1:50051"
    metrics_listen: str = "127.0.0.1:9464"
    # Plaintext grpc.health.v1 only, for probes that cannot speak TLS (Kubernetes'
    # native gRPC probe); "" disables it. It serves nothing else.
    health_listen: str = ""
    # Security. Without TLS or without tokens the server only starts with insecure=1.
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""  # set: clients must present a certificate it signed (mTLS)
    tokens_file: str = ""  # lines "<token> <tenant>" ('#' starts a comment)
    tokens: str = ""  # "<token>=<tenant>,..." (prefer the file: env is visible to ps)
    insecure: bool = False
    # Device tier.
    device: str = "auto"  # auto | cpu | cuda
    device_budget_bytes: int = 1 << 30
    # Overflow tier: empty redis_url means no overflow (a full budget then refuses writes).
    redis_url: str = ""
    redis_username: str = ""
    redis_password: str = ""
    redis_password_file: str = ""
    redis_tls_ca: str = ""
    redis_pool_size: int = 16
    redis_timeout_s: float = 2.0
    redis_ttl_s: int = 0  # 0: overflowed entries do not expire
    redis_key_prefix: str = "minicache"
    # Requests.
    default_policy: str = "default"
    max_chunk_bytes: int = 1 << 20
    max_message_bytes: int = 4 << 20
    max_tokens: int = 1 << 17
    max_layers: int = 256
    tenant_quota_bytes: int = 0  # 0: no quota
    # Process.
    grace_s: float = 10.0
    log_level: str = "INFO"
    log_format: str = "json"  # json | text

    def __post_init__(self) -> None:
        checks = [
            (self.device in ("auto", "cpu", "cuda"), "device", "auto, cpu or cuda"),
            (self.device_budget_bytes > 0, "device_budget_bytes", "> 0"),
            (self.redis_pool_size >= 1, "redis_pool_size", ">= 1"),
            (self.redis_timeout_s > 0, "redis_timeout_s", "> 0"),
            (self.redis_ttl_s >= 0, "redis_ttl_s", ">= 0"),
            (self.max_chunk_bytes >= 1024, "max_chunk_bytes", ">= 1024"),
            (
                self.max_message_bytes >= self.max_chunk_bytes + 65536,
                "max_message_bytes",
                "at least max_chunk_bytes + 64 KiB",
            ),
            (self.max_tokens >= 1, "max_tokens", ">= 1"),
            (self.max_layers >= 1, "max_layers", ">= 1"),
            (self.tenant_quota_bytes >= 0, "tenant_quota_bytes", ">= 0"),
            (self.grace_s >= 0, "grace_s", ">= 0"),
            (self.log_format in ("json", "text"), "log_format", "json or text"),
            (bool(self.tls_cert) == bool(self.tls_key), "tls_cert", "set together with tls_key"),
            (
                not self.tls_client_ca or bool(self.tls_cert),
                "tls_client_ca",
                "used only with tls_cert and tls_key",
            ),
            (
                self.insecure or (bool(self.tls_cert) and self.has_tokens),
                "insecure",
                "1 when TLS (tls_cert, tls_key) or tokens (tokens_file, tokens) are not set",
            ),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise SettingsError(
                    f"{env_name(name)} (--{name.replace('_', '-')}): must be {expected}"
                )
        for name in ("tls_cert", "tls_key", "tls_client_ca", "tokens_file", "redis_tls_ca"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise SettingsError(f"{env_name(name)}: no such file {path!r}")

    @property
    def has_tokens(self) -> bool:
        return bool(self.tokens_file or self.tokens)

    def token_tenants(self) -> dict[str, str]:
        """Bearer token -> tenant, from the file and the env var."""
        pairs: list[tuple[str, str, str]] = []
        if self.tokens_file:
            for number, line in enumerate(Path(self.tokens_file).read_text().splitlines(), 1):
                line = line.split("#", 1)[0].strip()
                if line:
                    parts = line.split()
                    if len(parts) != 2:
                        raise SettingsError(
                            f"{env_name('tokens_file')}: line {number} must be '<token> <tenant>'"
                        )
                    pairs.append((parts[0], parts[1], f"line {number}"))
        for item in filter(None, (part.strip() for part in self.tokens.split(","))):
            token, sep, tenant = item.partition("=")
            if not sep or not token or not tenant:
                raise SettingsError(f"{env_name('tokens')}: entries must be '<token>=<tenant>'")
            pairs.append((token, tenant, "env"))
        mapping: dict[str, str] = {}
        for token, tenant, where in pairs:
            if len(token) < 16:
                raise SettingsError(
                    f"{env_name('tokens')}/{env_name('tokens_file')} ({where}): tokens must "
                    "have at least 16 characters"
                )
            if mapping.get(token, tenant) != tenant:
                raise SettingsError(f"token of {where} is mapped to two tenants")
            mapping[token] = tenant
        return mapping

    def redis_password_value(self) -> str:
        if self.redis_password_file:
            return Path(self.redis_password_file).read_text().strip()
        return self.redis_password


def env_name(field_name: str) -> str:
    return f"MINICACHE_{field_name.upper()}"


def _convert(name: str, kind: type, text: str):
    try:
        if name.endswith("_bytes"):
            return parse_size(text)
        if kind is bool:
            return parse_bool(text)
        return kind(text)
    except ValueError as exc:
        raise SettingsError(f"{env_name(name)}: {exc}") from None


def load_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> ServerSettings:
    """Settings from flags (`argv`) over env vars (`environ`, default os.environ)."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="minicache-server",
        description="MiniCache cache server. Every flag also reads MINICACHE_<FLAG> from env.",
    )
    types = {"bool": bool, "int": int, "float": float, "str": str}
    for f in fields(ServerSettings):
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            default=None,
            help=f"env {env_name(f.name)}, default {f.default!r}",
        )
    args = parser.parse_args(argv)
    values = {}
    for f in fields(ServerSettings):
        kind = types[f.type] if isinstance(f.type, str) else f.type
        text = getattr(args, f.name)
        if text is None:
            text = environ.get(env_name(f.name))
        if text is not None:
            values[f.name] = _convert(f.name, kind, text)
    return ServerSettings(**values)
