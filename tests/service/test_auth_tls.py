"""TLS, mutual TLS and bearer tokens against a real server: every method refuses a
call without a known token, tenants never see each other's sequences, health answers
without a token, and a server without security refuses to start unless insecure."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from service_fixtures import ServerThread, kv_layers, settings_for

from minicache_client.proto import cache_service_pb2 as pb
from minicache_client.proto import cache_service_pb2_grpc as pb_grpc
from minicache_client.serving.settings import SettingsError
from minicache_client.wire import LayerAssembler, layer_chunks
from minicache_server.settings import ServerSettings

TIMEOUT = 10
TOKEN_A = "token-of-tenant-a-0123456789"
TOKEN_B = "token-of-tenant-b-9876543210"
TOKENS = f"{TOKEN_A}=tenant-a,{TOKEN_B}=tenant-b"
MODEL = "auth-model"
A_ID = "a-sequence"
LAYERS, TOKEN_COUNT, HEADS, DIM = 4, 32, 2, 16
A_LAYERS = kv_layers(LAYERS, TOKEN_COUNT, HEADS, DIM, seed=31)
B_LAYERS = kv_layers(LAYERS, TOKEN_COUNT, HEADS, DIM, seed=32)
EXTRA = kv_layers(LAYERS, 4, HEADS, DIM, seed=33)

KV = list[tuple]


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def ref(sequence_id: str = A_ID) -> pb.SequenceRef:
    return pb.SequenceRef(model_id=MODEL, sequence_id=sequence_id)


def header(sequence_id: str = A_ID, start: int = 0, end: int = TOKEN_COUNT) -> pb.SequenceHeader:
    return pb.SequenceHeader(
        sequence=ref(sequence_id),
        num_layers=LAYERS,
        kv_heads=HEADS,
        head_dim=DIM,
        dtype=pb.DTYPE_FLOAT16,
        start_token=start,
        end_token=end,
        policy="none" if start == 0 else "",
    )


def layer_messages(layers: KV) -> list[pb.LayerChunk]:
    return [
        chunk
        for index, (keys, values) in enumerate(layers)
        for chunk in layer_chunks(index, keys, values, "float16")
    ]


def put_requests(hdr: pb.SequenceHeader, layers: KV) -> list[pb.PutRequest]:
    return [pb.PutRequest(header=hdr)] + [pb.PutRequest(chunk=c) for c in layer_messages(layers)]


def put(stub, metadata, layers: KV, sequence_id: str = A_ID) -> pb.PutResponse:
    return stub.Put(
        iter(put_requests(header(sequence_id), layers)), metadata=metadata, timeout=TIMEOUT
    )


def extension(sequence_id: str = A_ID) -> pb.AppendRequest:
    return pb.AppendRequest(
        header=header(sequence_id, TOKEN_COUNT, TOKEN_COUNT + 4), layers=layer_messages(EXTRA)
    )


def prefetched(stub, metadata, sequence_id: str = A_ID) -> KV:
    messages = iter(
        stub.Prefetch(
            pb.PrefetchRequest(sequence=ref(sequence_id)), metadata=metadata, timeout=TIMEOUT
        )
    )
    hdr = next(messages).header
    assembler = LayerAssembler(LAYERS, HEADS, hdr.end_token - hdr.start_token, DIM, "float16")
    layers = {}
    for message in messages:
        done = assembler.add(message.chunk)
        if done is not None:
            layers[message.chunk.layer] = done
    return [layers[index] for index in range(LAYERS)]


def assert_same(got: KV, expected: KV) -> None:
    assert len(got) == len(expected)
    for (keys, values), (want_keys, want_values) in zip(got, expected, strict=True):
        assert keys.tobytes() == want_keys.tobytes()
        assert values.tobytes() == want_values.tobytes()


def refused(call: Callable[[], object], code: grpc.StatusCode) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    error = info.value
    assert error.code() != grpc.StatusCode.UNKNOWN, error.details()
    assert error.code() == code, f"expected {code.name}, got {error.code().name}: {error.details()}"
    return error


def tls_credentials(certificates: dict[str, Path], client_cert: bool = False):
    root = certificates["ca.pem"].read_bytes()
    if not client_cert:
        return grpc.ssl_channel_credentials(root_certificates=root)
    return grpc.ssl_channel_credentials(
        root_certificates=root,
        private_key=certificates["client.key"].read_bytes(),
        certificate_chain=certificates["client.pem"].read_bytes(),
    )


def secure_settings(certificates: dict[str, Path], **overrides) -> ServerSettings:
    return settings_for(
        tls_cert=str(certificates["server.pem"]),
        tls_key=str(certificates["server.key"]),
        tokens=TOKENS,
        insecure=False,
        **overrides,
    )


@dataclass
class Secure:
    server: ServerThread
    channel: grpc.Channel
    stub: pb_grpc.CacheServiceStub


@pytest.fixture(scope="module")
def secure(certificates: dict[str, Path]) -> Iterator[Secure]:
    """A TLS server with tokens for tenants a and b; tenant a holds A_ID."""
    server = ServerThread(secure_settings(certificates))
    channel = grpc.secure_channel(server.address, tls_credentials(certificates))
    try:
        stub = pb_grpc.CacheServiceStub(channel)
        put(stub, bearer(TOKEN_A), A_LAYERS)
        yield Secure(server, channel, stub)
    finally:
        channel.close()
        server.stop()


@pytest.fixture
def stub(secure: Secure) -> Iterator[pb_grpc.CacheServiceStub]:
    """The TLS server's stub; after the test tenant a still holds A_ID unchanged."""
    yield secure.stub
    lookup = secure.stub.Lookup(
        pb.LookupRequest(sequence=ref()), metadata=bearer(TOKEN_A), timeout=TIMEOUT
    )
    assert lookup.header.end_token == TOKEN_COUNT
    assert_same(prefetched(secure.stub, bearer(TOKEN_A)), A_LAYERS)


