"""Calibration and evaluation text never overlap; needle cases are well formed."""

from __future__ import annotations

import pytest

from minicache_worker.texts import NEEDLE_QUESTION, essays, needle_cases


def test_calibration_and_evaluation_essays_are_disjoint() -> None:
    calibration, evaluation = essays("calibration"), essays("evaluation")
    assert calibration and evaluation
    assert not set(calibration) & set(evaluation)
    # Not even a long passage of one appears in the other.
    for essay in calibration:
        probe = essay[len(essay) // 2 : len(essay) // 2 + 200]
        assert all(probe not in other for other in evaluation)


def test_unknown_split_is_refused() -> None:
    with pytest.raises(ValueError, match="split must be"):
        essays("training")


def test_needle_cases_hide_the_passkey_at_each_depth() -> None:
    cases = needle_cases(6, haystack_chars=4000)
    assert len(cases) == 6
    assert [case.depth for case in cases] == [0.1, 0.5, 0.9, 0.1, 0.5, 0.9]
    for case in cases:
        assert len(case.passkey) == 5 and case.passkey.isdigit()
        position = case.context.index(f"The passkey is {case.passkey}.")
        assert abs(position / len(case.context) - case.depth) < 0.1
        assert case.question == NEEDLE_QUESTION
    assert needle_cases(6, haystack_chars=4000) == cases  # seeded: reproducible
