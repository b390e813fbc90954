"""deploy/loadtest/capacity.py end to end at smoke sizes: real `minicache-server`
processes on loopback with a 16 MiB device budget, random KV of 256-token sessions,
`none` and `kivi4`, two-second load steps. Its JSON carries every figure with the
`none` baseline beside it, and `kivi4` holds more sessions than `none`."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

LOADTEST = Path(__file__).resolve().parents[2] / "deploy" / "loadtest"
HELD_FIELDS = (
    "sessions",
    "device_full",
    "device_bytes",
    "device_bytes_per_session",
    "sessions_per_gib",
    "none_sessions",
    "none_sessions_per_gib",
    "sessions_vs_none",
    "device_bytes_per_token",
    "sessions_per_gib_at_mean_length",
    "sessions_per_gib_at_mean_length_vs_none",
)
STEP_FIELDS = (
    "concurrent_sessions",
    "turns",
    "turns_per_s",
    "hits",
    "recomputes",
    "hit_rate",
    "prefetch_ms",
    "turn_ms",
    "compute_s_per_turn",
    "refused_writes",
    "failed_writes",
    "none",
)


@pytest.fixture
def capacity(monkeypatch):
    monkeypatch.syspath_prepend(str(LOADTEST))  # its sibling modules (load_test)
    spec = importlib.util.spec_from_file_location("capacity", LOADTEST / "capacity.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "capacity", module)  # dataclasses look it up
    spec.loader.exec_module(module)
    return module


def test_smoke_run_reports_sessions_held_and_the_load_sweep(capacity, tmp_path):
    out = tmp_path / "capacity.json"
    argv = [
        "--kv", "random", "--tokens", "256", "--device-budget", "16MiB",
        "--policies", "kivi4", "none", "--sessions", "40",
        "--load-multiples", "1", "2", "--step-seconds", "2",
        "--prefill-ms-per-token", "0.2", "--json", str(out), "--plots", str(tmp_path),
    ]  # fmt: skip
    assert capacity.main(argv) == 0
    report = json.loads(out.read_text())

    assert list(report["policies"]) == ["none", "kivi4"]  # the baseline runs first
    assert report["device_budget_bytes"] == 16 << 20
    none, kivi4 = (report["policies"][name]["held"] for name in ("none", "kivi4"))
    for held in (none, kivi4):
        assert set(HELD_FIELDS) <= set(held)
        assert held["device_full"], held["stopped_by"]
        assert 0 < held["device_bytes"] <= 16 << 20
        assert held["none_sessions"] == none["sessions"] >= 1
    assert kivi4["sessions"] > none["sessions"]
    assert kivi4["device_bytes_per_token"] < none["device_bytes_per_token"]
    assert kivi4["sessions_per_gib_at_mean_length_vs_none"] > 2  # kivi4 is ~3x on any KV
    assert kivi4["sessions_vs_none"] == kivi4["sessions"] / none["sessions"]

    for policy, result in report["policies"].items():
        held = result["held"]["sessions"]
        assert [step["load_multiple"] for step in result["sweep"]] == [1, 2]
        for step in result["sweep"]:
            assert set(STEP_FIELDS) <= set(step), policy
            assert step["concurrent_sessions"] == round(step["load_multiple"] * held)
            assert step["turns"] > 0 and math.isfinite(step["turns_per_s"])
            assert (
                step["none"]["concurrent_sessions"]
                == report["policies"]["none"]["sweep"][[1, 2].index(step["load_multiple"])][
                    "concurrent_sessions"
                ]
            )
            assert not step["crashed_threads"] and step["threads_still_running"] == 0
            assert step["sequences_left_on_server"] == 0
    assert [row["policy"] for row in report["summary"]] == ["none", "kivi4"]
    for name in ("sessions", "throughput", "hit_rate", "prefetch_p99", "turn_time"):
        assert (tmp_path / f"capacity_{name}.png").stat().st_size > 1000
    # The plots are drawn from the JSON alone.
    assert capacity.main(["--replot", str(out), "--plots", str(tmp_path / "again")]) == 0
    assert len(list((tmp_path / "again").glob("capacity_*.png"))) == 5


def test_arguments_are_checked(capacity, capsys):
    for argv, message in (
        (["--policies", "kivi4"], "must include none"),
        (["--device-budget", "lots"], "not a size"),
        (["--load-multiples", "0"], "each in (0, 64]"),
        (["--kv", "random"], "set --prefill-ms-per-token"),
        (["--replot", "report.json"], "--replot needs --plots"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            capacity.parse_args(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
