"""Assembles a running cache server from `ServerSettings`.

`start_server(settings)` binds the gRPC port (port 0 picks a free one: tests use it),
adds the library's health service and reflection, the auth interceptor, TLS when
configured, and the metrics HTTP endpoint. It first adds the artifact directory
(`MINICACHE_ARTIFACT_DIR`) to the process's registry of calibration artifacts
(`minicache_server.artifacts`; taken away again at stop), and stops with SettingsError
when the default policy's artifact is missing or corrupt. `CacheServer.stop()` drains gracefully:
health turns NOT_SERVING first, in-flight calls get `grace_s` to finish; then what
lives only on the device tier is written down to the persistent tier below it (disk or
Redis), within another `grace_s`, so that the next start recovers it
(`store/write_down.py`); then the tiers close. A crash (`kill -9`) writes nothing
down: the device's content is lost with the process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from wsgiref.simple_server import WSGIServer

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from minicache_client.errors import CacheError, clipped
from minicache_client.policy import CompressionPolicy, load_policy
from minicache_client.serving.auth import AuthInterceptor, TokenAuth
from minicache_client.serving.metrics import serve_metrics
from minicache_client.serving.settings import SettingsError, split_address
from minicache_client.serving.tls import server_credentials
from minicache_server import artifacts
from minicache_server.metrics import CacheMetrics
from minicache_server.service.servicer import SERVICE, add_cache_service
from minicache_server.settings import ServerSettings
from minicache_server.store import Limits, SequenceStore
from minicache_server.tiers.base import StorageTier
from minicache_server.tiers.chain import TierChain
from minicache_server.tiers.device_tier import DeviceTier
from minicache_server.tiers.disk_tier import DiskTier
from minicache_server.tiers.redis_tier import RedisTier

log = logging.getLogger(__name__)

SERVICE_NAME = SERVICE.full_name


def array_module(device: str) -> ModuleType:
    """NumPy, or CuPy when a CUDA device is wanted (`cuda`) or present (`auto`)."""
    if device == "cpu":
        return np
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception as exc:  # no CuPy, no driver, no device: all mean "no GPU"
        if device == "cuda":
            raise SettingsError(
                f"MINICACHE_DEVICE=cuda but no CUDA device is usable: {exc}"
            ) from None
    if device == "cuda":
        raise SettingsError("MINICACHE_DEVICE=cuda but no CUDA device is present")
    return np


@dataclass
class CacheServer:
    server: grpc.aio.Server
    port: int
    store: SequenceStore
    health: health.aio.HealthServicer
    metrics: CacheMetrics
    metrics_http: WSGIServer | None  # prometheus-client's server; None: metrics off
    settings: ServerSettings
    health_server: grpc.aio.Server | None = None
    health_port: int | None = None
    # The artifact directory this server added to the process's registry.
    artifact_dir: Path | None = None

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_http.server_port if self.metrics_http else None

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain, write the device down, close (see the module docstring). `grace_s`
        (default `settings.grace_s`) bounds the drain and, after it, the write-down."""
        grace = self.settings.grace_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self.write_down(grace)
        if self.health_server is not None:  # probes see NOT_SERVING until the drain ends
            await self.health_server.stop(0)
        if self.metrics_http is not None:
            self.metrics_http.shutdown()
            self.metrics_http.server_close()
        await self.store.close()
        artifacts.forget_directory(self.artifact_dir)

    async def write_down(self, time_limit_s: float) -> None:
        """What lives only on the device, to the persistent tier below it
        (`store/write_down.py`); logged, never raising."""
        if not self.store.chain.lower:
            return  # no persistent tier: the device's content ends with the process
        try:
            report = await self.store.write_down(time_limit_s)
        except Exception as exc:  # the stop goes on whatever happened
            log.warning("device tier not written down", extra={"error": clipped(str(exc), 300)})
            return
        log.info(
            "device tier written down",
            extra={
                "tier": report.target,
                "sequences": report.sequences,
                "entries": report.entries,
                "bytes": report.bytes,
                "seconds": report.seconds,
            },
        )
        if report.lost_sequences:
            log.warning(
                "device entries not written down: these sequences are lost at the restart",
                extra={
                    "sequences": report.lost_sequences,
                    "bytes": report.lost_bytes,
                    "reasons": report.reasons_line(),
                },
            )


