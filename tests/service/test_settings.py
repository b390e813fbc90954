"""The cache server's settings: sizes, flags over env vars over defaults, and bad values
that stop start-up naming their env var."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from minicache_client.serving.settings import (
    MASK,
    SettingsError,
    add_setting_flags,
    config_json,
    masked_settings,
    parse_size,
    setting,
)
from minicache_server.settings import ServerSettings, env_name, load_settings
from minicache_server.tiers.redis_tier import parse_cluster_url

INSECURE = {"MINICACHE_INSECURE": "1"}
TOKEN_A = "token-of-tenant-a-0123456789"
TOKEN_B = "token-of-tenant-b-9876543210"


# -- sizes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1048576", 1048576),
        ("0", 0),
        ("10b", 10),
        ("10 B", 10),
        ("64k", 64_000),
        ("64kb", 64_000),
        ("64KiB", 64 << 10),
        ("64ki", 64 << 10),
        ("512MiB", 512 << 20),
        ("512mib", 512 << 20),
        ("2GB", 2_000_000_000),
        ("2g", 2_000_000_000),
        ("2GiB", 2 << 30),
        ("1TiB", 1 << 40),
        ("3T", 3 * 10**12),
        ("1.5GiB", 3 << 29),
        ("0.5KiB", 512),
        ("  7 MB  ", 7_000_000),
    ],
)
def test_parse_size_units(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1", "1e6", "12XB", "5 PiB", "MiB", "1,024", "1 2"])
def test_parse_size_refuses_what_is_no_size(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


# -- flags over env vars over defaults --------------------------------------------------


def test_defaults_without_flags_or_env() -> None:
    settings = load_settings([], INSECURE)
    assert settings == ServerSettings(insecure=True)
    assert settings.max_tokens == 1 << 17
    assert settings.device_budget_bytes == 1 << 30


def test_env_var_sets_a_value() -> None:
    settings = load_settings(
        [],
        {
            **INSECURE,
            "MINICACHE_MAX_TOKENS": "4096",
            "MINICACHE_DEVICE_BUDGET_BYTES": "2GiB",
            "MINICACHE_REDIS_TIMEOUT_S": "0.5",
            "MINICACHE_DEVICE": "cpu",
            "MINICACHE_LISTEN": "0.0.0.0:6000",
        },
    )
    assert settings.max_tokens == 4096
    assert settings.device_budget_bytes == 2 << 30
    assert settings.redis_timeout_s == 0.5
    assert settings.device == "cpu"
    assert settings.listen == "0.0.0.0:6000"


def test_flag_wins_over_env_var() -> None:
    settings = load_settings(
        ["--max-tokens", "100", "--device-budget-bytes", "64MiB", "--log-format", "text"],
        {
            **INSECURE,
            "MINICACHE_MAX_TOKENS": "50",
            "MINICACHE_DEVICE_BUDGET_BYTES": "1GiB",
            "MINICACHE_LOG_FORMAT": "json",
            "MINICACHE_MAX_LAYERS": "12",
        },
    )
    assert settings.max_tokens == 100
    assert settings.device_budget_bytes == 64 << 20
    assert settings.log_format == "text"
    assert settings.max_layers == 12  # no flag: the env var still counts


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1", True), ("true", True), ("Yes", True), ("on", True), ("0", False), ("off", False)],
)
def test_boolean_values(text: str, expected: bool, tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("x")
    secure = {"MINICACHE_TLS_CERT": str(cert), "MINICACHE_TLS_KEY": str(key)}
    secure["MINICACHE_TOKENS"] = f"{TOKEN_A}=a"
    assert load_settings([], {**secure, "MINICACHE_INSECURE": text}).insecure is expected
    # The flag is a switch: it wins over the env var either way.
    switch = "--insecure" if expected else "--no-insecure"
    opposite = "0" if expected else "1"
    assert load_settings([switch], {**secure, "MINICACHE_INSECURE": opposite}).insecure is expected


def test_a_switch_takes_no_value(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_settings(["--insecure", "1"], {})
    assert exit_info.value.code == 2
    assert "unrecognized arguments: 1" in capsys.readouterr().err


def test_environ_defaults_to_the_process_environment(monkeypatch) -> None:
    monkeypatch.setenv("MINICACHE_INSECURE", "1")
    monkeypatch.setenv("MINICACHE_MAX_LAYERS", "7")
    assert load_settings([]).max_layers == 7


# -- bad values name their env var ------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MINICACHE_MAX_TOKENS", "many"),
        ("MINICACHE_MAX_TOKENS", "0"),
        ("MINICACHE_MAX_TOKENS", "1e5"),
        ("MINICACHE_INSECURE", "maybe"),
        ("MINICACHE_DEVICE_BUDGET_BYTES", "lots"),
        ("MINICACHE_DEVICE_BUDGET_BYTES", "0"),
        ("MINICACHE_DEVICE", "tpu"),
        ("MINICACHE_REDIS_TIMEOUT_S", "0"),
        ("MINICACHE_REDIS_TIMEOUT_S", "soon"),
        ("MINICACHE_REDIS_POOL_SIZE", "0"),
        ("MINICACHE_REDIS_TTL_S", "-1"),
        ("MINICACHE_MAX_CHUNK_BYTES", "100"),
        ("MINICACHE_MAX_MESSAGE_BYTES", "1MiB"),
        ("MINICACHE_MAX_LAYERS", "0"),
        ("MINICACHE_STREAM_WINDOW_BYTES", "-1"),
        ("MINICACHE_GRACE_S", "-1"),
        ("MINICACHE_MEMORY_TRIM_S", "-1"),
        ("MINICACHE_WORK_THREADS", "-1"),
        ("MINICACHE_LOG_FORMAT", "xml"),
        ("MINICACHE_TLS_CERT", "/nonexistent/cert.pem"),
        ("MINICACHE_TOKENS_FILE", "/nonexistent/tokens"),
        ("MINICACHE_REDIS_TLS_CA", "/nonexistent/ca.pem"),
        ("MINICACHE_REDIS_PASSWORD_FILE", "/nonexistent/password"),
        ("MINICACHE_LOG_LEVEL", "LOUD"),
        ("MINICACHE_DEFAULT_POLICY", "no-such-preset"),
        ("MINICACHE_DEFAULT_POLICY", "/nonexistent/policy.json"),
    ],
)
def test_bad_env_value_names_its_variable(name: str, value: str) -> None:
    environ = {**INSECURE, name: value}
    if name == "MINICACHE_TLS_CERT":
        environ["MINICACHE_TLS_KEY"] = "/nonexistent/key.pem"
    with pytest.raises(SettingsError, match=name):
        load_settings([], environ)


def test_redis_cluster_takes_its_startup_nodes_from_the_url() -> None:
    url = "rediss://minicache@10.0.0.1:6379,10.0.0.2:6380,[::1]:6381"
    settings = load_settings(["--redis-mode", "cluster"], {**INSECURE, "MINICACHE_REDIS_URL": url})
    assert settings.redis_cluster and settings.tier_names() == ["device", "redis"]
    address = parse_cluster_url(settings.redis_url)
    assert address.tls and address.username == "minicache"
    assert address.nodes == (("10.0.0.1", 6379), ("10.0.0.2", 6380), ("::1", 6381))
    environ = {**INSECURE, "MINICACHE_REDIS_MODE": "cluster", "MINICACHE_REDIS_URL": url + "/0"}
    assert load_settings([], environ).redis_cluster


@pytest.mark.parametrize(
    ("environ", "named", "message"),
    [
        ({"MINICACHE_REDIS_MODE": "cluster"}, "MINICACHE_REDIS_MODE", "startup nodes"),
        ({"MINICACHE_REDIS_MODE": "sentinel"}, "MINICACHE_REDIS_MODE", "single or cluster"),
        (
            {"MINICACHE_REDIS_MODE": "cluster", "MINICACHE_REDIS_URL": "redis://h:1,h:2/3"},
            "MINICACHE_REDIS_URL",
            "no database",
        ),
        (
            {"MINICACHE_REDIS_MODE": "cluster", "MINICACHE_REDIS_URL": "redis://h:1,h"},
            "MINICACHE_REDIS_URL",
            "host:port",
        ),
        (
            {"MINICACHE_REDIS_MODE": "cluster", "MINICACHE_REDIS_URL": "http://h:1"},
            "MINICACHE_REDIS_URL",
            "redis://",
        ),
        ({"MINICACHE_REDIS_URL": "redis://h:1,h:2"}, "MINICACHE_REDIS_URL", "REDIS_MODE=cluster"),
        ({"MINICACHE_REDIS_KEY_PREFIX": "a{b}"}, "MINICACHE_REDIS_KEY_PREFIX", "'{'"),
        ({"MINICACHE_REDIS_KEY_PREFIX": ""}, "MINICACHE_REDIS_KEY_PREFIX", "non-empty"),
    ],
)
def test_bad_redis_cluster_settings_name_their_variable(environ, named, message) -> None:
    with pytest.raises(SettingsError, match=named) as raised:
        load_settings([], {**INSECURE, **environ})
    assert message in str(raised.value)


def test_bad_flag_value_names_its_variable() -> None:
    with pytest.raises(SettingsError, match="MINICACHE_MAX_TOKENS"):
        load_settings(["--max-tokens", "many"], {**INSECURE, "MINICACHE_MAX_TOKENS": "5"})


def test_tls_cert_without_key_is_refused(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    with pytest.raises(SettingsError, match=r"MINICACHE_TLS_CERT.*tls_key"):
        load_settings([], {**INSECURE, "MINICACHE_TLS_CERT": str(cert)})


def test_mutual_tls_without_a_server_certificate_is_refused(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    with pytest.raises(SettingsError, match="MINICACHE_TLS_CLIENT_CA"):
        ServerSettings(tls_client_ca=str(ca), insecure=True)
    with pytest.raises(SettingsError, match="MINICACHE_TLS_CLIENT_CA"):
        load_settings([], {**INSECURE, "MINICACHE_TLS_CLIENT_CA": str(ca)})


def test_security_is_required_unless_insecure() -> None:
    with pytest.raises(SettingsError, match="MINICACHE_INSECURE"):
        load_settings([], {})
    with pytest.raises(SettingsError, match="MINICACHE_INSECURE"):
        load_settings([], {"MINICACHE_TOKENS": f"{TOKEN_A}=a"})


# -- tokens -----------------------------------------------------------------------------


def test_tokens_file_with_comments_and_env_tokens(tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(
        "# token tenant\n"
        "\n"
        f"{TOKEN_A} tenant-a\n"
        f"   {TOKEN_B}\ttenant-b   # the second tenant\n"
        "   # an indented comment\n"
    )
    extra = "token-of-tenant-c-5555555555"
    settings = load_settings(
        [],
        {
            **INSECURE,
            "MINICACHE_TOKENS_FILE": str(tokens_file),
            "MINICACHE_TOKENS": f" {extra}=tenant-c , ",
        },
    )
    assert settings.token_tenants() == {TOKEN_A: "tenant-a", TOKEN_B: "tenant-b", extra: "tenant-c"}


@pytest.mark.parametrize(
    "bad_line", [f"{TOKEN_A}", f"{TOKEN_A} tenant-a extra", f"{TOKEN_A}=tenant-a"]
)
def test_tokens_file_bad_line_names_the_line(tmp_path: Path, bad_line: str) -> None:
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(f"# header\n{TOKEN_B} tenant-b\n{bad_line}\n")
    settings = ServerSettings(tokens_file=str(tokens_file), insecure=True)
    with pytest.raises(SettingsError, match="MINICACHE_TOKENS_FILE: line 3"):
        settings.token_tenants()


def test_short_token_in_the_file_is_refused(tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(f"{TOKEN_A} a\nshort b\n")
    settings = ServerSettings(tokens_file=str(tokens_file), insecure=True)
    with pytest.raises(SettingsError, match=r"line 2.*at least 16 characters"):
        settings.token_tenants()


@pytest.mark.parametrize("tokens", ["short=x", f"{TOKEN_A}=a,tiny=b"])
def test_short_token_in_env_is_refused(tokens: str) -> None:
    with pytest.raises(SettingsError, match="at least 16 characters"):
        ServerSettings(tokens=tokens, insecure=True).token_tenants()


@pytest.mark.parametrize(
    "tokens", [TOKEN_A, f"{TOKEN_A}=", f"={TOKEN_A}", f"{TOKEN_A}=a,{TOKEN_B}"]
)
def test_malformed_env_tokens_are_refused(tokens: str) -> None:
    with pytest.raises(SettingsError, match="MINICACHE_TOKENS: entries must be"):
        ServerSettings(tokens=tokens, insecure=True).token_tenants()


def test_one_token_for_two_tenants_is_refused(tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(f"{TOKEN_A} tenant-a\n")
    settings = ServerSettings(
        tokens_file=str(tokens_file), tokens=f"{TOKEN_A}=tenant-b", insecure=True
    )
    with pytest.raises(SettingsError, match="two tenants"):
        settings.token_tenants()


def test_same_token_twice_for_one_tenant_is_fine(tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(f"{TOKEN_A} tenant-a\n")
    settings = ServerSettings(
        tokens_file=str(tokens_file), tokens=f"{TOKEN_A}=tenant-a", insecure=True
    )
    assert settings.token_tenants() == {TOKEN_A: "tenant-a"}


# -- --print-config: the effective settings, secrets masked -------------------------------


def test_masked_settings_hide_tokens_passwords_and_url_passwords(tmp_path: Path) -> None:
    password_file = tmp_path / "redis-password"
    password_file.write_text("file-password-0123456789\n")
    settings = load_settings(
        ["--redis-password-file", str(password_file)],
        {
            **INSECURE,
            "MINICACHE_TOKENS": f"{TOKEN_A}=a,{TOKEN_B}=b",
            "MINICACHE_REDIS_PASSWORD": "env-password-0123456789",
            "MINICACHE_REDIS_URL": "rediss://minicache:url-password-0123@redis:6379/0",
        },
    )
    shown = masked_settings(settings)
    assert shown["tokens"] == MASK
    assert shown["redis_password"] == MASK
    assert shown["redis_url"] == f"rediss://minicache:{MASK}@redis:6379/0"
    assert shown["redis_password_file"] == str(password_file)
    assert shown["max_tokens"] == 1 << 17  # a count, not a secret
    assert shown["tokens_file"] == ""  # unset secrets and paths show as they are
    text = config_json(settings)
    for secret in (TOKEN_A, TOKEN_B, "env-password", "url-password", "file-password"):
        assert secret not in text
    assert json.loads(text) == shown


def test_a_setting_named_like_a_secret_is_masked_without_being_declared() -> None:
    @dataclass(frozen=True)
    class Named:
        api_token: str = setting("", "a token nobody declared secret")
        admin_password: str = setting("", "a password nobody declared secret")
        session: str = setting("", "declared secret", secret=True)
        url: str = setting("", "a URL without a password")

    shown = masked_settings(
        Named("tok-0123456789abcdef", "pw-0123456789", "sess-0123", "redis://user@host:1/0")
    )
    assert shown == {
        "api_token": MASK,
        "admin_password": MASK,
        "session": MASK,
        "url": "redis://user@host:1/0",
    }


def test_a_setting_without_help_has_no_flag() -> None:
    @dataclass(frozen=True)
    class Undocumented:
        listen: str = field(default="127.0.0.1:1")

    with pytest.raises(TypeError, match="listen has no help"):
        add_setting_flags(argparse.ArgumentParser(), Undocumented, env_name)
