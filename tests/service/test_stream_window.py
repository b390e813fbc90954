"""The cache server's gRPC options bound how much of a streamed request gRPC takes in
before the handler reads it (`MINICACHE_STREAM_WINDOW_BYTES`): a handler that stops
reading stops the client's writes after about one window, whatever gRPC's adaptive
window would have grown to.

A server built with `grpc_options` serves one client-streamed method whose handler
reads the first message and then waits; the client writes 1 MiB messages until a write
has waited 2 s. Real gRPC over loopback, no cache service needed."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from service_fixtures import settings_for

from minicache_server.service.server import grpc_options

MESSAGE_BYTES = 1 << 20
STALL_S = 2.0


async def _bytes_taken_while_the_handler_waits(settings, messages: int = 64) -> int:
    release = asyncio.Event()

    async def handler(requests, context):
        await anext(aiter(requests))
        await release.wait()
        return b""

    server = grpc.aio.server(options=grpc_options(settings))
    method = grpc.stream_unary_rpc_method_handler(handler)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", {"Put": method}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    sent = 0
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_unary("/t.T/Put")()
            try:
                for _ in range(messages):
                    await asyncio.wait_for(call.write(b"x" * MESSAGE_BYTES), STALL_S)
                    sent += MESSAGE_BYTES
            except asyncio.TimeoutError:
                pass
            release.set()
            call.cancel()
    finally:
        await server.stop(0)
    return sent


@pytest.mark.parametrize("window", [1 << 16, 1 << 20])
def test_a_stalled_handler_takes_about_one_window(window: int) -> None:
    settings = settings_for(stream_window_bytes=window)
    taken = asyncio.run(_bytes_taken_while_the_handler_waits(settings))
    # Measured here: 1 MiB (the first message, read) with a 64 KiB window, 2 MiB with
    # 1 MiB; the bound leaves room for the stream's and the connection's windows and a
    # message in flight. gRPC's adaptive window let 9-19 MiB in on the same set-up.
    assert MESSAGE_BYTES <= taken <= 2 * MESSAGE_BYTES + 2 * window


def test_the_default_window_is_one_mebibyte() -> None:
    assert settings_for().stream_window_bytes == 1 << 20
    options = dict(grpc_options(settings_for()))
    assert options["grpc.http2.bdp_probe"] == 0
    assert options["grpc.http2.lookahead_bytes"] == 1 << 20


def test_zero_leaves_grpc_its_adaptive_window() -> None:
    options = dict(grpc_options(settings_for(stream_window_bytes=0)))
    assert "grpc.http2.bdp_probe" not in options
    assert "grpc.http2.lookahead_bytes" not in options
