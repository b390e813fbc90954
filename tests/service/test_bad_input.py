"""Malformed requests against a real server: each is refused with its documented status
code (protos/minicache/v1/cache_service.proto, design.md section 7) and details that
say what was wrong, never UNKNOWN; afterwards the server still serves and a sequence
stored before is intact, bit for bit. Raw stubs, because the SDK refuses to send most
of these."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from service_fixtures import ServerThread, kv_layers, settings_for

from minicache_client.proto import cache_service_pb2 as pb
from minicache_client.proto import cache_service_pb2_grpc as pb_grpc
from minicache_client.wire import LayerAssembler, layer_chunks

TIMEOUT = 10
MODEL = "bad-input-model"
LAYERS, TOKENS, HEADS, DIM = 6, 64, 2, 16
# 2048 bytes hold 16 tokens of keys + values: four chunks per layer of 64 tokens.
CHUNK_BYTES = 2048
QUOTA_BYTES = 1 << 20
GOOD_ID = "good"
GOOD_LAYERS = kv_layers(LAYERS, TOKENS, HEADS, DIM, seed=1)

KV = list[tuple[np.ndarray, np.ndarray]]


# -- requests -------------------------------------------------------------------------


def ref(sequence_id: str, model_id: str = MODEL) -> pb.SequenceRef:
    return pb.SequenceRef(model_id=model_id, sequence_id=sequence_id)


def header(
    sequence_id: str,
    *,
    model_id: str = MODEL,
    num_layers: int = LAYERS,
    kv_heads: int = HEADS,
    head_dim: int = DIM,
    dtype: int = pb.DTYPE_FLOAT16,
    start: int = 0,
    end: int = TOKENS,
    policy: str = "none",
) -> pb.SequenceHeader:
    return pb.SequenceHeader(
        sequence=ref(sequence_id, model_id),
        num_layers=num_layers,
        kv_heads=kv_heads,
        head_dim=head_dim,
        dtype=dtype,
        start_token=start,
        end_token=end,
        policy=policy,
    )


def chunks(layers: KV, dtype: str = "float16", chunk_bytes: int = CHUNK_BYTES) -> list:
    return [
        chunk
        for index, (keys, values) in enumerate(layers)
        for chunk in layer_chunks(index, keys, values, dtype, chunk_bytes)
    ]


def put_stream(hdr: pb.SequenceHeader, layers: KV, dtype: str = "float16") -> list:
    return [pb.PutRequest(header=hdr)] + [pb.PutRequest(chunk=c) for c in chunks(layers, dtype)]


def bfloat16(layers: KV) -> KV:
    """The same KV as bfloat16 bit patterns (uint16 carrier), truncated."""
    return [
        tuple((a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16) for a in pair)
        for pair in layers
    ]


def with_value(layers: KV, layer: int, value) -> KV:
    """A copy of `layers` with one key of `layer` set to `value` (in its carrier)."""
    copied = [(keys.copy(), values.copy()) for keys, values in layers]
    copied[layer][0][1, -1, 3] = value
    return copied


# -- checks ---------------------------------------------------------------------------


def refused(call: Callable[[], object]) -> grpc.RpcError:
    """Run a call that must fail; its status is never UNKNOWN (an escaped exception)."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    error = info.value
    assert error.code() != grpc.StatusCode.UNKNOWN, f"UNKNOWN status: {error.details()}"
    return error


def assert_refused(
    call: Callable[[], object], code: grpc.StatusCode, details: str
) -> grpc.RpcError:
    error = refused(call)
    assert error.code() == code, f"expected {code.name}, got {error.code().name}: {error.details()}"
    assert re.search(details, error.details() or "", re.IGNORECASE), (
        f"details {error.details()!r} do not mention {details!r}"
    )
    return error


