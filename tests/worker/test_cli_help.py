"""Every flag of `eval`, `calibrate` and `demo` says what it does, and the top-level
description is a whole sentence."""

from __future__ import annotations

import argparse

import pytest

from minicache_worker import cli


def _subcommand(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[name]


@pytest.mark.parametrize("command", ["eval", "calibrate", "demo"])
def test_every_flag_has_help(command: str) -> None:
    parser = _subcommand(command)
    flags = [action for action in parser._actions if action.option_strings]
    assert len(flags) > 3
    for action in flags:
        assert action.help and action.help.strip(), f"{command} {action.option_strings}"
        if action.default not in (None, False, argparse.SUPPRESS):
            assert "default" in action.help, f"{command} {action.option_strings}"


@pytest.mark.parametrize("command", ["eval", "calibrate", "demo"])
def test_help_renders(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--model" in capsys.readouterr().out


def test_eval_help_states_the_exit_status(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Exit status: 0 when every policy ran; 1 when any policy" in text
    assert "auto draws them only when stderr is a terminal" in text


def test_top_level_description_is_not_cut_mid_sentence() -> None:
    description = cli.build_parser().description
    assert description.endswith(".")
    assert "calibration of compression policies" in description
