"""The cache server's settings: one object, read from flags and MINICACHE_* env vars.

A flag wins over its env var, which wins over the default. A missing or bad value stops
start-up with the variable's name in the message (`SettingsError`). The readers and
parsers are the ones the worker's settings use too (`minicache_client.serving.settings`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from minicache_client.serving.auth import load_token_tenants
from minicache_client.serving.settings import (
    SettingsError,
    add_setting_flags,
    flag_name,
    setting_values,
)


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
                raise SettingsError(f"{env_name(name)} ({flag_name(name)}): must be {expected}")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "tokens_file", "redis_tls_ca"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise SettingsError(f"{env_name(name)}: no such file {path!r}")

    @property
    def has_tokens(self) -> bool:
        return bool(self.tokens_file or self.tokens)

    def token_tenants(self) -> dict[str, str]:
        """Bearer token -> tenant, from the file and the env var."""
        return load_token_tenants(self.tokens_file, self.tokens, env_name)

    def redis_password_value(self) -> str:
        if self.redis_password_file:
            return Path(self.redis_password_file).read_text().strip()
        return self.redis_password


def env_name(field_name: str) -> str:
    return f"MINICACHE_{field_name.upper()}"


def load_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> ServerSettings:
    """Settings from flags (`argv`) over env vars (`environ`, default os.environ)."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="minicache-server",
        description="MiniCache cache server. Every flag also reads MINICACHE_<FLAG> from env.",
    )
    add_setting_flags(parser, ServerSettings, env_name)
    values = setting_values(ServerSettings, parser.parse_args(argv), environ, env_name)
    return ServerSettings(**values)
