"""Prometheus metrics of the service, built on an injected registry.

Nothing is registered at import time: ``build_metrics(registry)`` creates every
metric on the registry it is given (tests use a fresh ``CollectorRegistry``; the
service uses one of its own, exposed by :mod:`stream_trainer.operations.http`).

Conventions: prefix ``stream_trainer_``, base units (seconds, bytes), ``_total``
counters, low-cardinality labels whose values are known up front are
pre-initialised so ``rate()`` and ``increase()`` see a 0 before the first event.
Callers update per batch / per unit, never per record where that would cost more
than the learner.
"""

from __future__ import annotations

import contextlib
import json
import platform
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)

from stream_trainer.ingest.records import REASONS
from stream_trainer.state.ledger import TopicPartitionKey

PREFIX = "stream_trainer"

# Reason codes of dead-lettered records (pre-initialised labels): the decoder's own list.
DEAD_LETTER_REASONS: tuple[str, ...] = REASONS
# Why a checkpoint was quarantined: the reason strings of checkpoint.py.
QUARANTINE_REASONS: tuple[str, ...] = (
    "bad_magic",
    "truncated",
    "bad_manifest",
    "bad_signature",
    "payload_checksum",
    "sequence_mismatch",
    "library_mismatch",
    "unpickle_failed",
    "validation_failed",
)
REBALANCE_KINDS: tuple[str, ...] = ("assign", "revoke", "lost")
RETRAIN_TRIGGERS: tuple[str, ...] = ("count", "time", "drift", "manual")
# stream_trainer.training.search.search.TRIAL_STATES (not imported: metrics stay free of the
# learners).
SEARCH_TRIAL_STATES: tuple[str, ...] = ("complete", "failed", "pruned")
STATES: tuple[str, ...] = (
    "starting",
    "standby",
    "restoring",
    "running",
    "retraining",
    "paused",
    "stopping",
)
METRIC_SCOPES: tuple[str, ...] = ("window", "total")
# Requests of the object store (stream_trainer.state.objectstore.OPERATIONS, not imported: metrics
# stay free of obstore). Only these values ever label a series: never a key or a URL.
OBJECT_STORE_OPERATIONS: tuple[str, ...] = (
    "get",
    "put",
    "put_if_absent",
    "put_if_match",
    "list",
    "delete",
)

# Sub-millisecond resolution: a River learn_one is ~10-100 us; a big batch seconds.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS: tuple[float, ...] = (
    1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 50_000, 100_000,
)  # fmt: skip
CHECKPOINT_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip
# A request on a nearby store takes ~1-5 ms; a slow or distant one up to its timeout.
OBJECT_STORE_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
RETRAIN_BUCKETS: tuple[float, ...] = (
    0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
)  # fmt: skip


