"""PrequentialEvaluator against scikit-learn's metrics, evaluate_holdout, DriftMonitor."""

from __future__ import annotations

import itertools
import math
import pickle
from typing import Any

import numpy as np
import pytest
from river import drift
from sklearn import metrics as skm

from stream_trainer.config import DriftSettings
from stream_trainer.training.evaluation import DriftMonitor, PrequentialEvaluator, evaluate_holdout

BINARY = ["no", "yes"]
MULTI = [0, 1, 2, 3]


def binary_stream(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, n)
    proba = np.clip(0.5 + 0.3 * (2 * truth - 1) + rng.normal(scale=0.25, size=n), 0.01, 0.99)
    labels = np.array(BINARY, dtype=object)
    return labels[truth], labels[(proba > 0.5).astype(int)], proba


def sklearn_binary(y: np.ndarray, pred: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    positive = y == "yes"
    return {
        "accuracy": skm.accuracy_score(y, pred),
        "f1": skm.f1_score(y, pred, pos_label="yes"),
        "macro_f1": skm.f1_score(y, pred, average="macro"),
        "log_loss": skm.log_loss(positive, proba),
        "roc_auc": skm.roc_auc_score(positive, proba),
    }


def feed(
    evaluator: PrequentialEvaluator,
    *arrays: Any,
    batch: int,
) -> None:
    y, pred, proba = arrays
    for start in range(0, len(y), batch):
        end = start + batch
        evaluator.update(y[start:end], pred[start:end], None if proba is None else proba[start:end])


@pytest.mark.parametrize("batch", [1, 37, 500, 5000])
def test_binary_metrics_match_sklearn(batch: int) -> None:
    y, pred, proba = binary_stream(3000, seed=1)
    names = ["accuracy", "f1", "macro_f1", "log_loss", "roc_auc"]
    evaluator = PrequentialEvaluator("binary_classification", names, 700, BINARY)
    feed(evaluator, y, pred, proba, batch=batch)
    assert evaluator.count == 3000
    window = evaluator.window_values()
    expected_window = sklearn_binary(y[-700:], pred[-700:], proba[-700:])
    for name in names:
        assert window[name] == pytest.approx(expected_window[name], rel=1e-9), name
    total = evaluator.total_values()
    expected_total = sklearn_binary(y, pred, proba)
    for name in ["accuracy", "f1", "macro_f1", "log_loss"]:
        assert total[name] == pytest.approx(expected_total[name], rel=1e-9), name
    # Since-start roc_auc is binned (see the module doc).
    assert total["roc_auc"] == pytest.approx(expected_total["roc_auc"], abs=1e-3)


@pytest.mark.parametrize("batch", [1, 64, 2000])
def test_multiclass_metrics_match_sklearn(batch: int) -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 4, 1500)
    pred = np.where(rng.random(1500) < 0.6, y, rng.integers(0, 3, 1500))  # 3 never predicted
    evaluator = PrequentialEvaluator(
        "multiclass_classification", ["accuracy", "macro_f1"], 256, MULTI
    )
    feed(evaluator, y, pred, None, batch=batch)
    window = evaluator.window_values()
    assert window["accuracy"] == pytest.approx(skm.accuracy_score(y[-256:], pred[-256:]))
    assert window["macro_f1"] == pytest.approx(
        skm.f1_score(y[-256:], pred[-256:], average="macro", zero_division=0)
    )
    total = evaluator.total_values()
    assert total["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert total["macro_f1"] == pytest.approx(
        skm.f1_score(y, pred, average="macro", zero_division=0)
    )


@pytest.mark.parametrize("batch", [1, 90, 4000])
def test_regression_metrics_match_sklearn(batch: int) -> None:
    rng = np.random.default_rng(3)
    y = 1e6 + rng.normal(size=2500)  # far from zero: r2 must stay exact
    pred = y + rng.normal(scale=0.5, size=2500)
    evaluator = PrequentialEvaluator("regression", ["mae", "rmse", "r2"], 333, None)
    feed(evaluator, y, pred, None, batch=batch)

    def expected(t: np.ndarray, p: np.ndarray) -> dict[str, float]:
        return {
            "mae": skm.mean_absolute_error(t, p),
            "rmse": skm.root_mean_squared_error(t, p),
            "r2": skm.r2_score(t, p),
        }

    for got, want in (
        (evaluator.window_values(), expected(y[-333:], pred[-333:])),
        (evaluator.total_values(), expected(y, pred)),
    ):
        for name in ("mae", "rmse", "r2"):
            assert got[name] == pytest.approx(want[name], rel=1e-6), name
    assert evaluator.score() == pytest.approx(-skm.mean_absolute_error(y[-333:], pred[-333:]))
    assert evaluator.score("r2") == pytest.approx(skm.r2_score(y[-333:], pred[-333:]))


