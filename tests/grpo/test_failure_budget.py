"""The failure budget (uniar_ray.grpo.FailureBudget) and the cause summary, without Ray."""
from __future__ import annotations

import pytest

from uniar_ray.grpo import FailureBudget, count_reasons


def test_count_reasons_most_frequent_first_with_a_tail():
    reasons = ["decode failed: x"] * 3 + ["ocr: timed out"] * 5 + ["", "a", "b"]
    assert count_reasons(reasons, limit=2) == "5x ocr: timed out; 3x decode failed: x; +2 more"
    assert count_reasons(["", ""]) == "no reason recorded"


def test_budget_judges_a_full_window_only():
    budget = FailureBudget(max_fraction=0.5, window=3)
    assert budget.record(4, 4, ["decode failed: boom"] * 16) is None  # one bad step at the start: no verdict yet
    assert budget.record(0, 4, []) is None
    assert budget.record(2, 4, ["target_color: reward actor lost"] * 8) is None  # 6 of 12 = 0.5: not past it
    stop = budget.record(4, 4, ["target_color: reward actor lost"] * 16)  # window now 0 + 2 + 4 of 12 = 0.5
    assert stop is None
    stop = budget.record(3, 4, ["target_color: reward actor lost"] * 12)  # 2 + 4 + 3 of 12 = 0.75
    assert stop.startswith("9 of 12 prompt groups (75%) were excluded over the last 3 steps")
    assert "grpo.max_excluded_fraction=0.5" in stop and "36x target_color: reward actor lost" in stop
    assert "decode failed" not in stop  # outside the window


def test_budget_of_one_never_stops_and_bad_settings_are_refused():
    budget = FailureBudget(max_fraction=1.0, window=1)
    assert all(budget.record(4, 4, ["x"]) is None for _ in range(5))
    with pytest.raises(ValueError, match="max_fraction=1.5"):
        FailureBudget(1.5, 3)
    with pytest.raises(ValueError, match="window=0"):
        FailureBudget(0.5, 0)
