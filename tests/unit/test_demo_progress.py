"""The demo's progress line: no score is shown as "-", never as 0.0."""

from __future__ import annotations

import io

from stream_trainer.laptop.demo import Progress, Snapshot


def test_progress_shows_no_score_and_the_unscored_count_before_the_first_fit() -> None:
    out = io.StringIO()
    progress = Progress(out, 1000, "accuracy")
    cold = Snapshot.from_samples(
        {
            "stream_trainer_records_learnt_total": 100.0,
            "stream_trainer_records_unscored_total": 100.0,
            'stream_trainer_prequential_metric{metric="accuracy",scope="window"}': float("nan"),
        }
    )
    progress.update(cold, 50.0, force=True)
    assert "accuracy - (100 unscored)" in out.getvalue()
    warm = Snapshot.from_samples(
        {
            "stream_trainer_records_learnt_total": 200.0,
            'stream_trainer_prequential_metric{metric="accuracy",scope="window"}': 0.9,
        }
    )
    progress.update(warm, 50.0, force=True)
    assert "accuracy 0.9000  model" in out.getvalue().splitlines()[-1]