# -- tokens -----------------------------------------------------------------------------

CALLS: dict[str, Callable[[pb_grpc.CacheServiceStub, tuple], object]] = {
    # Every call addresses tenant a's sequence: a refused one must leave it as it is.
    "Put": lambda stub, md: put(stub, md, B_LAYERS),
    "Append": lambda stub, md: stub.Append(extension(), metadata=md, timeout=TIMEOUT),
    "Prefetch": lambda stub, md: list(
        stub.Prefetch(pb.PrefetchRequest(sequence=ref()), metadata=md, timeout=TIMEOUT)
    ),
    "Lookup": lambda stub, md: stub.Lookup(
        pb.LookupRequest(sequence=ref()), metadata=md, timeout=TIMEOUT
    ),
    "Delete": lambda stub, md: stub.Delete(
        pb.DeleteRequest(sequence=ref()), metadata=md, timeout=TIMEOUT
    ),
    "Stats": lambda stub, md: stub.Stats(pb.StatsRequest(), metadata=md, timeout=TIMEOUT),
    "GetArtifact": lambda stub, md: list(
        stub.GetArtifact(pb.GetArtifactRequest(digest="0" * 64), metadata=md, timeout=TIMEOUT)
    ),
}
BAD_CREDENTIALS = {
    "no_token": (),
    "unknown_token": bearer("an-unknown-token-of-enough-length"),
    "token_prefix": bearer(TOKEN_A[:-1]),
    "wrong_scheme": (("authorization", f"Basic {TOKEN_A}"),),
    "empty_bearer": (("authorization", "Bearer "),),
}


def test_every_service_method_is_covered() -> None:
    methods = pb.DESCRIPTOR.services_by_name["CacheService"].methods_by_name
    assert set(CALLS) == set(methods)


@pytest.mark.parametrize("credentials", BAD_CREDENTIALS)
@pytest.mark.parametrize("method", CALLS)
def test_call_without_a_known_token_is_unauthenticated(stub, method: str, credentials: str) -> None:
    error = refused(
        lambda: CALLS[method](stub, BAD_CREDENTIALS[credentials]), grpc.StatusCode.UNAUTHENTICATED
    )
    assert "bearer token" in error.details()


