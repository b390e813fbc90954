"""Bearer tokens mapped to tenants, and the interceptors that check them.

Every call but health carries `authorization: Bearer <token>`. An interceptor rejects
unknown or missing tokens with UNAUTHENTICATED before a handler runs: `AuthInterceptor`
on an asyncio server (the cache server), `SyncAuthInterceptor` on a threaded one (the
worker). A servicer asks `TokenAuth.tenant_of` for the caller's tenant, inside which all
its sequence ids live. Health answers without a token (Kubernetes' gRPC probe cannot
send one). Without tokens (insecure mode) every caller is the tenant `default`.

`load_token_tenants` reads the token settings both services share: a file of lines
`<token> <tenant>` and an env var `<token>=<tenant>,...`.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping
from pathlib import Path

import grpc

from minicache_client.serving.rpc_methods import HANDLER_FACTORIES
from minicache_client.serving.settings import SettingsError

PUBLIC_PREFIX = "/grpc.health.v1.Health/"
OPEN_TENANT = "default"
MIN_TOKEN_CHARS = 16
UNAUTHENTICATED_MESSAGE = (
    "missing or unknown bearer token (metadata 'authorization: Bearer <token>')"
)


def load_token_tenants(
    tokens_file: str, tokens: str, env_name: Callable[[str], str]
) -> dict[str, str]:
    """Bearer token -> tenant, from the file and the env var's value; errors name the
    service's variables (`env_name("tokens")`, `env_name("tokens_file")`)."""
    pairs: list[tuple[str, str, str]] = []
    if tokens_file:
        for number, line in enumerate(Path(tokens_file).read_text().splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if line:
                parts = line.split()
                if len(parts) != 2:
                    raise SettingsError(
                        f"{env_name('tokens_file')}: line {number} must be '<token> <tenant>'"
                    )
                pairs.append((parts[0], parts[1], f"line {number}"))
    for item in filter(None, (part.strip() for part in tokens.split(","))):
        token, sep, tenant = item.partition("=")
        if not sep or not token or not tenant:
            raise SettingsError(f"{env_name('tokens')}: entries must be '<token>=<tenant>'")
        pairs.append((token, tenant, "env"))
    mapping: dict[str, str] = {}
    for token, tenant, where in pairs:
        if len(token) < MIN_TOKEN_CHARS:
            raise SettingsError(
                f"{env_name('tokens')}/{env_name('tokens_file')} ({where}): tokens must "
                f"have at least {MIN_TOKEN_CHARS} characters"
            )
        if mapping.get(token, tenant) != tenant:
            raise SettingsError(f"token of {where} is mapped to two tenants")
        mapping[token] = tenant
    return mapping


class TokenAuth:
    def __init__(self, token_tenants: Mapping[str, str]) -> None:
        self.token_tenants = dict(token_tenants)

    @property
    def required(self) -> bool:
        return bool(self.token_tenants)

    def tenant_for(self, metadata) -> str | None:
        """The tenant of the call's bearer token; None when it is missing or unknown."""
        if not self.required:
            return OPEN_TENANT
        header = next((value for key, value in metadata or () if key == "authorization"), "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        # Compare every known token in constant time: timing reveals nothing.
        found = None
        for known, tenant in self.token_tenants.items():
            if hmac.compare_digest(known.encode(), token.strip().encode()):
                found = tenant
        return found

    def tenant_of(self, context: grpc.ServicerContext | grpc.aio.ServicerContext) -> str:
        tenant = self.tenant_for(context.invocation_metadata())
        if tenant is None:  # the interceptor already refused such calls
            raise PermissionError("no tenant for this call")
        return tenant

    def admits(self, handler_call_details: grpc.HandlerCallDetails) -> bool:
        """Whether a call may reach its handler: health, or a known token (or no
        tokens at all)."""
        return (
            handler_call_details.method.startswith(PUBLIC_PREFIX)
            or not self.required
            or self.tenant_for(handler_call_details.invocation_metadata) is not None
        )


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """`TokenAuth`'s check on a `grpc.aio` server."""

    def __init__(self, auth: TokenAuth) -> None:
        self.auth = auth

    async def intercept_service(
        self,
        continuation: Callable,
        handler_call_details: grpc.HandlerCallDetails,
    ):
        handler = await continuation(handler_call_details)
        if self.auth.admits(handler_call_details):
            return handler
        return _refusing_aio(handler)


class SyncAuthInterceptor(grpc.ServerInterceptor):
    """`TokenAuth`'s check on a threaded `grpc.server`."""

    def __init__(self, auth: TokenAuth) -> None:
        self.auth = auth

    def intercept_service(
        self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if self.auth.admits(handler_call_details):
            return handler
        return _refusing_sync(handler)


def _same_shape(handler: grpc.RpcMethodHandler, behaviour: Callable) -> grpc.RpcMethodHandler:
    shape = (bool(handler.request_streaming), bool(handler.response_streaming))
    return HANDLER_FACTORIES[shape](
        behaviour,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _refusing_aio(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    """A handler of the same streaming shape that aborts with UNAUTHENTICATED."""

    async def abort(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

    async def abort_stream(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        yield  # pragma: no cover - makes this an async generator

    if handler is None:
        return grpc.unary_unary_rpc_method_handler(abort)
    return _same_shape(handler, abort_stream if handler.response_streaming else abort)


def _refusing_sync(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    """A handler of the same streaming shape that aborts with UNAUTHENTICATED."""

    def abort(request_or_iterator, context: grpc.ServicerContext):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

    if handler is None:
        return grpc.unary_unary_rpc_method_handler(abort)
    return _same_shape(handler, abort)
