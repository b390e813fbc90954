"""Calibration: candidate generation, combining merges, and a small real run."""

from __future__ import annotations

from dataclasses import replace

import pytest

from minicache_client.policy import (
    CompressionPolicy,
    LayerBits,
    MergePlan,
    ModelShape,
    PairMerge,
    Quantization,
    load_policy,
    policy_for_model,
)
from minicache_worker.calibration import (
    CalibrationScorer,
    CalibrationSettings,
    PolicyChange,
    _combine,
    calibrate,
    calibrated_policy,
    merge_candidates,
    policy_changes,
)
from minicache_worker.texts import split_text


def test_merge_candidates_cover_each_pair_side_and_t() -> None:
    candidates = merge_candidates(30, (0.3, 0.6))
    assert len(candidates) == 29 * 2 * 2
    assert all(c.keys != c.values and c.retention is None for c in candidates)
    assert {c.first_layer for c in merge_candidates(30, (0.6,), (4, 28))} == {4, 28}
    values_only = merge_candidates(30, (0.6,), kinds=("values",), window=32)
    assert len(values_only) == 29
    assert all(c.values and not c.keys and c.window == 32 for c in values_only)
    with pytest.raises(ValueError, match="no layer pair starts at 29"):
        merge_candidates(30, (0.6,), (29,))


def test_combine_joins_the_other_side_of_a_pair_and_refuses_overlaps() -> None:
    keys = PairMerge(10, keys=True, values=False, retention=None)
    values = PairMerge(10, keys=False, values=True, retention=None)
    assert _combine([keys], values) == [PairMerge(10, True, True, retention=None)]
    assert _combine([keys], keys) is None
    assert _combine([keys], PairMerge(11, retention=None)) is None  # layer 11 is taken
    assert _combine([keys], PairMerge(10, keys=False, t=0.3, retention=None)) is None
    assert _combine([keys], PairMerge(12, retention=None)) == [keys, PairMerge(12, retention=None)]


def test_lowering_a_layers_bits_adds_an_override_once() -> None:
    base = CompressionPolicy(quantization=Quantization(3, 2, sink_tokens=4))
    lowered = PolicyChange(layer=7, kind="keys", bits=2).apply(base)
    assert lowered.quantization.layer_bits == (LayerBits(7, 2, 2),)
    assert lowered.quantization.bits_for("keys", 6) == 3
    # Already at two bits: the same change again, or values below two, cannot apply.
    assert PolicyChange(layer=7, kind="keys", bits=2).apply(lowered) is None
    both = PolicyChange(layer=3, kind="keys", bits=2).apply(lowered)
    assert [o.layer for o in both.quantization.layer_bits] == [3, 7]


def test_policy_changes_list_merges_and_one_step_lower_bits() -> None:
    settings = CalibrationSettings(merge_first_layers=(0,))
    base = CompressionPolicy(quantization=Quantization(4, 2))
    changes = policy_changes(base, 3, settings)
    merges = [c for c in changes if c.merge is not None]
    lowerings = {(c.layer, c.kind, c.bits) for c in changes if c.merge is None}
    assert len(merges) == 2  # pair (0, 1): keys, values
    assert lowerings == {(0, "keys", 3), (1, "keys", 3), (2, "keys", 3)}  # values at 2 already
    merged = merges[0].apply(base)
    assert merged.merge.pairs == (merges[0].merge,)
    assert merges[0].apply(merged) is None


@pytest.mark.parametrize(
    "bad",
    [
        {"budget": 0.0},
        {"budget": 1.5},
        {"windows": 0},
        {"t_values": ()},
        {"scored_tokens": 1},
        {"decode_chunk_tokens": 0},
        {"merge_window": 8},  # below decode_chunk_tokens
        {"merge_kinds": ()},
        {"merge_kinds": ("both",)},
    ],
)
def test_settings_are_validated(bad) -> None:
    with pytest.raises(ValueError):
        CalibrationSettings(**bad)


