"""`minicache-worker --help` and the `--help` of every subcommand, read as a user reads
them: every flag says what it does (and, for `serve`, its unit, default and env var);
booleans are switches; the top-level description is a whole sentence;
`serve --print-config` shows the effective settings with secrets masked."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from test_cli_help_server import (
    assert_every_flag_explains_itself,
    assert_settings_flags,
    help_entries,
)

from minicache_client.serving.settings import MASK
from minicache_worker import cli
from minicache_worker.worker_settings import WorkerSettings

COMMANDS = ["serve", "demo", "eval", "calibrate", "calibrate-transform"]
WORKER = str(Path(sys.executable).with_name("minicache-worker"))
CACHE_TOKEN = "cache-token-of-the-workers-0123456789"
CALLER_TOKEN = "caller-token-of-tenant-a-9876543210"


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")  # the width argparse wraps --help to


def test_top_level_help_lists_every_command_and_is_not_cut(capsys) -> None:
    text = _help([], capsys)
    listed = re.search(r"\{([a-z,-]+)\}", text)
    assert listed is not None and listed.group(1).split(",") == COMMANDS
    description = " ".join(text.split("positional arguments:")[0].split("\n\n", 1)[1].split())
    assert description == (
        "`minicache-worker`: the inference worker service, and accuracy evaluation and "
        "calibration of compression policies."
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_of_every_command_explains_itself(command: str, capsys) -> None:
    entries = help_entries(_help([command], capsys))
    entries.pop("--help")
    assert_every_flag_explains_itself(entries, f"minicache-worker {command}")
    for name, entry in entries.items():
        if entry.metavar:  # a flag with a value says what happens without it
            assert "default" in entry.text or "required" in entry.text, f"{command} {name}"


def test_serve_flags_name_their_unit_default_and_env_var(capsys) -> None:
    entries = help_entries(_help(["serve"], capsys))
    entries.pop("--help")
    assert_settings_flags(entries, WorkerSettings, "MINICACHE_WORKER_", "minicache-worker serve")
    assert "--print-config" in entries
    assert entries["--no-cache-insecure"].spellings == ["--cache-insecure", "--no-cache-insecure"]


def test_switches_take_no_value(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--insecure", "1"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: 1" in capsys.readouterr().err
    quantization_only = help_entries(_help(["calibrate"], capsys))["--quantization-only"]
    assert quantization_only.metavar == ""


def test_eval_help_states_the_exit_status(capsys) -> None:
    text = " ".join(_help(["eval"], capsys).split())
    assert "Exit status: 0 when every policy ran; 1 when any policy" in text
    assert "auto draws them only when stderr is a terminal" in text


def _run_worker(args: list[str], environ: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINICACHE_")}
    env.update(environ)
    return subprocess.run(
        [WORKER, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_serve_print_config_masks_secrets_and_exits(tmp_path: Path) -> None:
    tokens_file = tmp_path / "worker-tokens"
    tokens_file.write_text(f"{CALLER_TOKEN} tenant-a\n")
    result = _run_worker(
        ["serve", "--print-config", "--cache-insecure", "--max-queue", "3"],
        {
            "MINICACHE_WORKER_INSECURE": "true",
            "MINICACHE_WORKER_CACHE_TARGETS": "127.0.0.1:50051,127.0.0.1:50052",
            "MINICACHE_WORKER_CACHE_TOKEN": CACHE_TOKEN,
            "MINICACHE_WORKER_TOKENS_FILE": str(tokens_file),
            "MINICACHE_WORKER_TOKENS": f"{CALLER_TOKEN}=tenant-a",
            "MINICACHE_WORKER_MAX_QUEUE": "9",  # the flag wins
        },
    )
    assert result.returncode == 0, result.stderr
    assert CACHE_TOKEN not in result.stdout and CALLER_TOKEN not in result.stdout
    config = json.loads(result.stdout)
    assert list(config) == [f.name for f in fields(WorkerSettings)]
    assert config["cache_token"] == MASK
    assert config["tokens"] == MASK
    assert config["tokens_file"] == str(tokens_file)
    assert config["cache_targets"] == "127.0.0.1:50051,127.0.0.1:50052"
    assert config["cache_insecure"] is True and config["insecure"] is True
    assert config["max_queue"] == 3
    assert config["max_new_tokens_limit"] == 4096  # a number, though named "tokens"
    assert "worker ready" not in result.stderr  # exits before serving


def test_serve_print_config_refuses_a_bad_value_naming_its_variable() -> None:
    result = _run_worker(
        ["serve", "--print-config"],
        {"MINICACHE_WORKER_INSECURE": "1", "MINICACHE_WORKER_CACHE_TIMEOUT_S": "soon"},
    )
    assert result.returncode == 2
    assert "MINICACHE_WORKER_CACHE_TIMEOUT_S" in result.stderr
    assert result.stdout == ""