def prefetch(stub, request: pb.PrefetchRequest) -> tuple[pb.SequenceHeader, KV]:
    """The restored layers of a prefetch, reassembled from their chunks."""
    messages = iter(stub.Prefetch(request, timeout=TIMEOUT))
    first = next(messages)
    assert first.WhichOneof("item") == "header"
    hdr = first.header
    assembler = LayerAssembler(
        hdr.num_layers,
        hdr.kv_heads,
        hdr.end_token - hdr.start_token,
        hdr.head_dim,
        {1: "float32", 2: "float16", 3: "bfloat16"}[hdr.dtype],
    )
    layers = {}
    for message in messages:
        assert message.WhichOneof("item") == "chunk"
        done = assembler.add(message.chunk)
        if done is not None:
            layers[message.chunk.layer] = done
    assert not assembler.missing_layers()
    return hdr, [layers[index] for index in sorted(layers)]


def assert_holds(stub, sequence_id: str, expected: KV) -> None:
    """The sequence holds exactly `expected` (policy "none" stores it losslessly)."""
    tokens = expected[0][0].shape[1]
    assert (
        stub.Lookup(pb.LookupRequest(sequence=ref(sequence_id)), timeout=TIMEOUT).header.end_token
        == tokens
    )
    hdr, layers = prefetch(stub, pb.PrefetchRequest(sequence=ref(sequence_id)))
    assert (hdr.start_token, hdr.end_token, len(layers)) == (0, tokens, len(expected))
    for (keys, values), (want_keys, want_values) in zip(layers, expected, strict=True):
        assert keys.tobytes() == want_keys.tobytes()
        assert values.tobytes() == want_values.tobytes()


# -- the server -----------------------------------------------------------------------


@dataclass
class Target:
    server: ServerThread
    stub: pb_grpc.CacheServiceStub
    health: health_pb2_grpc.HealthStub


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    """One server for the module, with a tenant quota, holding the good sequence."""
    server = ServerThread(settings_for(tenant_quota_bytes=QUOTA_BYTES))
    channel = grpc.insecure_channel(server.address)
    try:
        stub = pb_grpc.CacheServiceStub(channel)
        stub.Put(iter(put_stream(header(GOOD_ID), GOOD_LAYERS)), timeout=TIMEOUT)
        yield Target(server, stub, health_pb2_grpc.HealthStub(channel))
    finally:
        channel.close()
        server.stop()


@pytest.fixture
def stub(target: Target) -> Iterator[pb_grpc.CacheServiceStub]:
    """The module server's stub; after the test the server is healthy and still holds
    the good sequence, bit-exact."""
    yield target.stub
    answer = target.health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert_holds(target.stub, GOOD_ID, GOOD_LAYERS)


# -- the matrix -----------------------------------------------------------------------


def put(stub, requests: list) -> pb.PutResponse:
    return stub.Put(iter(requests), timeout=TIMEOUT)


def put_of(hdr: pb.SequenceHeader, layers: KV | None = None, dtype: str = "float16"):
    requests = put_stream(hdr, GOOD_LAYERS if layers is None else layers, dtype)
    return lambda stub: put(stub, requests)


def edited_put(sequence_id: str, edit: Callable[[list], None]):
    """A put of the good KV under `sequence_id`, its request list changed by `edit`."""
    requests = put_stream(header(sequence_id), GOOD_LAYERS)
    edit(requests)
    return lambda stub: put(stub, requests)


def truncate_keys(requests: list) -> None:
    requests[3].chunk.keys = requests[3].chunk.keys[:-2]


def set_layer(index: int, layer: int):
    def edit(requests: list) -> None:
        requests[index].chunk.layer = layer

    return edit


def duplicate_layer(requests: list) -> None:
    # Layer 0 again after layer 0 completed (its chunks are requests 1..4).
    requests[5:5] = requests[1:5]


def drop_last_layer(requests: list) -> None:
    del requests[-4:]


def swap_chunks(requests: list) -> None:
    requests[1], requests[2] = requests[2], requests[1]


def zero_tokens(requests: list) -> None:
    requests[1].chunk.tokens = 0


