"""Hostile bytes against a real cache server, sent through a raw channel with identity
serializers (what any gRPC implementation can send, not what our SDK builds): bytes that
are no request message (truncated, random, invalid wire types), invalid UTF-8 in every
string field, deeply nested and huge policies, hostile artifact hashes, puts that
declare or stream more than the device budget, calls cancelled mid-stream. Each gets its documented code with
details of bounded length, no ERROR log line and no traceback; afterwards the server is
healthy and a sequence stored before comes back bit-exact. The oversized puts also run
against a server process whose resident memory is read from /proc."""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from service_fixtures import ServerThread, free_port, kv_layers, settings_for

from minicache_client.errors import InvalidArgumentError
from minicache_client.proto import cache_service_pb2 as pb
from minicache_client.protocol import MAX_POLICY_BYTES, sequence_ref
from minicache_client.serving.logs import JsonFormatter
from minicache_client.serving.rpc_methods import MAX_DETAILS_BYTES
from minicache_client.wire import LayerAssembler, layer_chunks
from minicache_server.service import servicer

TIMEOUT = 10
SERVICE = "/minicache.v1.CacheService/"
MODEL = "hostile-model"
GOOD_ID = "good"
LAYERS, TOKENS, HEADS, DIM = 4, 64, 2, 16
GOOD_LAYERS = kv_layers(LAYERS, TOKENS, HEADS, DIM, seed=7)
BUDGET = 16 << 20
# A log line of a refused request: its message, method, code and the bounded details.
MAX_LOG_LINE_BYTES = 1024
C = grpc.StatusCode

# -- raw calls: bytes in, bytes out ----------------------------------------------------

# method -> (request streaming, response streaming)
SHAPES = {
    "Put": (True, False),
    "Append": (False, False),
    "Prefetch": (False, True),
    "Lookup": (False, False),
    "Delete": (False, False),
    "Stats": (False, False),
    "GetArtifact": (False, True),
}
REQUEST_TYPES = {
    "Put": pb.PutRequest,
    "Append": pb.AppendRequest,
    "Prefetch": pb.PrefetchRequest,
    "Lookup": pb.LookupRequest,
    "Delete": pb.DeleteRequest,
    "Stats": pb.StatsRequest,
    "GetArtifact": pb.GetArtifactRequest,
}


def raw_call(channel: grpc.Channel, path: str, shape: tuple[bool, bool], messages: list[bytes]):
    """Send `messages` (one, unless the request streams) to `path` as they are; the
    response bytes (a list when the response streams)."""
    streams_in, streams_out = shape
    factory = {
        (True, False): channel.stream_unary,
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, True): channel.stream_stream,
    }[shape]
    call = factory(path, request_serializer=None, response_deserializer=None)
    request = iter(messages) if streams_in else messages[0]
    response = call(request, timeout=TIMEOUT)
    return list(response) if streams_out else response