async def build_tiers(settings: ServerSettings) -> list[StorageTier]:
    """The tier chain's tiers in the configured order (`ServerSettings.tier_names`)."""
    tiers: list[StorageTier] = []
    for name in settings.tier_names():
        if name == "device":
            tiers.append(DeviceTier(settings.device_budget_bytes, array_module(settings.device)))
        elif name == "disk":
            try:
                tiers.append(DiskTier(settings.disk_dir, settings.disk_budget_bytes))
            except OSError as exc:
                raise SettingsError(
                    f"MINICACHE_DISK_DIR: cannot use {settings.disk_dir!r}: {exc}"
                ) from None
        else:
            redis_tier = RedisTier(
                settings.redis_url,
                cluster=settings.redis_cluster,
                username=settings.redis_username,
                password=settings.redis_password_value(),
                tls_ca=settings.redis_tls_ca,
                pool_size=settings.redis_pool_size,
                timeout_s=settings.redis_timeout_s,
                ttl_s=settings.redis_ttl_s,
                key_prefix=settings.redis_key_prefix,
            )
            kind = "Redis Cluster" if settings.redis_cluster else "Redis"
            where = {"redis": redis_tier.startup_nodes, "key_prefix": settings.redis_key_prefix}
            if await redis_tier.ping():
                log.info("%s tier answers", kind, extra=where)
            else:
                log.warning(
                    "%s does not answer yet; the tiers above it serve meanwhile", kind, extra=where
                )
            tiers.append(redis_tier)
    return tiers


def default_policy_of(settings: ServerSettings) -> CompressionPolicy:
    """The default policy; a transform policy whose artifact the server lacks or holds
    corrupt stops start-up (SettingsError), not the first put."""
    # ServerSettings refused a bad default policy already, naming its variable.
    policy = load_policy(settings.default_policy)
    if policy.transform is not None:
        try:
            artifacts.require(policy.transform.artifact)
        except CacheError as exc:
            raise SettingsError(f"MINICACHE_DEFAULT_POLICY: {exc}") from None
    return policy


async def start_server(settings: ServerSettings) -> CacheServer:
    """Build, bind and start a cache server (inside a running asyncio loop)."""
    artifact_dir = artifacts.use_directory(settings.artifact_dir)
    try:
        return await _start_server(settings, artifact_dir)
    except BaseException:
        artifacts.forget_directory(artifact_dir)
        raise


def grpc_options(settings: ServerSettings) -> list[tuple[str, int]]:
    """The cache service's gRPC server options: message limits, no port sharing, and
    the flow-control window of each call (`stream_window_bytes`).

    gRPC's adaptive window (BDP probing) grows each call's window to megabytes when the
    connection is fast, as loopback and a cluster network are: every streamed put then
    has that much of its KV taken in ahead of the server reading it, and a server's
    resident memory rises and falls with the puts in flight (docs/results.md,
    "Capacity and load": the soak before and after)."""
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    if settings.stream_window_bytes:
        options += [
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", settings.stream_window_bytes),
        ]
    return options


async def _start_server(settings: ServerSettings, artifact_dir: Path | None) -> CacheServer:
    default_policy = default_policy_of(settings)
    metrics = CacheMetrics()
    chain = TierChain(await build_tiers(settings), metrics)
    limits = Limits(
        max_chunk_bytes=settings.max_chunk_bytes,
        max_tokens=settings.max_tokens,
        max_layers=settings.max_layers,
        tenant_quota_bytes=settings.tenant_quota_bytes,
    )
    store = SequenceStore(chain, metrics, limits, default_policy)
    if chain.persistent:
        report = await store.recover()
        log.info("recovered what the persistent tiers hold", extra=report.__dict__)
    auth = TokenAuth(settings.token_tenants())
    server = grpc.aio.server(interceptors=[AuthInterceptor(auth)], options=grpc_options(settings))
    add_cache_service(server, store, auth, metrics)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    credentials = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    if credentials is None:
        port = server.add_insecure_port(settings.listen)
    else:
        port = server.add_secure_port(settings.listen, credentials)
    if port == 0:
        raise SettingsError(f"MINICACHE_LISTEN: cannot bind {settings.listen}")
    health_server, health_port = None, None
    if settings.health_listen:
        health_server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        health_port = health_server.add_insecure_port(settings.health_listen)
        if health_port == 0:
            raise SettingsError(f"MINICACHE_HEALTH_LISTEN: cannot bind {settings.health_listen}")
        await health_server.start()
    metrics_http = None
    if settings.metrics_listen:
        host, metrics_port = split_address(settings.metrics_listen)
        metrics_http = serve_metrics(metrics, host, metrics_port)
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if settings.insecure and (credentials is None or not auth.required):
        missing = [what for what, ok in (("TLS", credentials), ("tokens", auth.required)) if not ok]
        log.warning(
            "INSECURE MODE: %s off; anyone who reaches port %d can read and write the cache. "
            "For local development only.",
            " and ".join(missing),
            port,
        )
    log.info(
        "cache server listening",
        extra={
            "port": port,
            "tls": credentials is not None,
            "mutual_tls": bool(settings.tls_client_ca),
            "tenants": len(set(auth.token_tenants.values())),
            "tiers": ",".join(tier.name for tier in chain.tiers),
            "device_budget_bytes": chain.device.budget_bytes,
            "metrics_port": metrics_http.server_port if metrics_http else None,
            "health_port": health_port,
        },
    )
    return CacheServer(
        server,
        port,
        store,
        health_servicer,
        metrics,
        metrics_http,
        settings,
        health_server,
        health_port,
        artifact_dir,
    )
