"""How a client reaches one cache server: `ClientConfig` and the gRPC channels built from it.

Every channel declares its retries in the service config (UNAVAILABLE only, at most 4
attempts with exponential backoff, all within the call's deadline; every method but the
client-streamed Put, see `RETRIED_METHODS`) rather than in Python loops, caps message
sizes, and sends keepalive pings during long calls. Plaintext is allowed only when asked
for (`insecure=True`); otherwise `tls_ca` makes the channel TLS
(mutual TLS with a client certificate and key). The bearer token travels as call
credentials over TLS, or as per-call metadata (`call_metadata`) over plaintext, where
gRPC refuses call credentials.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import grpc

from minicache_client.proto import cache_service_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["CacheService"]
SERVICE_NAME = SERVICE.full_name

RETRY_POLICY = {
    "maxAttempts": 4,
    "initialBackoff": "0.05s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
# Every method but the client-streamed ones (Put). gRPC replays a retried call's
# messages from a bounded buffer; a Put refused UNAVAILABLE while its layers still stream
# (the server's staging is full) was replayed without its header, and grpcio 1.85 then
# aborted the client process (SIGABRT, "ILLEGAL STATE: FORWARDED_BATCH"). A refused Put
# surfaces as `UnavailableError`: the caller writes it again, or goes on without the cache.
RETRIED_METHODS = tuple(method.name for method in SERVICE.methods if not method.client_streaming)
SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": SERVICE_NAME, "method": name} for name in RETRIED_METHODS],
                "retryPolicy": RETRY_POLICY,
            }
        ]
    }
)

# A ping after 60 s without traffic during a call, dropped after 20 s unanswered. No
# pings on an idle channel: servers reject frequent pings without calls (GOAWAY).
KEEPALIVE_OPTIONS = (
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
)

# Room for the fields around a LayerChunk's keys and values in one message.
MESSAGE_OVERHEAD_BYTES = 4096


def _is_host_port(target: str) -> bool:
    host, sep, port = target.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def _has_scheme(target: str) -> bool:
    # gRPC name-resolver targets: dns:///host:port, unix:/path, ipv4:..., ipv6:...
    return "://" in target or target.startswith(("unix:", "unix-abstract:", "ipv4:", "ipv6:"))


@dataclass(frozen=True)
class ClientConfig:
    """Settings of a client of one cache server.

    target: "host:port" (or a gRPC target such as "dns:///host:port").
    token: bearer token, sent as `authorization: Bearer <token>`; empty sends none.
    tls_ca: PEM file of the CA that signed the server's certificate; set means TLS.
    tls_client_cert, tls_client_key: PEM files of a client certificate (mutual TLS).
    tls_server_name: the name to check the server's certificate against, instead of
        the target's host.
    insecure: allow plaintext; required when `tls_ca` is empty.
    timeout_s: deadline of every call, retries included.
    max_chunk_bytes: keys + values bytes of one streamed layer chunk.
    max_message_bytes: largest message sent or received.
    """

    target: str
    token: str = ""
    tls_ca: str = ""
    tls_client_cert: str = ""
    tls_client_key: str = ""
    tls_server_name: str = ""
    insecure: bool = False
    timeout_s: float = 10.0
    max_chunk_bytes: int = 1 << 20
    max_message_bytes: int = 8 << 20

    def __post_init__(self) -> None:
        if not isinstance(self.target, str) or not self.target.strip():
            raise ValueError("target must be 'host:port', got an empty value")
        if any(c.isspace() for c in self.target):
            raise ValueError(f"target must not contain whitespace, got {self.target!r}")
        if not _has_scheme(self.target) and not _is_host_port(self.target):
            raise ValueError(
                f"target must be 'host:port' with a port in 1..65535, got {self.target!r}"
            )
        if not isinstance(self.token, str) or any(
            c.isspace() or not c.isprintable() for c in self.token
        ):
            raise ValueError("token must be printable text without whitespace")
        if self.tls_ca and self.insecure:
            raise ValueError("tls_ca and insecure=True contradict each other: choose one")
        if not self.tls_ca and not self.insecure:
            raise ValueError(
                "tls_ca is empty: set tls_ca to the CA certificate's PEM file for TLS, or "
                "insecure=True to allow plaintext"
            )
        for field in ("tls_ca", "tls_client_cert", "tls_client_key"):
            path = getattr(self, field)
            if path and not os.path.isfile(path):
                raise ValueError(f"{field}: no such file {path!r}")
        if bool(self.tls_client_cert) != bool(self.tls_client_key):
            raise ValueError(
                "tls_client_cert and tls_client_key go together: set both for mutual TLS, "
                "or neither"
            )
        for field in ("tls_client_cert", "tls_client_key", "tls_server_name"):
            if getattr(self, field) and not self.tls_ca:
                raise ValueError(f"{field} needs TLS: set tls_ca as well")
        if (
            isinstance(self.timeout_s, bool)
            or not isinstance(self.timeout_s, (int, float))
            or not math.isfinite(self.timeout_s)
            or self.timeout_s <= 0
        ):
            raise ValueError(
                f"timeout_s must be a positive number of seconds, got {self.timeout_s!r}"
            )
        for field in ("max_chunk_bytes", "max_message_bytes"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{field} must be a positive integer, got {value!r}")
        if self.max_chunk_bytes + MESSAGE_OVERHEAD_BYTES > self.max_message_bytes:
            raise ValueError(
                f"max_message_bytes ({self.max_message_bytes}) must exceed max_chunk_bytes "
                f"({self.max_chunk_bytes}) by at least {MESSAGE_OVERHEAD_BYTES} bytes"
            )

    @property
    def secure(self) -> bool:
        return bool(self.tls_ca)


def channel_options(config: ClientConfig) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", SERVICE_CONFIG),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        *KEEPALIVE_OPTIONS,
    ]
    if config.tls_server_name:
        options.append(("grpc.ssl_target_name_override", config.tls_server_name))
    return options


def _read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def channel_credentials(config: ClientConfig) -> grpc.ChannelCredentials:
    """TLS credentials of a secure config, with the token as call credentials."""
    if not config.secure:
        raise ValueError("channel_credentials needs tls_ca (the config is plaintext)")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(config.tls_ca),
        private_key=_read(config.tls_client_key) if config.tls_client_key else None,
        certificate_chain=_read(config.tls_client_cert) if config.tls_client_cert else None,
    )
    if config.token:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(config.token)
        )
    return credentials


def call_metadata(config: ClientConfig) -> tuple[tuple[str, str], ...] | None:
    """Metadata every call passes: the bearer token on a plaintext channel (over TLS
    the channel's call credentials carry it)."""
    if config.token and not config.secure:
        return (("authorization", f"Bearer {config.token}"),)
    return None


def create_channel(config: ClientConfig) -> grpc.Channel:
    """A sync channel to `config.target`; the caller closes it."""
    options = channel_options(config)
    if config.secure:
        return grpc.secure_channel(config.target, channel_credentials(config), options)
    return grpc.insecure_channel(config.target, options)


def create_aio_channel(config: ClientConfig) -> grpc.aio.Channel:
    """An asyncio channel to `config.target`; create it inside the event loop that
    uses it, and close it there (`await channel.close()`)."""
    options = channel_options(config)
    if config.secure:
        return grpc.aio.secure_channel(config.target, channel_credentials(config), options)
    return grpc.aio.insecure_channel(config.target, options)


class ChannelClient:
    """What every synchronous client owns: its config, one channel, the call metadata;
    closed by `close()` or as a context manager."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self._channel = create_channel(config)
        self._metadata = call_metadata(config)

    @property
    def target(self) -> str:
        return self.config.target

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):  # the subclass's type
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