def refused(call: Callable[[], object], code: grpc.StatusCode, details: str = "") -> str:
    """Run a call that must fail with `code`; its details, checked to be bounded."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    error = info.value
    got = error.details() or ""
    assert error.code() == code, f"expected {code.name}, got {error.code().name}: {got[:400]}"
    assert len(got.encode()) <= MAX_DETAILS_BYTES, f"{len(got.encode())} bytes of details"
    assert details in got, f"details {got!r} do not mention {details!r}"
    return got


# -- hostile payloads ------------------------------------------------------------------


def _random_undecodable(seed: int) -> bytes:
    """Random bytes that no request type of either service decodes."""
    rng = random.Random(seed)
    while True:
        data = bytes(rng.getrandbits(8) for _ in range(64))
        if all(_undecodable(kind, data) for kind in REQUEST_TYPES.values()):
            return data


def _undecodable(message_type: type, data: bytes) -> bool:
    try:
        message_type.FromString(data)
    except Exception:  # the parser's DecodeError, whatever its module
        return True
    return False


def _header(sequence_id: str = "x", **fields) -> pb.SequenceHeader:
    values = {
        "sequence": pb.SequenceRef(model_id=MODEL, sequence_id=sequence_id),
        "num_layers": LAYERS,
        "kv_heads": HEADS,
        "head_dim": DIM,
        "dtype": pb.DTYPE_FLOAT16,
        "start_token": 0,
        "end_token": TOKENS,
        "policy": "none",
        **fields,
    }
    return pb.SequenceHeader(**values)


# A valid message of each method, long enough to be cut inside a field.
VALID = {
    "Put": pb.PutRequest(header=_header()),
    "Append": pb.AppendRequest(header=_header(start_token=TOKENS, end_token=TOKENS + 1)),
    "Prefetch": pb.PrefetchRequest(sequence=pb.SequenceRef(model_id=MODEL, sequence_id="x")),
    "Lookup": pb.LookupRequest(sequence=pb.SequenceRef(model_id=MODEL, sequence_id="x")),
    "Delete": pb.DeleteRequest(sequence=pb.SequenceRef(model_id=MODEL, sequence_id="x")),
    "Stats": pb.StatsRequest(),
    "GetArtifact": pb.GetArtifactRequest(digest="0" * 64),
}

# Bytes that are no message of any request type.
UNDECODABLE = {
    "truncated_length": b"\x0a\x10abc",  # field 1 declares 16 bytes, 3 follow
    "truncated_varint": b"\x10\xff\xff",
    "overlong_varint": b"\x10" + b"\xff" * 10 + b"\x01",
    "wire_type_6": b"\x0e\x00",
    "wire_type_7": b"\x0f",
    "end_group_without_start": b"\x0c",
    "group_never_closed": b"\x0b",
    "random": _random_undecodable(11),
}


def cut_in_half(method: str) -> bytes:
    """The method's valid message cut in the middle (Stats has no field to cut)."""
    data = VALID[method].SerializeToString()
    return data[: len(data) // 2] if data else UNDECODABLE["truncated_length"]


def broken_utf8(message, placeholder: str, bad: bytes) -> bytes:
    """`message` serialized with the string field holding `placeholder` made `bad`
    (same length, so every length prefix stays right)."""
    data = message.SerializeToString()
    assert data.count(placeholder.encode()) == 1 and len(bad) == len(placeholder)
    return data.replace(placeholder.encode(), bad)


# Invalid UTF-8: a stray continuation byte pair, an overlong "/", a lone surrogate
# (U+D800 as a UTF-8-like 3 bytes: what some clients send for one).
BAD_UTF8 = {
    "invalid_bytes": b"\xff\xfe\xfd",
    "overlong": b"\xc0\xaf\x41",
    "surrogate": b"\xed\xa0\x80",
}
PLACEHOLDER = "Q~Q"


def _with_string(method: str, field: str) -> object:
    """The method's request with string `field` ("model_id", "sequence_id", "policy",
    "digest") set to PLACEHOLDER."""
    if method == "GetArtifact":
        return pb.GetArtifactRequest(digest=PLACEHOLDER)
    ids = {"model_id": MODEL, "sequence_id": "x", field: PLACEHOLDER}
    ref = pb.SequenceRef(model_id=ids["model_id"], sequence_id=ids["sequence_id"])
    policy = PLACEHOLDER if field == "policy" else "none"
    if method == "Put":
        return pb.PutRequest(header=_header(sequence=ref, policy=policy))
    if method == "Append":
        hdr = _header(sequence=ref, start_token=TOKENS, end_token=TOKENS + 1, policy=policy)
        return pb.AppendRequest(header=hdr)
    return REQUEST_TYPES[method](sequence=ref)


STRING_FIELDS = {
    "Put": ("model_id", "sequence_id", "policy"),
    "Append": ("model_id", "sequence_id", "policy"),
    "Prefetch": ("model_id", "sequence_id"),
    "Lookup": ("model_id", "sequence_id"),
    "Delete": ("model_id", "sequence_id"),
    "GetArtifact": ("digest",),
}


def undecodable_cases() -> list:
    cases = []
    for method in SHAPES:
        payloads = {**UNDECODABLE, "cut_in_half": cut_in_half(method)}
        for name, data in payloads.items():
            cases.append(pytest.param(method, [data], id=f"{method}-{name}"))
        for field in STRING_FIELDS.get(method, ()):
            for name, bad in BAD_UTF8.items():
                data = broken_utf8(_with_string(method, field), PLACEHOLDER, bad)
                cases.append(pytest.param(method, [data], id=f"{method}-{field}-{name}"))
    # A put whose header is fine and whose second message is not a message.
    header = pb.PutRequest(header=_header("mid-stream")).SerializeToString()
    for name in ("truncated_length", "random"):
        cases.append(
            pytest.param("Put", [header, UNDECODABLE[name]], id=f"Put-after-header-{name}")
        )
    return cases


# -- the server and what it logs -------------------------------------------------------


class Records(logging.Handler):
    """Every log record of the test process, from the server's threads too."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.lines: list[str] = []
        self.formatter_json = JsonFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(self.formatter_json.format(record))

    def check_and_clear(self) -> None:
        """No ERROR, no traceback, no line longer than MAX_LOG_LINE_BYTES."""
        try:
            for record, line in zip(self.records, self.lines, strict=True):
                assert record.levelno < logging.ERROR, f"ERROR logged: {line[:600]}"
                assert record.exc_info is None, f"traceback logged: {line[:600]}"
                assert len(line.encode()) <= MAX_LOG_LINE_BYTES, f"log line: {line[:600]}..."
        finally:
            self.records.clear()
            self.lines.clear()


@dataclass
class RawChannel:
    """Calls of the cache service's methods with bytes."""

    channel: grpc.Channel

    def call(self, method: str, messages: list[bytes]):
        return raw_call(self.channel, SERVICE + method, SHAPES[method], messages)


@dataclass
class Target(RawChannel):
    server: ServerThread
    records: Records

    def requests(self, method: str, code: str) -> float:
        return self.server.server.metrics.requests.value(method=method, code=code)


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    records = Records()
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(records)
    root.setLevel(logging.DEBUG)
    server = ServerThread(settings_for(device_budget_bytes=BUDGET))
    channel = grpc.insecure_channel(server.address)
    try:
        target = Target(channel, server, records)
        put(target, "Put", GOOD_ID, GOOD_LAYERS)
        yield target
    finally:
        channel.close()
        server.stop()
        root.removeHandler(records)
        root.setLevel(previous_level)


@pytest.fixture
def hostile(target: Target) -> Iterator[Target]:
    """The module's server; afterwards it logged no error, is healthy and still holds
    the good sequence, bit-exact."""
    target.records.check_and_clear()
    yield target
    health = health_pb2_grpc.HealthStub(target.channel)
    answer = health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert_holds(target, GOOD_ID, GOOD_LAYERS)
    target.records.check_and_clear()


def put_messages(sequence_id: str, layers, dtype: str = "float16", **header_fields) -> list[bytes]:
    tokens = layers[0][0].shape[1]
    wire_dtype = {"float16": pb.DTYPE_FLOAT16, "float32": pb.DTYPE_FLOAT32}[dtype]
    hdr = _header(sequence_id, end_token=tokens, dtype=wire_dtype, **header_fields)
    messages = [pb.PutRequest(header=hdr)]
    for index, (keys, values) in enumerate(layers):
        for chunk in layer_chunks(index, keys, values, dtype, 1 << 20):
            messages.append(pb.PutRequest(chunk=chunk))
    return [message.SerializeToString() for message in messages]


def put(target: RawChannel, method: str, sequence_id: str, layers) -> None:
    response = pb.PutResponse.FromString(target.call(method, put_messages(sequence_id, layers)))
    assert response.tokens == layers[0][0].shape[1]


def assert_holds(target: RawChannel, sequence_id: str, expected) -> None:
    request = pb.PrefetchRequest(sequence=pb.SequenceRef(model_id=MODEL, sequence_id=sequence_id))
    messages = [
        pb.PrefetchResponse.FromString(data)
        for data in target.call("Prefetch", [request.SerializeToString()])
    ]
    hdr = messages[0].header
    assembler = LayerAssembler(hdr.num_layers, hdr.kv_heads, hdr.end_token, hdr.head_dim, "float16")
    layers = {}
    for message in messages[1:]:
        done = assembler.add(message.chunk)
        if done is not None:
            layers[message.chunk.layer] = done
    assert sorted(layers) == list(range(len(expected)))
    for index, (keys, values) in enumerate(expected):
        assert layers[index][0].tobytes() == keys.tobytes()
        assert layers[index][1].tobytes() == values.tobytes()


# -- undecodable requests --------------------------------------------------------------


@pytest.mark.parametrize(("method", "messages"), undecodable_cases())
def test_undecodable_request_is_invalid_argument(
    hostile: Target, method: str, messages: list[bytes]
) -> None:
    before = hostile.requests(method, "INVALID_ARGUMENT")
    request_type = REQUEST_TYPES[method].DESCRIPTOR.full_name
    refused(
        lambda: hostile.call(method, messages),
        C.INVALID_ARGUMENT,
        f"not a valid {request_type} message",
    )
    # Counted once the status went out: a moment after the caller has it.
    wait_for(
        lambda: hostile.requests(method, "INVALID_ARGUMENT") == before + 1,
        f"{method} counted INVALID_ARGUMENT",
    )


def test_unknown_fields_and_mismatched_wire_types_are_ignored(hostile: Target) -> None:
    """What protobuf parses (unknown fields, a known field number with another wire
    type) is a message: Stats answers, Lookup checks the ids it lacks."""
    for data in (b"\x08\x01", b"\x09" + bytes(8), b"\xa0\x06\x05"):
        assert pb.StatsResponse.FromString(hostile.call("Stats", [data])).device_budget_bytes
        refused(lambda data=data: hostile.call("Lookup", [data]), C.INVALID_ARGUMENT, "model_id")


# -- hostile policies and ids ----------------------------------------------------------

NESTED_POLICY = "[" * 1000 + "]" * 1000
NESTED_OBJECT_POLICY = '{"merge": ' * 1000 + "null" + "}" * 1000
HUGE_POLICY = json.dumps({"name": "x" * (2 << 20)})
HUGE_POLICY_NAME = "p" * (60 << 10)  # under the size limit: an unknown preset name
LONG_ID = "i" * 5000


def header_call(method: str, **fields) -> Callable[[Target], object]:
    if method == "Put":
        message = pb.PutRequest(header=_header(**fields)).SerializeToString()
    else:
        fields = {"start_token": TOKENS, "end_token": TOKENS + 1, **fields}
        message = pb.AppendRequest(header=_header(**fields)).SerializeToString()
    return lambda target: target.call(method, [message])


def ref_call(method: str, model_id: str, sequence_id: str) -> Callable[[Target], object]:
    ref = pb.SequenceRef(model_id=model_id, sequence_id=sequence_id)
    message = REQUEST_TYPES[method](sequence=ref).SerializeToString()
    return lambda target: target.call(method, [message])


POLICY_CASES = {
    f"{method}-{name}": (header_call(method, sequence_id=GOOD_ID, policy=policy), details)
    for method in ("Put", "Append")
    for name, policy, details in (
        ("nested_arrays", NESTED_POLICY, "nests deeper than"),
        ("nested_objects", NESTED_OBJECT_POLICY, "nests deeper than"),
        ("huge_json", HUGE_POLICY, f"more than the limit of {MAX_POLICY_BYTES}"),
        ("huge_name", HUGE_POLICY_NAME, "unknown policy 'ppp"),
    )
}
ID_CASES = {
    **{
        f"{method}-long_{field}": (
            ref_call(method, **{"model_id": MODEL, "sequence_id": "x", field: LONG_ID}),
            f"{field} must be a non-empty string",
        )
        for method in ("Prefetch", "Lookup", "Delete")
        for field in ("model_id", "sequence_id")
    },
    "Put-long_sequence_id": (
        header_call("Put", sequence_id=LONG_ID),
        "sequence_id must be a non-empty string",
    ),
    "Lookup-unknown_long_but_valid_id": (ref_call("Lookup", MODEL, "n" * 256), "is not held"),
}


def artifact_call(digest: str) -> Callable[[Target], object]:
    message = pb.GetArtifactRequest(digest=digest).SerializeToString()
    return lambda target: target.call("GetArtifact", [message])


DIGEST_CASES = {
    f"GetArtifact-{name}": (artifact_call(digest), details)
    for name, digest, details in (
        ("long_digest", LONG_ID, "64 lowercase hex digits"),
        ("huge_digest", HUGE_POLICY_NAME, "64 lowercase hex digits"),
        ("uppercase_digest", "A" * 64, "64 lowercase hex digits"),
        ("path_digest", "../" * 20 + "etc/passwd", "64 lowercase hex digits"),
        ("unknown_digest", "0" * 64, "is not held"),
    )
}


@pytest.mark.parametrize("name", list(POLICY_CASES) + list(ID_CASES) + list(DIGEST_CASES))
def test_hostile_policy_or_id_is_refused_with_bounded_details(hostile: Target, name: str) -> None:
    call, details = {**POLICY_CASES, **ID_CASES, **DIGEST_CASES}[name]
    code = C.NOT_FOUND if details == "is not held" else C.INVALID_ARGUMENT
    got = refused(lambda: call(hostile), code, details)
    assert LONG_ID not in got and HUGE_POLICY_NAME[:400] not in got


@pytest.mark.parametrize(
    "sequence_id",
    ["chat-1", "a/b:c", "x" * 256, "x" * 257, "has space", "tab\t", "caf\u00e9", ""],
    ids=["plain", "punctuation", "256", "257", "space", "tab", "non_ascii", "empty"],
)
def test_client_and_server_refuse_the_same_ids(hostile: Target, sequence_id: str) -> None:
    """One id rule (`minicache_client.protocol.check_id`) on both sides."""
    try:
        sequence_ref(MODEL, sequence_id)
        client_takes_it = True
    except InvalidArgumentError:
        client_takes_it = False
    lookup = ref_call("Lookup", MODEL, sequence_id)
    code = C.NOT_FOUND if client_takes_it else C.INVALID_ARGUMENT
    refused(lambda: lookup(hostile), code)


# -- oversized puts --------------------------------------------------------------------


def held_open_put(target: Target, messages: list[bytes], released: threading.Event):
    """A put that sends `messages`, then keeps its stream open until `released`."""

    def stream() -> Iterator[bytes]:
        yield from messages
        released.wait(TIMEOUT)

    call = target.channel.stream_unary(
        SERVICE + "Put", request_serializer=None, response_deserializer=None
    )
    return call.future(stream(), timeout=TIMEOUT)


def test_put_declaring_more_than_the_budget_is_refused_at_its_header(hostile: Target) -> None:
    """512 MiB of fp16 declared for a budget of 16 MiB (32 MiB even at one bit a
    value): refused while the stream is still open, before a single chunk."""
    hdr = _header(
        "declared-512MiB", num_layers=64, kv_heads=8, end_token=4096, head_dim=64, policy="kivi2"
    )
    released = threading.Event()
    future = held_open_put(hostile, [pb.PutRequest(header=hdr).SerializeToString()], released)
    try:
        refused(lambda: future.result(timeout=TIMEOUT / 2), C.RESOURCE_EXHAUSTED, "stores at least")
        assert not released.is_set()
    finally:
        released.set()
    # One layer alone above the budget, whatever the policy (256 MiB).
    big_layer = _header("big-layer", kv_heads=1024, head_dim=1024, end_token=64)
    refused(
        lambda: hostile.call("Put", [pb.PutRequest(header=big_layer).SerializeToString()]),
        C.RESOURCE_EXHAUSTED,
        "one layer of this put",
    )
    assert hostile.server.store.staged_bytes == 0


# -- cancellations ---------------------------------------------------------------------


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"not within {TIMEOUT} s: {what}"
        time.sleep(0.02)


def test_put_that_stops_sending_is_ended_and_frees_its_staging(
    hostile: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that keeps a put open and sends nothing more does not hold its staging
    (and a new write's reservation, which other writes wait for) for ever."""
    monkeypatch.setattr(servicer, "PUT_IDLE_S", 0.5)
    messages = put_messages("stalled-put", kv_layers(LAYERS, 4096, HEADS, DIM, seed=9))
    released = threading.Event()
    future = held_open_put(hostile, messages[:2], released)  # the header, one chunk
    try:
        refused(lambda: future.result(timeout=TIMEOUT), C.DEADLINE_EXCEEDED, "sent nothing")
    finally:
        released.set()
    wait_for(lambda: hostile.server.store.staged_bytes == 0, "the put's staging released")
    wait_for(lambda: not hostile.server.store.pending, "the put's generation released")


def test_put_cancelled_mid_stream_is_counted_as_cancelled(hostile: Target) -> None:
    before = hostile.requests("Put", "CANCELLED")
    messages = put_messages("cancelled-put", kv_layers(LAYERS, 4096, HEADS, DIM, seed=8))
    released = threading.Event()
    future = held_open_put(hostile, messages[: len(messages) // 2], released)
    try:
        # A write in progress holds a generation of its own (its groups are placed in the
        # tiers as they complete; only raw layers count as staging).
        wait_for(lambda: hostile.server.store.pending, "the put is in progress")
        assert future.cancel()
    finally:
        released.set()
    wait_for(lambda: hostile.requests("Put", "CANCELLED") == before + 1, "Put counted CANCELLED")
    wait_for(lambda: hostile.server.store.staged_bytes == 0, "the put's staging released")
    wait_for(lambda: not hostile.server.store.pending, "the put's generation released")
    lookup = ref_call("Lookup", MODEL, "cancelled-put")
    refused(lambda: lookup(hostile), C.NOT_FOUND, "is not held")


def test_prefetch_cancelled_mid_stream_is_counted_as_cancelled(hostile: Target) -> None:
    # 8 MiB: more than the transport buffers while the caller does not read.
    put(hostile, "Put", "long", kv_layers(LAYERS, 16384, HEADS, DIM, seed=9))
    before = hostile.requests("Prefetch", "CANCELLED")
    call = hostile.channel.unary_stream(
        SERVICE + "Prefetch", request_serializer=None, response_deserializer=None
    )
    request = pb.PrefetchRequest(sequence=pb.SequenceRef(model_id=MODEL, sequence_id="long"))
    responses = call(request.SerializeToString(), timeout=TIMEOUT)
    assert pb.PrefetchResponse.FromString(next(responses)).WhichOneof("item") == "header"
    responses.cancel()
    wait_for(
        lambda: hostile.requests("Prefetch", "CANCELLED") == before + 1,
        "Prefetch counted CANCELLED",
    )
    delete = ref_call("Delete", MODEL, "long")
    assert pb.DeleteResponse.FromString(delete(hostile)).deleted


# -- resident memory of a server process -----------------------------------------------

PROCESS_BUDGET = 4 << 20
# What the server process may grow by around the oversized puts: its staging (at most
# the budget) and the transport's buffers; far below what the puts send (96 + 200 MiB).
MAX_GROWTH_BYTES = 40 << 20
# The shape of the put streamed past the budget (its float32 layers are 2 MiB each).
STREAMED_HEADS, STREAMED_DIM = 2, 64
SERVER = str(Path(sys.executable).with_name("minicache-server"))


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def streamed_put(
    channel: grpc.Channel, header: pb.SequenceHeader, sent: list[int]
) -> Callable[[], object]:
    """A put of `header` that streams chunks of zeros (1 MiB or less) for every layer,
    counting the bytes it sent in `sent[0]`."""
    itemsize = {pb.DTYPE_FLOAT16: 2, pb.DTYPE_FLOAT32: 4}[header.dtype]
    token_bytes = header.kv_heads * header.head_dim * itemsize
    per_chunk = (1 << 19) // token_bytes  # keys + values: 1 MiB a message

    def stream() -> Iterator[bytes]:
        yield pb.PutRequest(header=header).SerializeToString()
        tokens = header.end_token
        for layer in range(header.num_layers):
            for offset in range(0, tokens, per_chunk):
                count = min(per_chunk, tokens - offset)
                data = bytes(count * token_bytes)
                chunk = pb.LayerChunk(
                    layer=layer, token_offset=offset, tokens=count, keys=data, values=data
                )
                sent[0] += 2 * len(data)
                yield pb.PutRequest(chunk=chunk).SerializeToString()

    call = channel.stream_unary(
        SERVICE + "Put", request_serializer=None, response_deserializer=None
    )
    return lambda: call(stream(), timeout=60)


def test_oversized_puts_leave_the_server_process_memory_bounded(tmp_path: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINICACHE_")}
    env.update(
        MINICACHE_LISTEN=address,
        MINICACHE_INSECURE="1",
        MINICACHE_DEVICE_BUDGET_BYTES=str(PROCESS_BUDGET),
        MINICACHE_LOG_FORMAT="json",
    )
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen([SERVER], env=env, stdout=log_file, stderr=subprocess.STDOUT)
    channel = grpc.insecure_channel(address)
    try:
        grpc.channel_ready_future(channel).result(timeout=30)
        target = RawChannel(channel)
        # Warm up every path once (a put, a prefetch), then measure. The compiled KIVI
        # kernels are built on first use (Numba: tens of MiB of compiler memory), so a
        # kivi4 put of the streamed put's dtype and shape comes first too (a kernel is
        # built per group width: the streamed put's heads of 64 need their own).
        good = kv_layers(LAYERS, 1024, HEADS, DIM, seed=12)
        put(target, "Put", GOOD_ID, good)
        assert_holds(target, GOOD_ID, good)
        warm = kv_layers(LAYERS, 256, STREAMED_HEADS, STREAMED_DIM, dtype=np.float32, seed=13)
        messages = put_messages(
            "warm-kivi4",
            warm,
            dtype="float32",
            policy="kivi4",
            kv_heads=STREAMED_HEADS,
            head_dim=STREAMED_DIM,
        )
        pb.PutResponse.FromString(target.call("Put", messages))
        baseline = resident_bytes(process.pid)

        # 96 MiB of float32 declared for a 4 MiB budget: past the header (at one bit per
        # value it would fit), refused once its entries fill the device tier, the only
        # tier here.
        sent = [0]
        staged = _header(
            "streamed-96MiB",
            num_layers=48,
            kv_heads=STREAMED_HEADS,
            end_token=2048,
            head_dim=STREAMED_DIM,
            dtype=pb.DTYPE_FLOAT32,
            policy="kivi4",
        )
        refused(streamed_put(channel, staged, sent), C.RESOURCE_EXHAUSTED, "no tier can hold")
        streamed = resident_bytes(process.pid)
        assert sent[0] < 96 << 20, "refused only after the whole put was sent"

        # The put: 512 MiB declared (128x the budget), then 200 MiB of chunks.
        sent = [0]
        declared = _header(
            "declared-512MiB",
            num_layers=16,
            kv_heads=8,
            end_token=16384,
            head_dim=64,
            policy="default",
        )
        refused(streamed_put(channel, declared, sent), C.RESOURCE_EXHAUSTED, "device budget")
        after = resident_bytes(process.pid)

        growth = max(streamed, after) - baseline
        assert growth < MAX_GROWTH_BYTES, (
            f"server grew by {growth >> 20} MiB (baseline {baseline >> 20} MiB)"
        )
        health = health_pb2_grpc.HealthStub(channel)
        answer = health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        assert_holds(target, GOOD_ID, good)
    finally:
        channel.close()
        process.terminate()
        process.wait(timeout=30)
    lines = log_path.read_text().splitlines()
    for line in lines:
        record = json.loads(line)
        assert record["level"] not in ("ERROR", "CRITICAL"), line[:600]
        assert "traceback" not in record, line[:600]
        assert len(line.encode()) <= MAX_LOG_LINE_BYTES, line[:600]