def test_ring_buffer_wraps_around() -> None:
    evaluator = PrequentialEvaluator("multiclass_classification", ["accuracy"], 10, MULTI)
    # 7 wrong, then 7 right: the window holds the last 3 wrong and 7 right.
    evaluator.update(np.zeros(7, int), np.ones(7, int), None)
    assert evaluator.window_values()["accuracy"] == 0.0
    evaluator.update(np.zeros(7, int), np.zeros(7, int), None)
    assert evaluator.window_values()["accuracy"] == pytest.approx(0.7)
    evaluator.update(np.zeros(5, int), np.ones(5, int), None)
    assert evaluator.window_values()["accuracy"] == pytest.approx(0.5)
    assert evaluator.total_values()["accuracy"] == pytest.approx(7 / 19)
    # A batch longer than the window keeps only its newest `window` records.
    evaluator.update(np.zeros(25, int), np.r_[np.ones(20, int), np.zeros(5, int)], None)
    assert evaluator.window_values()["accuracy"] == pytest.approx(0.5)
    assert evaluator.count == 44


def test_missing_predictions_are_not_scored() -> None:
    evaluator = PrequentialEvaluator(
        "binary_classification", ["accuracy", "log_loss", "roc_auc"], 100, [False, True]
    )
    y = np.array([True, False, True, False])
    pred = np.array([None, None, True, False], dtype=object)
    proba = np.array([np.nan, np.nan, 0.9, 0.2])
    errors = evaluator.update(y, pred, proba)
    assert np.isnan(errors[:2]).all()
    assert errors[2:].tolist() == [0.0, 0.0]
    window = evaluator.window_values()
    assert window["accuracy"] == 1.0  # River's convention: no prediction, no score
    assert evaluator.total_values()["accuracy"] == 1.0
    assert window["log_loss"] == pytest.approx(skm.log_loss([True, False], [0.9, 0.2]))
    assert window["roc_auc"] == 1.0
    assert evaluator.total_values()["log_loss"] == pytest.approx(window["log_loss"])
    assert (evaluator.count, evaluator.unscored) == (4, 2)

    regression = PrequentialEvaluator("regression", ["mae"], 10, None)
    errors = regression.update(
        np.array([1.0, 2.0, 3.0]), np.array([None, 2.5, np.nan], dtype=object), None
    )
    assert np.isnan(errors[[0, 2]]).all()
    assert errors[1] == 0.5
    assert regression.window_values()["mae"] == 0.5  # missing predictions are skipped
    assert regression.total_values()["mae"] == 0.5
    assert (regression.count, regression.unscored) == (3, 2)


@pytest.mark.parametrize("batch", [1, 37, 5000])
def test_cold_start_then_scored_matches_sklearn_on_the_scored_records(batch: int) -> None:
    """A first unit without predictions (mini_batch / full_batch before the first fit)
    changes no metric: window and since-start values are sklearn's on the scored records,
    and the window holds the last `window` scored ones."""
    y, pred, proba = binary_stream(3000, seed=7)
    cold = 1000
    pred = pred.copy()
    pred[:cold] = None
    proba = proba.copy()
    proba[:cold] = np.nan
    names = ["accuracy", "f1", "macro_f1", "log_loss", "roc_auc"]
    evaluator = PrequentialEvaluator("binary_classification", names, 700, BINARY)
    feed(evaluator, y, pred, proba, batch=batch)
    assert (evaluator.count, evaluator.unscored) == (3000, cold)
    expected_total = sklearn_binary(y[cold:], pred[cold:], proba[cold:])
    expected_window = sklearn_binary(y[-700:], pred[-700:], proba[-700:])
    for got, want in (
        (evaluator.total_values(), expected_total),
        (evaluator.window_values(), expected_window),
    ):
        for name in names:
            assert got[name] == pytest.approx(
                want[name], abs=2e-4 if name == "roc_auc" else 1e-9
            ), name

    multi = PrequentialEvaluator("multiclass_classification", ["accuracy", "macro_f1"], 50, MULTI)
    truth = np.array([0, 1, 2, 3] * 10)
    guess = np.array([None] * 8 + [0, 1, 2, 0] * 8, dtype=object)
    multi.update(truth, guess, None)
    assert multi.unscored == 8
    assert multi.total_values()["accuracy"] == pytest.approx(0.75)
    assert multi.total_values()["macro_f1"] == pytest.approx(
        skm.f1_score(truth[8:], guess[8:].astype(int), average="macro")
    )
    assert multi.window_values() == multi.total_values()


