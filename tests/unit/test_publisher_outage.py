"""A registry outage while the gate refuses a candidate does not stop the service.

Pure logic: the registry is a stand-in whose ``record_rejection`` raises the error an
unreachable object store raises (the S3 path itself is tested against SeaweedFS).
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from stream_trainer.operations.metrics import build_metrics
from stream_trainer.publishing.publisher import ModelPublisher
from stream_trainer.publishing.registry import RegistryUnavailable
from stream_trainer.training.learners import build_model
from stream_trainer.training.trainers import RetrainOutcome
from tests.unit.test_search import _state, make_settings


class _UnreachableRegistry:
    def __init__(self) -> None:
        self.calls = 0

    def record_rejection(self, *_args: Any) -> None:
        self.calls += 1
        raise RegistryUnavailable("s3://models/m: connection refused")


def test_a_refusal_recorded_during_a_store_outage_is_logged_not_fatal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = make_settings(trials=2)
    model = build_model(settings)
    state = _state(model, 100)
    metrics = build_metrics(CollectorRegistry())
    registry = _UnreachableRegistry()
    publisher = ModelPublisher(settings, registry, None, metrics)  # type: ignore[arg-type]
    outcome = RetrainOutcome(
        trigger="count",
        accepted=False,
        candidate=model,
        champion_score=0.9,
        candidate_score=0.6,
        duration_s=1.0,
        trained_on=100,
        reason="candidate 0.6000 vs champion 0.9000 (margin 0.0)",
    )
    with caplog.at_level(logging.WARNING, logger="stream_trainer.publishing.publisher"):
        publisher.record_rejection(state, outcome)  # must not raise
    assert registry.calls == 1
    assert metrics.versions_rejected._value.get() == 1  # counted all the same
    [record] = [r for r in caplog.records if "registry unavailable" in r.getMessage()]
    assert record.__dict__["candidate_score"] == 0.6
    assert "connection refused" in record.__dict__["reason"]