@dataclass(frozen=True)
class Metrics:
    """Every metric the service exports; field comment = exported name(s)."""

    # stream_trainer_records_consumed_total
    records_consumed: Counter
    # stream_trainer_records_learnt_total
    records_learnt: Counter
    # stream_trainer_records_unscored_total (no prediction yet: left out of every metric)
    records_unscored: Counter
    # stream_trainer_records_dead_lettered_total{reason}
    records_dead_lettered: Counter
    schema_registry_retries: Counter
    schema_registry_wait: Histogram
    # stream_trainer_batches_total
    batches: Counter
    # stream_trainer_batch_size_records (histogram)
    batch_size: Histogram
    # stream_trainer_learn_duration_seconds (histogram, per batch / unit)
    learn_duration: Histogram
    # stream_trainer_predict_duration_seconds (histogram, per batch / unit)
    predict_duration: Histogram
    # stream_trainer_decode_wait_seconds (histogram, per unit): the loop waiting for the
    # decode worker; near 0 while decoding keeps ahead of training
    decode_wait: Histogram
    # stream_trainer_consumer_lag_records{topic,partition}
    consumer_lag: Gauge
    # stream_trainer_assigned_partitions
    assigned_partitions: Gauge
    # stream_trainer_rebalances_total{kind=assign|revoke|lost}
    rebalances: Counter
    # stream_trainer_slots{state=restoring|training|unavailable|fenced} (partition scope)
    slots: Gauge
    # stream_trainer_slots_fenced_total (partition scope: a slot claimed over by another member)
    slots_fenced: Counter
    # stream_trainer_slot_restore_duration_seconds (histogram, partition scope: claim + restore)
    slot_restore_duration: Histogram
    # stream_trainer_slot_records_learnt_total{topic,partition} (partition scope)
    slot_records_learnt: Counter
    # stream_trainer_key_models_live (key scope: key models this member holds in memory)
    key_models_live: Gauge
    # stream_trainer_key_models_loaded_total (key scope: evicted key states read back)
    key_models_loaded: Counter
    # stream_trainer_key_models_evicted_total (key scope: key states written out, dropped)
    key_models_evicted: Counter
    # stream_trainer_key_objects_deleted_total (key scope: key objects no checkpoint names)
    key_objects_deleted: Counter
    # stream_trainer_kafka_errors_total{code} (KafkaError.name(), e.g. _TRANSPORT)
    kafka_errors: Counter
    # stream_trainer_poll_heartbeat_timestamp_seconds (unix time of the last poll)
    poll_heartbeat_timestamp: Gauge
    # stream_trainer_poll_gap_max_seconds (largest gap between two polls)
    poll_gap_max: Gauge
    # stream_trainer_checkpoint_duration_seconds (histogram)
    checkpoint_duration: Histogram
    # stream_trainer_checkpoint_size_bytes
    checkpoint_size: Gauge
    # stream_trainer_checkpoint_last_success_timestamp_seconds
    checkpoint_last_success: Gauge
    # stream_trainer_checkpoint_failures_total
    checkpoint_failures: Counter
    # stream_trainer_checkpoints_quarantined_total{reason}
    checkpoints_quarantined: Counter
    # stream_trainer_retrain_duration_seconds (histogram)
    retrain_duration: Histogram
    # stream_trainer_retrains_total{trigger=count|time|drift|manual}
    retrains: Counter
    # stream_trainer_search_trials_total{state=complete|failed|pruned}
    search_trials: Counter
    # stream_trainer_search_best_score (the last search's best, in its metric's units)
    search_best_score: Gauge
    # stream_trainer_search_duration_seconds (histogram)
    search_duration: Histogram
    # stream_trainer_selection_live_candidates (online selection: candidates still learning)
    selection_live: Gauge
    # stream_trainer_selection_leader{candidate} (1 for the leader, 0 for the others)
    selection_leader: Gauge
    # stream_trainer_selection_candidate_score{candidate} (prequential, the selection's metric)
    selection_score: Gauge
    # stream_trainer_selection_candidate_cpu_seconds{candidate} (since the model started)
    selection_cpu: Gauge
    # stream_trainer_search_trial_peak_memory_bytes (the last search's largest trial peak)
    search_trial_peak_memory: Gauge
    # stream_trainer_drift_detections_total
    drift_detections: Counter
    # stream_trainer_prequential_metric{metric,scope=window|total}
    prequential_metric: Gauge
    # stream_trainer_model_version (numeric version of the current champion)
    model_version: Gauge
    # stream_trainer_model_info{version,learner,mode}
    model_info: Info
    # stream_trainer_versions_published_total
    versions_published: Counter
    # stream_trainer_publish_duration_seconds (histogram: gate, upload, version event)
    publish_duration: Histogram
    # stream_trainer_object_store_request_seconds{operation} (histogram, every request)
    object_store_request: Histogram
    # stream_trainer_object_store_request_failures_total{operation}
    object_store_failures: Counter
    # stream_trainer_versions_rejected_total
    versions_rejected: Counter
    # stream_trainer_partitions_halted (by the bad-record breaker)
    partitions_halted: Gauge
    # stream_trainer_state{stream_trainer_state=<one of STATES>} (Enum)
    state: Enum
    # stream_trainer_ready (1 when /readyz would answer 200)
    ready: Gauge
    # stream_trainer_build_info{version,python}
    build_info: Info
    # stream_trainer_retention_gap_accepted_total
    retention_gap_accepted: Counter
    # stream_trainer_registry_champion_unavailable_total
    registry_champion_unavailable: Counter

    def set_prequential(self, values: Mapping[str, float], scope: str) -> None:
        """Set the prequential gauges of one scope ("window" or "total") from a batch."""
        if scope not in METRIC_SCOPES:
            raise ValueError(f"scope must be one of {METRIC_SCOPES}, got {scope!r}")
        for name, value in values.items():
            self.prequential_metric.labels(metric=name, scope=scope).set(value)

    def set_model(self, version: int, learner: str, mode: str) -> None:
        """Record the current champion version (numeric gauge and ``_info``)."""
        self.model_version.set(version)
        self.model_info.info({"version": str(version), "learner": learner, "mode": mode})

    def observe_object_store(self, operation: str, seconds: float, failed: bool) -> None:
        """One object-store request (a :data:`stream_trainer.state.objectstore.RequestObserver`):
        its duration and, when the store failed it, a failure. A refused conditional write
        or a missing key is an answer, not a failure. ``operation`` must be one of
        :data:`OBJECT_STORE_OPERATIONS` (ValueError otherwise: no unbounded label)."""
        if operation not in OBJECT_STORE_OPERATIONS:
            raise ValueError(f"unknown object-store operation {operation!r}")
        self.object_store_request.labels(operation=operation).observe(seconds)
        if failed:
            self.object_store_failures.labels(operation=operation).inc()


