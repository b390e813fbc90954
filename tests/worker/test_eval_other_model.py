"""`eval` and `calibrate` on a model of another shape than the bundled one.

A tiny Llama built from a config (6 layers, 2 KV heads of 32, random weights, seeded)
with the bundled model's tokenizer, saved as a Hugging Face directory and loaded
through `--model` like a user's own model. Accuracy figures of random weights mean
nothing: these tests check which policy runs, error rows and exit statuses.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from minicache_client.policy import (
    FALLBACK_POLICY,
    PRESETS,
    CompressionPolicy,
    ModelShape,
    Quantization,
)
from minicache_worker import cli
from minicache_worker.evaluation import evaluate_each
from minicache_worker.models import resolve_model_source

TINY = ModelShape(num_layers=6, kv_heads=2, head_dim=32)
TINY_EVAL_FLAGS = [
    "--context-tokens=64",
    "--continuation-tokens=16",
    "--needle-cases=1",
    "--needle-context-tokens=64",
    "--needle-answer-tokens=4",
    "--greedy-prompts=1",
    "--greedy-tokens=4",
]
ROW_FIELDS = {"model", "policy", "resolved_policy", "compression_ratio", "perplexity"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source, kwargs = resolve_model_source("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=TINY.num_layers,
        num_attention_heads=4,
        num_key_value_heads=TINY.kv_heads,
        head_dim=TINY.head_dim,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_calibrated(tiny_model: Path, tmp_path_factory) -> Path:
    """A policy that `calibrate` wrote for the tiny model (quantization step only)."""
    out = tmp_path_factory.mktemp("calibrated") / "tiny.json"
    code = cli.main(
        [
            "calibrate",
            "--model",
            str(tiny_model),
            "--out",
            str(out),
            "--name",
            "tiny_calibrated",
            "--quantization-only",
            "--budget=0.5",
            "--context-tokens=32",
            "--scored-tokens=16",
            "--decode-chunk-tokens=16",
            "--merge-window=16",
            "--windows=1",
        ]
    )
    assert code == cli.EXIT_OK
    return out


def test_calibrate_writes_the_shape_of_its_model(tiny_calibrated: Path) -> None:
    written = json.loads(tiny_calibrated.read_text())
    assert written["calibrated_for"] == {"num_layers": 6, "kv_heads": 2, "head_dim": 32}
    policy = CompressionPolicy.from_json(tiny_calibrated.read_text())
    assert policy.calibrated_for == TINY
    assert policy.unfit_reason(TINY) is None
    assert "calibrated for 6 layers" in policy.unfit_reason(ModelShape(30, 3, 64))


def test_eval_runs_every_policy_that_fits_and_reports_the_others_as_error_rows(
    tiny_model: Path, tiny_calibrated: Path, tmp_path: Path, capsys
) -> None:
    bundled_shape = ModelShape(30, 3, 64)
    other_model = tmp_path / "other_model.json"
    other_model.write_text(
        replace(PRESETS["kivi4"], name="other_model", calibrated_for=bundled_shape).to_json()
    )
    layer_29 = tmp_path / "layer_29.json"
    layer_29.write_text(
        CompressionPolicy(
            "layer_29", quantization=Quantization(full_precision_layers=(29,))
        ).to_json()
    )
    out, plot = tmp_path / "out.json", tmp_path / "out.png"
    policies = ["kivi4", "default", str(other_model), str(tiny_calibrated), str(layer_29)]
    code = cli.main(
        [
            "eval",
            "--model",
            str(tiny_model),
            *(flag for policy in policies for flag in ("--policy", policy)),
            "--json",
            str(out),
            "--plot",
            str(plot),
            *TINY_EVAL_FLAGS,
        ]
    )

    assert code == cli.EXIT_POLICY_FAILED
    rows = json.loads(out.read_text())
    assert [row["policy"] for row in rows] == [
        "kivi4",
        "default",
        "other_model",
        "tiny_calibrated",
        "layer_29",
    ]
    kivi4, default, other, calibrated, named_29 = rows
    for row in (kivi4, default, calibrated):
        assert row.keys() >= ROW_FIELDS
        assert "error" not in row
        assert row["context_tokens"] == 64
    assert kivi4["resolved_policy"] == "kivi4"
    assert default["resolved_policy"] == FALLBACK_POLICY == "kivi4_sink"
    assert CompressionPolicy.from_dict(default["policy_config"]) == PRESETS[FALLBACK_POLICY]
    assert calibrated["resolved_policy"] == "tiny_calibrated"
    assert other.keys() == {"model", "policy", "error"}
    assert "calibrated for 30 layers" in other["error"]
    assert named_29.keys() == {"model", "policy", "error"}
    assert "29" in named_29["error"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    captured = capsys.readouterr()
    assert "default (as kivi4_sink)" in captured.out
    assert "other_model" in captured.out and "error: policy 'other_model'" in captured.out
    assert "running 'kivi4_sink' instead" in captured.err  # the fallback is logged
    assert "2 of 5 policies failed" in captured.err


def test_eval_exits_zero_when_every_policy_ran(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "one.json"
    argv = ["eval", "--model", str(tiny_model), "--policy", "default", "--json", str(out)]
    assert cli.main([*argv, *TINY_EVAL_FLAGS]) == cli.EXIT_OK
    row = json.loads(out.read_text())  # one --policy: one object
    assert (row["policy"], row["resolved_policy"]) == ("default", "kivi4_sink")


def test_a_policy_failing_while_it_runs_becomes_an_error_row() -> None:
    figures = dict.fromkeys(
        ("compression_ratio", "perplexity_increase", "needle_accuracy", "greedy_agreement"), 1.0
    )

    class Evaluator:
        lm = type("LoadedModel", (), {"name": "stub"})()

        @staticmethod
        def bar(items, phase, total, unit):
            return items

        @staticmethod
        def evaluate(policy: CompressionPolicy) -> dict:
            if policy.name == "kivi2":
                raise ValueError("group size does not divide head_dim")
            return {"policy": policy.name, "resolved_policy": policy.name, **figures}

    rows = evaluate_each(Evaluator(), [PRESETS["kivi2"], PRESETS["kivi4"]])
    assert rows == [
        {"model": "stub", "policy": "kivi2", "error": "group size does not divide head_dim"},
        {"policy": "kivi4", "resolved_policy": "kivi4", **figures},
    ]
