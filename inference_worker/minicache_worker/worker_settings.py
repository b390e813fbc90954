"""The inference worker's settings: one object, read from flags and MINICACHE_WORKER_*
env vars.

A flag wins over its env var, which wins over the default. A missing or bad value stops
start-up with the variable's name in the message (`SettingsError`). The readers, the
parsers and the token format are the cache server's (`minicache_client.serving`).
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from minicache_client import ClientConfig
from minicache_client.policy import PRESETS, load_policy
from minicache_client.serving.auth import load_token_tenants
from minicache_client.serving.settings import (
    SettingsError,
    add_setting_flags,
    flag_name,
    setting_values,
)

RESIDENCIES = ("local", "remote")
TENANT = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
KV_DTYPES = ("", "float32", "float16", "bfloat16")
# The proto's bound on GenerateRequest.max_new_tokens.
MAX_NEW_TOKENS_CEILING = 4096


def env_name(field_name: str) -> str:
    return f"MINICACHE_WORKER_{field_name.upper()}"


@dataclass(frozen=True)
class WorkerSettings:
    """Every setting, with its env var `MINICACHE_WORKER_<NAME>` and flag `--<name>`."""

    # gRPC and metrics endpoints ("host:port"; metrics_listen "" disables metrics).
    listen: str = "127.0.0.1:50061"
    metrics_listen: str = "127.0.0.1:9465"
    # The model: a bundled name, a local .gguf file or a local Hugging Face directory.
    model: str = "smollm2"
    # The model name the session's KV is stored under in the cache service ("": the
    # `model` setting). Workers that share sessions must use the same one.
    model_id: str = ""
    # The cache service ("": none; the worker generates with a plain local cache).
    cache_target: str = ""
    cache_token: str = ""
    cache_token_file: str = ""
    cache_tls_ca: str = ""
    cache_insecure: bool = False
    # Deadline of each short cache call (lookup, append, delete).
    cache_timeout_s: float = 5.0
    # Deadline of a prefill's streamed put and of a history's prefetch: both last as
    # long as the prefill computes.
    cache_stream_timeout_s: float = 300.0
    # Defaults of requests that leave them unset.
    residency: str = "local"  # local | remote
    kv_dtype: str = ""  # "": the model's dtype (lossless with policy "none")
    default_policy: str = ""  # "": the cache server's default; a preset or a JSON file
    # Security of the worker's own endpoint: as the cache server, it starts without
    # TLS or without tokens only with insecure=1.
    tls_cert: str = ""
    tls_key: str = ""
    tokens_file: str = ""  # lines "<token> <tenant>" ('#' starts a comment)
    tokens: str = ""  # "<token>=<tenant>,..." (prefer the file: env is visible to ps)
    insecure: bool = False
    # Requests.
    max_new_tokens_limit: int = MAX_NEW_TOKENS_CEILING
    max_queue: int = 8  # turns waiting behind the running one; more get RESOURCE_EXHAUSTED
    # Process.
    grace_s: float = 30.0  # on SIGTERM, how long the running turn may take to finish
    log_level: str = "INFO"
    log_format: str = "json"  # json | text

    def __post_init__(self) -> None:
        checks = [
            (self.residency in RESIDENCIES, "residency", "local or remote"),
            (self.kv_dtype in KV_DTYPES, "kv_dtype", "empty, float32, float16 or bfloat16"),
            (
                1 <= self.max_new_tokens_limit <= MAX_NEW_TOKENS_CEILING,
                "max_new_tokens_limit",
                f"between 1 and {MAX_NEW_TOKENS_CEILING}",
            ),
            (self.max_queue >= 0, "max_queue", ">= 0"),
            (
                math.isfinite(self.cache_timeout_s) and self.cache_timeout_s > 0,
                "cache_timeout_s",
                "> 0",
            ),
            (
                math.isfinite(self.cache_stream_timeout_s) and self.cache_stream_timeout_s > 0,
                "cache_stream_timeout_s",
                "> 0",
            ),
            (math.isfinite(self.grace_s) and self.grace_s >= 0, "grace_s", ">= 0"),
            (self.log_format in ("json", "text"), "log_format", "json or text"),
            (bool(self.tls_cert) == bool(self.tls_key), "tls_cert", "set together with tls_key"),
            (
                self.insecure or (bool(self.tls_cert) and self.has_tokens),
                "insecure",
                "1 when TLS (tls_cert, tls_key) or tokens (tokens_file, tokens) are not set",
            ),
            (
                not (self.cache_token and self.cache_token_file),
                "cache_token",
                "empty when cache_token_file is set (give one of them)",
            ),
            (
                not self.cache_target or bool(self.cache_tls_ca) != self.cache_insecure,
                "cache_insecure",
                "1 when cache_tls_ca is empty (plaintext to the cache service), 0 otherwise",
            ),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise SettingsError(f"{env_name(name)} ({flag_name(name)}): must be {expected}")
        for name in ("tls_cert", "tls_key", "tokens_file", "cache_token_file", "cache_tls_ca"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise SettingsError(f"{env_name(name)}: no such file {path!r}")
        for tenant in set(self.token_tenants().values()):
            # A tenant names its sessions in the cache service: "<tenant>/<session_id>".
            if not TENANT.match(tenant):
                raise SettingsError(
                    f"{env_name('tokens')}/{env_name('tokens_file')}: tenant {tenant!r} must "
                    "be 1 to 64 characters of [A-Za-z0-9._:-]"
                )
        if self.default_policy:
            try:
                load_policy(self.default_policy)
            except ValueError as exc:
                raise SettingsError(f"{env_name('default_policy')}: {exc}") from None
        if self.cache_target:
            self.cache_client_config()  # a bad target stops start-up, not the first turn

    @property
    def has_tokens(self) -> bool:
        return bool(self.tokens_file or self.tokens)

    def token_tenants(self) -> dict[str, str]:
        """Bearer token -> tenant of the worker's own callers (the cache server's
        format and checks, reported under the worker's variable names)."""
        return load_token_tenants(self.tokens_file, self.tokens, env_name)

    def policy_for_requests(self) -> str:
        """What a turn without a policy sends: a preset name, the default policy file's
        JSON, or "" (the cache server's default)."""
        if not self.default_policy or self.default_policy in PRESETS:
            return self.default_policy
        return load_policy(self.default_policy).to_json()

    def cache_client_config(self) -> ClientConfig | None:
        """The cache service's client settings; None without a cache target."""
        if not self.cache_target:
            return None
        token = self.cache_token
        if self.cache_token_file:
            token = Path(self.cache_token_file).read_text().strip()
        try:
            return ClientConfig(
                self.cache_target,
                token=token,
                tls_ca=self.cache_tls_ca,
                insecure=self.cache_insecure,
                timeout_s=self.cache_timeout_s,
            )
        except ValueError as exc:
            raise SettingsError(f"{env_name('cache_target')} and related: {exc}") from None


def settings_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """One flag per setting (default None: unset flags fall back to the env var)."""
    parser = parser or argparse.ArgumentParser(prog="minicache-worker serve")
    return add_setting_flags(parser, WorkerSettings, env_name)


def settings_from(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> WorkerSettings:
    """Settings from parsed flags over env vars (`environ`, default os.environ)."""
    environ = os.environ if environ is None else environ
    return WorkerSettings(**setting_values(WorkerSettings, args, environ, env_name))


def load_worker_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> WorkerSettings:
    """Settings from flags (`argv`) over env vars (`environ`, default os.environ)."""
    return settings_from(settings_parser().parse_args(argv), environ)
