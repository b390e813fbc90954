"""A refused call leaves nothing of itself alive in the server: its put session (the
layers it staged, its encoder) is freed when the refusal is answered, not at the
garbage collector's next full pass.

grpc keeps the error that `abort` raises in a reference cycle with the call's state;
through that error's context, the refused method's traceback kept every frame of the
failed put alive with it. Under load (puts refused UNAVAILABLE while staging is full)
a cache server grew by gigabytes between the collector's rare full passes.
"""

from __future__ import annotations

import gc
import time

import grpc
import numpy as np
import pytest
from service_fixtures import kv_layers

from minicache_client.proto import cache_service_pb2 as pb
from minicache_client.proto import cache_service_pb2_grpc as pb_grpc
from minicache_client.wire import layer_chunks
from minicache_server.store.writes import PutSession

LAYERS, TOKENS, HEADS, DIM = 6, 256, 2, 16
# How long the server may take, after the caller saw the status, to finish the call.
FREED_WITHIN_S = 10.0


def refused_put_requests(sequence_id: str) -> list[pb.PutRequest]:
    """A put whose third layer holds a NaN: refused INVALID_ARGUMENT after the first
    layers were staged and encoded."""
    layers = kv_layers(LAYERS, TOKENS, HEADS, DIM, seed=5)
    layers[2][0][1, -1, 3] = np.nan
    header = pb.SequenceHeader(
        sequence=pb.SequenceRef(model_id="refusal-memory", sequence_id=sequence_id),
        num_layers=LAYERS,
        kv_heads=HEADS,
        head_dim=DIM,
        dtype=pb.DTYPE_FLOAT16,
        start_token=0,
        end_token=TOKENS,
        policy="kivi4",
    )
    chunks = [
        chunk
        for index, (keys, values) in enumerate(layers)
        for chunk in layer_chunks(index, keys, values, "float16", 4096)
    ]
    return [pb.PutRequest(header=header)] + [pb.PutRequest(chunk=chunk) for chunk in chunks]


def live_put_sessions() -> int:
    # type(), not isinstance(): a dead weak proxy among the objects raises on isinstance().
    return sum(1 for item in gc.get_objects() if type(item) is PutSession)


def test_a_refused_put_is_freed_without_the_collector(make_server) -> None:
    server = make_server()
    gc.collect()
    gc.disable()  # only reference counting frees what the refusals leave
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.CacheServiceStub(channel)
            for attempt in range(4):
                with pytest.raises(grpc.RpcError) as refused:
                    stub.Put(iter(refused_put_requests(f"nan-{attempt}")), timeout=30)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "NaN or Inf" in refused.value.details()
        deadline = time.monotonic() + FREED_WITHIN_S
        while live_put_sessions() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert live_put_sessions() == 0, "a refused put's session is still alive"
    finally:
        gc.enable()
    assert server.store.staged_bytes == 0
