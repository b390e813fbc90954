"""The cache server's settings: one object, read from flags and MINICACHE_* env vars.

A flag wins over its env var, which wins over the default. A missing or bad value stops
start-up with the variable's name in the message (`SettingsError`). The readers and
parsers are the ones the worker's settings use too (`minicache_client.serving.settings`).
"""

from __future__ import annotations

import argparse
import os
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from minicache_client.policy import load_policy
from minicache_client.serving.auth import load_token_tenants
from minicache_client.serving.settings import (
    SettingsError,
    add_setting_flags,
    check_log_level,
    flag_name,
    setting,
    setting_values,
)
from minicache_server.tiers.chain import check_tier_order
from minicache_server.tiers.redis_tier import check_key_prefix, parse_cluster_url

DESCRIPTION = (
    "The MiniCache cache server: stores the KV cache of inference sessions, compressed, in "
    "a chain of tiers (device memory under a byte budget, then a local disk and Redis), "
    "behind gRPC. Every flag also reads the env var MINICACHE_<NAME> (shown with each flag); a flag wins over its "
    "env var, which wins over the default. A bad value stops start-up naming its variable "
    "(exit status 2)."
)
EXAMPLES = """examples:
  MINICACHE_INSECURE=1 minicache-server --device-budget-bytes 2GiB \\
      --redis-url redis://127.0.0.1:6379/0
  minicache-server --tls-cert server.crt --tls-key server.key --tokens-file tokens
  MINICACHE_TOKENS_FILE=tokens minicache-server --insecure --print-config
"""