def test_health_answers_without_a_token(secure: Secure) -> None:
    health = health_pb2_grpc.HealthStub(secure.channel)
    for service in ("", "minicache.v1.CacheService"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service_with_a_token(secure: Secure, certificates) -> None:
    credentials = grpc.composite_channel_credentials(
        tls_credentials(certificates), grpc.access_token_call_credentials(TOKEN_A)
    )
    with grpc.secure_channel(secure.server.address, credentials) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "minicache.v1.CacheService" in services
    assert "grpc.health.v1.Health" in services


def test_reflection_needs_a_token(secure: Secure) -> None:
    reflection = reflection_pb2_grpc.ServerReflectionStub(secure.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    refused(
        lambda: list(reflection.ServerReflectionInfo(iter([request]), timeout=TIMEOUT)),
        grpc.StatusCode.UNAUTHENTICATED,
    )


# -- tenants ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda stub, md: CALLS["Prefetch"](stub, md), id="Prefetch"),
        pytest.param(lambda stub, md: CALLS["Lookup"](stub, md), id="Lookup"),
        pytest.param(lambda stub, md: CALLS["Append"](stub, md), id="Append"),
        pytest.param(
            lambda stub, md: stub.Put(
                iter(put_requests(header(A_ID, TOKEN_COUNT, TOKEN_COUNT + 4), EXTRA)),
                metadata=md,
                timeout=TIMEOUT,
            ),
            id="Put-extension",
        ),
    ],
)
def test_other_tenant_does_not_find_the_sequence(stub, call) -> None:
    error = refused(lambda: call(stub, bearer(TOKEN_B)), grpc.StatusCode.NOT_FOUND)
    assert "not held" in error.details()


def test_other_tenant_cannot_delete_the_sequence(stub) -> None:
    answer = stub.Delete(
        pb.DeleteRequest(sequence=ref()), metadata=bearer(TOKEN_B), timeout=TIMEOUT
    )
    assert not answer.deleted
    # The fixture then checks that tenant a still holds it, unchanged.


def test_same_ids_in_two_tenants_are_two_sequences(stub) -> None:
    sequence_id = "same-id-both-tenants"
    put(stub, bearer(TOKEN_A), A_LAYERS, sequence_id)
    put(stub, bearer(TOKEN_B), B_LAYERS, sequence_id)
    try:
        assert_same(prefetched(stub, bearer(TOKEN_A), sequence_id), A_LAYERS)
        assert_same(prefetched(stub, bearer(TOKEN_B), sequence_id), B_LAYERS)
    finally:
        for token in (TOKEN_A, TOKEN_B):
            deleted = stub.Delete(
                pb.DeleteRequest(sequence=ref(sequence_id)), metadata=bearer(token), timeout=TIMEOUT
            )
            assert deleted.deleted


def test_stats_count_the_callers_tenant_only(stub) -> None:
    stats_a = stub.Stats(pb.StatsRequest(), metadata=bearer(TOKEN_A), timeout=TIMEOUT)
    stats_b = stub.Stats(pb.StatsRequest(), metadata=bearer(TOKEN_B), timeout=TIMEOUT)
    assert (stats_a.sequences, stats_a.tokens) == (1, TOKEN_COUNT)
    assert stats_a.device_bytes > 0 and stats_a.fp16_bytes > 0
    assert (stats_b.sequences, stats_b.tokens, stats_b.device_bytes, stats_b.fp16_bytes) == (
        0,
        0,
        0,
        0,
    )
    put(stub, bearer(TOKEN_B), B_LAYERS, "b-own")
    try:
        stats_b = stub.Stats(pb.StatsRequest(), metadata=bearer(TOKEN_B), timeout=TIMEOUT)
        assert (stats_b.sequences, stats_b.tokens) == (1, TOKEN_COUNT)
        again_a = stub.Stats(pb.StatsRequest(), metadata=bearer(TOKEN_A), timeout=TIMEOUT)
        assert (again_a.sequences, again_a.tokens) == (1, TOKEN_COUNT)
    finally:
        stub.Delete(
            pb.DeleteRequest(sequence=ref("b-own")), metadata=bearer(TOKEN_B), timeout=TIMEOUT
        )


