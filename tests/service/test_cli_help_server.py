"""`minicache-server --help`, read as a user reads it: every flag says what it does,
its unit, default and env var; booleans are switches; `--print-config` shows the
effective settings with secrets masked. `help_entries` is the reader of a rendered
`--help` that tests/worker/test_cli_help.py uses for every `minicache-worker` command."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

from minicache_client.serving.settings import MASK
from minicache_server.settings import ServerSettings

# The console script installed beside this interpreter (the venv's bin/).
SERVER = str(Path(sys.executable).with_name("minicache-server"))
TOKEN = "token-of-tenant-a-0123456789abcdef"
OTHER_TOKEN = "token-of-tenant-b-fedcba9876543210"
REDIS_PASSWORD = "redis-password-not-to-be-shown"
# A help entry: "  --flag METAVAR    text" or "  --flag, --no-flag" alone on its line.
ENTRY = re.compile(r"^  (-\S.*?)(?:\s{2,}(\S.*))?$")
TRAILER = re.compile(r"\s*\[[^\[\]]*\]$")


class HelpEntry:
    """One flag of a rendered `--help`: its spellings, metavar ("" for a switch) and
    description (continuation lines joined)."""

    def __init__(self, spec: str, text: str) -> None:
        self.spellings: list[str] = []
        self.metavar = ""
        for part in spec.split(", "):
            flag, _, metavar = part.partition(" ")
            self.spellings.append(flag)
            self.metavar = self.metavar or metavar
        self.text = text

    @property
    def what(self) -> str:
        """The description without the "[unit; default ...; env ...]" trailer."""
        return TRAILER.sub("", self.text).strip()


def help_entries(text: str) -> dict[str, HelpEntry]:
    """Long flag name -> entry, for every flag of the "options:" section."""
    entries: dict[str, HelpEntry] = {}
    in_options, current = False, None
    for line in text.splitlines():
        if line and not line.startswith(" "):
            in_options, current = line.rstrip().endswith("options:"), None
            continue
        if not in_options or not line.strip():
            continue
        match = ENTRY.match(line)
        if match:
            current = HelpEntry(match.group(1), match.group(2) or "")
            entries[current.spellings[-1]] = current
        elif current is not None:
            current.text = f"{current.text} {line.strip()}".strip()
    return entries


def assert_every_flag_explains_itself(entries: dict[str, HelpEntry], command: str) -> None:
    """Each flag has a description of a few words beyond its metavar, env var and
    default."""
    assert len(entries) > 3, f"{command}: no flags read from --help"
    for name, entry in entries.items():
        bare = re.sub(r"\b(env|default:?)\s+\S+", "", entry.what)
        words = [w for w in re.findall(r"[A-Za-z]{2,}", bare) if w != entry.metavar]
        assert len(words) >= 3, f"{command} {name}: says no more than {entry.text!r}"


def assert_settings_flags(
    entries: dict[str, HelpEntry], settings_class: type, prefix: str, command: str
) -> None:
    """One flag per setting, naming its env var and default, with its unit; booleans
    as `--name, --no-name` switches that take no value."""
    for f in fields(settings_class):
        flag = f"--{f.name.replace('_', '-')}"
        booleans = f.type in ("bool", bool)
        entry = entries.get(f"--no-{flag[2:]}" if booleans else flag)
        assert entry is not None, f"{command}: no flag for {f.name}"
        env = f"{prefix}{f.name.upper()}"
        assert re.search(rf"\benv {env}\b", entry.text), f"{command} {flag}: {entry.text!r}"
        assert "default" in entry.text, f"{command} {flag}: {entry.text!r}"
        if booleans:
            assert entry.spellings == [flag, f"--no-{flag[2:]}"], entry.spellings
            assert entry.metavar == "", f"{command} {flag} takes a value: {entry.metavar}"
        else:
            assert entry.metavar, f"{command} {flag}: no metavar"
        if f.name.endswith("_bytes"):
            assert "bytes" in entry.text and "MiB" in entry.text, entry.text
        if f.name.endswith("_s"):
            assert "seconds" in entry.text, entry.text


def run_server(args: list[str], environ: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINICACHE_")}
    env.update(environ, COLUMNS="100")
    return subprocess.run(
        [SERVER, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_every_flag_of_the_server_explains_itself() -> None:
    result = run_server(["--help"], {})
    assert result.returncode == 0, result.stderr
    entries = help_entries(result.stdout)
    entries.pop("--help")
    assert_every_flag_explains_itself(entries, "minicache-server")
    assert_settings_flags(entries, ServerSettings, "MINICACHE_", "minicache-server")
    assert set(entries) == {
        *(f"--{f.name.replace('_', '-')}" for f in fields(ServerSettings)),
        "--no-insecure",
        "--print-config",
    } - {"--insecure"}
    assert "1073741824 = 1 GiB" in entries["--device-budget-bytes"].text
    description = " ".join(result.stdout.split("options:")[0].split())
    assert "A bad value stops start-up naming its variable (exit status 2)." in description


def test_switches_take_no_value_and_the_env_var_keeps_true_false() -> None:
    on = run_server(["--insecure", "--print-config"], {})
    assert on.returncode == 0, on.stderr
    assert json.loads(on.stdout)["insecure"] is True
    given_a_value = run_server(["--insecure", "1", "--print-config"], {})
    assert given_a_value.returncode == 2
    assert "unrecognized arguments: 1" in given_a_value.stderr
    for text in ("true", "1", "yes"):
        by_env = run_server(["--print-config"], {"MINICACHE_INSECURE": text})
        assert json.loads(by_env.stdout)["insecure"] is True, by_env.stderr
    # --no-insecure wins over the env var, and then the server must have TLS and tokens.
    refused = run_server(["--no-insecure", "--print-config"], {"MINICACHE_INSECURE": "true"})
    assert refused.returncode == 2
    assert "MINICACHE_INSECURE" in refused.stderr


def test_print_config_shows_effective_settings_with_secrets_masked(tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(f"{OTHER_TOKEN} tenant-b\n")
    result = run_server(
        ["--print-config", "--max-tokens", "4096", "--log-format", "text"],
        {
            "MINICACHE_INSECURE": "1",
            "MINICACHE_TOKENS": f"{TOKEN}=tenant-a",
            "MINICACHE_TOKENS_FILE": str(tokens_file),
            "MINICACHE_REDIS_URL": f"redis://minicache:{REDIS_PASSWORD}@127.0.0.1:6379/0",
            "MINICACHE_REDIS_PASSWORD": REDIS_PASSWORD,
            "MINICACHE_DEVICE_BUDGET_BYTES": "2GiB",
            "MINICACHE_MAX_TOKENS": "8",  # the flag wins
        },
    )
    assert result.returncode == 0, result.stderr
    for secret in (TOKEN, OTHER_TOKEN, REDIS_PASSWORD):
        assert secret not in result.stdout
    config = json.loads(result.stdout)
    assert list(config) == [f.name for f in fields(ServerSettings)]
    assert config["tokens"] == MASK
    assert config["redis_password"] == MASK
    assert config["redis_url"] == f"redis://minicache:{MASK}@127.0.0.1:6379/0"
    assert config["tokens_file"] == str(tokens_file)  # the path, never the contents
    assert config["device_budget_bytes"] == 2 << 30
    assert config["max_tokens"] == 4096
    assert config["log_format"] == "text"
    assert config["listen"] == "127.0.0.1:50051"
    assert config["insecure"] is True


def test_print_config_refuses_a_bad_value_naming_its_variable() -> None:
    result = run_server(
        ["--print-config"], {"MINICACHE_INSECURE": "1", "MINICACHE_LOG_LEVEL": "LOUD"}
    )
    assert result.returncode == 2
    assert "MINICACHE_LOG_LEVEL" in result.stderr
    assert result.stdout == ""
