"""Records without a prediction are not scored (River's convention), on a real broker.

In mini_batch an unfitted scikit-learn model has no prediction for the first unit; those
records used to be scored as errors (accuracy 0.0 in the window, since-start accuracy held
down for good). The oracle replays the same units through a fresh model outside the
service and scores the predictions with scikit-learn: the service's since-start accuracy
must equal the accuracy over the records that had a prediction, and the unscored counter
the first unit's size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score

from stream_trainer.config import settings_from_mapping
from stream_trainer.laptop.datasets import get_dataset
from stream_trainer.laptop.produce import produce
from stream_trainer.training.learners import build_model
from tests.conftest import KAFKA_ONLY, BrokerHandle
from tests.harness import HMAC_KEY, ServiceProcess, service_config, wait_for

pytestmark = pytest.mark.integration

UNIT, RECORDS = 100, 1250
LEARNT = "stream_trainer_records_learnt_total"
UNSCORED = "stream_trainer_records_unscored_total"
TOTAL_ACCURACY = 'stream_trainer_prequential_metric{metric="accuracy",scope="total"}'
BATCHES_UP_TO_50 = 'stream_trainer_batch_size_records_bucket{le="50.0"}'
BATCHES_UP_TO_100 = 'stream_trainer_batch_size_records_bucket{le="100.0"}'


def replayed_predictions(config: dict[str, object]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, predictions) of the same model fed the same units: predict, then learn."""
    settings = settings_from_mapping(config, env={"STREAM_TRAINER_CHECKPOINT__HMAC_KEY": HMAC_KEY})
    model = build_model(settings)
    features = settings.record.feature_names
    rows = list(get_dataset("phishing").rows(RECORDS))
    X = np.array([[x[name] for name in features] for x, _y in rows], dtype=np.float64)
    y = np.empty(len(rows), dtype=object)
    y[:] = [label for _x, label in rows]
    predictions = np.empty(len(rows), dtype=object)
    for start in range(0, len(rows), UNIT):
        unit = slice(start, start + UNIT)
        predictions[unit], _proba = model.predict_many(X[unit])
        model.learn_many(X[unit], y[unit], None)
    return y, predictions


# Scoring against an offline oracle: the broker only delivers (see KAFKA_ONLY).
@KAFKA_ONLY
def test_mini_batch_first_unit_is_not_scored(broker: BrokerHandle, tmp_path: Path) -> None:
    bootstrap = broker.bootstrap_servers
    config = service_config(
        tmp_path,
        bootstrap,
        "phishing",
        "mini_batch",
        overrides={
            "model": {
                "preprocessing": [{"path": "sklearn.preprocessing.StandardScaler"}],
                "learner": {
                    "path": "sklearn.linear_model.SGDClassifier",
                    "params": {"loss": "log_loss", "random_state": 0},
                },
            },
            # Everything is produced before the start: units fill to UNIT, the last one
            # (50) waits for max_wait_s.
            "training": {"mini_batch": {"size": UNIT, "max_wait_s": 3.0}},
        },
    )
    report = produce(
        {"bootstrap.servers": bootstrap},
        config["topics"]["input"][0],
        get_dataset("phishing"),
        RECORDS,
    )
    assert report.valid == RECORDS
    y, predictions = replayed_predictions(config)
    scored = np.array([p is not None for p in predictions])
    expected = accuracy_score(y[scored].astype(bool), predictions[scored].astype(bool))
    assert int((~scored).sum()) == UNIT  # the oracle's own cold start: the first unit
    last: dict[str, float] = {}

    def settled() -> bool:
        last.update(service.metrics())
        return last.get(LEARNT) == RECORDS and last.get(TOTAL_ACCURACY) == pytest.approx(
            expected, abs=1e-12
        )

    with ServiceProcess(config, tmp_path) as service:
        service.wait_metric(LEARNT, RECORDS, timeout=90)
        try:
            wait_for(settled, 10, "the since-start accuracy of the scored records")
        finally:
            print(
                f"[{broker.name}] mini_batch cold start: unscored {last.get(UNSCORED)} "
                f"(oracle {UNIT}), accuracy since start {last.get(TOTAL_ACCURACY)} (oracle "
                f"over scored records {expected:.6f}; as errors it would be "
                f"{expected * scored.sum() / RECORDS:.6f})"
            )
        assert service.stop() == 0
    samples = last
    # Units as replayed: 12 of exactly UNIT records, then one of 50.
    assert samples[BATCHES_UP_TO_100] == 13
    assert samples[BATCHES_UP_TO_50] == 1
    assert samples.get(UNSCORED) == UNIT
