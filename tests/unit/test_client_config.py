"""ClientConfig: every bad value stops construction with the field's name; the channel
options declare bounded retries of UNAVAILABLE only; the token travels as metadata on a
plaintext channel and as call credentials over TLS."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import grpc
import pytest

from minicache_client.cache_client import CacheClient, check_timeout
from minicache_client.channel import (
    SERVICE_NAME,
    ClientConfig,
    call_metadata,
    channel_options,
    create_channel,
)

PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


@pytest.fixture
def pem_files(tmp_path: Path) -> dict[str, str]:
    files = {}
    for name in ("ca", "cert", "key"):
        path = tmp_path / f"{name}.pem"
        path.write_text(PEM)
        files[name] = str(path)
    return files


def test_defaults_of_a_plaintext_config() -> None:
    config = ClientConfig("localhost:50051", insecure=True)
    assert config.timeout_s == 10.0
    assert config.max_chunk_bytes == 1 << 20
    assert config.max_message_bytes == 8 << 20
    assert not config.secure


def test_config_is_frozen() -> None:
    config = ClientConfig("localhost:50051", insecure=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.timeout_s = 1.0  # type: ignore[misc]


def test_plaintext_must_be_asked_for() -> None:
    with pytest.raises(ValueError, match=r"tls_ca is empty.*insecure=True"):
        ClientConfig("localhost:50051")


@pytest.mark.parametrize(
    "target",
    [
        "",
        "   ",
        "localhost",
        "localhost:",
        ":50051",
        "localhost:0",
        "localhost:65536",
        "localhost:http",
        "local host:50051",
    ],
)
def test_bad_targets_are_refused(target: str) -> None:
    with pytest.raises(ValueError, match="target"):
        ClientConfig(target, insecure=True)


@pytest.mark.parametrize(
    "target", ["127.0.0.1:1", "[::1]:50051", "dns:///cache.internal:50051", "unix:/tmp/mc.sock"]
)
def test_good_targets_are_accepted(target: str) -> None:
    assert ClientConfig(target, insecure=True).target == target


@pytest.mark.parametrize("timeout_s", [0, -1.0, math.nan, math.inf, True, "10"])
def test_timeout_must_be_positive_and_finite(timeout_s: object) -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        ClientConfig("localhost:50051", insecure=True, timeout_s=timeout_s)  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["max_chunk_bytes", "max_message_bytes"])
@pytest.mark.parametrize("value", [0, -5, 1.5, True])
def test_sizes_must_be_positive_integers(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        ClientConfig("localhost:50051", insecure=True, **{field: value})


def test_a_chunk_must_fit_in_a_message() -> None:
    with pytest.raises(ValueError, match=r"max_message_bytes .* must exceed max_chunk_bytes"):
        ClientConfig(
            "localhost:50051", insecure=True, max_chunk_bytes=4 << 20, max_message_bytes=4 << 20
        )


@pytest.mark.parametrize("token", ["two words", "line\nbreak", "tab\there"])
def test_token_must_be_one_printable_word(token: str) -> None:
    with pytest.raises(ValueError, match="token"):
        ClientConfig("localhost:50051", insecure=True, token=token)


def test_tls_files_must_exist(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(ValueError, match=r"tls_ca: no such file"):
        ClientConfig("localhost:50051", tls_ca=missing)


def test_tls_and_insecure_contradict(pem_files: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="tls_ca and insecure"):
        ClientConfig("localhost:50051", tls_ca=pem_files["ca"], insecure=True)


def test_client_certificate_and_key_go_together(pem_files: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="tls_client_cert and tls_client_key"):
        ClientConfig("localhost:50051", tls_ca=pem_files["ca"], tls_client_cert=pem_files["cert"])


@pytest.mark.parametrize("field", ["tls_client_cert", "tls_client_key", "tls_server_name"])
def test_tls_options_need_tls(field: str, pem_files: dict[str, str]) -> None:
    value = "cache.internal" if field == "tls_server_name" else pem_files["cert"]
    extra = {field: value}
    if field == "tls_client_cert":
        extra["tls_client_key"] = pem_files["key"]
    if field == "tls_client_key":
        extra["tls_client_cert"] = pem_files["cert"]
    with pytest.raises(ValueError, match="needs TLS: set tls_ca"):
        ClientConfig("localhost:50051", insecure=True, **extra)


def test_mutual_tls_config_is_secure(pem_files: dict[str, str]) -> None:
    config = ClientConfig(
        "cache:50051",
        tls_ca=pem_files["ca"],
        tls_client_cert=pem_files["cert"],
        tls_client_key=pem_files["key"],
        tls_server_name="cache.internal",
    )
    assert config.secure
    assert ("grpc.ssl_target_name_override", "cache.internal") in channel_options(config)


def test_service_config_retries_unavailable_only() -> None:
    options = dict(channel_options(ClientConfig("localhost:50051", insecure=True)))
    assert options["grpc.enable_retries"] == 1
    (method,) = json.loads(options["grpc.service_config"])["methodConfig"]
    assert SERVICE_NAME == "minicache.v1.CacheService"
    retried = {entry["method"] for entry in method["name"]}
    assert {entry["service"] for entry in method["name"]} == {SERVICE_NAME}
    # Every unary or server-streamed method, never the client-streamed Put.
    assert retried == {"Append", "Prefetch", "Lookup", "Delete", "Stats", "GetArtifact"}
    assert method["retryPolicy"] == {
        "maxAttempts": 4,
        "initialBackoff": "0.05s",
        "maxBackoff": "1s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }


def test_message_limits_and_keepalive_in_options() -> None:
    config = ClientConfig("localhost:50051", insecure=True, max_message_bytes=6 << 20)
    options = dict(channel_options(config))
    assert options["grpc.max_send_message_length"] == 6 << 20
    assert options["grpc.max_receive_message_length"] == 6 << 20
    assert options["grpc.keepalive_time_ms"] > options["grpc.keepalive_timeout_ms"] > 0
    assert "grpc.ssl_target_name_override" not in options


def test_token_is_per_call_metadata_on_plaintext() -> None:
    config = ClientConfig("localhost:50051", insecure=True, token="s3cr3t-token-0123")
    assert call_metadata(config) == (("authorization", "Bearer s3cr3t-token-0123"),)
    assert call_metadata(ClientConfig("localhost:50051", insecure=True)) is None


def test_token_is_not_repeated_as_metadata_over_tls(pem_files: dict[str, str]) -> None:
    config = ClientConfig("localhost:50051", tls_ca=pem_files["ca"], token="s3cr3t-token-0123")
    assert call_metadata(config) is None  # the channel's call credentials carry it


def test_channels_are_built_for_both_modes(pem_files: dict[str, str]) -> None:
    for config in (
        ClientConfig("localhost:50051", insecure=True, token="t0k3n"),
        ClientConfig("localhost:50051", tls_ca=pem_files["ca"], token="t0k3n"),
    ):
        channel = create_channel(config)
        try:
            assert isinstance(channel, grpc.Channel)
        finally:
            channel.close()


def test_call_timeout_override_is_checked() -> None:
    assert check_timeout(None, 10.0) == 10.0
    assert check_timeout(2, 10.0) == 2.0
    for bad in (0, -1, math.nan, True):
        with pytest.raises(ValueError, match="timeout_s"):
            check_timeout(bad, 10.0)


def test_client_is_a_context_manager_that_closes_its_channel() -> None:
    with CacheClient(ClientConfig("127.0.0.1:9", insecure=True)) as client:
        assert client.target == "127.0.0.1:9"
    with pytest.raises(ValueError, match="closed channel"):
        client.lookup("model", "sequence")
