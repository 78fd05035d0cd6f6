"""build_metrics: names, pre-initialised labels, no _created series, lag from librdkafka stats."""

from __future__ import annotations

import json

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from stream_trainer.metrics import (
    DEAD_LETTER_REASONS,
    LagTracker,
    build_metrics,
    parse_lag_stats,
    update_lag_from_stats,
)

# Trimmed from a real librdkafka statistics payload (consumer).
STATS = {
    "name": "rdkafka#consumer-1",
    "type": "consumer",
    "topics": {
        "in": {
            "topic": "in",
            "partitions": {
                "0": {
                    "partition": 0,
                    "consumer_lag": 42,
                    "consumer_lag_stored": 40,
                    "hi_offset": 100,
                },
                "1": {"partition": 1, "consumer_lag": 0, "consumer_lag_stored": 0, "hi_offset": 7},
                "2": {
                    "partition": 2,
                    "consumer_lag": -1,
                    "consumer_lag_stored": -1,
                    "hi_offset": -1,
                },
                "-1": {"partition": -1, "consumer_lag": -1, "hi_offset": -1001},
            },
        },
        "other": {"topic": "other", "partitions": {"3": {"partition": 3, "consumer_lag": 5}}},
    },
}


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_labels_are_pre_initialised() -> None:
    registry = CollectorRegistry()
    build_metrics(registry)
    for reason in DEAD_LETTER_REASONS:
        assert value(registry, "stream_trainer_records_dead_lettered_total", reason=reason) == 0
    for kind in ("assign", "revoke", "lost"):
        assert value(registry, "stream_trainer_rebalances_total", kind=kind) == 0
    for trigger in ("count", "time", "drift", "manual"):
        assert value(registry, "stream_trainer_retrains_total", trigger=trigger) == 0
    assert value(registry, "stream_trainer_records_learnt_total") == 0


def test_custom_dead_letter_reasons() -> None:
    registry = CollectorRegistry()
    build_metrics(registry, dead_letter_reasons=("schema",))
    assert value(registry, "stream_trainer_records_dead_lettered_total", reason="schema") == 0
    assert value(registry, "stream_trainer_records_dead_lettered_total", reason="empty") is None


def test_no_created_series_and_prefix() -> None:
    registry = CollectorRegistry()
    metrics = build_metrics(registry)
    metrics.records_consumed.inc()
    metrics.learn_duration.observe(0.001)
    text = generate_latest(registry).decode()
    assert "_created" not in text
    own = [f.name for f in registry.collect() if not f.name.startswith(("process_", "python_"))]
    assert own and all(name.startswith("stream_trainer_") for name in own)


def test_default_collectors_registered() -> None:
    registry = CollectorRegistry()
    build_metrics(registry)
    names = {f.name for f in registry.collect()}
    assert {"process_cpu_seconds", "python_info", "python_gc_collections"} <= names


def test_nothing_registered_globally_and_twice_fails() -> None:
    registry = CollectorRegistry()
    build_metrics(registry)
    build_metrics(CollectorRegistry())  # independent registries do not clash
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        build_metrics(registry)


def test_sub_millisecond_latency_buckets() -> None:
    registry = CollectorRegistry()
    metrics = build_metrics(registry)
    metrics.learn_duration.observe(0.00003)
    assert value(registry, "stream_trainer_learn_duration_seconds_bucket", le="5e-05") == 1
    assert value(registry, "stream_trainer_learn_duration_seconds_bucket", le="1e-05") == 0


def test_model_info_state_build_info() -> None:
    registry = CollectorRegistry()
    metrics = build_metrics(registry, version="9.9.9")
    metrics.set_model(7, "river.linear_model.LogisticRegression", "mini_batch")
    metrics.state.state("retraining")
    assert value(registry, "stream_trainer_model_version") == 7
    info = {
        "version": "7",
        "learner": "river.linear_model.LogisticRegression",
        "mode": "mini_batch",
    }
    assert value(registry, "stream_trainer_model_info", **info) == 1
    assert value(registry, "stream_trainer_state", stream_trainer_state="retraining") == 1
    assert value(registry, "stream_trainer_state", stream_trainer_state="running") == 0
    build = {s.labels["version"] for f in registry.collect() for s in f.samples
             if s.name == "stream_trainer_build_info"}  # fmt: skip
    assert build == {"9.9.9"}


def test_set_prequential_validates_scope() -> None:
    registry = CollectorRegistry()
    metrics = build_metrics(registry)
    metrics.set_prequential({"accuracy": 0.75}, "window")
    assert (
        value(registry, "stream_trainer_prequential_metric", metric="accuracy", scope="window")
        == 0.75
    )
    with pytest.raises(ValueError, match="scope"):
        metrics.set_prequential({"accuracy": 0.75}, "recent")


def test_parse_lag_skips_unknown_and_internal_partition() -> None:
    assert parse_lag_stats(json.dumps(STATS)) == {("in", 0): 42, ("in", 1): 0, ("other", 3): 5}
    assert parse_lag_stats(json.dumps({"name": "x", "topics": {}})) == {}
    assert parse_lag_stats("{}") == {}


def test_update_lag_sets_gauge() -> None:
    registry = CollectorRegistry()
    metrics = build_metrics(registry)
    update_lag_from_stats(metrics, json.dumps(STATS))
    assert value(registry, "stream_trainer_consumer_lag_records", topic="in", partition="0") == 42
    assert value(registry, "stream_trainer_consumer_lag_records", topic="in", partition="1") == 0
    assert value(registry, "stream_trainer_consumer_lag_records", topic="in", partition="2") is None


def test_lag_tracker_removes_partitions_no_longer_reported() -> None:
    registry = CollectorRegistry()
    tracker = LagTracker(build_metrics(registry))
    tracker.on_stats(json.dumps(STATS))
    revoked = {"topics": {"in": {"partitions": {"0": {"partition": 0, "consumer_lag": 0}}}}}
    tracker.on_stats(json.dumps(revoked))
    assert value(registry, "stream_trainer_consumer_lag_records", topic="in", partition="0") == 0
    assert (
        value(registry, "stream_trainer_consumer_lag_records", topic="other", partition="3") is None
    )
    tracker.clear()
    assert value(registry, "stream_trainer_consumer_lag_records", topic="in", partition="0") is None


def test_reason_codes_match_their_modules() -> None:
    from stream_trainer import checkpoint, records
    from stream_trainer.metrics import QUARANTINE_REASONS

    assert records.REASONS == DEAD_LETTER_REASONS
    assert {checkpoint.BAD_SIGNATURE, checkpoint.PAYLOAD_CHECKSUM} <= set(QUARANTINE_REASONS)