def prefetch_of(**fields):
    request = pb.PrefetchRequest(**fields)
    return lambda stub: list(stub.Prefetch(request, timeout=TIMEOUT))


def append_of(hdr: pb.SequenceHeader | None, layers: KV, omit: tuple[int, ...] = (), twice=()):
    request = pb.AppendRequest(header=hdr) if hdr is not None else pb.AppendRequest()
    for index, (keys, values) in enumerate(layers):
        if index not in omit:
            request.layers.extend(layer_chunks(index, keys, values, "float16"))
        if index in twice:
            request.layers.extend(layer_chunks(index, keys, values, "float16"))
    return lambda stub: stub.Append(request, timeout=TIMEOUT)


def one_chunk(hdr: pb.SequenceHeader, chunk: pb.LayerChunk):
    requests = [pb.PutRequest(header=hdr), pb.PutRequest(chunk=chunk)]
    return lambda stub: put(stub, requests)


def oversized_chunk():
    """One chunk of 1.5 MiB: above max_chunk_bytes (1 MiB), below the 4 MiB message limit."""
    tokens = 12288  # 12288 tokens x 2 heads x 16 x 2 bytes = 768 KiB each for keys, values
    size = tokens * HEADS * DIM * 2
    chunk = pb.LayerChunk(layer=0, tokens=tokens, keys=bytes(size), values=bytes(size))
    return one_chunk(header("oversized", end=tokens), chunk)