def _package_version() -> str:
    try:
        return metadata.version("stream-trainer")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_metrics(
    registry: CollectorRegistry,
    *,
    version: str | None = None,
    dead_letter_reasons: Iterable[str] = DEAD_LETTER_REASONS,
) -> Metrics:
    """Create and register every metric (and the default process collectors) on ``registry``.

    Calls ``prometheus_client.disable_created_metrics()``, which is process-global:
    ``_created`` series are noise for Prometheus and double the series count.
    Raises ``ValueError`` (duplicate timeseries) if called twice on one registry.
    """
    disable_created_metrics()  # type: ignore[no-untyped-call]
    p = PREFIX
    r: dict[str, Any] = {"registry": registry}

    metrics = Metrics(
        records_consumed=Counter(f"{p}_records_consumed", "Records read from Kafka.", **r),
        records_learnt=Counter(f"{p}_records_learnt", "Records the model has learnt.", **r),
        records_unscored=Counter(
            f"{p}_records_unscored",
            "Records the model had no prediction for (cold start): not in the prequential metrics.",
            **r,
        ),
        records_dead_lettered=Counter(
            f"{p}_records_dead_lettered",
            "Records sent to the dead-letter topic, by reason.",
            ["reason"],
            **r,
        ),
        schema_registry_retries=Counter(
            f"{p}_schema_registry_retries",
            "Schema lookups retried because the schema registry was unreachable, slow or "
            "failing (records wait meanwhile; none is dead-lettered for it).",
            **r,
        ),
        schema_registry_wait=Histogram(
            f"{p}_schema_registry_wait_seconds",
            "Time a unit waited for the schema registry to answer for its new schema ids.",
            buckets=(0.01, 0.05, 0.25, 1, 5, 15, 60, 300, 1800),
            **r,
        ),
        batches=Counter(f"{p}_batches", "Training units (batches) processed.", **r),
        batch_size=Histogram(
            f"{p}_batch_size_records",
            "Records per training unit.",
            buckets=BATCH_SIZE_BUCKETS,
            **r,
        ),
        learn_duration=Histogram(
            f"{p}_learn_duration_seconds",
            "Time spent learning one training unit.",
            buckets=LATENCY_BUCKETS,
            **r,
        ),
        predict_duration=Histogram(
            f"{p}_predict_duration_seconds",
            "Time spent predicting one training unit (test-then-train).",
            buckets=LATENCY_BUCKETS,
            **r,
        ),
        decode_wait=Histogram(
            f"{p}_decode_wait_seconds",
            "Time the poll loop waited for a unit from the decode worker.",
            buckets=LATENCY_BUCKETS,
            **r,
        ),
        consumer_lag=Gauge(
            f"{p}_consumer_lag_records",
            "Records between the end of each owned partition (paused or halted included) "
            "and the next offset the service learns.",
            ["topic", "partition"],
            **r,
        ),
        assigned_partitions=Gauge(
            f"{p}_assigned_partitions", "Partitions currently assigned to this consumer.", **r
        ),
        rebalances=Counter(
            f"{p}_rebalances", "Consumer group rebalance callbacks, by kind.", ["kind"], **r
        ),
        slots=Gauge(
            f"{p}_slots",
            "Partition-scope slots this member holds, by state (restoring, training, "
            "unavailable: the store could not be read at assign, fenced: claimed over).",
            ["state"],
            **r,
        ),
        slots_fenced=Counter(
            f"{p}_slots_fenced",
            "Partition slots another member claimed while this one still held them.",
            **r,
        ),
        slot_restore_duration=Histogram(
            f"{p}_slot_restore_duration_seconds",
            "Claim and restore of one partition slot at assign (the hand-over's cost).",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            **r,
        ),
        slot_records_learnt=Counter(
            f"{p}_slot_records_learnt",
            "Records learnt per input partition (partition scope).",
            ["topic", "partition"],
            **r,
        ),
        key_models_live=Gauge(
            f"{p}_key_models_live",
            "Key models this member holds in memory (key scope; never labelled by key).",
            **r,
        ),
        key_models_loaded=Counter(
            f"{p}_key_models_loaded",
            "Evicted key models read back from the checkpoint store (key scope).",
            **r,
        ),
        key_models_evicted=Counter(
            f"{p}_key_models_evicted",
            "Key models written to the checkpoint store and dropped from memory (key scope).",
            **r,
        ),
        key_objects_deleted=Counter(
            f"{p}_key_objects_deleted",
            "Evicted key states deleted from the checkpoint store: no retained checkpoint "
            "names them and none can again (key scope).",
            **r,
        ),
        kafka_errors=Counter(
            f"{p}_kafka_errors", "Kafka client errors, by error code name.", ["code"], **r
        ),
        poll_heartbeat_timestamp=Gauge(
            f"{p}_poll_heartbeat_timestamp_seconds",
            "Unix time of the last poll-loop iteration.",
            **r,
        ),
        poll_gap_max=Gauge(
            f"{p}_poll_gap_max_seconds",
            "Largest gap between two poll-loop iterations since start.",
            **r,
        ),
        checkpoint_duration=Histogram(
            f"{p}_checkpoint_duration_seconds",
            "Time to write a checkpoint durably.",
            buckets=CHECKPOINT_BUCKETS,
            **r,
        ),
        checkpoint_size=Gauge(
            f"{p}_checkpoint_size_bytes", "Size of the last checkpoint written.", **r
        ),
        checkpoint_last_success=Gauge(
            f"{p}_checkpoint_last_success_timestamp_seconds",
            "Unix time of the last durable checkpoint (0 = none yet).",
            **r,
        ),
        checkpoint_failures=Counter(
            f"{p}_checkpoint_failures", "Checkpoint writes that failed.", **r
        ),
        checkpoints_quarantined=Counter(
            f"{p}_checkpoints_quarantined",
            "Checkpoints set aside on load, by reason.",
            ["reason"],
            **r,
        ),
        retrain_duration=Histogram(
            f"{p}_retrain_duration_seconds",
            "Duration of a full retrain (fit on a clone).",
            buckets=RETRAIN_BUCKETS,
            **r,
        ),
        retrains=Counter(f"{p}_retrains", "Full retrains started, by trigger.", ["trigger"], **r),
        search_trials=Counter(
            f"{p}_search_trials",
            "Hyperparameter search trials run by full retrains, by final state.",
            ["state"],
            **r,
        ),
        search_best_score=Gauge(
            f"{p}_search_best_score",
            "Best validation score of the last hyperparameter search (its metric's units).",
            **r,
        ),
        search_duration=Histogram(
            f"{p}_search_duration_seconds",
            "Duration of a hyperparameter search, trials and the winner's refit.",
            buckets=RETRAIN_BUCKETS,
            **r,
        ),
        selection_live=Gauge(
            f"{p}_selection_live_candidates",
            "Online model selection: candidates still learning (the cost is about this many "
            "models' predict and learn).",
            **r,
        ),
        selection_leader=Gauge(
            f"{p}_selection_leader",
            "Online model selection: 1 for the candidate that is the model, 0 for the others.",
            ["candidate"],
            **r,
        ),
        selection_score=Gauge(
            f"{p}_selection_candidate_score",
            "Online model selection: each candidate's prequential score since it started, in "
            "the selection metric's units.",
            ["candidate"],
            **r,
        ),
        selection_cpu=Gauge(
            f"{p}_selection_candidate_cpu_seconds",
            "Online model selection: CPU seconds each candidate spent predicting and learning "
            "since the model started (checkpointed, so it survives restarts).",
            ["candidate"],
            **r,
        ),
        search_trial_peak_memory=Gauge(
            f"{p}_search_trial_peak_memory_bytes",
            "Largest peak resident memory of a process running a trial of the last search.",
            **r,
        ),
        drift_detections=Counter(
            f"{p}_drift_detections", "Concept drifts detected on the prequential error.", **r
        ),
        prequential_metric=Gauge(
            f"{p}_prequential_metric",
            "Prequential (test-then-train) score, by metric and scope (window or total).",
            ["metric", "scope"],
            **r,
        ),
        model_version=Gauge(
            f"{p}_model_version", "Numeric version of the current champion model.", **r
        ),
        model_info=Info(f"{p}_model", "The current champion model.", **r),
        versions_published=Counter(f"{p}_versions_published", "Model versions published.", **r),
        publish_duration=Histogram(
            f"{p}_publish_duration_seconds",
            "Time to publish a version on the poll thread: the gate, the registry upload and "
            "the version event (the checkpoint before it is in checkpoint_duration).",
            buckets=CHECKPOINT_BUCKETS,
            **r,
        ),
        object_store_request=Histogram(
            f"{p}_object_store_request_seconds",
            "Object-store (s3://) requests of the registry, by operation (failed ones included).",
            ["operation"],
            buckets=OBJECT_STORE_BUCKETS,
            **r,
        ),
        object_store_failures=Counter(
            f"{p}_object_store_request_failures",
            "Object-store requests the store failed (network, permissions, server errors), by "
            "operation; a refused conditional write or a missing key is not a failure.",
            ["operation"],
            **r,
        ),
        versions_rejected=Counter(
            f"{p}_versions_rejected", "Candidate versions rejected by the promotion gate.", **r
        ),
        partitions_halted=Gauge(
            f"{p}_partitions_halted",
            "Partitions stopped by the bad-record breaker.",
            **r,
        ),
        state=Enum(f"{p}_state", "Lifecycle state of the service.", states=list(STATES), **r),
        ready=Gauge(f"{p}_ready", "1 when the service is ready (/readyz), else 0.", **r),
        build_info=Info(f"{p}_build", "Build information.", **r),
        retention_gap_accepted=Counter(
            f"{p}_retention_gap_accepted",
            "Starts that accepted offsets lost to Kafka retention (accept_retention_gap).",
            **r,
        ),
        registry_champion_unavailable=Counter(
            f"{p}_registry_champion_unavailable",
            "Gate decisions whose registry champion failed verification (sha256 / HMAC) or "
            "could not be read; an older version that verifies, or none, stood in for it.",
            **r,
        ),
    )

    # Pre-initialise known label values: rate()/increase() need the 0 sample.
    for reason in dead_letter_reasons:
        metrics.records_dead_lettered.labels(reason=reason)
    for reason in QUARANTINE_REASONS:
        metrics.checkpoints_quarantined.labels(reason=reason)
    for kind in REBALANCE_KINDS:
        metrics.rebalances.labels(kind=kind)
    for trigger in RETRAIN_TRIGGERS:
        metrics.retrains.labels(trigger=trigger)
    for trial_state in SEARCH_TRIAL_STATES:
        metrics.search_trials.labels(state=trial_state)
    for operation in OBJECT_STORE_OPERATIONS:
        metrics.object_store_failures.labels(operation=operation)
    metrics.build_info.info(
        {"version": version or _package_version(), "python": platform.python_version()}
    )

    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return metrics