SMALL = CalibrationSettings(
    budget=0.05,
    context_tokens=96,
    scored_tokens=24,
    windows=2,
    merge_first_layers=(26, 28),
    quantization_candidates=(Quantization(4, 4, 32, 32), Quantization(2, 2, 32, 32)),
)


@pytest.mark.model
def test_calibration_scores_only_calibration_text(lm) -> None:
    scorer = CalibrationScorer(lm, SMALL)
    calibration, evaluation = split_text("calibration"), split_text("evaluation")
    for window in scorer.windows:
        text = lm.tokenizer.decode(window.continuation)
        assert text.strip()[:80] in calibration
        assert text.strip()[:80] not in evaluation
        assert len(window.prefix_kv) == lm.num_layers
        assert window.prefix_kv[0][0].shape == (lm.kv_heads, SMALL.context_tokens, lm.head_dim)
    assert scorer.measure(CompressionPolicy("none")).cost == pytest.approx(0.0, abs=1e-9)


@pytest.mark.model
def test_chunked_scoring_matches_token_by_token_decoding_when_the_window_covers_a_chunk(
    lm,
) -> None:
    def perplexity(window: int, chunk: int) -> float:
        settings = replace(SMALL, decode_chunk_tokens=chunk, merge_window=max(window, chunk))
        policy = CompressionPolicy(
            "one_pair",
            merge=MergePlan(pairs=(PairMerge(16, keys=False, retention=None, window=window),)),
        )
        return CalibrationScorer(lm, settings).measure(policy).perplexity

    # With a merge window of 16, a chunk of 16 sees no more unmerged tokens than
    # decoding does: the figures agree up to 16-bit rounding of the stored history.
    assert perplexity(16, 16) == pytest.approx(perplexity(16, 1), rel=0.005)
    # Without a window, chunks would hide the damage decoding suffers: the reason
    # calibration requires merge_window >= decode_chunk_tokens.
    assert perplexity(0, 1) > 1.01 * perplexity(0, 16)


@pytest.mark.model
def test_small_calibration_returns_the_best_policy_within_budget(lm, tmp_path) -> None:
    report = calibrate(lm, SMALL)
    best = report.best
    assert best.cost <= SMALL.budget
    within = [m for m in report.quantization if m.cost <= SMALL.budget]
    assert best.compression_ratio >= max(m.compression_ratio for m in within)
    # Two pairs (keys or values) and every layer's keys and values one step lower.
    assert len(report.single_changes) == 2 * 2 + 2 * lm.num_layers
    assert report.path[0] in report.quantization
    assert report.path[-1] == best
    for before, after in zip(report.path, report.path[1:], strict=False):
        assert after.cost <= SMALL.budget
        assert after.compression_ratio > before.compression_ratio
    policy = calibrated_policy(report, "mine")
    path = tmp_path / "mine.json"
    path.write_text(policy.to_json())
    assert load_policy(str(path)) == policy
    assert "budget 5.00%" in policy.description
    # Applied to its own model only.
    assert policy.calibrated_for == lm.shape == ModelShape(30, 3, 64)
    assert report.to_dict()["shape"] == {"num_layers": 30, "kv_heads": 3, "head_dim": 64}
    assert policy_for_model(policy, lm.shape) is policy
    with pytest.raises(ValueError, match="calibrated for 30 layers"):
        policy_for_model(policy, ModelShape(30, 3, 32))


@pytest.mark.model
def test_quantization_only_calibration_stops_at_the_best_candidate_within_budget(lm) -> None:
    report = calibrate(lm, replace(SMALL, quantization_only=True))
    within = [m for m in report.quantization if m.cost <= SMALL.budget]
    assert report.single_changes == []
    assert report.path == [report.best]
    assert report.best.compression_ratio == max(m.compression_ratio for m in within)
