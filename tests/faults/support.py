"""Shared pieces of the fault-injection suite: the exactly-once oracle and run helpers.

The oracle is the :class:`~stream_trainer.state.ledger.OffsetLedger` inside the checkpointed
training state: it is written in the same pickle as the model, so whatever a crash takes
back from the model it takes back from the ledger too. A record learnt twice is an
overlap, a record skipped is a hole in ``[0, end)``.

Waiting is always a bounded poll on an observable fact (a metric, a manifest, an exit).
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from stream_trainer.config import ObjectStoreSettings
from stream_trainer.laptop.datasets import get_dataset
from stream_trainer.laptop.produce import produce
from stream_trainer.state.checkpoint import CheckpointStore, LoadedCheckpoint
from stream_trainer.state.ledger import OffsetLedger, TopicPartitionKey, parse_partition_key
from stream_trainer.state.objectstore import is_store_url, open_store
from stream_trainer.state.store_checkpoint import ObjectCheckpointStore
from stream_trainer.state.training_state import TrainingState
from stream_trainer.testing.counting import CountingProducer
from tests.harness import HMAC_KEY, ServiceProcess, deep_merge, service_config, unique, wait_for

LEARNT = "stream_trainer_records_learnt_total"
ASSIGNED = "stream_trainer_assigned_partitions"


def store_of(config: Mapping[str, Any]) -> CheckpointStore | ObjectCheckpointStore:
    """A store on the service's checkpoint directory (or object-store prefix: this process
    needs the store's credentials in its environment) with the test key (reads only unless
    the service is stopped: ``load_latest`` may quarantine)."""
    where = str(config["checkpoint"]["dir"])
    if is_store_url(where):
        store = open_store(where, ObjectStoreSettings(**config.get("object_store", {})))
        return ObjectCheckpointStore(store, HMAC_KEY.encode(), allow_unsigned=False, keep_last=1000)
    return folder_store_of(config)


def folder_store_of(config: Mapping[str, Any]) -> CheckpointStore:
    """:func:`store_of` for a service whose checkpoint.dir is a folder."""
    return CheckpointStore(
        Path(config["checkpoint"]["dir"]),
        key=HMAC_KEY.encode(),
        allow_unsigned=False,
        keep_last=1000,
    )


def topic_of(config: Mapping[str, Any]) -> str:
    topic: str = config["topics"]["input"][0]
    return topic


def produce_records(
    config: Mapping[str, Any],
    count: int,
    partitions: int,
    seed: int = 42,
    dataset: str = "linear20",
) -> None:
    """``count`` valid records of ``dataset`` round-robin over ``partitions``."""
    report = produce(
        {"bootstrap.servers": config["kafka"]["bootstrap_servers"]},
        topic_of(config),
        get_dataset(dataset),
        count,
        partitions,
        seed=seed,
    )
    assert report.valid == count


def end_offsets(bootstrap: str, topic: str) -> dict[TopicPartitionKey, int]:
    """High watermark of every partition of ``topic``."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("probe")})
    try:
        meta = consumer.list_topics(topic, timeout=10)
        ends: dict[TopicPartitionKey, int] = {}
        for p in sorted(meta.topics[topic].partitions):
            _low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, p), timeout=10, cached=False
            )
            ends[(topic, p)] = int(high)
        return ends
    finally:
        consumer.close()


def committed_offsets(
    bootstrap: str, group: str, keys: Sequence[TopicPartitionKey]
) -> dict[TopicPartitionKey, int]:
    """The group's committed next offsets (negative when nothing is committed).

    A consumer that never subscribes does not join the group, so reading is passive.
    """
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False}
    )
    try:
        tps = consumer.committed([TopicPartition(t, p) for t, p in keys], timeout=10)
        return {(tp.topic, tp.partition): int(tp.offset) for tp in tps}
    finally:
        consumer.close()


def manifest_offsets(config: Mapping[str, Any]) -> dict[TopicPartitionKey, int]:
    """Offsets of the newest checkpoint that verifies (read-only; {} when none)."""
    manifest = store_of(config).latest_manifest()
    if manifest is None:
        return {}
    return {parse_partition_key(k): v for k, v in manifest.offsets.items()}


def covers(offsets: Mapping[TopicPartitionKey, int], ends: Mapping[TopicPartitionKey, int]) -> bool:
    return all(offsets.get(key, 0) >= end for key, end in ends.items())


def wait_checkpointed(
    config: Mapping[str, Any],
    ends: Mapping[TopicPartitionKey, int],
    service: ServiceProcess,
    timeout: float = 120.0,
) -> None:
    """Until a durable checkpoint covers ``ends``; fails early if the service died."""

    def done() -> bool:
        if not service.alive():
            raise AssertionError(
                f"service exited ({service.proc and service.proc.returncode}):\n{service.tail()}"
            )
        return covers(manifest_offsets(config), ends)

    try:
        wait_for(done, timeout, f"a checkpoint covering {dict(ends)}", interval=0.1)
    except AssertionError as error:
        # What the service was doing is the only clue to why it never got there.
        raise AssertionError(f"{error}; its log ends:\n{service.tail(40)}") from None