def test_a_unit_with_nothing_scored_leaves_every_metric_undefined() -> None:
    evaluator = PrequentialEvaluator("binary_classification", ["accuracy", "f1"], 10, [0, 1])
    errors = evaluator.update(np.array([0, 1, 1]), np.full(3, None, dtype=object), None)
    assert np.isnan(errors).all()
    assert all(math.isnan(v) for v in evaluator.window_values().values())
    assert all(math.isnan(v) for v in evaluator.total_values().values())
    assert math.isnan(evaluator.score())
    regression = PrequentialEvaluator("regression", ["rmse", "r2"], 10, None)
    regression.update(np.array([1.0, 2.0]), np.full(2, np.nan), None)
    assert regression.unscored == 2
    assert all(math.isnan(v) for v in regression.window_values().values())


def test_evaluator_checkpointed_when_unscored_records_counted_as_errors() -> None:
    """An evaluator pickled by the previous release kept unscored records in its window
    (prediction -1) and in the confusion's "no prediction" column; once loaded it leaves
    them out and reports them as unscored."""
    evaluator = PrequentialEvaluator("binary_classification", ["accuracy", "f1"], 10, [0, 1])
    # What the previous release's update() left after 4 records, 2 without a prediction.
    true_idx = np.array([1, 0, 1, 0])
    pred_idx = np.array([-1, -1, 1, 1])
    evaluator._count = 4
    evaluator._push(
        (evaluator._buf_true, true_idx),
        (evaluator._buf_pred, pred_idx),
        (evaluator._buf_proba, np.full(4, np.nan)),
    )
    evaluator._confusion += np.array([[0, 1, 1], [0, 1, 1]])  # rows truth, columns 0, 1, none
    restored = pickle.loads(pickle.dumps(evaluator))
    assert restored.unscored == 2
    assert restored.window_values() == {"accuracy": 0.5, "f1": pytest.approx(2 / 3)}
    assert restored.total_values() == restored.window_values()


def test_empty_and_undefined_values_are_nan() -> None:
    evaluator = PrequentialEvaluator("binary_classification", ["f1", "roc_auc"], 10, [0, 1])
    assert math.isnan(evaluator.score())
    evaluator.update(np.ones(5, int), np.ones(5, int), np.full(5, 0.7))
    assert evaluator.window_values()["f1"] == 1.0
    assert math.isnan(evaluator.window_values()["roc_auc"])  # a single class
    assert math.isnan(evaluator.total_values()["roc_auc"])


def test_error_signal_and_score_orientation() -> None:
    evaluator = PrequentialEvaluator("binary_classification", ["log_loss", "accuracy"], 10, [0, 1])
    errors = evaluator.update(np.array([0, 1, 1]), np.array([0, 0, 1]), np.array([0.2, 0.4, 0.8]))
    assert errors.tolist() == [0.0, 1.0, 0.0]
    assert evaluator.primary_metric == "log_loss"
    assert evaluator.score() == pytest.approx(-skm.log_loss([0, 1, 1], [0.2, 0.4, 0.8]))
    assert evaluator.score("accuracy") == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="not configured"):
        evaluator.score("f1")


def test_invalid_configuration() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        PrequentialEvaluator("regression", ["accuracy"], 10, None)
    with pytest.raises(ValueError, match="needs binary"):
        PrequentialEvaluator("multiclass_classification", ["roc_auc"], 10, MULTI)
    with pytest.raises(ValueError, match=r"record\.labels"):
        PrequentialEvaluator("binary_classification", ["accuracy"], 10, None)
    evaluator = PrequentialEvaluator("binary_classification", ["accuracy"], 10, [0, 1])
    with pytest.raises(ValueError, match=r"outside record\.labels"):
        evaluator.update(np.array([2]), np.array([0]), None)


