"""The one promotion gate (versions.judge): a table of cases, run against the publish path
(PromotionGate.decide) and the full-retrain path (FullBatchTrainer.verdict), so the two
cannot drift apart. Pure logic: no broker, no registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from stream_trainer.config import GateSettings
from stream_trainer.operations.metrics import build_metrics
from stream_trainer.publishing.events import GATE_CODES, PromotionGate, gate_metric, judge
from stream_trainer.publishing.publisher import ModelPublisher
from stream_trainer.training.evaluation import PrequentialEvaluator
from stream_trainer.training.learners import build_model
from stream_trainer.training.trainers import FullBatchTrainer
from tests.unit.test_search import _state
from tests.unit.test_trainers_unscored import make_settings

NAN = math.nan
INF = math.inf

# (gate, champion score, candidate score, candidate parameters finite, accepted, code).
# Scores are higher-is-better, as both paths produce them (losses negated).
CASES: list[tuple[GateSettings, float | None, float | None, bool, bool, str]] = [
    # margin edges (margin 0.05): exactly at champion - margin wins, just below loses
    (GateSettings(margin=0.05), 0.80, 0.90, True, True, "within_margin"),
    (GateSettings(margin=0.05), 0.80, 0.80, True, True, "within_margin"),
    (GateSettings(margin=0.05), 0.80, 0.75, True, True, "within_margin"),
    (GateSettings(margin=0.05), 0.80, 0.7499, True, False, "worse_than_margin"),
    (GateSettings(margin=0.0), 0.80, 0.80, True, True, "within_margin"),
    (GateSettings(margin=0.0), 0.80, 0.7999, True, False, "worse_than_margin"),
    # a lower-is-better metric (mae 2.0 vs 2.5) arrives negated: -2.5 < -2.0 - 0.1
    (GateSettings(margin=0.1), -2.0, -2.5, True, False, "worse_than_margin"),
    (GateSettings(margin=0.1), -2.0, -2.05, True, True, "within_margin"),
    (GateSettings(margin=0.1), -2.0, -1.0, True, True, "within_margin"),
    # infinities compare as numbers (an infinite log loss is -inf)
    (GateSettings(margin=0.1), -INF, -5.0, True, True, "within_margin"),
    (GateSettings(margin=0.1), -5.0, -INF, True, False, "worse_than_margin"),
    # candidate undefined: never over a champion with a score
    (GateSettings(margin=0.05), 0.80, NAN, True, False, "candidate_undefined"),
    (GateSettings(margin=0.05), 0.80, None, True, False, "candidate_undefined"),
    # champion undefined (none yet, or NaN): any defined candidate wins
    (GateSettings(margin=0.05), None, 0.10, True, True, "champion_undefined"),
    (GateSettings(margin=0.05), NAN, 0.10, True, True, "champion_undefined"),
    (GateSettings(margin=0.05), NAN, -INF, True, True, "champion_undefined"),
    # both undefined (no champion yet / nothing to score on): nothing to compare, accept
    (GateSettings(margin=0.05), None, NAN, True, True, "nothing_to_compare"),
    (GateSettings(margin=0.05), None, None, True, True, "nothing_to_compare"),
    (GateSettings(margin=0.05), NAN, NAN, True, True, "nothing_to_compare"),
    # disabled: anything with finite parameters wins
    (GateSettings(enabled=False), 0.90, 0.10, True, True, "disabled"),
    (GateSettings(enabled=False), 0.90, NAN, True, True, "disabled"),
    # non-finite parameters never ship, gate on or off, whatever the scores
    (GateSettings(margin=0.05), 0.10, 0.90, False, False, "candidate_not_finite"),
    (GateSettings(margin=0.05), None, None, False, False, "candidate_not_finite"),
    (GateSettings(enabled=False), 0.10, 0.90, False, False, "candidate_not_finite"),
]


def _full_batch_trainer(gate: GateSettings) -> FullBatchTrainer:
    settings = make_settings(
        "sklearn.linear_model.SGDClassifier", "binary_classification", "full_batch", ["accuracy"]
    )
    registry = settings.registry.model_copy(update={"gate": gate})
    return FullBatchTrainer(settings.model_copy(update={"registry": registry}))


@pytest.mark.parametrize(
    ("gate", "champion", "candidate", "finite", "accepted", "code"),
    CASES,
    ids=[f"{i}-{case[-1]}" for i, case in enumerate(CASES)],
)
def test_both_paths_reach_the_table_verdict(
    gate: GateSettings,
    champion: float | None,
    candidate: float | None,
    finite: bool,
    accepted: bool,
    code: str,
) -> None:
    publish = PromotionGate(gate).decide(champion, candidate, finite)
    assert (publish.accepted, publish.code) == (accepted, code), publish.reason
    assert code in GATE_CODES
    # The full-retrain path scores NaN where the publish path has None (no holdout).
    retrain_candidate = NAN if candidate is None else candidate
    retrain = _full_batch_trainer(gate).verdict(champion, retrain_candidate, finite)
    assert (retrain.accepted, retrain.code) == (accepted, code), retrain.reason
    assert retrain == judge(gate, champion, retrain_candidate, finite)


def test_reasons_name_the_scores_and_margin() -> None:
    verdict = judge(GateSettings(margin=0.05), 0.8, 0.7)
    assert "0.7" in verdict.reason and "0.8" in verdict.reason and "0.05" in verdict.reason
    assert judge(GateSettings(), None, NAN).reason.startswith("no scores to compare on")


@pytest.mark.parametrize(
    ("metrics", "expected"),
    [
        (["log_loss", "accuracy"], "accuracy"),
        (["roc_auc", "log_loss", "f1"], "f1"),
        (["log_loss"], "log_loss"),
        (["mae", "rmse"], "mae"),
    ],
)
def test_both_paths_compare_on_one_metric(metrics: list[str], expected: str) -> None:
    assert gate_metric(metrics) == expected
    task = "regression" if expected == "mae" else "binary_classification"
    learner = (
        "sklearn.linear_model.SGDRegressor"
        if task == "regression"
        else "sklearn.linear_model.SGDClassifier"
    )
    settings = make_settings(learner, task, "full_batch", metrics)
    trainer = FullBatchTrainer(settings)
    publisher = ModelPublisher(settings, None, None, None)  # type: ignore[arg-type]
    assert trainer._metric == publisher._metric == expected


def test_lower_is_better_metrics_reach_the_gate_negated() -> None:
    """The direction is the evaluator's: a larger mae must be the lower score."""
    scores: dict[float, float] = {}
    for error in (1.0, 2.0):
        evaluator = PrequentialEvaluator("regression", ["mae"], 4, None)
        y = np.zeros(4)
        evaluator.update(y, y + error, None)
        scores[error] = evaluator.score("mae")
    assert scores[2.0] < scores[1.0] < 0
    # Champion mae 1.0, candidate mae 2.0: rejected with a margin below 1.0.
    assert not judge(GateSettings(margin=0.5), scores[1.0], scores[2.0]).accepted
    assert judge(GateSettings(margin=1.0), scores[1.0], scores[2.0]).accepted