# -- transport --------------------------------------------------------------------------


def test_plaintext_client_fails_against_the_tls_port(secure: Secure) -> None:
    with grpc.insecure_channel(secure.server.address) as channel:
        stub = pb_grpc.CacheServiceStub(channel)
        refused(
            lambda: stub.Stats(pb.StatsRequest(), metadata=bearer(TOKEN_A), timeout=TIMEOUT),
            grpc.StatusCode.UNAVAILABLE,
        )


def test_client_that_does_not_trust_the_ca_fails(secure: Secure, certificates) -> None:
    # The client certificate is no CA: the server's chain does not verify against it.
    untrusting = grpc.ssl_channel_credentials(
        root_certificates=certificates["client.pem"].read_bytes()
    )
    with grpc.secure_channel(secure.server.address, untrusting) as channel:
        stub = pb_grpc.CacheServiceStub(channel)
        refused(
            lambda: stub.Stats(pb.StatsRequest(), metadata=bearer(TOKEN_A), timeout=TIMEOUT),
            grpc.StatusCode.UNAVAILABLE,
        )


def test_mutual_tls_needs_the_client_certificate(make_server, certificates) -> None:
    server = make_server(
        **{
            field: getattr(secure_settings(certificates), field)
            for field in ("tls_cert", "tls_key", "tokens", "insecure")
        },
        tls_client_ca=str(certificates["ca.pem"]),
    )
    with grpc.secure_channel(server.address, tls_credentials(certificates)) as channel:
        stub = pb_grpc.CacheServiceStub(channel)
        refused(
            lambda: stub.Stats(pb.StatsRequest(), metadata=bearer(TOKEN_A), timeout=TIMEOUT),
            grpc.StatusCode.UNAVAILABLE,
        )
    with grpc.secure_channel(
        server.address, tls_credentials(certificates, client_cert=True)
    ) as channel:
        stub = pb_grpc.CacheServiceStub(channel)
        stats = stub.Stats(pb.StatsRequest(), metadata=bearer(TOKEN_A), timeout=TIMEOUT)
        assert stats.sequences == 0
        # A certificate is not a token: the bearer token is still required.
        refused(
            lambda: stub.Stats(pb.StatsRequest(), timeout=TIMEOUT), grpc.StatusCode.UNAUTHENTICATED
        )


def test_tokens_are_checked_over_plaintext_in_insecure_mode(make_server) -> None:
    server = make_server(tokens=TOKENS, insecure=True)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.CacheServiceStub(channel)
        refused(
            lambda: stub.Stats(pb.StatsRequest(), timeout=TIMEOUT), grpc.StatusCode.UNAUTHENTICATED
        )
        assert (
            stub.Stats(pb.StatsRequest(), metadata=bearer(TOKEN_B), timeout=TIMEOUT).sequences == 0
        )


# -- settings that refuse to start ------------------------------------------------------


@pytest.mark.parametrize("with_tls", [False, True], ids=["nothing", "tls_only"])
def test_server_refuses_to_start_without_tls_and_tokens(certificates, with_tls: bool) -> None:
    tls = (
        {"tls_cert": str(certificates["server.pem"]), "tls_key": str(certificates["server.key"])}
        if with_tls
        else {}
    )
    with pytest.raises(SettingsError, match="MINICACHE_INSECURE"):
        ServerSettings(listen="127.0.0.1:0", metrics_listen="", insecure=False, **tls)


def test_server_refuses_tokens_without_tls() -> None:
    with pytest.raises(SettingsError, match="MINICACHE_INSECURE"):
        ServerSettings(listen="127.0.0.1:0", tokens=TOKENS, insecure=False)


def test_short_token_is_refused() -> None:
    settings = ServerSettings(tokens="short=x", insecure=True)
    with pytest.raises(SettingsError, match="at least 16 characters"):
        settings.token_tenants()
