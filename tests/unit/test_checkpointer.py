"""Checkpointer on the in-memory group and a checkpoint folder: every commit it makes is
covered by a durable checkpoint at that moment, and none is made for a failed, fenced or
lost one."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException
from prometheus_client import CollectorRegistry

from stream_trainer.ingest.deadletter import DeadLetterError
from stream_trainer.ingest.source import Source
from stream_trainer.operations.cadence import Cadence
from stream_trainer.operations.faults import CrashPoints
from stream_trainer.operations.metrics import build_metrics
from stream_trainer.state.checkpoint import (
    CheckpointError,
    CheckpointFenced,
    CheckpointStore,
    WriteResult,
)
from stream_trainer.state.checkpointer import Checkpointer, Snapshot
from stream_trainer.state.ledger import TopicPartitionKey, partition_key
from stream_trainer.testing.memory_source import InMemoryGroup, InMemorySource
from tests.harness import NoCommits

T = "in"
P0: TopicPartitionKey = (T, 0)
P1: TopicPartitionKey = (T, 1)


class GatedStore:
    """A real checkpoint folder whose writes can be held (``gate``) or refused (``fail``)."""

    def __init__(self, directory: Path) -> None:
        self.inner = CheckpointStore(directory, key=None, allow_unsigned=True, keep_last=5)
        self.gate = threading.Event()
        self.gate.set()
        self.fail: CheckpointError | None = None
        self.writes = 0

    def serialize(self, state: Any) -> bytes:
        return self.inner.serialize(state)

    def write(self, payload: bytes, manifest_fields: dict[str, Any]) -> WriteResult[Any]:
        self.writes += 1
        assert self.gate.wait(10.0), "the test never opened the gate"
        if self.fail is not None:
            raise self.fail
        return self.inner.write(payload, manifest_fields)

    def durable_offsets(self) -> dict[TopicPartitionKey, int]:
        manifest = self.inner.latest_manifest()
        if manifest is None:
            return {}
        return {(T, int(k.rsplit(":", 1)[1])): v for k, v in manifest.offsets.items()}


class Listener(NoCommits):
    """Assignment only: the Checkpointer is what these tests look at."""

    def on_kafka_error(self, error: KafkaError) -> None:
        pass


class Recorded(CrashPoints):
    """Records the crash points reached, in order."""

    def __init__(self) -> None:
        self.points: list[str] = []

    def reached(self, point: str) -> None:
        self.points.append(point)


class Rig:
    """One member owning both partitions, a state that is just its offsets, a Checkpointer
    checkpointing every 10 records; ``group.on_commit`` checks each commit at once."""

    def __init__(self, tmp_path: Path, durable: Mapping[TopicPartitionKey, int] = {}) -> None:
        self.store = GatedStore(tmp_path / "checkpoints")
        self.group = InMemoryGroup({T: 2}, on_commit=self._covered)
        self.source: Source = self.group.join("a", Listener())
        assert isinstance(self.source, InMemorySource)
        self.source.consume(1, 0.0)  # the assign runs in here
        assert self.source.owned == {P0, P1}
        self.offsets: dict[TopicPartitionKey, int] = dict(durable)
        self.snapshot_error: DeadLetterError | None = None
        self.registry = CollectorRegistry()
        self.crash = Recorded()
        self.clock = 0.0
        self.checkpointer = Checkpointer(
            self.store,
            self._snapshot,
            lambda: self.source,
            Cadence(10, None),
            build_metrics(self.registry),
            durable=durable,
            clock=lambda: self.clock,
            crash=self.crash,
        )

    def _snapshot(self, reason: str) -> Snapshot:
        if self.snapshot_error is not None:
            raise self.snapshot_error
        fields = {
            "offsets": {partition_key(k): v for k, v in sorted(self.offsets.items())},
            "model_version": None,
            "config_hash": "c" * 64,
            "records_learnt": sum(self.offsets.values()),
            "metrics": {},
            "extra": {"reason": reason},
        }
        return Snapshot(self.store.serialize(dict(self.offsets)), fields, dict(self.offsets))

    def _covered(self, member: str, applied: Mapping[TopicPartitionKey, int]) -> None:
        durable = self.store.durable_offsets()
        for key, offset in applied.items():
            assert offset <= durable.get(key, -1), (key, offset, durable)

    def learn(self, p0: int, p1: int) -> None:
        """Records up to these next-offsets were processed."""
        records = p0 - self.offsets.get(P0, 0) + p1 - self.offsets.get(P1, 0)
        self.offsets.update({P0: p0, P1: p1})
        self.checkpointer.observe(records)

    def failures(self) -> float:
        value = self.registry.get_sample_value("stream_trainer_checkpoint_failures_total")
        return value or 0.0

    def commits(self) -> list[tuple[TopicPartitionKey, int]]:
        return [(c.partition, c.offset) for c in self.group.commits]


def finish_in_flight(checkpointer: Checkpointer) -> None:
    """Wait until the background write is done (closing the writer: no more periodic
    writes in this test), so the next ``tick`` collects it."""
    assert checkpointer.writer.close(10.0)


def test_a_periodic_checkpoint_is_committed_only_once_its_write_is_durable(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path)
    rig.learn(5, 4)
    rig.checkpointer.tick(0.0)
    assert rig.store.writes == 0, "not due: 9 of 10 records"
    rig.store.gate.clear()  # the write hangs in the background
    rig.learn(6, 4)
    rig.checkpointer.tick(0.0)
    assert rig.store.writes == 1 and rig.checkpointer.in_flight
    rig.learn(30, 30)  # due again, but one write at a time
    rig.checkpointer.tick(0.0)
    assert rig.store.writes == 1
    assert rig.commits() == [], "nothing is durable yet"
    rig.store.gate.set()
    rig.checkpointer.wait()
    assert not rig.checkpointer.in_flight
    assert rig.commits() == [(P0, 6), (P1, 4)], "the written offsets, not the newer ones"
    assert rig.checkpointer.durable == {P0: 6, P1: 4}
    assert rig.crash.points == ["after_checkpoint"]
    assert rig.checkpointer.unsaved, "50 records since the write started"


def test_tick_collects_a_finished_write_without_waiting_for_it(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.learn(6, 4)
    rig.checkpointer.tick(0.0)
    finish_in_flight(rig.checkpointer)
    assert rig.commits() == [] and rig.checkpointer.in_flight
    rig.checkpointer.tick(0.0)  # not due (nothing learnt since): collects, starts nothing
    assert not rig.checkpointer.in_flight
    assert rig.commits() == [(P0, 6), (P1, 4)]
    assert not rig.checkpointer.unsaved


def test_now_collects_the_write_in_flight_then_writes_and_commits_its_own(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path)
    rig.learn(6, 4)
    rig.store.gate.clear()
    rig.checkpointer.tick(0.0)
    assert rig.checkpointer.in_flight
    rig.learn(8, 9)
    rig.store.gate.set()
    assert rig.checkpointer.now("publish")
    assert not rig.checkpointer.in_flight
    assert rig.store.writes == 2
    assert rig.commits() == [(P0, 6), (P1, 4), (P0, 8), (P1, 9)], "in write order"
    assert rig.checkpointer.durable == {P0: 8, P1: 9}
    assert not rig.checkpointer.unsaved
    assert rig.store.inner.latest_manifest() is not None
    manifest = rig.store.inner.latest_manifest()
    assert manifest is not None and manifest.extra["reason"] == "publish"


def test_forget_waits_for_the_write_in_flight_and_commits_none_of_it(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.learn(6, 4)
    rig.store.gate.clear()
    rig.checkpointer.tick(0.0)
    rig.store.gate.set()
    rig.checkpointer.forget()
    assert not rig.checkpointer.in_flight
    assert rig.commits() == []
    # It landed: a consistent state, the durable one now (a reload restores it).
    assert rig.store.durable_offsets() == {P0: 6, P1: 4}
    assert rig.checkpointer.durable == {P0: 6, P1: 4}
    rig.checkpointer.restart({P0: 6, P1: 4})
    rig.checkpointer.resumed({P0: 6, P1: 4})  # the start rule still applies afterwards
    assert rig.commits() == [(P0, 6), (P1, 4)]


def test_resumed_commits_only_the_starts_that_equal_the_durable_checkpoint(
    tmp_path: Path,
) -> None:
    first = Rig(tmp_path)
    first.learn(6, 4)
    assert first.checkpointer.now("shutdown")  # the restored checkpoint of the next member
    rig = Rig(tmp_path, durable={P0: 6, P1: 4})
    # P1 starts elsewhere (the group was ahead, or retention moved the log start).
    rig.checkpointer.resumed({P0: 6, P1: 9})
    assert rig.commits() == [(P0, 6)]
    rig.checkpointer.resumed({})
    assert rig.commits() == [(P0, 6)]
    assert rig.store.writes == 0, "the start rule writes nothing"


def test_a_failed_write_is_counted_committed_never_and_tried_again(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.store.fail = CheckpointError("disk full")
    rig.learn(6, 4)
    rig.checkpointer.tick(0.0)
    rig.checkpointer.wait()  # collects the failed write
    assert rig.failures() == 1
    assert rig.commits() == [] and rig.checkpointer.durable == {}
    assert rig.checkpointer.unsaved, "counted once more: due again at the next period"
    assert not rig.checkpointer.now("control")
    assert rig.failures() == 2 and rig.commits() == []
    assert rig.crash.points == []
    rig.store.fail = None
    assert rig.checkpointer.now("control")
    assert rig.commits() == [(P0, 6), (P1, 4)]


def test_a_fenced_write_raises_and_commits_nothing(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.store.fail = CheckpointFenced("another member took the checkpoints over")
    rig.learn(6, 4)
    rig.checkpointer.tick(0.0)
    finish_in_flight(rig.checkpointer)
    with pytest.raises(CheckpointFenced):
        rig.checkpointer.tick(0.0)
    with pytest.raises(CheckpointFenced):
        rig.checkpointer.now("revoke")
    assert rig.failures() == 2 and rig.commits() == []


def test_dead_letters_not_durable_hold_the_checkpoint_back_one_period(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.checkpointer = Checkpointer(
        rig.store,
        rig._snapshot,
        lambda: rig.source,
        Cadence(None, 5.0, since=0.0),
        build_metrics(CollectorRegistry()),
        durable={},
        clock=lambda: rig.clock,
    )
    rig.learn(1, 0)
    rig.snapshot_error = DeadLetterError("dead letters not durable")
    rig.checkpointer.tick(5.0)
    assert rig.store.writes == 0
    rig.snapshot_error = None
    rig.checkpointer.tick(9.0)
    assert rig.store.writes == 0, "deferred: the next try is one period after the failure"
    rig.checkpointer.tick(10.0)
    assert rig.store.writes == 1
    rig.checkpointer.wait()
    assert rig.commits() == [(P0, 1), (P1, 0)]


class BrokerDown:
    """A source whose commits fail as an unreachable broker's do."""

    def __init__(self, inner: Source) -> None:
        self.inner = inner
        self.tried = 0

    def commit(
        self, offsets: Mapping[TopicPartitionKey, int], asynchronous: bool = False
    ) -> dict[TopicPartitionKey, int]:
        self.tried += 1
        raise KafkaException(KafkaError(KafkaError._TRANSPORT))


def test_a_failed_commit_is_counted_and_the_checkpoint_stands(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    down = BrokerDown(rig.source)
    rig.source = down  # type: ignore[assignment]
    rig.learn(6, 4)
    assert rig.checkpointer.now("publish"), "the checkpoint is the source of truth"
    assert down.tried == 1
    assert rig.checkpointer.durable == {P0: 6, P1: 4}
    errors = rig.registry.get_sample_value(
        "stream_trainer_kafka_errors_total", {"code": "_TRANSPORT"}
    )
    assert errors == 1
