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
    check_log_level,
    flag_name,
    setting,
    setting_values,
)

RESIDENCIES = ("local", "remote")
TENANT = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
KV_DTYPES = ("", "float32", "float16", "bfloat16")
# The single-server setting that `cache_targets` replaced.
RETIRED_CACHE_TARGET = "MINICACHE_WORKER_CACHE_TARGET"
# The proto's bound on GenerateRequest.max_new_tokens.
MAX_NEW_TOKENS_CEILING = 4096


def env_name(field_name: str) -> str:
    return f"MINICACHE_WORKER_{field_name.upper()}"


@dataclass(frozen=True)
class WorkerSettings:
    """Every setting, with its env var `MINICACHE_WORKER_<NAME>` and flag `--<name>`;
    each field's help is what `minicache-worker serve --help` prints for it."""

    # Endpoints.
    listen: str = setting(
        "127.0.0.1:50061",
        "address the gRPC worker service binds, host:port (port 0 picks a free one)",
        metavar="HOST:PORT",
    )
    metrics_listen: str = setting(
        "127.0.0.1:9465",
        "address of the Prometheus endpoint (GET /metrics), host:port; empty: no metrics",
        metavar="HOST:PORT",
    )
    # The model.
    model: str = setting(
        "smollm2",
        "the model: the bundled model's name (smollm2), a local .gguf file or a local "
        "Hugging Face model directory",
        metavar="MODEL",
    )
    model_id: str = setting(
        "",
        "name the sessions' KV is stored under in the cache service; empty: the --model "
        "setting. Workers that share sessions must use the same one",
        metavar="NAME",
    )
    # The cache service.
    cache_targets: str = setting(
        "",
        "the cache servers, a comma-separated list of host:port (one entry a server); each "
        "session lives on one of them, picked by rendezvous hashing of the model id and "
        "session id, so workers that share sessions list the same servers, spelled the "
        "same (the order does not matter); empty: no cache service, each turn recomputes "
        "its history with a plain local cache",
        metavar="HOST:PORT,...",
    )
    cache_token: str = setting(
        "",
        "bearer token presented to every cache server (prefer --cache-token-file: env and "
        "arguments are visible to ps)",
        metavar="TOKEN",
        secret=True,
    )
    cache_token_file: str = setting(
        "",
        "file holding the bearer token for the cache service (surrounding whitespace "
        "stripped); give this or --cache-token, not both",
        metavar="PATH",
    )
    cache_tls_ca: str = setting(
        "",
        "PEM CA certificate of the cache servers: talk to them over TLS",
        metavar="PATH",
    )
    cache_insecure: bool = setting(
        False,
        "talk to the cache servers in plaintext; with --cache-targets, exactly one of "
        "--cache-tls-ca and --cache-insecure",
    )
    cache_timeout_s: float = setting(
        5.0, "deadline of each short cache call (lookup, append, delete)"
    )
    cache_stream_timeout_s: float = setting(
        300.0,
        "deadline of a prefill's streamed put and of a history's prefetch, which last as "
        "long as the prefill computes; a longer prefill is not stored (the turn still answers)",
    )
    # Defaults of requests that leave them unset.
    residency: str = setting(
        "local",
        "residency of turns that do not choose: local (the worker holds the turn's KV, each "
        "step's KV is appended to the cache service) or remote (every decode step reads "
        "the whole history back from the cache service)",
        metavar="{local,remote}",
    )
    kv_dtype: str = setting(
        "",
        "dtype the KV travels and is stored in: float32, float16 or bfloat16; empty: the "
        "model's, so policy none is lossless",
        metavar="DTYPE",
    )
    default_policy: str = setting(
        "",
        "compression policy of turns that send none: a preset name or a policy JSON file; "
        "empty: the cache server's default",
        metavar="POLICY",
    )
    # Security of the worker's own endpoint: as the cache server, it starts without
    # TLS or without tokens only with insecure.
    tls_cert: str = setting(
        "",
        "PEM certificate (chain) of the worker's endpoint; with --tls-key it speaks TLS",
        metavar="PATH",
    )
    tls_key: str = setting("", "PEM private key of --tls-cert", metavar="PATH")
    tokens_file: str = setting(
        "",
        "bearer tokens of the worker's callers, one line '<token> <tenant>' each ('#' "
        "starts a comment; tokens of at least 16 characters)",
        metavar="PATH",
    )
    tokens: str = setting(
        "",
        "more bearer tokens of callers, '<token>=<tenant>,...' (prefer --tokens-file: env "
        "and arguments are visible to ps)",
        metavar="TOKEN=TENANT,...",
        secret=True,
    )
    insecure: bool = setting(
        False,
        "start without TLS or without tokens on the worker's own endpoint; when off, the "
        "worker refuses to start unless --tls-cert, --tls-key and tokens are all set",
    )
    # Requests.
    max_new_tokens_limit: int = setting(
        MAX_NEW_TOKENS_CEILING,
        f"most tokens a turn may ask to generate (1 to {MAX_NEW_TOKENS_CEILING})",
    )
    max_queue: int = setting(
        8, "turns that may wait behind the running one; more get RESOURCE_EXHAUSTED"
    )
    # Process.
    grace_s: float = setting(
        30.0,
        "on SIGTERM or SIGINT, how long the running turn may take to finish (health turns "
        "NOT_SERVING and waiting turns are refused at once)",
    )
    log_level: str = setting(
        "INFO", "least severe log level written: DEBUG, INFO, WARNING or ERROR", metavar="LEVEL"
    )
    log_format: str = setting(
        "json",
        "log lines on stderr as json (one object a line) or text",
        metavar="{json,text}",
    )

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
                not self.cache_targets.strip() or bool(self.cache_tls_ca) != self.cache_insecure,
                "cache_insecure",
                "1 when cache_tls_ca is empty (plaintext to the cache servers), 0 otherwise",
            ),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise SettingsError(f"{env_name(name)} ({flag_name(name)}): must be {expected}")
        check_log_level(self.log_level, env_name)
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
        try:
            parse_cache_targets(self.cache_targets)
        except ValueError as exc:
            raise SettingsError(
                f"{env_name('cache_targets')} ({flag_name('cache_targets')}): {exc}"
            ) from None
        self.cache_client_configs()  # a bad target stops start-up, not the first turn

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

    @property
    def cache_target_list(self) -> tuple[str, ...]:
        """The cache servers' targets, in the order given (empty: no cache service)."""
        return parse_cache_targets(self.cache_targets)

    def cache_client_configs(self) -> tuple[ClientConfig, ...]:
        """One client configuration per cache server, each with the same TLS CA, token
        and deadline; empty without cache targets."""
        targets = self.cache_target_list
        if not targets:
            return ()
        token = self.cache_token
        if self.cache_token_file:
            token = Path(self.cache_token_file).read_text().strip()
        try:
            return tuple(
                ClientConfig(
                    target,
                    token=token,
                    tls_ca=self.cache_tls_ca,
                    insecure=self.cache_insecure,
                    timeout_s=self.cache_timeout_s,
                )
                for target in targets
            )
        except ValueError as exc:
            raise SettingsError(f"{env_name('cache_targets')} and related: {exc}") from None


