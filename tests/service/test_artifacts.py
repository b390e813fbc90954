"""Calibration artifacts of transform policies against real servers on loopback.

The server reads them from its artifact directory (MINICACHE_ARTIFACT_DIR) and refuses
a policy whose artifact it lacks or holds corrupt (FAILED_PRECONDITION, the hash in the
details) or that does not fit the model (INVALID_ARGUMENT); GetArtifact streams an
artifact by hash to any known token (NOT_FOUND, INVALID_ARGUMENT, UNAUTHENTICATED); a
client whose process lacks an artifact restores the compressed wire form by fetching
it (`use_for_artifacts`), or asks for restored KV.

In-process servers share the test process's registry (`ARTIFACTS`, which
`sample_artifact` fills); the tests of a client that lacks the artifact run the server
as a `minicache-server` process that holds it only in its directory, while the test
process's registry is emptied for the test.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from service_fixtures import ServerThread, free_port, kv_layers, settings_for
from transform_samples import sample_artifact, transform_policy

from minicache_client.aio_client import AsyncCacheClient
from minicache_client.cache_client import CacheClient
from minicache_client.channel import ClientConfig
from minicache_client.errors import (
    CacheError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from minicache_client.proto import cache_service_pb2 as pb
from minicache_client.proto import cache_service_pb2_grpc as pb_grpc
from minicache_client.protocol import ArtifactStream
from minicache_client.serving.rpc_methods import MAX_DETAILS_BYTES
from minicache_client.serving.settings import SettingsError
from minicache_client.transform_artifact import (
    ARTIFACT_SUFFIX,
    ARTIFACTS,
    BUNDLED_DIRECTORY,
    CorruptArtifactError,
)
from minicache_server.service.server import start_server

TIMEOUT = 10
MODEL = "artifact-model"
LAYERS, TOKENS, HEADS, DIM = 4, 64, 2, 16
TOKEN_A = "token-of-tenant-a-0123456789"
TOKEN_B = "token-of-tenant-b-9876543210"
SERVER = str(Path(sys.executable).with_name("minicache-server"))

# The artifact every test uses (a seed of its own: no other module registers it).
ARTIFACT, DIGEST = sample_artifact(seed=4242)
POLICY = transform_policy(DIGEST).to_json()
MISSING = hashlib.sha256(b"an artifact no server holds").hexdigest()
C = grpc.StatusCode


def layers(tokens: int = TOKENS, seed: int = 0, head_dim: int = DIM):
    return kv_layers(LAYERS, tokens, HEADS, head_dim, dtype=np.float32, seed=seed)


def client(address: str) -> CacheClient:
    """A plaintext client whose chunks fit every server here (`artifact_server`'s 4 KiB)."""
    return CacheClient(ClientConfig(address, insecure=True, max_chunk_bytes=4096))


def artifact_dir(directory: Path, files: dict[str, bytes]) -> Path:
    """A directory holding `files` as `<name>.mcta`."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / f"{name}.mcta").write_bytes(data)
    return directory


def corrupt_files() -> dict[str, tuple[str, bytes]]:
    """Case -> (the hash a policy names, the file's bytes under that name)."""
    flipped = bytearray(sample_artifact(seed=4343)[0])
    flipped[len(flipped) // 2] ^= 0xFF  # in the payload: the checksum fails
    flipped = bytes(flipped)
    truncated = ARTIFACT[: len(ARTIFACT) // 3]
    return {
        # Named by its own hash, so only the file's checksum can tell.
        "bytes_flipped": (hashlib.sha256(flipped).hexdigest(), flipped),
        # A valid artifact under another artifact's name.
        "misnamed": (hashlib.sha256(b"another artifact").hexdigest(), ARTIFACT),
        "truncated": (hashlib.sha256(truncated).hexdigest(), truncated),
    }


CORRUPT = corrupt_files()


def assert_refused(error: CacheError, code: grpc.StatusCode, *mentions: str) -> str:
    details = str(error)
    assert error.code == code, details
    assert len(details.encode()) <= MAX_DETAILS_BYTES + 64, details
    for text in mentions:
        assert text in details, f"{details!r} does not mention {text!r}"
    return details


def assert_close(got, expected, sink_tokens: int = 2) -> None:
    """Transform coded KV: the sink tokens exact, every value within a few quantization
    steps (the sample artifact's step is 0.05)."""
    assert len(got) == len(expected)
    for (keys, values), (want_keys, want_values) in zip(got, expected, strict=True):
        for tensor, want in ((keys, want_keys), (values, want_values)):
            assert tensor.shape == want.shape
            assert np.array_equal(tensor[:, :sink_tokens], want[:, :sink_tokens])
            assert float(np.abs(tensor - want).max()) < 0.1


def assert_same(got, expected) -> None:
    assert len(got) == len(expected)
    for (keys, values), (want_keys, want_values) in zip(got, expected, strict=True):
        assert keys.tobytes() == want_keys.tobytes()
        assert values.tobytes() == want_values.tobytes()


def counted(server: ServerThread, code: str, expected: int) -> bool:
    """Whether the server counted `expected` GetArtifact calls of `code`, within a few
    seconds: a call is counted after its status reaches the client."""
    deadline = time.monotonic() + 5
    while server.server.metrics.requests.value(method="GetArtifact", code=code) != expected:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def artifact_server(make_server, tmp_path: Path) -> ServerThread:
    """An in-process server whose artifact directory holds the artifact and the corrupt
    files; pieces of 4 KiB, so an artifact takes several."""
    files = {DIGEST: ARTIFACT, **dict(CORRUPT.values())}
    directory = artifact_dir(tmp_path / "artifacts", files)
    return make_server(artifact_dir=str(directory), max_chunk_bytes=4096)


# -- policies that name an artifact -------------------------------------------------------


def test_put_append_and_prefetch_with_a_transform_policy(artifact_server: ServerThread) -> None:
    full = layers(TOKENS + 8, seed=1)
    first = [(k[:, :TOKENS], v[:, :TOKENS]) for k, v in full]
    extra = [(k[:, TOKENS:], v[:, TOKENS:]) for k, v in full]
    with client(artifact_server.address) as cache:
        result = cache.put(MODEL, "round-trip", first, dtype="float32", policy=POLICY)
        assert result.tokens == TOKENS
        assert cache.append(MODEL, "round-trip", extra, dtype="float32", start_token=TOKENS)
        policy = json.loads(cache.lookup(MODEL, "round-trip").policy)
        assert policy["transform"]["artifact"] == DIGEST
        restored = cache.prefetch_layers(MODEL, "round-trip")
        compressed = cache.prefetch_layers(MODEL, "round-trip", wire_form="compressed")
    assert_close(restored, full)
    assert_same(compressed, restored)


def test_policy_naming_a_missing_artifact_is_failed_precondition(
    artifact_server: ServerThread,
) -> None:
    policy = transform_policy(MISSING).to_json()
    with client(artifact_server.address) as cache:
        with pytest.raises(FailedPreconditionError) as info:
            cache.put(MODEL, "missing", layers(), dtype="float32", policy=policy)
        assert_refused(info.value, C.FAILED_PRECONDITION, MISSING, "not held")
        with pytest.raises(NotFoundError):
            cache.lookup(MODEL, "missing")


@pytest.mark.parametrize("case", CORRUPT)
def test_corrupt_artifact_is_refused_naming_its_hash(
    artifact_server: ServerThread, case: str
) -> None:
    digest, _ = CORRUPT[case]
    policy = transform_policy(digest).to_json()
    with client(artifact_server.address) as cache:
        with pytest.raises(FailedPreconditionError) as info:
            cache.put(MODEL, f"corrupt-{case}", layers(), dtype="float32", policy=policy)
        assert_refused(info.value, C.FAILED_PRECONDITION, digest, "corrupt")
        # Never sent either.
        with pytest.raises(FailedPreconditionError) as info:
            cache.get_artifact(digest)
        assert_refused(info.value, C.FAILED_PRECONDITION, digest, "corrupt")
        # The server goes on serving the good one.
        assert cache.get_artifact(DIGEST) == ARTIFACT


def test_artifact_that_does_not_fit_the_model_is_invalid_argument(
    artifact_server: ServerThread,
) -> None:
    with client(artifact_server.address) as cache:
        with pytest.raises(InvalidArgumentError) as info:
            cache.put(MODEL, "unfit", layers(head_dim=8), dtype="float32", policy=POLICY)
        assert_refused(info.value, C.INVALID_ARGUMENT, DIGEST, "16 dims")
        groups = transform_policy(DIGEST, groups=((0, 1, 2),)).to_json()
        with pytest.raises(InvalidArgumentError) as info:
            cache.put(MODEL, "unfit", layers(), dtype="float32", policy=groups)
        assert_refused(info.value, C.INVALID_ARGUMENT, DIGEST, "no transform for layers")


def test_default_policy_may_name_an_artifact(make_server, tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text(POLICY)
    directory = artifact_dir(tmp_path / "artifacts", {DIGEST: ARTIFACT})
    server = make_server(artifact_dir=str(directory), default_policy=str(path))
    with client(server.address) as cache:
        cache.put(MODEL, "by-default", layers(), dtype="float32")
        policy = json.loads(cache.lookup(MODEL, "by-default").policy)
    assert policy["transform"]["artifact"] == DIGEST


@pytest.mark.parametrize("case", ["missing", "corrupt"])
def test_default_policy_without_its_artifact_stops_start_up(tmp_path: Path, case: str) -> None:
    digest = MISSING if case == "missing" else CORRUPT["bytes_flipped"][0]
    path = tmp_path / "policy.json"
    path.write_text(transform_policy(digest).to_json())
    directory = artifact_dir(tmp_path / "artifacts", dict([CORRUPT["bytes_flipped"]]))
    settings = settings_for(artifact_dir=str(directory), default_policy=str(path))
    before = list(ARTIFACTS.directories)
    with pytest.raises(SettingsError) as info:
        asyncio.run(start_server(settings))
    assert "MINICACHE_DEFAULT_POLICY" in str(info.value) and digest in str(info.value)
    assert ARTIFACTS.directories == before  # the directory it added is gone again


def test_artifact_dir_must_be_a_directory(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="MINICACHE_ARTIFACT_DIR"):
        settings_for(artifact_dir=str(tmp_path / "nowhere"))


def test_stopped_server_leaves_the_registry_as_it_was(tmp_path: Path) -> None:
    before = list(ARTIFACTS.directories)
    server = ServerThread(settings_for(artifact_dir=str(artifact_dir(tmp_path / "a", {}))))
    try:
        assert ARTIFACTS.directories[0] == tmp_path / "a"
    finally:
        server.stop()
    assert ARTIFACTS.directories == before


# -- GetArtifact ------------------------------------------------------------------------


def test_get_artifact_returns_the_exact_bytes_in_pieces(artifact_server: ServerThread) -> None:
    with client(artifact_server.address) as cache:
        assert cache.get_artifact(DIGEST) == ARTIFACT
    with grpc.insecure_channel(artifact_server.address) as channel:
        stub = pb_grpc.CacheServiceStub(channel)
        pieces = list(stub.GetArtifact(pb.GetArtifactRequest(digest=DIGEST), timeout=TIMEOUT))
    assert len(pieces) == -(-len(ARTIFACT) // 4096) > 1
    assert all(len(piece.data) <= 4096 for piece in pieces)
    assert b"".join(piece.data for piece in pieces) == ARTIFACT
    assert {piece.total_bytes for piece in pieces} == {len(ARTIFACT)}
    assert counted(artifact_server, "OK", 2)


def test_get_artifact_of_an_unknown_hash_is_not_found(artifact_server: ServerThread) -> None:
    with client(artifact_server.address) as cache, pytest.raises(NotFoundError) as info:
        cache.get_artifact(MISSING)
    assert_refused(info.value, C.NOT_FOUND, MISSING)
    assert counted(artifact_server, "NOT_FOUND", 1)


@pytest.mark.parametrize(
    "digest",
    ["", "abc", DIGEST.upper(), DIGEST + "0", DIGEST[:-1] + "g", "x" * 5000],
    ids=["empty", "short", "uppercase", "65_digits", "not_hex", "huge"],
)
def test_get_artifact_of_a_malformed_hash_is_invalid_argument(
    artifact_server: ServerThread, digest: str
) -> None:
    with client(artifact_server.address) as cache, pytest.raises(InvalidArgumentError):
        cache.get_artifact(digest)  # refused here, before a call
    with grpc.insecure_channel(artifact_server.address) as channel:
        stub = pb_grpc.CacheServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.GetArtifact(pb.GetArtifactRequest(digest=digest), timeout=TIMEOUT))
    assert info.value.code() == C.INVALID_ARGUMENT
    assert "64 lowercase hex digits" in info.value.details()
    assert len(info.value.details().encode()) <= MAX_DETAILS_BYTES


def test_async_client_gets_the_artifact(artifact_server: ServerThread) -> None:
    async def fetch() -> tuple[bytes, CacheError]:
        config = ClientConfig(artifact_server.address, insecure=True)
        async with AsyncCacheClient(config) as cache:
            data = await cache.get_artifact(DIGEST)
            with pytest.raises(NotFoundError) as info:
                await cache.get_artifact(MISSING)
        return data, info.value

    data, error = asyncio.run(fetch())
    assert data == ARTIFACT
    assert_refused(error, C.NOT_FOUND, MISSING)


def test_artifact_stream_that_breaks_the_protocol_is_refused() -> None:
    """What a client does with pieces a server should not send."""
    piece = pb.GetArtifactResponse
    stream = ArtifactStream(DIGEST)
    with pytest.raises(InvalidArgumentError, match="at byte 5"):
        stream.feed(piece(data=b"abc", total_bytes=10, offset=5))
    stream = ArtifactStream(DIGEST)
    with pytest.raises(InvalidArgumentError, match="at most"):
        stream.feed(piece(data=b"abc", total_bytes=1 << 40, offset=0))
    stream = ArtifactStream(DIGEST)
    stream.feed(piece(data=b"abc", total_bytes=10, offset=0))
    with pytest.raises(FailedPreconditionError, match="3 of 10"):
        stream.finish()
    stream = ArtifactStream(DIGEST)
    stream.feed(piece(data=ARTIFACT[:-1] + b"?", total_bytes=len(ARTIFACT), offset=0))
    with pytest.raises(CorruptArtifactError, match=DIGEST):
        stream.finish()


# -- GetArtifact under TLS and tokens -----------------------------------------------------


@pytest.fixture(scope="module")
def secure_server(certificates: dict[str, Path]) -> Iterator[ServerThread]:
    """TLS and tokens of tenants a and b; the artifact in the test process's registry."""
    server = ServerThread(
        settings_for(
            tls_cert=str(certificates["server.pem"]),
            tls_key=str(certificates["server.key"]),
            tokens=f"{TOKEN_A}=tenant-a,{TOKEN_B}=tenant-b",
            insecure=False,
        )
    )
    try:
        yield server
    finally:
        server.stop()


def secure_client(server: ServerThread, certificates: dict[str, Path], token: str):
    config = ClientConfig(server.address, token=token, tls_ca=str(certificates["ca.pem"]))
    return CacheClient(config)


@pytest.mark.parametrize("token", ["", "an-unknown-token-of-enough-length", TOKEN_A[:-1]])
def test_get_artifact_needs_a_known_token(secure_server, certificates, token: str) -> None:
    cache = secure_client(secure_server, certificates, token)
    with cache, pytest.raises(CacheError) as info:
        cache.get_artifact(DIGEST)
    assert_refused(info.value, C.UNAUTHENTICATED, "bearer token")


@pytest.mark.parametrize("token", [TOKEN_A, TOKEN_B], ids=["tenant_a", "tenant_b"])
def test_get_artifact_answers_a_token_of_any_tenant(
    secure_server, certificates, token: str
) -> None:
    """Artifacts are model calibration, not tenant data."""
    with secure_client(secure_server, certificates, token) as cache:
        assert cache.get_artifact(DIGEST) == ARTIFACT
        with pytest.raises(NotFoundError):
            cache.get_artifact(MISSING)


# -- a client whose process lacks the artifact ----------------------------------------------


class ServerProcess:
    """`minicache-server` as a process whose artifact directory holds the artifact (and a
    corrupt file); its own HOME, so no other directory of its registry holds one."""

    def __init__(self, workdir: Path) -> None:
        files = {DIGEST: ARTIFACT, **dict([CORRUPT["misnamed"]])}
        self.directory = artifact_dir(workdir / "server-artifacts", files)
        self.address = f"127.0.0.1:{free_port()}"
        self.log = workdir / "server.log"
        home = workdir / "home"
        home.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MINICACHE_")}
        env.update(
            HOME=str(home),
            MINICACHE_LISTEN=self.address,
            MINICACHE_METRICS_LISTEN="",
            MINICACHE_INSECURE="1",
            MINICACHE_ARTIFACT_DIR=str(self.directory),
            MINICACHE_GRACE_S="1",
        )
        with open(self.log, "w") as log:
            self.process = subprocess.Popen([SERVER], env=env, stdout=log, stderr=log)
        self._wait_serving()

    def _wait_serving(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"server exited early: {self.log.read_text()[-2000:]}")
            try:
                with grpc.insecure_channel(self.address) as channel:
                    health = health_pb2_grpc.HealthStub(channel)
                    answer = health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.1)
        self.stop()
        pytest.fail("server did not become SERVING within 60 s")

    def log_records(self) -> list[dict]:
        lines = self.log.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def server_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The server process, holding sequence `stored` (transform coded)."""
    server = ServerProcess(tmp_path_factory.mktemp("artifact-server"))
    try:
        with client(server.address) as cache:
            cache.put(MODEL, "stored", layers(seed=3), dtype="float32", policy=POLICY)
        yield server
    finally:
        server.stop()


@pytest.fixture
def bare_registry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The test process's registry as a fresh process has it: nothing loaded, no
    artifact in its one directory (returned), no fetch."""
    cache_dir = tmp_path / "client-artifacts"
    monkeypatch.setattr(ARTIFACTS, "_loaded", {})
    monkeypatch.setattr(ARTIFACTS, "directories", [cache_dir])
    monkeypatch.setattr(ARTIFACTS, "fetch", None)
    return cache_dir


def test_server_process_logs_the_artifacts_of_its_directory(
    server_process: ServerProcess,
) -> None:
    records = [
        r for r in server_process.log_records() if r.get("message") == "calibration artifacts"
    ]
    assert records, server_process.log.read_text()[-2000:]
    assert records[0]["artifact_dir"] == str(server_process.directory)
    # Its directory's two, and the artifacts bundled with the SDK (the shipped default's).
    bundled = len(list(BUNDLED_DIRECTORY.glob(f"*{ARTIFACT_SUFFIX}")))
    assert records[0]["artifacts"] == 2 + bundled


def test_server_process_refuses_what_its_directory_lacks_or_holds_corrupt(
    server_process: ServerProcess,
) -> None:
    with client(server_process.address) as cache:
        with pytest.raises(FailedPreconditionError) as info:
            cache.put(
                MODEL, "x", layers(), dtype="float32", policy=transform_policy(MISSING).to_json()
            )
        assert_refused(info.value, C.FAILED_PRECONDITION, MISSING)
        digest = CORRUPT["misnamed"][0]
        with pytest.raises(FailedPreconditionError) as info:
            cache.put(
                MODEL, "x", layers(), dtype="float32", policy=transform_policy(digest).to_json()
            )
        assert_refused(info.value, C.FAILED_PRECONDITION, digest, "corrupt")


def test_client_lacking_the_artifact_restores_by_fetching_it(
    server_process: ServerProcess, bare_registry: Path
) -> None:
    expected = layers(seed=3)
    with client(server_process.address) as cache:
        # Restored by the server: no artifact needed here.
        restored = cache.prefetch_layers(MODEL, "stored")
        assert_close(restored, expected)
        # The compressed form needs the artifact, which this process lacks.
        with pytest.raises(FailedPreconditionError) as info:
            cache.prefetch_layers(MODEL, "stored", wire_form="compressed")
        assert DIGEST in str(info.value) and "use_for_artifacts" in str(info.value)
        cache.use_for_artifacts()
        assert ARTIFACTS.fetch == cache.get_artifact
        compressed = cache.prefetch_layers(MODEL, "stored", wire_form="compressed")
        assert_same(compressed, restored)
    assert ARTIFACTS.fetch is None  # close() undid use_for_artifacts
    # Kept on disk: a later process finds it there without a fetch.
    assert (bare_registry / f"{DIGEST}.mcta").read_bytes() == ARTIFACT


def test_async_client_lacking_the_artifact_restores_by_fetching_it(
    server_process: ServerProcess, bare_registry: Path
) -> None:
    async def prefetch() -> tuple[list, list]:
        config = ClientConfig(server_process.address, insecure=True)
        async with AsyncCacheClient(config) as cache:
            cache.use_for_artifacts()
            compressed = await cache.prefetch_layers(MODEL, "stored", wire_form="compressed")
            restored = await cache.prefetch_layers(MODEL, "stored")
        assert ARTIFACTS.fetch is None
        return compressed, restored

    compressed, restored = asyncio.run(prefetch())
    assert_same(compressed, restored)
    assert (bare_registry / f"{DIGEST}.mcta").read_bytes() == ARTIFACT


def test_fetch_failure_is_the_typed_error_of_the_call(
    server_process: ServerProcess, bare_registry: Path
) -> None:
    """A server that cannot send the artifact: the compressed prefetch raises the
    fetch's typed error."""
    with client(server_process.address) as cache:
        cache.use_for_artifacts()
        ARTIFACTS.fetch = lambda digest: cache.get_artifact(MISSING)
        with pytest.raises(NotFoundError) as info:
            cache.prefetch_layers(MODEL, "stored", wire_form="compressed")
    assert MISSING in str(info.value)