def load_final(config: Mapping[str, Any]) -> LoadedCheckpoint[Any]:
    """The newest good checkpoint; only call while no service holds the directory."""
    loaded = store_of(config).load_latest()
    assert loaded is not None, "no checkpoint verifies"
    assert isinstance(loaded.state, TrainingState)
    return loaded


@dataclass
class Verdict:
    """What the oracle found over one or more ledgers."""

    lost: int
    twice: int
    records_learnt: int
    holes: dict[str, list[list[int]]] = field(default_factory=dict)

    def line(self) -> str:
        return (
            f"records lost={self.lost} learnt twice={self.twice} "
            f"records_learnt={self.records_learnt}"
        )


def judge(states: Sequence[TrainingState], ends: Mapping[TopicPartitionKey, int]) -> Verdict:
    """Exactly-once over the union of ``states``' ledgers against ``[0, end)``.

    ``twice`` counts overlaps inside each ledger plus offsets claimed by more than one.
    """
    twice = sum(s.ledger.overlaps for s in states)
    union = OffsetLedger()
    for state in states:
        for key, spans in state.ledger.ranges.items():
            for start, end in spans:
                union.add(key, start, end)
    twice += union.overlaps
    lost = 0
    holes: dict[str, list[list[int]]] = {}
    for key, end in ends.items():
        cursor = 0
        for start, stop in union.ranges.get(key, []):
            if start > cursor:
                holes.setdefault(f"{key[0]}:{key[1]}", []).append([cursor, start])
                lost += start - cursor
            cursor = max(cursor, stop)
        if cursor < end:
            holes.setdefault(f"{key[0]}:{key[1]}", []).append([cursor, end])
            lost += end - cursor
    return Verdict(lost, twice, sum(s.records_learnt for s in states), holes)


def wait_exit(service: ServiceProcess, timeout: float, what: str) -> int:
    """The exit code once the process ended (negative: killed by that signal)."""
    assert service.proc is not None
    try:
        return service.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        service.kill()
        raise AssertionError(
            f"{what}: still running after {timeout} s:\n{service.tail()}"
        ) from None


@contextmanager
def trickle(producer: CountingProducer, batch: int = 300, period: float = 0.3) -> Iterator[None]:
    """A producer running throughout the block: ``batch`` records every ``period`` s."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            while not stop.wait(period):
                producer.produce(batch)
        except BaseException as error:  # reported by the test, not lost in the thread
            errors.append(error)

    thread = threading.Thread(target=run, name="counting-producer")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(60)
    assert not errors, errors


def recovery_seconds(service: ServiceProcess, started: float, timeout: float = 60.0) -> float:
    """Seconds from ``started`` (monotonic) until this process learnt its first record."""
    service.wait_metric(LEARNT, 1, timeout)
    return time.monotonic() - started


def model_fingerprint(state: TrainingState) -> dict[str, Any]:
    """Exact learnt parameters of the River StandardScaler | LogisticRegression, and
    probabilities on fixed inputs."""
    pipeline = state.model.model  # type: ignore[attr-defined]
    scaler, learner = list(pipeline.steps.values())
    probes = [{f"f{i}": ((i * 7 + k * 13) % 11 - 5) / 3.0 for i in range(20)} for k in range(25)]
    return {
        "weights": dict(learner.weights),
        "intercept": float(learner.intercept),
        "means": dict(scaler.means),
        "vars": dict(scaler.vars),
        "counts": dict(scaler.counts),
        "proba": [pipeline.predict_proba_one(x) for x in probes],
    }


def fingerprint_difference(a: Any, b: Any, path: str = "") -> float:
    """The largest relative difference between two fingerprints; raises AssertionError when
    their shapes or keys differ."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (path, a, b)
        return max((fingerprint_difference(a[k], b[k], f"{path}.{k}") for k in a), default=0.0)
    if isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), (path, a, b)
        return max(
            (
                fingerprint_difference(x, y, f"{path}[{i}]")
                for i, (x, y) in enumerate(zip(a, b, strict=True))
            ),
            default=0.0,
        )
    scale = max(abs(float(a)), abs(float(b)), 1e-12)
    return abs(float(a) - float(b)) / scale


def fault_config(
    tmp_path: Path, broker: Any, partitions: int, *overrides: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The fault suite's service: per_record River on ``linear20``, fresh topics on
    ``broker``; ``overrides`` are deep-merged in order."""
    merged: dict[str, Any] = {}
    for override in overrides:
        merged = deep_merge(merged, dict(override or {}))
    return service_config(
        tmp_path, broker.bootstrap_servers, "linear20", "per_record", partitions, merged
    )
