"""Bearer tokens mapped to tenants.

Every call but health carries `authorization: Bearer <token>`. The interceptor rejects
unknown or missing tokens with UNAUTHENTICATED before a handler runs; the servicer asks
`tenant_of` for the caller's tenant, inside which all sequence ids live. Health answers
without a token (Kubernetes' gRPC probe cannot send one). In insecure mode without
tokens every caller is the tenant `default`.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping

import grpc

PUBLIC_PREFIX = "/grpc.health.v1.Health/"
OPEN_TENANT = "default"


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

    def tenant_of(self, context: grpc.aio.ServicerContext) -> str:
        tenant = self.tenant_for(context.invocation_metadata())
        if tenant is None:  # the interceptor already refused such calls
            raise PermissionError("no tenant for this call")
        return tenant


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, auth: TokenAuth) -> None:
        self.auth = auth

    async def intercept_service(
        self,
        continuation: Callable,
        handler_call_details: grpc.HandlerCallDetails,
    ):
        method = handler_call_details.method
        if method.startswith(PUBLIC_PREFIX) or not self.auth.required:
            return await continuation(handler_call_details)
        if self.auth.tenant_for(handler_call_details.invocation_metadata) is not None:
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        return _refusing(handler)


def _refusing(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    """A handler of the same streaming shape that aborts with UNAUTHENTICATED."""
    message = "missing or unknown bearer token (metadata 'authorization: Bearer <token>')"

    async def abort(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    if handler is None:
        return grpc.unary_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        factory = (
            grpc.stream_stream_rpc_method_handler
            if handler.request_streaming
            else grpc.unary_stream_rpc_method_handler
        )
        return factory(
            abort_stream,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    factory = (
        grpc.stream_unary_rpc_method_handler
        if handler.request_streaming
        else grpc.unary_unary_rpc_method_handler
    )
    return factory(
        abort,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