# The statistics callback runs on the poll thread: asking the broker for the end offsets of
# partitions it does not fetch blocks the loop at most this long per statistics interval.
LAG_QUERY_BUDGET_S = 0.5


class LagSource(Protocol):
    """What :class:`LagTracker` reads from the consumer (``KafkaSource``)."""

    @property
    def owned(self) -> frozenset[TopicPartitionKey]:
        """Partitions assigned to this member."""

    @property
    def paused(self) -> frozenset[TopicPartitionKey]:
        """Owned partitions not being fetched (halted or paused)."""

    def query_watermarks(self, key: TopicPartitionKey, timeout_s: float) -> tuple[int, int] | None:
        """(log start, end offset) asked from the broker now; None if it did not answer."""


@dataclass(frozen=True)
class StatsOffsets:
    """One partition's offsets in a librdkafka statistics payload (-1 = unknown)."""

    log_start: int
    end: int


def parse_partition_offsets(
    stats_json: str, read_committed: bool = True
) -> dict[TopicPartitionKey, StatsOffsets]:
    """``{(topic, partition): StatsOffsets}`` from a librdkafka statistics JSON string.

    The end is ``ls_offset`` (last stable offset) under ``read_committed`` (librdkafka's
    default isolation level), else ``hi_offset``: what librdkafka's own ``consumer_lag``
    uses. Both come from fetch responses, so they are stale for a partition not fetched.
    Skips the internal partition -1.
    """
    stats = json.loads(stats_json)
    end_field = "ls_offset" if read_committed else "hi_offset"
    out: dict[TopicPartitionKey, StatsOffsets] = {}
    for topic, tstats in (stats.get("topics") or {}).items():
        for key, pstats in (tstats.get("partitions") or {}).items():
            partition = int(pstats.get("partition", key))
            if partition < 0:
                continue
            out[(topic, partition)] = StatsOffsets(
                _offset(pstats.get("lo_offset")),
                _offset(pstats.get(end_field)),
            )
    return out


