"""The real Service on an in-memory group: its guarantees in milliseconds.

Built as ``app.run_service`` builds it (checkpoints in a tmp folder, a folder registry,
the per-record River trainer, the inline decoder), minus Kafka, HTTP, the lease and the
control channel. The oracle is the model itself: River's StandardScaler counts every
record it learns, and its running mean and variance of the ``uid`` feature (a unique
number per record) move with any record lost or learnt twice; the ledger is checked too.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from stream_trainer import __version__
from stream_trainer.config import Settings, settings_from_mapping
from stream_trainer.errors import StreamTrainerError
from stream_trainer.ingest.deadletter import DeadLetterPublisher
from stream_trainer.ingest.records import RecordDecoder
from stream_trainer.operations.app import open_checkpoints, restore_state, validate_restored
from stream_trainer.operations.faults import NO_CRASHES, CrashPoints
from stream_trainer.operations.http import Heartbeat
from stream_trainer.operations.metrics import build_metrics
from stream_trainer.operations.service import Service
from stream_trainer.publishing.publisher import ModelPublisher
from stream_trainer.publishing.registry import open_registry
from stream_trainer.state.ledger import TopicPartitionKey, partition_key
from stream_trainer.state.training_state import TrainingState
from stream_trainer.testing.memory_source import InMemoryGroup, InMemoryProducer, InMemorySource
from stream_trainer.training.trainers import build_trainer

T = "in"
PARTITIONS = 3


def make_settings(
    tmp_path: Path, every_records: int, extra: Mapping[str, Any] | None = None
) -> Settings:
    return settings_from_mapping(
        {
            **(extra or {}),
            "kafka": {
                "bootstrap_servers": "in-memory:9092",
                "group_id": "g",
                "consume_batch_size": 7,
            },
            "topics": {"input": [T], "dead_letter": "dlq", "versions": "v"},
            "record": {"features": ["uid", "f"], "labels": [0, 1]},
            "model": {
                "name": "m",
                "task": "binary_classification",
                "preprocessing": [{"path": "river.preprocessing.StandardScaler"}],
                "learner": {"path": "river.linear_model.LogisticRegression"},
            },
            "training": {"mode": "per_record"},
            "checkpoint": {
                "dir": str(tmp_path / "checkpoints"),
                "allow_unsigned": True,
                "every_records": every_records,
                "every_seconds": None,
            },
            "registry": {"root": str(tmp_path / "registry")},
        },
        env={},
    )


class Crashed(StreamTrainerError):
    """The simulated kill -9 of :class:`CrashAt`."""


class CrashAt(CrashPoints):
    """Crashes at the ``nth`` arrival at ``point`` by raising, not by SIGKILLing this
    process: the test then drops the service where it stood, with no shutdown at all."""

    def __init__(self, point: str, nth: int = 1) -> None:
        super().__init__(f"{point}:{nth}")  # checks the point's name
        self._crash_point, self._left = point, nth

    def reached(self, point: str) -> None:
        if point == self._crash_point:
            self._left -= 1
            if self._left == 0:
                raise Crashed(point)


def build_service(
    settings: Settings, group: InMemoryGroup, member: str, crash: CrashPoints = NO_CRASHES
) -> Service:
    """A Service wired as app.run_service wires it, on ``group`` as ``member``."""
    metrics = build_metrics(CollectorRegistry())
    store = open_checkpoints(settings)
    state, _restored = restore_state(settings, store)
    registry = open_registry(settings.registry.root, settings.model.name, None, 3)
    publisher = ModelPublisher(settings, registry, None, metrics)
    publisher.reconcile(state)
    return Service(
        settings,
        state,
        make_source=lambda service: group.join(member, service),
        decoder=RecordDecoder(settings.record, settings.model.task),
        trainer=build_trainer(settings),
        store=store,
        dead_letters=DeadLetterPublisher(
            InMemoryProducer(group), settings.topics.dead_letter, "g", __version__
        ),
        publisher=publisher,
        metrics=metrics,
        heartbeat=Heartbeat(metrics=metrics),
        reload_state=lambda: restore_state(settings, store)[0],
        crash=crash,
        clock=lambda: 0.0,  # checkpoints by count only: no time in these tests
    )


def uid(partition: int, offset: int) -> int:
    return partition * 100_000 + offset


def produce(group: InMemoryGroup, per_partition: int) -> None:
    """``per_partition`` valid records on every partition of ``T``, each with a unique
    ``uid``."""
    for p in range(group.partitions[T]):
        for _ in range(per_partition):
            offset = len(group.log[T][p])
            x = {"uid": uid(p, offset), "f": (offset % 7) / 7.0}
            group.append(T, p, json.dumps({"x": x, "y": offset % 2}).encode())


def source_of(service: Service) -> InMemorySource:
    source = service.source
    assert isinstance(source, InMemorySource)
    return source


def drive(services: Iterable[Service], done: Callable[[], bool], max_rounds: int = 500) -> None:
    """Step every service in turn until ``done`` (bounded)."""
    members = list(services)
    for _ in range(max_rounds):
        for service in members:
            service.step()
        if done():
            return
    raise AssertionError("the services did not get there")


def learnt_all(service: Service, ends: Mapping[TopicPartitionKey, int]) -> Callable[[], bool]:
    return lambda: all(service.state.offsets.get(k, 0) >= end for k, end in ends.items())


def stop(service: Service) -> None:
    """A graceful stop: drain, checkpoint, commit, close (the revoke runs in close)."""
    service.request_stop()
    assert service.run() == 0


def final_state(settings: Settings) -> TrainingState:
    loaded = open_checkpoints(settings).load_latest(validate_restored(settings))
    assert loaded is not None
    assert isinstance(loaded.state, TrainingState)
    return loaded.state


def assert_learnt_once(state: TrainingState, ends: Mapping[TopicPartitionKey, int]) -> None:
    """The model saw every record of ``[0, end)`` exactly once (model and ledger agree)."""
    uids = [uid(p, o) for (_t, p), end in ends.items() for o in range(end)]
    scaler = next(iter(state.model.model.steps.values()))  # type: ignore[attr-defined]
    assert scaler.counts["uid"] == len(uids)
    assert scaler.means["uid"] == pytest.approx(statistics.fmean(uids), rel=1e-12)
    assert scaler.vars["uid"] == pytest.approx(statistics.pvariance(uids), rel=1e-9)
    assert state.records_learnt == len(uids)
    assert state.ledger.overlaps == 0
    assert state.ledger.as_json() == {partition_key(k): [[0, e]] for k, e in ends.items() if e}


class CoveredCommits:
    """``InMemoryGroup.on_commit``: every commit must be covered by the newest durable
    checkpoint at that moment (offsets are committed only after their checkpoint)."""

    def __init__(self, settings: Settings) -> None:
        self._store = open_checkpoints(settings)
        self.checked = 0

    def __call__(self, member: str, applied: Mapping[TopicPartitionKey, int]) -> None:
        manifest = self._store.latest_manifest()
        assert manifest is not None, f"{member} committed {applied} with no checkpoint"
        for key, offset in applied.items():
            assert offset <= manifest.offsets[partition_key(key)], (member, key, offset)
            self.checked += 1


def test_records_are_learnt_once_and_committed_only_after_their_checkpoint(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path, every_records=25)
    covered = CoveredCommits(settings)
    group = InMemoryGroup({T: PARTITIONS}, on_commit=covered)
    produce(group, 40)
    service = build_service(settings, group, "a")
    ends = group.end_offsets()
    drive([service], learnt_all(service, ends))
    produce(group, 10)  # more while it runs
    ends = group.end_offsets()
    drive([service], learnt_all(service, ends))
    stop(service)
    assert covered.checked >= PARTITIONS * 2  # periodic commits, and the shutdown's
    assert group.committed == ends
    assert group.violations == []
    assert_learnt_once(final_state(settings), ends)


def test_a_revoke_learns_checkpoints_and_commits_before_it_returns(tmp_path: Path) -> None:
    """No periodic checkpoint is due (1000 records), so only the revoke can make the
    moved partitions' records durable and committed, and it must before the partition
    reaches the next member."""
    settings = make_settings(tmp_path, every_records=1000)
    group = InMemoryGroup({T: PARTITIONS}, on_commit=CoveredCommits(settings))
    produce(group, 30)
    ends = group.end_offsets()
    service = build_service(settings, group, "a")
    drive([service], learnt_all(service, ends))
    assert group.committed == {}
    seen_at_assign: dict[str, Any] = {}

    class Next:
        """The next owner: what it finds when the moved partition reaches it."""

        def start_offsets(self, partitions: Sequence[TopicPartitionKey]) -> dict[Any, int]:
            return {}

        def on_assigned(self, partitions: Sequence[TopicPartitionKey]) -> None:
            seen_at_assign["partitions"] = list(partitions)
            seen_at_assign["committed"] = {k: group.committed.get(k) for k in partitions}
            seen_at_assign["checkpoint"] = final_state(settings)

        def on_revoked(self, partitions: Sequence[TopicPartitionKey]) -> None: ...
        def on_lost(self, partitions: Sequence[TopicPartitionKey]) -> None: ...

    produce(group, 5)
    service.step()  # consumes one unit (7 records): it waits in the decoder, not learnt
    assert service.state.records_learnt == 90
    joiner = group.join("b", Next())
    service.step()  # the revoke runs inside this step's consume
    assert source_of(service).owned == frozenset([(T, 0), (T, 1)])
    [first, *_] = joiner.consume(100, 0.0)
    assert seen_at_assign["partitions"] == [(T, 2)]
    # Everything consumed before the revoke (the unit in the decoder too) was learnt,
    # checkpointed, and the moved partition's offset committed before the revoke returned.
    checkpoint: TrainingState = seen_at_assign["checkpoint"]
    assert checkpoint.records_learnt == 97 == sum(checkpoint.offsets.values())
    assert checkpoint.ledger.overlaps == 0
    assert seen_at_assign["committed"] == {(T, 2): checkpoint.offsets[(T, 2)]}
    assert first.offset() == checkpoint.offsets[(T, 2)]
    assert group.violations == []


def test_a_lost_member_commits_nothing_reloads_and_learns_each_record_once(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path, every_records=1000)  # checkpoints when told only
    group = InMemoryGroup({T: PARTITIONS}, on_commit=CoveredCommits(settings))
    produce(group, 40)
    ends = group.end_offsets()
    service = build_service(settings, group, "a")
    drive([service], learnt_all(service, ends))
    assert service.checkpoint_now("test")  # durable and committed: 120 records
    produce(group, 5)
    ends = group.end_offsets()
    drive([service], learnt_all(service, ends))
    learnt_before = service.state.records_learnt
    assert learnt_before == 135
    commits_before = len(group.commits)
    group.expire("a")
    service.step()  # on_lost inside consume: nothing committed, state reloaded
    assert len(group.commits) == commits_before
    assert source_of(service).owned == frozenset()
    assert service.state.records_learnt == final_state(settings).records_learnt == 120
    group.join("a", service)  # the consumer rejoins, as librdkafka does after a lost
    produce(group, 5)
    ends = group.end_offsets()
    drive([service], learnt_all(service, ends))
    stop(service)
    assert group.violations == []
    assert group.committed == ends
    assert_learnt_once(final_state(settings), ends)


@pytest.mark.parametrize("how", ["graceful", "crash"])
def test_a_restarted_service_neither_loses_nor_repeats_records(tmp_path: Path, how: str) -> None:
    """Stopped (graceful) or dropped mid-run with unsaved records (crash: no shutdown;
    its session expires), then a new Service on the same folder and group."""
    settings = make_settings(tmp_path, every_records=20)
    group = InMemoryGroup({T: PARTITIONS}, on_commit=CoveredCommits(settings))
    produce(group, 30)
    first = build_service(settings, group, "a")
    drive([first], lambda: first.state.records_learnt >= 50)
    if how == "graceful":
        stop(first)
    else:
        # kill -9: the process ends where it is. A checkpoint write already running may
        # land or not; waiting for it keeps the test deterministic.
        first._writer.close(timeout=10.0)
        group.expire("a")
    produce(group, 10)
    ends = group.end_offsets()
    second = build_service(settings, group, "a2")
    drive([second], learnt_all(second, ends))
    stop(second)
    assert group.violations == []
    assert group.committed == ends
    assert_learnt_once(final_state(settings), ends)


def test_two_services_on_one_group_hand_partitions_over_without_violations(
    tmp_path: Path,
) -> None:
    """Two members with separate folders (each model learns what it owned): every
    partition's records are learnt exactly once across both models, and every commit
    comes from the owner of that moment (today's single-model service still commits all
    its offsets; the source's own view must filter out the ones it gave up)."""
    a_settings = make_settings(tmp_path / "a", every_records=10)
    b_settings = make_settings(tmp_path / "b", every_records=10)
    group = InMemoryGroup({T: PARTITIONS})
    produce(group, 20)
    a = build_service(a_settings, group, "a")
    drive([a], lambda: a.state.records_learnt >= 30)
    b = build_service(b_settings, group, "b")
    produce(group, 20)
    ends = group.end_offsets()

    def both_done() -> bool:
        learnt = {**a.state.offsets, **b.state.offsets}
        owned = source_of(a).owned | source_of(b).owned
        return (
            group.settled()
            and all(learnt.get(k, 0) >= e for k, e in ends.items())
            and (owned == set(ends))
        )

    drive([a, b], both_done)
    moved = source_of(b).owned
    assert moved and source_of(a).owned.isdisjoint(moved)
    stop(b)
    stop(a)
    assert group.violations == []
    assert group.committed == ends
    # Every record of a moved partition was learnt once by one of the two models: A up to
    # where it committed at its revoke, B from there.
    a_state, b_state = final_state(a_settings), final_state(b_settings)
    for key in moved:
        spans = a_state.ledger.ranges.get(key, []) + b_state.ledger.ranges.get(key, [])
        assert sorted(spans)[0][0] == 0
        assert sum(end - start for start, end in spans) == ends[key]
    assert a_state.records_learnt + b_state.records_learnt == sum(ends.values())


def test_a_flood_of_bad_records_halts_its_partition_across_a_restart(tmp_path: Path) -> None:
    """Dead letters go to the dead-letter topic; the breaker pauses the flooded partition
    on the source while the others train on; the restarted service pauses it again."""
    settings = make_settings(
        tmp_path, every_records=10, extra={"dead_letter": {"max_consecutive_invalid": 3}}
    )
    group = InMemoryGroup({T: PARTITIONS}, on_commit=CoveredCommits(settings))
    produce(group, 5)
    group.append(T, 1, b"not json")  # (T, 1) offset 5: one bad record, dead-lettered
    produce(group, 5)
    for _ in range(4):  # (T, 1) offsets 11-14: a flood
        group.append(T, 1, b"not json")
    produce(group, 5)
    ends = group.end_offsets()
    first = build_service(settings, group, "a")
    healthy = {k: e for k, e in ends.items() if k != (T, 1)}
    drive([first], learnt_all(first, healthy))
    assert source_of(first).paused == frozenset([(T, 1)])
    assert (T, 1) in first.state.halted
    halted_at = first.state.offsets[(T, 1)]
    # Halted within the flood; a halted unit's records of that partition stay unread.
    assert 6 <= halted_at <= 13
    letters = [dict(entry.headers or []) for entry in group.log["dlq"][0]]
    origins = [(h["dlq.original.partition"], h["dlq.original.offset"]) for h in letters]
    assert origins[0] == (b"1", b"5")
    assert all(partition == b"1" for partition, _ in origins)
    stop(first)
    second = build_service(settings, group, "a2")
    produce(group, 2)
    ends = group.end_offsets()
    healthy = {k: e for k, e in ends.items() if k != (T, 1)}
    drive([second], learnt_all(second, healthy))
    assert source_of(second).paused == frozenset([(T, 1)])
    assert second.state.offsets[(T, 1)] == halted_at
    stop(second)
    assert group.violations == []
    assert group.committed == {**healthy, (T, 1): halted_at}


def test_a_restart_commits_a_checkpoint_whose_commit_was_lost(tmp_path: Path) -> None:
    """Twin of tests/faults/test_crash_recovery.py's: killed after its checkpoint is
    durable, before that checkpoint's commit; the restart learns nothing again and commits
    the checkpoint's offsets when it is assigned."""
    settings = make_settings(tmp_path, every_records=1000)
    group = InMemoryGroup({T: PARTITIONS}, on_commit=CoveredCommits(settings))
    produce(group, 20)
    ends = group.end_offsets()
    first = build_service(settings, group, "a", crash=CrashAt("after_checkpoint"))
    drive([first], learnt_all(first, ends))
    with pytest.raises(Crashed):
        first.checkpoint_now("test")
    group.expire("a")  # its session ends
    assert group.committed == {}
    assert final_state(settings).offsets == ends
    second = build_service(settings, group, "a2")
    second.step()
    assert group.committed == ends  # at the assignment, before anything is learnt
    assert second.state.records_learnt == 60
    drive([second], lambda: True)
    stop(second)
    assert group.violations == []
    assert_learnt_once(final_state(settings), ends)


def test_a_kill_inside_revoke_loses_and_repeats_nothing(tmp_path: Path) -> None:
    """Twin of tests/faults/test_crash_recovery.py's: a member is killed inside its revoke
    callback, before the revoke's checkpoint, holding records learnt since its last
    checkpoint; the restarted service learns them again, once."""
    settings = make_settings(tmp_path, every_records=1000)
    group = InMemoryGroup({T: PARTITIONS}, on_commit=CoveredCommits(settings))
    produce(group, 30)
    victim = build_service(settings, group, "a", crash=CrashAt("in_revoke"))
    drive([victim], learnt_all(victim, group.end_offsets()))
    assert victim.checkpoint_now("test")
    produce(group, 5)
    drive([victim], learnt_all(victim, group.end_offsets()))
    unsaved = victim.state.records_learnt - final_state(settings).records_learnt
    joiner = group.join("b", _Idle())  # a rebalance: the victim must give a partition up
    with pytest.raises(Crashed):
        victim.step()
    group.expire("a")
    joiner.close(1.0)
    produce(group, 5)
    ends = group.end_offsets()
    restarted = build_service(settings, group, "a2")
    drive([restarted], learnt_all(restarted, ends))
    stop(restarted)
    assert unsaved == 15
    assert group.violations == []
    assert group.committed == ends
    assert_learnt_once(final_state(settings), ends)


class _Idle:
    """A member that takes what it is given and reads nothing."""

    def start_offsets(self, partitions: Sequence[TopicPartitionKey]) -> dict[Any, int]:
        return {}

    def on_assigned(self, partitions: Sequence[TopicPartitionKey]) -> None: ...
    def on_revoked(self, partitions: Sequence[TopicPartitionKey]) -> None: ...
    def on_lost(self, partitions: Sequence[TopicPartitionKey]) -> None: ...


def test_a_partition_added_while_the_member_was_down_is_learnt(tmp_path: Path) -> None:
    """Counterpart of tests/faults/test_kafka_faults.py's (which is about the stale
    assignment of a static member, not modelled here): the restarted service learns the
    new partition from its first record, and the old ones from its checkpoint."""
    settings = make_settings(tmp_path, every_records=10)
    group = InMemoryGroup({T: 2}, on_commit=CoveredCommits(settings))
    produce(group, 20)
    first = build_service(settings, group, "a")
    drive([first], learnt_all(first, group.end_offsets()))
    stop(first)
    group.add_partitions(T, 3)
    produce(group, 5)
    ends = group.end_offsets()
    second = build_service(settings, group, "a2")
    drive([second], learnt_all(second, ends))
    stop(second)
    assert group.violations == []
    assert group.committed == ends
    assert_learnt_once(final_state(settings), ends)
