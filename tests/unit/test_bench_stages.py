"""The bench's stage arithmetic (pure logic)."""

from __future__ import annotations

import pytest

from stream_trainer.laptop.benchmarks.stages import StageRun, bracketing


def test_bracketing_rates_the_two_runs_as_one() -> None:
    # 1000 records in 1 s before the service, 1000 in 3 s after: 2000 in 4 s, not the
    # mean of the two rates (666.7/s), which would overweight the fast minute.
    before = StageRun(1000, 1.0, {"fit_s": 2.0})
    after = StageRun(1000, 3.0, {"fit_s": 4.0})
    both = bracketing(before, after)
    assert both.records == 2000
    assert both.rate == pytest.approx(500.0)
    assert both.extra == {
        "fit_s": 3.0,
        "before_per_s": 1000.0,
        "after_per_s": pytest.approx(1000 / 3),
    }
