"""build_metrics: names, pre-initialised labels, no _created series, lag of owned partitions."""

from __future__ import annotations

import json

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from stream_trainer.operations.metrics import (
    DEAD_LETTER_REASONS,
    OBJECT_STORE_OPERATIONS,
    LagTracker,
    StatsOffsets,
    build_metrics,
    parse_partition_offsets,
)
from stream_trainer.state.ledger import TopicPartitionKey

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
                    "lo_offset": 0,
                    "hi_offset": 100,
                    "ls_offset": 98,
                },
                "1": {
                    "partition": 1,
                    "consumer_lag": 0,
                    "lo_offset": 0,
                    "hi_offset": 7,
                    "ls_offset": 7,
                },
                "2": {
                    "partition": 2,
                    "consumer_lag": -1,
                    "lo_offset": -1001,
                    "hi_offset": -1001,
                    "ls_offset": -1001,
                },
                "-1": {"partition": -1, "consumer_lag": -1, "hi_offset": -1001},
            },
        },
        "other": {
            "topic": "other",
            "partitions": {"3": {"partition": 3, "lo_offset": 2, "hi_offset": 9, "ls_offset": 9}},
        },
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
    for state in ("complete", "failed", "pruned"):
        assert value(registry, "stream_trainer_search_trials_total", state=state) == 0
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


def test_parse_partition_offsets_reads_the_end_of_the_isolation_level() -> None:
    committed = parse_partition_offsets(json.dumps(STATS))
    assert committed == {
        ("in", 0): StatsOffsets(0, 98),
        ("in", 1): StatsOffsets(0, 7),
        ("in", 2): StatsOffsets(-1, -1),
        ("other", 3): StatsOffsets(2, 9),
    }
    assert parse_partition_offsets(json.dumps(STATS), read_committed=False)[("in", 0)].end == 100
    assert parse_partition_offsets(json.dumps({"name": "x", "topics": {}})) == {}
    assert parse_partition_offsets("{}") == {}


class FakeSource:
    """Owned / paused partitions and the broker's watermarks (pure logic: no consumer)."""

    def __init__(self, owned: set[TopicPartitionKey], paused: set[TopicPartitionKey]) -> None:
        self.owned_now = set(owned)
        self.paused_now = set(paused)
        self.watermarks: dict[TopicPartitionKey, tuple[int, int] | None] = {}
        self.queried: list[TopicPartitionKey] = []

    @property
    def owned(self) -> frozenset[TopicPartitionKey]:
        return frozenset(self.owned_now)

    @property
    def paused(self) -> frozenset[TopicPartitionKey]:
        return frozenset(self.paused_now)

    def query_watermarks(self, key: TopicPartitionKey, timeout_s: float) -> tuple[int, int] | None:
        assert timeout_s > 0
        self.queried.append(key)
        return self.watermarks.get(key)


def lag_of(registry: CollectorRegistry, topic: str, partition: int) -> float | None:
    return value(
        registry, "stream_trainer_consumer_lag_records", topic=topic, partition=str(partition)
    )


def test_lag_is_end_minus_the_service_position_paused_or_not() -> None:
    registry = CollectorRegistry()
    tracker = LagTracker(build_metrics(registry))
    source = FakeSource({("in", 0), ("in", 1)}, paused={("in", 1)})
    # Statistics keep the end of the last fetch for the paused partition 1 (7); the broker
    # says 1007 now.
    source.watermarks[("in", 1)] = (0, 1007)
    positions = {("in", 0): 90, ("in", 1): 5}
    tracker.attach(source, lambda: positions)
    tracker.on_stats(json.dumps(STATS))
    assert lag_of(registry, "in", 0) == 98 - 90  # ls_offset: read_committed
    assert lag_of(registry, "in", 1) == 1007 - 5
    assert source.queried == [("in", 1)]  # fetched partitions are not asked for
    assert lag_of(registry, "other", 3) is None  # reported, but not owned


def test_lag_without_a_position_counts_from_the_log_start() -> None:
    registry = CollectorRegistry()
    tracker = LagTracker(build_metrics(registry))
    source = FakeSource({("in", 0), ("in", 2)}, paused=set())
    source.watermarks[("in", 2)] = (3, 50)  # nothing in the statistics for partition 2 yet
    tracker.attach(source, dict)
    tracker.on_stats(json.dumps(STATS))
    assert lag_of(registry, "in", 0) == 98
    assert lag_of(registry, "in", 2) == 50 - 3


