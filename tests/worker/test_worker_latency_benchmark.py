"""deploy/benchmarks/worker_latency.py runs end to end at its smoke sizes (`--quick`:
256- and 512-token histories, 4 decode steps, one round) and writes every figure."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "benchmarks" / "worker_latency.py"


def load_script():
    spec = importlib.util.spec_from_file_location("worker_latency", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.model
def test_quick_run_reports_every_figure(lm, tmp_path):
    bench = load_script()
    out = tmp_path / "latency.json"
    assert bench.main(["--quick", "--json", str(out)], lm=lm) == 0
    doc = json.loads(out.read_text())

    assert doc["benchmark"] == "worker_latency"
    machine = doc["machine"]
    assert machine["cpu_count"] >= 1
    assert machine["torch"] and machine["model"] == lm.name
    assert machine["model_dtype"] == "float32"
    config = doc["config"]
    assert config["history_tokens"] == [256, 512]
    assert config["decode_tokens"] == 4
    assert config["policy"] == "none"
    assert config["kv_dtype"] == "float32"
    assert config["wire_bytes_per_token"] == 2 * lm.num_layers * lm.kv_heads * lm.head_dim * 4
    assert positive(doc["wall_seconds"])
    assert doc["warmup"]["tokens_identical"] in (True, False)

    assert [result["history_tokens"] for result in doc["results"]] == [256, 512]
    for result in doc["results"]:
        history = result["history_tokens"]
        new = result["new_tokens"]
        # The resumed turns resumed the whole history; the recomputes restored nothing.
        for name in ("resumed_local", "resumed_remote"):
            for turn in result["turns"][name]:
                assert turn["cached_tokens"] == history
                assert turn["prefilled_tokens"] == new
                assert turn["recompute_reason"] == ""
        for turn in result["turns"]["plain"]:
            assert turn["cached_tokens"] == 0
            assert turn["prefilled_tokens"] == history + new
        for turn in result["turns"]["miss"]:
            assert turn["cached_tokens"] == 0
            assert turn["recompute_reason"] == "miss"
        assert result["history_stored_bitwise"] is True

        ttft = result["ttft"]
        for key in (
            "resumed_s",
            "resumed_remote_residency_s",
            "recompute_local_s",
            "recompute_miss_s",
            "first_turn_s",
            "recompute_over_resumed",
            "miss_over_resumed",
        ):
            assert positive(ttft[key]), (key, ttft[key])

        decode = result["decode"]
        for mode in ("plain", "service_local", "service_remote"):
            assert positive(decode["tokens_per_s"][mode]), mode
            assert positive(decode["step_s"][mode]), mode
        assert positive(decode["local_over_plain"])
        assert positive(decode["remote_over_plain"])
        # Local and remote residency run the same arithmetic on the same KV.
        assert decode["service_local_remote_identical"] is True

        step = result["remote_step"]
        assert step["position"] >= history + new
        assert step["wire_bytes"] == (step["position"] + 1) * config["wire_bytes_per_token"]
        for key in (
            "plain_step_s",
            "remote_step_s",
            "wire_s",
            "loopback_gbps",
            "service_prefetch_s",
            "prefetch_convert_s",
            "service_append_s",
        ):
            assert positive(step[key]), (key, step[key])
        # Noise can make a tiny remote step as fast as a plain one: finite, any sign.
        assert math.isfinite(step["overhead_s"])
        assert math.isfinite(step["overhead_over_wire"])

    assert [v["history_tokens"] for v in doc["verdicts"]] == [256, 512]
    assert all(isinstance(v["ttft_pass"], bool) for v in doc["verdicts"])