def test_pickle_round_trip_continues_identically() -> None:
    y, pred, proba = binary_stream(900, seed=4)
    names = ["accuracy", "f1", "macro_f1", "log_loss", "roc_auc"]
    evaluator = PrequentialEvaluator("binary_classification", names, 250, BINARY)
    evaluator.update(y[:400], pred[:400], proba[:400])
    restored = pickle.loads(pickle.dumps(evaluator))
    for e in (evaluator, restored):
        e.update(y[400:], pred[400:], proba[400:])
    assert restored.window_values() == evaluator.window_values()
    assert restored.total_values() == evaluator.total_values()
    assert restored.count == evaluator.count == 900


@pytest.mark.parametrize("task", ["binary_classification", "regression"])
def test_an_evaluator_pickles_lean_and_continues_identically(task: str) -> None:
    """A ring not yet full pickles only its records, the ROC AUC histograms their non-zero
    bins: what key scope's thousand evaluators each cost in a checkpoint."""
    if task == "regression":
        rng = np.random.default_rng(5)
        y = rng.normal(size=1200)
        pred, proba, names, labels = y + rng.normal(scale=0.1, size=1200), None, ["mae"], None
    else:
        y, pred, proba = binary_stream(1200, seed=5)
        names, labels = ["accuracy", "log_loss", "roc_auc"], BINARY

    def part(start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        return y[start:stop], pred[start:stop], None if proba is None else proba[start:stop]

    evaluator = PrequentialEvaluator(task, names, 1000, labels)
    # Whole: 1 000 slots of 8 bytes per buffer (16-24 kB), 160 kB of histogram bins.
    assert len(pickle.dumps(evaluator)) < 3000
    evaluator.update(*part(0, 30))
    assert len(pickle.dumps(evaluator)) < 5000
    restored = pickle.loads(pickle.dumps(evaluator))
    assert restored.window_values() == evaluator.window_values()
    for e in (evaluator, restored):  # on past the ring's first wrap
        e.update(*part(30, 1200))
    assert restored.window_values() == evaluator.window_values()
    assert restored.total_values() == evaluator.total_values()
    again = pickle.loads(pickle.dumps(evaluator))  # a full ring pickles whole
    again.update(*part(0, 100))
    evaluator.update(*part(0, 100))
    assert again.window_values() == evaluator.window_values()
    assert again.total_values() == evaluator.total_values()


def test_an_evaluator_pickled_whole_by_an_earlier_release_still_loads() -> None:
    y, pred, proba = binary_stream(300, seed=6)
    evaluator = PrequentialEvaluator("binary_classification", ["roc_auc"], 1000, BINARY)
    evaluator.update(y, pred, proba)
    earlier = PrequentialEvaluator.__new__(PrequentialEvaluator)
    earlier.__setstate__(dict(vars(evaluator)))  # what pickle hands over for a whole pickle
    assert earlier.window_values() == evaluator.window_values()
    assert earlier.total_values() == evaluator.total_values()


class _FixedModel:
    """A stand-in adapter that returns canned predictions."""

    family = "sklearn"

    def __init__(self, predictions: np.ndarray, proba: np.ndarray | None) -> None:
        self._predictions = predictions
        self._proba = proba

    def predict_many(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        n = len(X)
        return self._predictions[:n], None if self._proba is None else self._proba[:n]


def test_evaluate_holdout() -> None:
    y, pred, proba = binary_stream(300, seed=5)
    model: Any = _FixedModel(pred, proba)
    X = np.zeros((300, 2))
    accuracy = evaluate_holdout(
        model, X, y, task="binary_classification", metric="accuracy", labels=BINARY
    )
    assert accuracy == pytest.approx(skm.accuracy_score(y, pred))
    loss = evaluate_holdout(
        model, X, y, task="binary_classification", metric="log_loss", labels=BINARY
    )
    assert loss == pytest.approx(-skm.log_loss(y == "yes", proba))
    truth = np.arange(10, dtype=float)
    regressor: Any = _FixedModel(truth + 2.0, None)
    mae = evaluate_holdout(
        regressor, np.zeros((10, 1)), truth, task="regression", metric="mae", labels=None
    )
    assert mae == pytest.approx(-2.0)
    empty = evaluate_holdout(
        regressor, np.zeros((0, 1)), truth[:0], task="regression", metric="mae", labels=None
    )
    assert math.isnan(empty)


def abrupt_stream(seed: int, before: int, after: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    stream: np.ndarray = np.r_[rng.random(before) < 0.05, rng.random(after) < 0.5]
    return stream.astype(np.float64)


@pytest.mark.parametrize("detector", ["ADWIN", "PageHinkley", "KSWIN"])
def test_drift_detects_abrupt_change(detector: str) -> None:
    params: dict[str, Any] = {"seed": 1} if detector == "KSWIN" else {}
    monitor = DriftMonitor(DriftSettings(detector=detector, params=params))
    stream = abrupt_stream(seed=6, before=2000, after=2000)
    found: list[int] = []
    for start in range(0, len(stream), 250):
        found += [start + i for i in monitor.update(stream[start : start + 250])]
    after_change = [i for i in found if i >= 2000]
    assert after_change, f"{detector} missed the change"
    assert after_change[0] - 2000 < 300
    assert monitor.detections == len(found)


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_adwin_quiet_on_stationary_stream(seed: int) -> None:
    monitor = DriftMonitor(DriftSettings())
    rng = np.random.default_rng(seed)
    errors = (rng.random(5000) < 0.05).astype(np.float64)
    assert monitor.update(errors) == []
    assert monitor.detections == 0


def test_drift_skips_nan_disabled_and_pickles() -> None:
    monitor = DriftMonitor(DriftSettings())
    stream = abrupt_stream(seed=10, before=1500, after=1500)
    with_gaps = np.r_[np.full(500, np.nan), stream]
    restored = pickle.loads(pickle.dumps(monitor))
    found = monitor.update(with_gaps)
    assert found
    assert all(i >= 2000 for i in found)  # the NaN prefix was not fed as errors
    assert restored.update(with_gaps) == found
    disabled = DriftMonitor(DriftSettings(enabled=False))
    assert disabled.update(stream) == []


def test_drift_params_are_checked() -> None:
    with pytest.raises(ValueError, match=r"drift\.params: unknown parameter\(s\) \['dleta'\]"):
        DriftMonitor(DriftSettings(params={"dleta": 0.1}))
    monitor = DriftMonitor(DriftSettings(detector="ADWIN", params={"delta": 0.5}))
    assert monitor.detector_name == "ADWIN"


@pytest.mark.parametrize("delta", [0.002, 0.5])
def test_adwin_fast_path_matches_river_public_update(delta: float) -> None:
    """DriftMonitor calls ADWIN's Cython window directly between detections; detections
    and the detector's state must equal River's own ``update`` path, including a
    detection on a batch's last value (the reset then happens in the next batch)."""
    rng = np.random.default_rng(3)
    rates = [0.05, 0.6, 0.1, 0.9, 0.02]
    stream = np.concatenate([(rng.random(3000) < r).astype(np.float64) for r in rates])
    stream[rng.random(len(stream)) < 0.01] = np.nan
    monitor = DriftMonitor(DriftSettings(params={"delta": delta}))
    reference = drift.ADWIN(delta=delta)  # type: ignore[no-untyped-call]
    expected: list[int] = []
    found: list[int] = []
    start = 0
    for size in itertools.cycle([1, 7, 250, 1000, 33]):
        chunk = stream[start : start + size]
        if not len(chunk):
            break
        found += [start + i for i in monitor.update(chunk)]
        for i, value in enumerate(chunk.tolist()):
            if not math.isnan(value):
                reference.update(value)  # type: ignore[no-untyped-call]
                if reference.drift_detected:
                    expected.append(start + i)
        start += size
    detector = monitor._detector
    print(f"\n[adwin fast path] delta={delta}: {len(found)} detections, same as River's")
    assert len(expected) >= 4
    assert found == expected
    assert (detector.width, detector.total, detector.n_detections, detector.drift_detected) == (
        reference.width,
        reference.total,
        reference.n_detections,
        reference.drift_detected,
    )