def _offset(value: Any) -> int:
    """A statistics offset, or -1 when absent or one of librdkafka's logical offsets."""
    return value if isinstance(value, int) and value >= 0 else -1


class LagTracker:
    """Sets ``consumer_lag_records`` for every owned partition, paused or not.

    Lag = end offset - the service's position (the next offset it learns; the log start
    for a partition it has no position for, where it starts without a checkpoint). The
    end offset comes from the statistics for fetched partitions; for paused or halted
    ones librdkafka stops fetching and its statistics keep the end of the last fetch
    (``consumer_lag`` reads 0 exactly while nothing is learnt), so those are asked from
    the broker, within :data:`LAG_QUERY_BUDGET_S` per statistics payload (partitions
    left over keep their last value and go first next time).

    ``on_stats`` fits confluent_kafka's ``stats_cb`` (called on the poll thread, the one
    that moves the positions); series of partitions no longer owned are removed.
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        read_committed: bool = True,
        budget_s: float = LAG_QUERY_BUDGET_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metrics = metrics
        self._read_committed = read_committed
        self._budget_s = budget_s
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: set[TopicPartitionKey] = set()
        self._source: LagSource | None = None
        self._positions: Callable[[], Mapping[TopicPartitionKey, int]] = dict
        self._queue_first: list[TopicPartitionKey] = []  # not queried last time: go first

    def attach(
        self, source: LagSource, positions: Callable[[], Mapping[TopicPartitionKey, int]]
    ) -> None:
        """Read owned / paused partitions from ``source`` and the service's next offsets
        from ``positions`` (statistics arriving before this are ignored)."""
        self._source = source
        self._positions = positions

    def on_stats(self, stats_json: str) -> None:
        """Update from one statistics payload (the ``stats_cb`` signature)."""
        source = self._source
        if source is None:
            return
        with self._lock:
            lags = self._lags(source, parse_partition_offsets(stats_json, self._read_committed))
            for topic, partition in self._seen - source.owned:
                self._remove(topic, partition)
            for (topic, partition), lag in lags.items():
                self._metrics.consumer_lag.labels(topic=topic, partition=str(partition)).set(lag)
            self._seen = (self._seen & source.owned) | lags.keys()

    def _lags(
        self, source: LagSource, stats: Mapping[TopicPartitionKey, StatsOffsets]
    ) -> dict[TopicPartitionKey, int]:
        """Lag of each owned partition whose end and position are known now."""
        owned, paused, positions = source.owned, source.paused, self._positions()
        deadline = self._clock() + self._budget_s
        first = [k for k in self._queue_first if k in owned]
        order = first + sorted(owned - set(first))
        self._queue_first = []
        lags: dict[TopicPartitionKey, int] = {}
        for key in order:
            seen = stats.get(key, StatsOffsets(-1, -1))
            end, position = seen.end, positions.get(key)
            if position is None and seen.log_start >= 0:
                position = seen.log_start  # nothing learnt, no checkpoint: starts there
            if key in paused or end < 0 or position is None:
                remaining = deadline - self._clock()
                marks = source.query_watermarks(key, remaining) if remaining > 0 else None
                if marks is None:
                    self._queue_first.append(key)
                    continue
                # The end never moves back: the larger of the two is the fresher (and some
                # brokers answer ListOffsets with less than their fetch responses say).
                end = max(end, marks[1])
                position = marks[0] if position is None else position
            if end >= 0 and position is not None:
                lags[key] = max(0, end - position)
        return lags

    def clear(self) -> None:
        """Remove every lag series (e.g. on close)."""
        with self._lock:
            for topic, partition in self._seen:
                self._remove(topic, partition)
            self._seen = set()

    def _remove(self, topic: str, partition: int) -> None:
        # remove() raises KeyError for a series that is already gone.
        with contextlib.suppress(KeyError):
            self._metrics.consumer_lag.remove(topic, str(partition))