def test_lag_keeps_the_larger_end_of_statistics_and_query() -> None:
    registry = CollectorRegistry()
    tracker = LagTracker(build_metrics(registry))
    source = FakeSource({("in", 0)}, paused={("in", 0)})
    source.watermarks[("in", 0)] = (0, 51)  # a broker answering less than it fetched
    tracker.attach(source, lambda: {("in", 0): 10})
    tracker.on_stats(json.dumps(STATS))
    assert lag_of(registry, "in", 0) == 98 - 10


def test_lag_removes_partitions_no_longer_owned_and_keeps_unanswered_ones() -> None:
    registry = CollectorRegistry()
    tracker = LagTracker(build_metrics(registry))
    source = FakeSource({("in", 0), ("in", 1)}, paused={("in", 1)})
    source.watermarks[("in", 1)] = (0, 20)
    tracker.attach(source, lambda: {("in", 0): 90, ("in", 1): 5})
    tracker.on_stats(json.dumps(STATS))
    assert lag_of(registry, "in", 1) == 15
    source.watermarks[("in", 1)] = None  # the broker does not answer: keep the last value
    tracker.on_stats(json.dumps(STATS))
    assert lag_of(registry, "in", 1) == 15
    source.owned_now = {("in", 1)}  # partition 0 revoked
    tracker.on_stats(json.dumps(STATS))
    assert lag_of(registry, "in", 0) is None
    assert lag_of(registry, "in", 1) == 15
    tracker.clear()
    assert lag_of(registry, "in", 1) is None


def test_lag_queries_stay_within_the_budget_and_rotate() -> None:
    registry = CollectorRegistry()
    now = [0.0]
    tracker = LagTracker(build_metrics(registry), budget_s=1.0, clock=lambda: now[0])
    keys = {("t", p) for p in range(4)}
    source = FakeSource(keys, paused=keys)

    def slow_query(key: TopicPartitionKey, timeout_s: float) -> tuple[int, int] | None:
        source.queried.append(key)
        now[0] += 0.6  # each answer takes 0.6 s: two fit in the 1 s budget
        return (0, 100)

    source.query_watermarks = slow_query  # type: ignore[method-assign]
    tracker.attach(source, lambda: dict.fromkeys(keys, 40))
    tracker.on_stats("{}")
    assert source.queried == [("t", 0), ("t", 1)]
    tracker.on_stats("{}")  # the partitions left over go first
    assert source.queried[2:] == [("t", 2), ("t", 3)]
    assert all(lag_of(registry, "t", p) == 60 for p in range(4))


def test_lag_ignores_statistics_before_attach() -> None:
    registry = CollectorRegistry()
    LagTracker(build_metrics(registry)).on_stats(json.dumps(STATS))
    assert lag_of(registry, "in", 0) is None


def test_reason_codes_match_their_modules() -> None:
    from stream_trainer.ingest import records
    from stream_trainer.operations.metrics import QUARANTINE_REASONS
    from stream_trainer.state import checkpoint

    assert records.REASONS == DEAD_LETTER_REASONS
    assert {checkpoint.BAD_SIGNATURE, checkpoint.PAYLOAD_CHECKSUM} <= set(QUARANTINE_REASONS)


def test_object_store_requests_are_labelled_by_operation_only() -> None:
    registry = CollectorRegistry()
    metrics = build_metrics(registry)
    for operation in OBJECT_STORE_OPERATIONS:
        failures = "stream_trainer_object_store_request_failures_total"
        assert value(registry, failures, operation=operation) == 0
    metrics.observe_object_store("put", 0.003, failed=False)
    metrics.observe_object_store("put", 0.2, failed=True)
    count = "stream_trainer_object_store_request_seconds_count"
    assert value(registry, count, operation="put") == 2
    assert value(registry, "stream_trainer_object_store_request_seconds_sum", operation="put") == (
        pytest.approx(0.203)
    )
    assert (
        value(registry, "stream_trainer_object_store_request_failures_total", operation="put") == 1
    )
    # A key or URL never becomes a label value.
    with pytest.raises(ValueError, match="operation"):
        metrics.observe_object_store("s3://bucket/m/LEASE", 0.1, failed=False)
    assert value(registry, count, operation="s3://bucket/m/LEASE") is None


def test_object_store_operations_are_the_stores_own() -> None:
    from stream_trainer.state.objectstore import OPERATIONS

    assert OBJECT_STORE_OPERATIONS == OPERATIONS