def parse_cache_targets(text: str) -> tuple[str, ...]:
    """The targets of a comma-separated "host:port,..." list (spaces around an entry
    ignored); "" is none. ValueError for an empty entry, a duplicate, or an entry that
    is not host:port with a port in 1..65535."""
    if not text.strip():
        return ()
    targets = tuple(entry.strip() for entry in text.split(","))
    for target in targets:
        if not target:
            raise ValueError(
                f"an empty entry in {text!r}: give host:port entries separated by commas"
            )
        host, sep, port = target.rpartition(":")
        if (
            not sep
            or not host.strip("[]")
            or not (port.isascii() and port.isdigit())
            or not 1 <= int(port) <= 65535
        ):
            raise ValueError(f"{target!r} must be host:port with a port in 1..65535")
    duplicates = sorted({target for target in targets if targets.count(target) > 1})
    if duplicates:
        raise ValueError(f"each server once: {', '.join(duplicates)} appears more than once")
    return targets


def settings_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """One flag per setting (default None: unset flags fall back to the env var), and
    `--print-config`."""
    parser = parser or argparse.ArgumentParser(prog="minicache-worker serve")
    return add_setting_flags(parser, WorkerSettings, env_name)


def settings_from(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> WorkerSettings:
    """Settings from parsed flags over env vars (`environ`, default os.environ)."""
    environ = os.environ if environ is None else environ
    if RETIRED_CACHE_TARGET in environ:
        # Ignoring it would start a worker without its cache service, silently.
        raise SettingsError(
            f"{RETIRED_CACHE_TARGET} was replaced by {env_name('cache_targets')}, a "
            "comma-separated list of host:port (one entry for one server): rename it"
        )
    return WorkerSettings(**setting_values(WorkerSettings, args, environ, env_name))


def load_worker_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> WorkerSettings:
    """Settings from flags (`argv`) over env vars (`environ`, default os.environ)."""
    return settings_from(settings_parser().parse_args(argv), environ)