def test_full_retrain_holdout_scores_feed_the_same_rule() -> None:
    """A retrain with no holdout is judged 'nothing to compare' (as a publish with no
    scored records); an unfitted champion counts as no champion."""
    trainer = _full_batch_trainer(GateSettings(margin=0.0))
    settings = make_settings(
        "sklearn.linear_model.SGDClassifier", "binary_classification", "full_batch", ["accuracy"]
    )
    champion, candidate = build_model(settings), build_model(settings)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 2))
    y = (X[:, 0] > 0).astype(np.int64)
    empty = np.empty((0, 2)), np.empty(0, dtype=np.int64)
    ch, ca = trainer.holdout_scores(champion, candidate, *empty)
    assert ch is None and math.isnan(ca)
    assert trainer.verdict(ch, ca, True).code == "nothing_to_compare"
    candidate.fit(X, y, None)
    ch, ca = trainer.holdout_scores(champion, candidate, X[:50], y[:50])
    assert ch is None and math.isfinite(ca)
    assert trainer.verdict(ch, ca, True).code == "champion_undefined"


class _RecordingRegistry:
    """Stands in for the registry: remembers rejections, refuses to publish."""

    def __init__(self) -> None:
        self.rejections: list[dict[str, object]] = []

    def record_rejection(self, metadata: dict[str, object], *_scores: float) -> None:
        self.rejections.append(metadata)

    def publish(self, *_args: object, **_kwargs: object) -> None:
        raise AssertionError("a model with non-finite parameters was published")


def test_publish_refuses_non_finite_parameters_even_with_the_gate_disabled() -> None:
    """Rule 1 on the publish path: the publisher passes the model's parameter check."""
    settings = make_settings(
        "sklearn.linear_model.SGDClassifier", "binary_classification", "full_batch", ["accuracy"]
    )
    gate = GateSettings(enabled=False)
    settings = settings.model_copy(
        update={"registry": settings.registry.model_copy(update={"gate": gate})}
    )
    model = build_model(settings)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(100, 2))
    model.fit(X, (X[:, 0] > 0).astype(np.int64), None)
    assert model.parameters_finite()
    model._pipeline.steps[-1][1].coef_[0, 0] = np.nan  # type: ignore[attr-defined]
    assert not model.parameters_finite()
    registry = _RecordingRegistry()
    metrics = build_metrics(CollectorRegistry())
    publisher = ModelPublisher(settings, registry, None, metrics)  # type: ignore[arg-type]
    assert publisher.publish(_state(model, 100), "manual", 0.0) is None
    [rejected] = registry.rejections
    assert rejected["gate"]["code"] == "candidate_not_finite"  # type: ignore[index]
    assert publisher.last_rejection == "candidate has non-finite parameters"
    assert metrics.versions_rejected._value.get() == 1