@dataclass(frozen=True)
class ServerSettings:
    """Every setting, with its env var `MINICACHE_<NAME>` and flag `--<name>`; each
    field's help is what `minicache-server --help` prints for it."""

    # Endpoints.
    listen: str = setting(
        "127.0.0.1:50051",
        "address the gRPC cache service binds, host:port (port 0 picks a free one)",
        metavar="HOST:PORT",
    )
    metrics_listen: str = setting(
        "127.0.0.1:9464",
        "address of the Prometheus endpoint (GET /metrics), host:port; empty: no metrics",
        metavar="HOST:PORT",
    )
    health_listen: str = setting(
        "",
        "plaintext address that serves grpc.health.v1 and nothing else, for probes that "
        "cannot speak TLS (Kubernetes' native gRPC probe); empty: none",
        metavar="HOST:PORT",
    )
    # Security. Without TLS or without tokens the server only starts with insecure.
    tls_cert: str = setting(
        "",
        "PEM certificate (chain) of the server; with --tls-key the service speaks TLS",
        metavar="PATH",
    )
    tls_key: str = setting("", "PEM private key of --tls-cert", metavar="PATH")
    tls_client_ca: str = setting(
        "",
        "PEM CA certificate: when set, every client must present a certificate it signed "
        "(mutual TLS); needs --tls-cert",
        metavar="PATH",
    )
    tokens_file: str = setting(
        "",
        "bearer tokens of the tenants, one line '<token> <tenant>' each ('#' starts a "
        "comment; tokens of at least 16 characters)",
        metavar="PATH",
    )
    tokens: str = setting(
        "",
        "more bearer tokens, '<token>=<tenant>,...' (prefer --tokens-file: env and "
        "arguments are visible to ps)",
        metavar="TOKEN=TENANT,...",
        secret=True,
    )
    insecure: bool = setting(
        False,
        "start without TLS or without tokens (plaintext, or no bearer tokens); when off, "
        "the server refuses to start unless --tls-cert, --tls-key and tokens are all set",
    )
    # Device tier.
    device: str = setting(
        "auto",
        "memory of the device tier: auto (a CUDA GPU through CuPy when there is one, else "
        "host memory), cpu or cuda",
        metavar="{auto,cpu,cuda}",
    )
    device_budget_bytes: int = setting(
        1 << 30,
        "stored bytes the device tier holds; beyond it the least recently used entries "
        "move to the next tier (without one, writes that need room are refused)",
    )
    # The tier chain.
    tiers: str = setting(
        "",
        "the storage tiers in order, comma-separated: device, device,disk, device,redis or "
        "device,disk,redis; a full tier moves its least recently used entries to the next, "
        "reads move them back to the device; empty: device, then redis when --redis-url "
        "is set",
        metavar="TIER,...",
    )
    disk_dir: str = setting(
        "",
        "directory of the disk tier (a file per entry; created if missing); a server "
        "restarted with the same directory serves the sequences it still holds",
        metavar="PATH",
    )
    disk_budget_bytes: int = setting(
        16 << 30, "stored bytes the disk tier holds; beyond it entries move to the next tier"
    )
    # Overflow tier: empty redis_url means no overflow (a full budget then refuses writes).
    redis_url: str = setting(
        "",
        "Redis of the overflow tier, redis://host:port/db (rediss:// for TLS); with "
        "--redis-mode cluster, the startup nodes of a Redis Cluster, "
        "redis://host:port,host:port,... (no db; any node that answers finds the rest); "
        "empty: no overflow, a full device budget refuses writes",
        metavar="URL",
    )
    redis_mode: str = setting(
        "single",
        "what --redis-url names: single (one Redis) or cluster (a Redis Cluster; keys "
        "carry their sequence as hash tag, <prefix>:{<tenant>:<model>:<sequence>}:..., so "
        "a sequence's entries and manifest share a slot; while a master is down the "
        "sequences in its slots are misses, or UNAVAILABLE for writes, until a replica "
        "takes over or it returns)",
        metavar="{single,cluster}",
    )
    redis_username: str = setting("", "Redis ACL user; empty: the default user", metavar="USER")
    redis_password: str = setting(
        "",
        "Redis password (prefer --redis-password-file: env and arguments are visible to ps)",
        metavar="PASSWORD",
        secret=True,
    )
    redis_password_file: str = setting(
        "",
        "file holding the Redis password (surrounding whitespace stripped); wins over "
        "--redis-password",
        metavar="PATH",
    )
    redis_tls_ca: str = setting(
        "",
        "PEM CA certificate that Redis's TLS certificate must chain to (rediss:// URLs)",
        metavar="PATH",
    )
    redis_pool_size: int = setting(16, "Redis connections kept open, at most")
    redis_timeout_s: float = setting(2.0, "deadline of each Redis connection attempt and command")
    redis_ttl_s: int = setting(
        0, "how long an overflowed entry lives in Redis; 0: no expiry", metavar="SECONDS"
    )
    redis_key_prefix: str = setting(
        "minicache",
        "prefix of every Redis key this server writes, without '{' or '}'; servers that "
        "share a Redis (or Redis Cluster) each need their own",
        metavar="PREFIX",
    )
    # Requests.
    artifact_dir: str = setting(
        "",
        "directory of the calibration artifacts of transform policies, files "
        "<sha256>.mcta (verified when first used); searched before MINICACHE_ARTIFACT_DIRS "
        "and the SDK's bundled artifacts. A put whose policy names an artifact the server "
        "lacks is refused; clients fetch artifacts by hash (GetArtifact); empty: only the "
        "bundled ones, ~/.cache/minicache/artifacts and MINICACHE_ARTIFACT_DIRS",
        metavar="PATH",
    )
    default_policy: str = setting(
        "default",
        "compression policy of puts that name none: a preset name or a policy JSON file",
        metavar="POLICY",
    )
    max_chunk_bytes: int = setting(
        1 << 20, "largest chunk of KV bytes in one message of a streamed put or prefetch"
    )
    max_message_bytes: int = setting(
        4 << 20,
        "largest gRPC message received or sent; at least --max-chunk-bytes + 64 KiB",
    )
    stream_window_bytes: int = setting(
        1 << 20,
        "HTTP/2 flow-control window of each call: the most bytes of a streamed put that "
        "gRPC takes in before the server reads them, so a server's memory does not follow "
        "how many puts are in flight; 0: gRPC's adaptive window (BDP probing), which grows "
        "to megabytes per call under load",
    )
    max_tokens: int = setting(1 << 17, "most tokens one sequence may hold")
    max_layers: int = setting(256, "most layers one sequence may have")
    tenant_quota_bytes: int = setting(
        0, "stored bytes each tenant may hold in both tiers together; 0: no quota"
    )
    # Process.
    grace_s: float = setting(
        10.0,
        "on SIGTERM or SIGINT, how long calls in flight may take to finish, then how long "
        "writing the device tier down to the tier below it may take, before the process "
        "exits (health turns NOT_SERVING at once)",
    )
    work_threads: int = setting(
        0,
        "threads that encode, restore and decode entries beside the event loop, at most "
        "this many at once: each holds tens of MiB while it works, and more threads than "
        "CPUs add memory, not speed; 0: one per CPU this process may run on",
    )
    memory_trim_s: float = setting(
        1.0,
        "every this many seconds, the free pages of malloc's heaps go back to the system "
        "(glibc's malloc_trim), so that the resident size follows what the server uses; "
        "0: never",
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
            (self.device in ("auto", "cpu", "cuda"), "device", "auto, cpu or cuda"),
            (self.device_budget_bytes > 0, "device_budget_bytes", "> 0"),
            (self.disk_budget_bytes > 0, "disk_budget_bytes", "> 0"),
            (self.redis_mode in ("single", "cluster"), "redis_mode", "single or cluster"),
            (self.redis_pool_size >= 1, "redis_pool_size", ">= 1"),
            (self.redis_timeout_s > 0, "redis_timeout_s", "> 0"),
            (self.redis_ttl_s >= 0, "redis_ttl_s", ">= 0"),
            (self.max_chunk_bytes >= 1024, "max_chunk_bytes", ">= 1024"),
            (
                self.max_message_bytes >= self.max_chunk_bytes + 65536,
                "max_message_bytes",
                "at least max_chunk_bytes + 64 KiB",
            ),
            (self.stream_window_bytes >= 0, "stream_window_bytes", ">= 0"),
            (self.max_tokens >= 1, "max_tokens", ">= 1"),
            (self.max_layers >= 1, "max_layers", ">= 1"),
            (self.tenant_quota_bytes >= 0, "tenant_quota_bytes", ">= 0"),
            (self.grace_s >= 0, "grace_s", ">= 0"),
            (self.work_threads >= 0, "work_threads", ">= 0"),
            (self.memory_trim_s >= 0, "memory_trim_s", ">= 0"),
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
        check_log_level(self.log_level, env_name)
        self._check_tiers()
        self._check_redis()
        files = ("tls_cert", "tls_key", "tls_client_ca", "tokens_file", "redis_tls_ca")
        for name in (*files, "redis_password_file"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise SettingsError(f"{env_name(name)}: no such file {path!r}")
        if self.artifact_dir and not Path(self.artifact_dir).is_dir():
            raise SettingsError(
                f"{env_name('artifact_dir')}: no such directory {self.artifact_dir!r}"
            )
        try:  # a bad default policy stops start-up, not the first put
            load_policy(self.default_policy)
        except ValueError as exc:
            raise SettingsError(f"{env_name('default_policy')}: {exc}") from None

    def _check_tiers(self) -> None:
        names = self.tier_names()
        try:
            check_tier_order(names)
        except ValueError as exc:
            raise SettingsError(f"{env_name('tiers')} ({flag_name('tiers')}): {exc}") from None
        for tier, field in (("disk", "disk_dir"), ("redis", "redis_url")):
            if (tier in names) != bool(getattr(self, field)):
                state = "names" if tier in names else "does not name"
                raise SettingsError(
                    f"{env_name('tiers')} {state} {tier}: set {env_name(field)} "
                    f"({flag_name(field)}) exactly when the {tier} tier is in the chain"
                )

    def _check_redis(self) -> None:
        try:
            check_key_prefix(self.redis_key_prefix)
        except ValueError as exc:
            raise SettingsError(f"{env_name('redis_key_prefix')}: {exc}") from None
        if self.redis_cluster:
            if not self.redis_url:
                raise SettingsError(
                    f"{env_name('redis_mode')} is cluster: set {env_name('redis_url')} to the "
                    "cluster's startup nodes, redis://host:port,host:port,..."
                )
            try:
                parse_cluster_url(self.redis_url)
            except ValueError as exc:
                raise SettingsError(f"{env_name('redis_url')}: {exc}") from None
        elif "," in self.redis_url.rpartition("@")[2]:
            raise SettingsError(
                f"{env_name('redis_url')} lists several nodes: set {env_name('redis_mode')}"
                "=cluster for a Redis Cluster (a single Redis has one address)"
            )

    @property
    def redis_cluster(self) -> bool:
        """The overflow Redis is a Redis Cluster (`redis_mode` cluster)."""
        return self.redis_mode == "cluster"

    def tier_names(self) -> list[str]:
        """The tier chain in order (the default: device, then redis with a Redis URL)."""
        if not self.tiers.strip():
            return ["device", "redis"] if self.redis_url else ["device"]
        return [name.strip() for name in self.tiers.split(",")]

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


def build_parser() -> argparse.ArgumentParser:
    """`minicache-server`'s flags: one per setting, and `--print-config`."""
    parser = argparse.ArgumentParser(
        prog="minicache-server",
        description=textwrap.fill(DESCRIPTION, 80),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return add_setting_flags(parser, ServerSettings, env_name)


def settings_from(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> ServerSettings:
    """Settings from parsed flags over env vars (`environ`, default os.environ)."""
    environ = os.environ if environ is None else environ
    return ServerSettings(**setting_values(ServerSettings, args, environ, env_name))


def load_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> ServerSettings:
    """Settings from flags (`argv`) over env vars (`environ`, default os.environ)."""
    return settings_from(build_parser().parse_args(argv), environ)