def huge_message():
    """One message of 5 MiB: above gRPC's 4 MiB receive limit of the server."""
    size = 5 << 20
    chunk = pb.LayerChunk(layer=0, tokens=size // (HEADS * DIM * 2), keys=bytes(size))
    return one_chunk(header("huge", end=1 << 16), chunk)


def over_quota():
    """1.5 MiB of KV stored uncompressed, for a tenant quota of 1 MiB."""
    layers = kv_layers(LAYERS, 2048, HEADS, DIM, seed=2)
    return put_of(header("over-quota", end=2048), layers)


APPENDED = kv_layers(LAYERS, 2, HEADS, DIM, seed=3)
NAN_OR_INF = "NaN or Inf"


@dataclass(frozen=True)
class Case:
    code: grpc.StatusCode
    details: str  # a regex the status details must match
    call: Callable[[pb_grpc.CacheServiceStub], object]


C = grpc.StatusCode
CASES: dict[str, Case] = {
    # Tensor shapes and dtypes.
    "wrong_byte_length": Case(
        C.INVALID_ARGUMENT, r"take \d+ bytes", edited_put("short", truncate_keys)
    ),
    "wrong_kv_heads": Case(
        C.INVALID_ARGUMENT,
        r"4 heads x 16 in float16 take \d+ bytes",
        put_of(header("heads", kv_heads=HEADS * 2)),
    ),
    "dtype_bytes_mismatch": Case(
        C.INVALID_ARGUMENT,
        r"float32 take \d+ bytes",
        put_of(header("f32-bytes", dtype=pb.DTYPE_FLOAT32)),
    ),
    "dtype_unspecified": Case(
        C.INVALID_ARGUMENT,
        r"dtype must be one of",
        put_of(header("no-dtype", dtype=pb.DTYPE_UNSPECIFIED)),
    ),
    "layer_out_of_range": Case(
        C.OUT_OF_RANGE, r"layer 6 is out of range", edited_put("layer6", set_layer(1, LAYERS))
    ),
    "duplicate_layer": Case(
        C.INVALID_ARGUMENT, r"layer 0 was sent twice", edited_put("dup", duplicate_layer)
    ),
    "missing_layer": Case(
        C.FAILED_PRECONDITION, r"layers missing: 5", edited_put("missing", drop_last_layer)
    ),
    "chunks_out_of_token_order": Case(
        C.FAILED_PRECONDITION, r"token order", edited_put("order", swap_chunks)
    ),
    "chunk_of_zero_tokens": Case(
        C.INVALID_ARGUMENT, r"chunk of 0 tokens", edited_put("zero", zero_tokens)
    ),
    "num_layers_zero": Case(
        C.INVALID_ARGUMENT, r"num_layers must be >= 1", put_of(header("l0", num_layers=0))
    ),
    "kv_heads_above_limit": Case(
        C.RESOURCE_EXHAUSTED, r"kv_heads 2000 is above", put_of(header("h", kv_heads=2000))
    ),
    # Protocol order.
    "chunk_without_header": Case(
        C.FAILED_PRECONDITION,
        r"before the put's header",
        lambda stub: put(stub, put_stream(header("no-header"), GOOD_LAYERS)[1:]),
    ),
    "two_headers": Case(
        C.FAILED_PRECONDITION,
        r"exactly one header",
        edited_put("two", lambda r: r.insert(3, pb.PutRequest(header=header("two")))),
    ),
    "empty_put_stream": Case(C.FAILED_PRECONDITION, r"without a header", lambda s: put(s, [])),
    "empty_put_request": Case(
        C.INVALID_ARGUMENT,
        r"neither header nor chunk",
        edited_put("e", lambda r: r.append(pb.PutRequest())),
    ),
    # Sizes and budgets.
    "chunk_above_max_chunk_bytes": Case(
        C.RESOURCE_EXHAUSTED, r"above the limit of 1048576", oversized_chunk()
    ),
    "message_above_grpc_limit": Case(C.RESOURCE_EXHAUSTED, r"larger than max", huge_message()),
    "tokens_above_max_tokens": Case(
        C.RESOURCE_EXHAUSTED,
        r"limit of 131072 tokens",
        put_of(header("long", end=(1 << 17) + 1)),
    ),
    "tenant_quota_exceeded": Case(C.RESOURCE_EXHAUSTED, r"tenant quota", over_quota()),
    # Ids and token ranges of a put.
    "empty_model_id": Case(
        C.INVALID_ARGUMENT, r"model_id must be a non-empty string", put_of(header("x", model_id=""))
    ),
    "empty_sequence_id": Case(
        C.INVALID_ARGUMENT,
        r"sequence_id must be a non-empty string",
        lambda stub: stub.Lookup(pb.LookupRequest(sequence=ref("")), timeout=TIMEOUT),
    ),
    "sequence_id_with_space": Case(
        C.INVALID_ARGUMENT, r"printable ASCII", put_of(header("has space"))
    ),
    "delete_empty_model_id": Case(
        C.INVALID_ARGUMENT,
        r"model_id must be a non-empty string",
        lambda stub: stub.Delete(pb.DeleteRequest(sequence=ref(GOOD_ID, "")), timeout=TIMEOUT),
    ),
    "end_equals_start": Case(
        C.INVALID_ARGUMENT, r"empty or reversed", put_of(header("empty-range", end=0))
    ),
    "end_before_start": Case(
        C.INVALID_ARGUMENT, r"empty or reversed", put_of(header(GOOD_ID, start=TOKENS, end=10))
    ),
    "put_past_held_tokens": Case(
        C.OUT_OF_RANGE,
        r"holds 64 tokens",
        put_of(header(GOOD_ID, start=TOKENS + 1, end=TOKENS + 65)),
    ),
    # Extensions.
    "extension_of_unknown_sequence": Case(
        C.NOT_FOUND, r"not held", put_of(header("nobody", start=TOKENS, end=2 * TOKENS))
    ),
    "extension_other_shape": Case(
        C.INVALID_ARGUMENT,
        r"does not match",
        put_of(header(GOOD_ID, start=TOKENS, end=2 * TOKENS, head_dim=DIM * 2)),
    ),
    "extension_changes_policy": Case(
        C.INVALID_ARGUMENT,
        r"cannot change the sequence's policy",
        put_of(header(GOOD_ID, start=TOKENS, end=2 * TOKENS, policy="kivi4")),
    ),
    "append_unknown_sequence": Case(
        C.NOT_FOUND,
        r"not held",
        append_of(header("nobody", start=TOKENS, end=TOKENS + 2), APPENDED),
    ),
    "append_start_zero": Case(
        C.INVALID_ARGUMENT,
        r"start_token must be the tokens held",
        append_of(header(GOOD_ID, start=0, end=2), APPENDED),
    ),
    "append_without_header": Case(
        C.INVALID_ARGUMENT, r"needs its header", append_of(None, APPENDED)
    ),
    "append_missing_layer": Case(
        C.FAILED_PRECONDITION,
        r"layers missing: 3",
        append_of(header(GOOD_ID, start=TOKENS, end=TOKENS + 2), APPENDED, omit=(3,)),
    ),
    "append_duplicate_layer": Case(
        C.INVALID_ARGUMENT,
        r"layer 2 was sent twice",
        append_of(header(GOOD_ID, start=TOKENS, end=TOKENS + 2), APPENDED, twice=(2,)),
    ),
    # Policies.
    "unknown_policy": Case(
        C.INVALID_ARGUMENT,
        r"unknown policy 'no-such-preset'",
        put_of(header("p", policy="no-such-preset")),
    ),
    "policy_path": Case(
        C.INVALID_ARGUMENT,
        r"unknown policy '/etc/passwd'",
        put_of(header("p", policy="/etc/passwd")),
    ),
    "malformed_policy_json": Case(
        C.INVALID_ARGUMENT, r"not valid JSON", put_of(header("p", policy='{"merge": '))
    ),
    "policy_json_float_bits": Case(
        C.INVALID_ARGUMENT,
        r"key_bits",
        put_of(header("p", policy='{"quantization": {"key_bits": 4.0}}')),
    ),
    "policy_json_float_group_size": Case(
        C.INVALID_ARGUMENT,
        r"key_group_size",
        put_of(header("p", policy='{"quantization": {"key_group_size": 2.5}}')),
    ),
    "policy_json_float_sink_tokens": Case(
        C.INVALID_ARGUMENT,
        r"sink_tokens",
        put_of(header("p", policy='{"merge": {"retention": {"sink_tokens": 2.5}}}')),
    ),
    "policy_json_bad_value": Case(
        C.INVALID_ARGUMENT,
        r"key_bits must be one of",
        put_of(header("p", policy='{"quantization": {"key_bits": 5}}')),
    ),
    # Non-finite values.
    "nan_float16": Case(
        C.INVALID_ARGUMENT, NAN_OR_INF, put_of(header("nan16"), with_value(GOOD_LAYERS, 2, np.nan))
    ),
    "inf_float16": Case(
        C.INVALID_ARGUMENT, NAN_OR_INF, put_of(header("inf16"), with_value(GOOD_LAYERS, 2, np.inf))
    ),
    "nan_bfloat16": Case(
        C.INVALID_ARGUMENT,
        NAN_OR_INF,
        put_of(
            header("nanbf", dtype=pb.DTYPE_BFLOAT16),
            with_value(bfloat16(GOOD_LAYERS), 4, 0x7FC0),
            "bfloat16",
        ),
    ),
    "inf_bfloat16": Case(
        C.INVALID_ARGUMENT,
        NAN_OR_INF,
        put_of(
            header("infbf", dtype=pb.DTYPE_BFLOAT16),
            with_value(bfloat16(GOOD_LAYERS), 4, 0xFF80),  # -inf
            "bfloat16",
        ),
    ),
    "nan_float32": Case(
        C.INVALID_ARGUMENT,
        NAN_OR_INF,
        put_of(
            header("nan32", dtype=pb.DTYPE_FLOAT32),
            with_value(
                [(k.astype(np.float32), v.astype(np.float32)) for k, v in GOOD_LAYERS], 0, np.nan
            ),
            "float32",
        ),
    ),
    "nan_in_append": Case(
        C.INVALID_ARGUMENT,
        NAN_OR_INF,
        append_of(header(GOOD_ID, start=TOKENS, end=TOKENS + 2), with_value(APPENDED, 0, np.nan)),
    ),
    # Reads.
    "prefetch_unknown_sequence": Case(
        C.NOT_FOUND, r"not held", prefetch_of(sequence=ref("nobody"))
    ),
    "lookup_unknown_sequence": Case(
        C.NOT_FOUND,
        r"not held",
        lambda stub: stub.Lookup(pb.LookupRequest(sequence=ref("nobody")), timeout=TIMEOUT),
    ),
    "prefetch_tokens_past_end": Case(
        C.OUT_OF_RANGE,
        r"outside the sequence's 64 tokens",
        prefetch_of(sequence=ref(GOOD_ID), end_token=TOKENS + 1),
    ),
    "prefetch_start_at_end": Case(
        C.OUT_OF_RANGE,
        r"outside the sequence's 64 tokens",
        prefetch_of(sequence=ref(GOOD_ID), start_token=TOKENS),
    ),
    "prefetch_layers_past_end": Case(
        C.OUT_OF_RANGE,
        r"layers \[0, 7\) are outside",
        prefetch_of(sequence=ref(GOOD_ID), first_layer=0, end_layer=LAYERS + 1),
    ),
    "prefetch_layers_reversed": Case(
        C.OUT_OF_RANGE,
        r"layers \[3, 2\) are outside",
        prefetch_of(sequence=ref(GOOD_ID), first_layer=3, end_layer=2),
    ),
    "prefetch_first_layer_past_end": Case(
        C.OUT_OF_RANGE,
        r"layers \[6, 6\) are outside",
        prefetch_of(sequence=ref(GOOD_ID), first_layer=LAYERS),
    ),
    "compressed_wire_form_other_dtype": Case(
        C.INVALID_ARGUMENT,
        r"compressed wire form",
        prefetch_of(
            sequence=ref(GOOD_ID), wire_form=pb.WIRE_FORM_COMPRESSED, dtype=pb.DTYPE_FLOAT32
        ),
    ),
    "unknown_wire_form": Case(
        C.INVALID_ARGUMENT, r"unknown wire_form 7", prefetch_of(sequence=ref(GOOD_ID), wire_form=7)
    ),
    "unknown_prefetch_dtype": Case(
        C.INVALID_ARGUMENT, r"enum value 9", prefetch_of(sequence=ref(GOOD_ID), dtype=9)
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_request_is_refused_with_its_code(stub, name: str) -> None:
    case = CASES[name]
    assert_refused(lambda: case.call(stub), case.code, case.details)


def test_policy_name_never_reads_a_server_file(stub, tmp_path: Path, monkeypatch) -> None:
    """A policy is a preset name or JSON: a name that happens to be a file in the
    server's working directory must not be read from disk."""
    (tmp_path / "my-policy").write_text('{"name": "read-from-disk"}')
    monkeypatch.chdir(tmp_path)
    request = put_stream(header("file-policy", policy="my-policy"), GOOD_LAYERS)
    try:
        assert_refused(lambda: put(stub, request), C.INVALID_ARGUMENT, r"unknown policy")
    finally:
        stub.Delete(pb.DeleteRequest(sequence=ref("file-policy")), timeout=TIMEOUT)


# -- failed writes leave what was held ------------------------------------------------


def layer_first_chunk(layer: int) -> int:
    """Index in a put_stream of the first chunk of `layer` (four chunks per layer)."""
    return 1 + 4 * layer


def truncate_layer_3(requests: list) -> None:
    chunk = requests[layer_first_chunk(3) + 1].chunk
    chunk.values = chunk.values[:-2]


def swap_layer_4(requests: list) -> None:
    first = layer_first_chunk(4)
    requests[first], requests[first + 1] = requests[first + 1], requests[first]


def header_in_layer_2(requests: list) -> None:
    requests.insert(layer_first_chunk(2), requests[0])


def nan_in_layer_5(requests: list) -> None:
    chunk = requests[layer_first_chunk(5) + 3].chunk
    keys = np.frombuffer(chunk.keys, dtype=np.float16).copy()
    keys[-1] = np.nan
    chunk.keys = keys.tobytes()


REPLACE_FAILURES = {
    "bad_byte_length": (truncate_layer_3, C.INVALID_ARGUMENT, r"take \d+ bytes"),
    "missing_layer": (drop_last_layer, C.FAILED_PRECONDITION, r"layers missing: 5"),
    "out_of_order": (swap_layer_4, C.FAILED_PRECONDITION, r"token order"),
    "second_header": (header_in_layer_2, C.FAILED_PRECONDITION, r"exactly one header"),
    "nan": (nan_in_layer_5, C.INVALID_ARGUMENT, NAN_OR_INF),
}


def replace_params() -> list:
    return [pytest.param(name, id=name) for name in REPLACE_FAILURES]


def stored(stub, sequence_id: str, layers: KV) -> None:
    response = put(stub, put_stream(header(sequence_id, end=layers[0][0].shape[1]), layers))
    assert response.tokens == layers[0][0].shape[1]


def delete(stub, sequence_id: str) -> None:
    assert stub.Delete(pb.DeleteRequest(sequence=ref(sequence_id)), timeout=TIMEOUT).deleted


@pytest.mark.parametrize("failure", replace_params())
def test_failed_replace_keeps_the_previous_version(stub, failure: str) -> None:
    sequence_id = f"replace-{failure}"
    v1, v2 = kv_layers(seed=10), kv_layers(seed=11)
    stored(stub, sequence_id, v1)
    edit, code, details = REPLACE_FAILURES[failure]
    requests = put_stream(header(sequence_id), v2)
    edit(requests)
    assert_refused(lambda: put(stub, requests), code, details)
    assert_holds(stub, sequence_id, v1)
    delete(stub, sequence_id)


def test_replace_over_quota_keeps_the_previous_version(stub) -> None:
    sequence_id = "replace-quota"
    v1 = kv_layers(seed=12)
    stored(stub, sequence_id, v1)
    big = kv_layers(LAYERS, 2048, HEADS, DIM, seed=13)
    assert_refused(
        lambda: put(stub, put_stream(header(sequence_id, end=2048), big)),
        C.RESOURCE_EXHAUSTED,
        r"tenant quota of 1048576 bytes exceeded",
    )
    assert_holds(stub, sequence_id, v1)
    delete(stub, sequence_id)


def test_cancelled_replace_keeps_the_previous_version(stub) -> None:
    sequence_id = "replace-cancelled"
    v1, v2 = kv_layers(seed=14), kv_layers(seed=15)
    stored(stub, sequence_id, v1)
    requests = put_stream(header(sequence_id), v2)
    half_sent, release = threading.Event(), threading.Event()

    def stream() -> Iterator[pb.PutRequest]:
        yield from requests[: len(requests) // 2]
        half_sent.set()
        release.wait(TIMEOUT)

    future = stub.Put.future(stream(), timeout=TIMEOUT)
    try:
        assert half_sent.wait(TIMEOUT)
        assert future.cancel()
    finally:
        release.set()
    with pytest.raises(grpc.FutureCancelledError):
        future.result()
    assert_holds(stub, sequence_id, v1)
    delete(stub, sequence_id)


def test_failed_new_put_is_invisible(stub) -> None:
    sequences = stub.Stats(pb.StatsRequest(), timeout=TIMEOUT).sequences
    requests = put_stream(header("never-written"), GOOD_LAYERS)
    drop_last_layer(requests)
    assert_refused(lambda: put(stub, requests), C.FAILED_PRECONDITION, r"layers missing")
    assert_refused(
        lambda: stub.Lookup(pb.LookupRequest(sequence=ref("never-written")), timeout=TIMEOUT),
        C.NOT_FOUND,
        r"not held",
    )
    assert stub.Stats(pb.StatsRequest(), timeout=TIMEOUT).sequences == sequences


EXTENSION = kv_layers(LAYERS, 16, HEADS, DIM, seed=21)


def extension_put(
    sequence_id: str, edit: Callable[[list], None] | None = None, policy: str = ""
) -> list:
    """A put of EXTENSION after the TOKENS held, one chunk per layer."""
    hdr = header(sequence_id, start=TOKENS, end=TOKENS + 16, policy=policy)
    requests = [pb.PutRequest(header=hdr)]
    requests += [pb.PutRequest(chunk=c) for c in chunks(EXTENSION, chunk_bytes=1 << 20)]
    if edit is not None:
        edit(requests)
    return requests


def extension_append(sequence_id: str, layers: KV = EXTENSION, omit=()) -> pb.AppendRequest:
    request = pb.AppendRequest(header=header(sequence_id, start=TOKENS, end=TOKENS + 16))
    for index, (keys, values) in enumerate(layers):
        if index not in omit:
            request.layers.extend(layer_chunks(index, keys, values, "float16", 1 << 20))
    return request


def short_values_of_layer_1(requests: list) -> None:
    requests[2].chunk.values = requests[2].chunk.values[:-2]


EXTENSION_FAILURES = {
    "put_missing_layer": (
        lambda stub, sid: put(stub, extension_put(sid, lambda r: r.pop())),
        C.FAILED_PRECONDITION,
        r"layers missing: 5",
    ),
    "put_bad_byte_length": (
        lambda stub, sid: put(stub, extension_put(sid, short_values_of_layer_1)),
        C.INVALID_ARGUMENT,
        r"take \d+ bytes",
    ),
    "put_other_policy": (
        lambda stub, sid: put(stub, extension_put(sid, policy="kivi2")),
        C.INVALID_ARGUMENT,
        r"cannot change the sequence's policy",
    ),
    "append_missing_layer": (
        lambda stub, sid: stub.Append(extension_append(sid, omit=(0,)), timeout=TIMEOUT),
        C.FAILED_PRECONDITION,
        r"layers missing: 0",
    ),
    "append_past_held_tokens": (
        lambda stub, sid: stub.Append(
            pb.AppendRequest(
                header=header(sid, start=TOKENS + 1, end=TOKENS + 17),
                layers=extension_append(sid).layers,
            ),
            timeout=TIMEOUT,
        ),
        C.OUT_OF_RANGE,
        r"holds 64 tokens",
    ),
    "append_nan": (
        lambda stub, sid: stub.Append(
            extension_append(sid, with_value(EXTENSION, 5, np.inf)), timeout=TIMEOUT
        ),
        C.INVALID_ARGUMENT,
        NAN_OR_INF,
    ),
}


@pytest.mark.parametrize(
    "failure",
    [pytest.param(name, id=name) for name in EXTENSION_FAILURES],
)
def test_failed_extension_keeps_the_tokens(stub, failure: str) -> None:
    sequence_id = f"extend-{failure}"
    v1 = kv_layers(seed=20)
    stored(stub, sequence_id, v1)
    tokens_before = stub.Stats(pb.StatsRequest(), timeout=TIMEOUT).tokens
    attempt, code, details = EXTENSION_FAILURES[failure]
    assert_refused(lambda: attempt(stub, sequence_id), code, details)
    assert stub.Stats(pb.StatsRequest(), timeout=TIMEOUT).tokens == tokens_before
    assert_holds(stub, sequence_id, v1)
    # The sequence still takes a well-formed extension at the same token.
    assert put(stub, extension_put(sequence_id)).tokens == TOKENS + 16
    extended = [
        tuple(np.concatenate([held, added], axis=1) for held, added in zip(*pair, strict=True))
        for pair in zip(v1, EXTENSION, strict=True)
    ]
    assert_holds(stub, sequence_id, extended)
    delete(stub, sequence_id)
