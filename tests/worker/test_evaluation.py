"""The evaluation command's measurements on the real model, at a small size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minicache_client.policy import PRESETS
from minicache_worker import cli
from minicache_worker.evaluation import EvalSettings, Evaluator, first_number

SMALL = EvalSettings(
    context_tokens=128,
    continuation_tokens=24,
    needle_cases=2,
    needle_context_tokens=256,
    needle_answer_tokens=12,
    greedy_prompts=1,
    greedy_tokens=8,
)
REQUIRED_FIELDS = {
    "model",
    "policy",
    "context_tokens",
    "compression_ratio",
    "perplexity",
    "perplexity_full",
    "needle_accuracy",
    "needle_accuracy_full",
    "greedy_agreement",
}


@pytest.fixture(scope="module")
def evaluator(lm) -> Evaluator:
    return Evaluator(lm, SMALL)


@pytest.mark.model
def test_full_cache_policy_reproduces_its_own_baseline(evaluator: Evaluator) -> None:
    result = evaluator.evaluate(PRESETS["none"])
    assert result.keys() >= REQUIRED_FIELDS
    assert result["perplexity"] == pytest.approx(result["perplexity_full"], rel=1e-9)
    assert result["greedy_agreement"] == 1.0
    assert result["greedy_tokens"] == SMALL.greedy_tokens
    assert result["needle_accuracy"] == result["needle_accuracy_full"]
    assert result["needle_cases"] == SMALL.needle_cases
    assert result["compression_ratio"] < 1.0  # metadata, nothing saved
    assert result["context_tokens"] == SMALL.context_tokens


@pytest.mark.model
def test_compressed_policy_is_measured_against_the_same_baseline(evaluator: Evaluator) -> None:
    full = evaluator.evaluate(PRESETS["none"])
    kivi2 = evaluator.evaluate(PRESETS["kivi2"])
    assert kivi2["perplexity_full"] == full["perplexity_full"]
    assert kivi2["compression_ratio"] > 3.0
    assert kivi2["perplexity"] != kivi2["perplexity_full"]
    assert kivi2["perplexity_increase"] == pytest.approx(
        kivi2["perplexity"] / kivi2["perplexity_full"] - 1
    )
    assert 0.0 <= kivi2["greedy_agreement"] <= 1.0
    # Haystack sized from the text's characters per token, plus template and question.
    assert all(n >= 0.9 * SMALL.needle_context_tokens for n in kivi2["needle_context_tokens"])


@pytest.mark.model
def test_eval_command_writes_json_table_and_plot(lm, monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setattr("minicache_worker.models.load_model", lambda spec: lm)
    out, plot = tmp_path / "results.json", tmp_path / "pareto.png"
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in vars(SMALL).items()]
    code = cli.main(
        [
            "eval",
            "--policy",
            "none",
            "--policy",
            "kivi4",
            "--json",
            str(out),
            "--plot",
            str(plot),
            *flags,
        ]
    )
    assert code == 0
    results = json.loads(out.read_text())
    assert [r["policy"] for r in results] == ["none", "kivi4"]
    assert [r["resolved_policy"] for r in results] == ["none", "kivi4"]  # both fit the model
    assert all(r.keys() >= REQUIRED_FIELDS for r in results)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "kivi4" in table and "ratio" in table


def test_eval_settings_reject_tiny_windows() -> None:
    with pytest.raises(ValueError, match="context_tokens must be at least 16"):
        EvalSettings(context_tokens=4)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "--model", "/no/such/model", "--policy", "none"], "unknown model"),
        (["eval", "--policy", "nonexistent"], "unknown policy 'nonexistent'"),
        (["calibrate", "--out", "x.json", "--budget", "2"], "budget must be in"),
    ],
)
def test_command_errors_are_one_clear_line(argv, message, capsys) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_policy_all_expands_to_every_preset() -> None:
    assert [p.name for p in cli._policies(["all"])] == list(PRESETS)
    rest = [name for name in PRESETS if name != "kivi4"]
    assert [p.name for p in cli._policies(["kivi4", "all"])] == ["kivi4", *rest]


@pytest.mark.parametrize(
    ("answer", "number"),
    [
        ("The passkey is 48213.", "48213"),
        ("48213", "48213"),
        ("It is 4821 or 48213", "4821"),  # the first number counts: no partial credit
        ("I don't know.", None),
    ],
)
def test_needle_answer_is_matched_on_its_first_number(answer: str, number) -> None:
    assert first_number(answer) == number
