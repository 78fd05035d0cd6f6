"""Each training mode leaves records without a prediction out of the metrics and counts
them (River's convention); pure logic, no broker: trainers do no Kafka I/O."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from stream_trainer.config import Settings, settings_from_mapping
from stream_trainer.ingest.records import DecodedBatch
from stream_trainer.operations.app import new_state
from stream_trainer.training.trainers import FullBatchTrainer, MiniBatchTrainer, PerRecordTrainer

FEATURES = ["f0", "f1"]


def make_settings(learner: str, task: str, mode: str, metrics: list[str]) -> Settings:
    data: dict[str, Any] = {
        "kafka": {"bootstrap_servers": "localhost:9092", "group_id": "g"},
        "topics": {"input": ["in"], "dead_letter": "dlq", "versions": "v"},
        "record": {
            "features": FEATURES,
            "labels": None if task == "regression" else [0, 1],
        },
        "model": {"name": "m", "task": task, "learner": {"path": learner}},
        "training": {"mode": mode},
        "evaluation": {"metrics": metrics},
        "checkpoint": {"dir": "/tmp/ck", "allow_unsigned": True},
        "registry": {"root": "/tmp/reg"},
    }
    return settings_from_mapping(data, env={})


def batch(X: np.ndarray, y: np.ndarray) -> DecodedBatch:
    n = len(y)
    return DecodedBatch(
        X=X,
        y=y,
        weights=None,
        valid_index=np.arange(n),
        invalid=[],
        topics=["in"] * n,
        partitions=np.zeros(n, dtype=np.int64),
        offsets=np.arange(n),
        feature_names=tuple(FEATURES),
        message_topics=["in"] * n,
        message_partitions=np.zeros(n, dtype=np.int64),
        message_offsets=np.arange(n),
    )


def separable(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 2))
    return X, (X[:, 0] > 0).astype(np.int64)


def test_per_record_river_cold_start_is_not_scored() -> None:
    """GaussianNB has no prediction before its first record ({}): that one is unscored."""
    settings = make_settings(
        "river.naive_bayes.GaussianNB", "binary_classification", "per_record", ["accuracy"]
    )
    state = new_state(settings)
    X, y = separable(200, seed=1)
    result = PerRecordTrainer().learn(state, batch(X, y))
    assert result.unscored == 1
    assert (state.evaluator.count, state.evaluator.unscored) == (200, 1)
    assert state.evaluator.total_values()["accuracy"] > 0.8


def test_mini_batch_regression_first_unit_is_not_scored() -> None:
    settings = make_settings(
        "sklearn.linear_model.SGDRegressor", "regression", "mini_batch", ["mae"]
    )
    state = new_state(settings)
    rng = np.random.default_rng(2)
    X = rng.normal(size=(200, 2))
    y = 3.0 * X[:, 0] - X[:, 1]
    trainer = MiniBatchTrainer()
    first = trainer.learn(state, batch(X[:100], y[:100]))
    assert first.unscored == 100
    assert np.isnan(state.evaluator.total_values()["mae"])  # nothing scored yet, not 0
    prequential, _ = state.model.predict_many(X[100:])  # what the next unit is scored on
    second = trainer.learn(state, batch(X[100:], y[100:]))
    assert second.unscored == 0
    assert (state.evaluator.count, state.evaluator.unscored) == (200, 100)
    assert state.evaluator.total_values()["mae"] == pytest.approx(
        np.abs(y[100:] - prequential).mean()
    )


@pytest.mark.parametrize("mode", ["mini_batch", "full_batch"])
def test_classification_before_the_first_fit_is_not_scored(mode: str) -> None:
    settings = make_settings(
        "sklearn.linear_model.SGDClassifier", "binary_classification", mode, ["accuracy"]
    )
    state = new_state(settings)
    X, y = separable(100, seed=3)
    trainer = MiniBatchTrainer() if mode == "mini_batch" else FullBatchTrainer(settings)
    try:
        result = trainer.learn(state, batch(X, y))
    finally:
        if isinstance(trainer, FullBatchTrainer):
            trainer.close()
    assert result.unscored == 100
    assert state.evaluator.unscored == 100
    assert np.isnan(state.evaluator.window_values()["accuracy"])  # not 0.0
