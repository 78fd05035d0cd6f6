"""The real PartitionService (``model.scope: partition``) on the in-memory group.

Wired as ``app._partition_service`` wires it: slots in a tmp folder through
``objectstore.LocalStore`` and ``SlotStore``, versions in a folder registry
(``ScopedPublishing``, no fence), the per-record trainer, the inline decoder; minus Kafka
and HTTP. The oracle is the model itself: the counting learner's state is the multiset of
the (partition, offset, key) tuples it learnt, read from every slot's newest checkpoint
(``SlotStore.read_head``, read-only), never from the service's ledger. Every commit is
checked at the moment it is applied against the slot's MANIFEST (docs/design/scale-out.md,
4.4 and 13.1): no commit ahead of a durable checkpoint, none by a member that does not hold
the slot's claim, and (the group's own check) none for a partition the member does not own.

Background checkpoint writes run on their threads as in production; between rounds of
steps the tests wait for them (``Cluster.await_writes``), so no outcome depends on the
machine's speed. The services' clock is the test's (``Clock``).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from stream_trainer import __version__
from stream_trainer.config import Settings, settings_from_mapping
from stream_trainer.errors import StreamTrainerError
from stream_trainer.ingest.deadletter import DeadLetterPublisher
from stream_trainer.ingest.records import RecordDecoder
from stream_trainer.ingest.source import Source
from stream_trainer.operations.app import new_state, validate_restored
from stream_trainer.operations.faults import CrashPoints
from stream_trainer.operations.http import Heartbeat
from stream_trainer.operations.metrics import build_metrics
from stream_trainer.operations.partition_service import RETRY_UNAVAILABLE_S, PartitionService
from stream_trainer.publishing.scoped_publish import ScopedPublishing
from stream_trainer.publishing.scoped_versions import KAFKA_KEY, Routing
from stream_trainer.state.ledger import TopicPartitionKey, partition_key
from stream_trainer.state.manager import SCOPE, PartitionSlot, PartitionSlots
from stream_trainer.state.objectstore import LocalStore, ObjectStoreError, StoredObject
from stream_trainer.state.slot_store import SlotStore, parse_object_name
from stream_trainer.state.training_state import TrainingState
from stream_trainer.testing.counting import RIVER_PATH, Sample, counts_of, judge_counts
from stream_trainer.testing.memory_source import InMemoryGroup, InMemoryProducer, InMemorySource
from stream_trainer.training.learners import TESTING_ENV
from stream_trainer.training.trainers import build_trainer

T = "in"
PARTITIONS = 6
KEYS = 5  # key ids 0..4, the third counted feature


@pytest.fixture(autouse=True)
def counting_learners(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TESTING_ENV, "1")


@pytest.fixture(autouse=True)
def no_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill -9 here drops a Python object, never the page cache: fsync guards against
    nothing these tests simulate, and on a shared disk it is most of their time."""
    monkeypatch.setattr(os, "fsync", lambda _fd: None)


def make_settings(
    tmp_path: Path,
    every_records: int,
    mode: str = "per_record",
    publish_every_records: int | None = None,
    consume_batch_size: int = 7,
) -> Settings:
    return settings_from_mapping(
        {
            "kafka": {
                "bootstrap_servers": "in-memory:9092",
                "group_id": "g",
                "consume_batch_size": consume_batch_size,
            },
            "topics": {"input": [T], "dead_letter": "dlq", "versions": "v"},
            "record": {"features": ["partition", "offset", "key"]},
            "model": {
                "name": "m",
                "task": "regression",
                "learner": {"path": RIVER_PATH},
                "scope": "partition",
            },
            "training": {"mode": mode, "mini_batch": {"size": 4, "max_wait_s": 1.0}},
            "checkpoint": {
                "dir": str(tmp_path / "checkpoints"),
                "allow_unsigned": True,
                "every_records": every_records,
                "every_seconds": None,
            },
            "registry": {
                "root": str(tmp_path / "registry"),
                "publish_every_records": publish_every_records,
                "publish_every_seconds": None,
            },
        },
        env={},
    )


class Crashed(StreamTrainerError):
    """The simulated kill -9 of :class:`Crash`."""


class Crash(CrashPoints):
    """Crash points armed from the test: the next arrival at the armed point raises
    Crashed (not SIGKILL), and the test drops the service where it stood."""

    def __init__(self) -> None:
        super().__init__(None)
        self.armed: str | None = None
        self.fired: str | None = None

    def arm(self, point: str) -> None:
        CrashPoints(point)  # checks the name
        self.armed = point

    def reached(self, point: str) -> None:
        if point == self.armed:
            self.armed, self.fired = None, point
            raise Crashed(point)


class Clock:
    """The services' clock: it moves only when the test moves it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FlakyStore(LocalStore):
    """A LocalStore whose ``get`` of keys under ``prefix`` fails ``failures`` times."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.prefix: str | None = None
        self.failures = 0

    def get(self, key: str) -> StoredObject:
        if self.prefix is not None and key.startswith(self.prefix) and self.failures > 0:
            self.failures -= 1
            raise ObjectStoreError(f"{key}: store unavailable (test)")
        return super().get(key)


class GatedStore(LocalStore):
    """A LocalStore whose MANIFEST swaps wait while :attr:`closed`, until :attr:`gate` is
    set: a checkpoint write caught between its upload and its compare-and-swap."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.closed = False
        self.waiting = threading.Event()  # a swap waits at the gate
        self.gate = threading.Event()

    def put_if_match(self, key: str, data: bytes, etag: str) -> str:
        if self.closed and key.endswith("/MANIFEST"):
            self.waiting.set()
            self.gate.wait(10.0)
        return super().put_if_match(key, data, etag)


class OverlapStore(LocalStore):
    """A LocalStore that measures how many of its calls of one kind overlap: each such call
    (``put_if_absent`` of a checkpoint object, or ``put_if_match`` of a MANIFEST: a claim
    or a checkpoint's swap) waits until ``expected`` are in progress or ``hold_s`` passed, so
    calls made one after another show as 1 and calls made side by side as ``expected``."""

    def __init__(self, root: Path, method: str, expected: int, hold_s: float = 2.0) -> None:
        super().__init__(root)
        self.method, self.expected, self.hold_s = method, expected, hold_s
        self.armed = False
        self.most = 0
        self._now = 0
        self._changed = threading.Condition()

    def _overlapping(self, call: Callable[[], str]) -> str:
        with self._changed:
            self._now += 1
            self.most = max(self.most, self._now)
            self._changed.notify_all()
            self._changed.wait_for(lambda: self._now >= self.expected, timeout=self.hold_s)
        try:
            return call()
        finally:
            with self._changed:
                self._now -= 1

    def put_if_absent(self, key: str, data: bytes) -> str:
        if self.armed and self.method == "put_if_absent" and not key.endswith("/MANIFEST"):
            return self._overlapping(lambda: LocalStore.put_if_absent(self, key, data))
        return super().put_if_absent(key, data)

    def put_if_match(self, key: str, data: bytes, etag: str) -> str:
        if self.armed and self.method == "put_if_match" and key.endswith("/MANIFEST"):
            return self._overlapping(lambda: LocalStore.put_if_match(self, key, data, etag))
        return super().put_if_match(key, data, etag)


@dataclass
class Member:
    """One running member: its service, its crash points and its metrics."""

    name: str
    service: PartitionService
    crash: Crash
    registry: CollectorRegistry

    @property
    def source(self) -> InMemorySource:
        source = self.service.source
        assert isinstance(source, InMemorySource)
        return source

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


class Recorder:
    """A member's rebalance listener: logs each callback, then hands it to the service."""

    def __init__(self, member: str, inner: PartitionService, events: list[Event]) -> None:
        self._member, self._inner, self._events = member, inner, events

    def start_offsets(self, partitions: Sequence[TopicPartitionKey]) -> dict[Any, int]:
        return self._inner.start_offsets(partitions)

    def on_assigned(self, partitions: Sequence[TopicPartitionKey]) -> None:
        self._events.append(Event(self._member, "assigned", tuple(partitions)))
        self._inner.on_assigned(partitions)

    def on_revoked(self, partitions: Sequence[TopicPartitionKey]) -> None:
        self._events.append(Event(self._member, "revoked", tuple(partitions)))
        self._inner.on_revoked(partitions)

    def on_lost(self, partitions: Sequence[TopicPartitionKey]) -> None:
        self._events.append(Event(self._member, "lost", tuple(partitions)))
        self._inner.on_lost(partitions)


@dataclass(frozen=True)
class Event:
    """One rebalance callback a member heard."""

    member: str
    kind: str  # assigned | revoked | lost
    partitions: tuple[TopicPartitionKey, ...]


@dataclass
class Cluster:
    """The group, the shared slot store, the members and the commit checks."""

    settings: Settings
    store: LocalStore
    clock: Clock = field(default_factory=Clock)
    seconds_per_round: float = 0.0  # how far the clock moves at each round of drive()
    members: dict[str, Member] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # commits that break _covered's rule
    checked: int = 0
    group: InMemoryGroup = field(init=False)

    def __post_init__(self) -> None:
        self.group = InMemoryGroup({T: PARTITIONS}, on_commit=self._covered)

    # -- the oracle's read-only view of the store ------------------------------------------

    def reader(self, key: TopicPartitionKey) -> SlotStore:
        ckpt = self.settings.checkpoint
        return SlotStore(
            LocalStore(self.store.root),  # not the flaky one: the oracle always reads
            SCOPE,
            partition_key(key),
            "oracle",
            ckpt.key(),
            ckpt.allow_unsigned,
            ckpt.keep_last,
        )

    def _covered(self, member: str, applied: Mapping[TopicPartitionKey, int]) -> None:
        """Every applied commit is covered by the slot's MANIFEST at that moment, and made
        by the member that holds the slot's claim (the offsets follow their checkpoint)."""
        for key, offset in applied.items():
            self.checked += 1
            manifest = self.reader(key).read().manifest
            if manifest is None or manifest.head is None:
                self.problems.append(f"{member} committed {key}@{offset} with no checkpoint")
                continue
            durable = manifest.offsets[partition_key(key)]
            if offset > durable:
                self.problems.append(f"{member} committed {key}@{offset} > checkpoint {durable}")
            if manifest.owner != member:
                self.problems.append(f"{member} committed {key}@{offset}; {manifest.owner} owns")

    # -- members ------------------------------------------------------------------------------

    def add(self, name: str, store: LocalStore | None = None) -> Member:
        """A member wired as app._partition_service wires one, joined to the group."""
        settings, group, clock = self.settings, self.group, self.clock
        registry = CollectorRegistry()
        metrics = build_metrics(registry)
        crash = Crash()
        producer = InMemoryProducer(group)
        routing = Routing(KAFKA_KEY, settings.routing.partitioner, PARTITIONS, T)
        publishing = ScopedPublishing(settings, SCOPE, routing, producer, metrics, crash=crash)
        checkpoints = store or self.store
        ckpt = settings.checkpoint

        def open_slot(scope_id: str) -> SlotStore:
            return SlotStore(
                checkpoints,
                SCOPE,
                scope_id,
                name,
                ckpt.key(),
                ckpt.allow_unsigned,
                ckpt.keep_last,
                crash=crash.reached,
            )

        def make_slots(service: PartitionService) -> PartitionSlots:
            return PartitionSlots(
                settings,
                open_slot,
                lambda: new_state(settings),
                validate_restored(settings),
                publishing,
                service.snapshot,
                lambda: service.commits,  # type: ignore[return-value]
                metrics,
                fenced_registry=False,
                clock=clock,
                crash=crash,
            )

        def make_source(service: PartitionService) -> Source:
            return group.join(name, Recorder(name, service, self.events))

        service = PartitionService(
            settings,
            make_slots,
            make_source,
            RecordDecoder(settings.record, settings.model.task),
            build_trainer(settings, crash),
            DeadLetterPublisher(producer, settings.topics.dead_letter, "g", __version__),
            metrics,
            Heartbeat(metrics=metrics),
            crash=crash,
            clock=clock,
        )
        member = self.members[name] = Member(name, service, crash, registry)
        return member

    def discard(self, name: str) -> None:
        """kill -9: the member ends where it stands; its session expires. A checkpoint
        write already running may land or not: waiting for it keeps the test
        deterministic."""
        member = self.members.pop(name)
        for slot in list(member.service.slots.slots.values()):
            slot.checkpointer.close(10.0)
        if name in self.group.members:
            self.group.expire(name)

    def stop(self, name: str) -> None:
        """A graceful stop: learn, checkpoint and commit every slot, leave the group."""
        member = self.members.pop(name)
        member.service.request_stop()
        assert member.service.run() == 0

    def drive(
        self,
        done: Callable[[], bool],
        on_crash: Callable[[Member], None] | None = None,
        max_rounds: int = 300,
    ) -> None:
        """Step every member in turn until ``done`` (bounded), letting the checkpoint
        writes finish between rounds; a member that crashes is discarded, then
        ``on_crash(member)``."""
        for _ in range(max_rounds):
            self.clock.now += self.seconds_per_round
            for name, member in list(self.members.items()):
                if name not in self.members:
                    continue
                try:
                    member.service.step()
                except Crashed:
                    self.discard(name)
                    if on_crash is not None:
                        on_crash(member)
            if done():
                return
            self.await_writes()
        raise AssertionError("the members did not get there")

    def await_writes(self) -> None:
        """Let every background checkpoint write finish, uncollected (the next tick
        collects it, as in the loop): the steps run by hand, faster than any write, and the
        outcome must not depend on the machine's speed."""
        for member in self.members.values():
            for slot in member.service.slots.slots.values():
                flight = slot.checkpointer._in_flight
                if flight is not None:
                    concurrent.futures.wait([flight.future], timeout=10.0)

    def collect_writes(self) -> None:
        """Wait for every background checkpoint write and commit its offsets, as the next
        ticks would once it finished (keeps the count of commits deterministic)."""
        for member in self.members.values():
            for slot in member.service.slots.slots.values():
                slot.checkpointer.wait()

    def slot_of(self, key: TopicPartitionKey) -> tuple[str, PartitionSlot] | None:
        """The member training ``key`` and its slot."""
        for name, member in self.members.items():
            slot = member.service.slots.get(key)
            if slot is not None and key in member.source.owned:
                return name, slot
        return None

    def learnt_all(self, ends: Mapping[TopicPartitionKey, int] | None = None) -> bool:
        """Settled, and every partition learnt up to ``ends`` (the log's end) by a slot."""
        if not self.group.settled():
            return False
        for key, end in (ends or self.group.end_offsets()).items():
            found = self.slot_of(key)
            if found is None or found[1].state.offsets.get(key, 0) < end:
                return False
        return True

    # -- the oracle -----------------------------------------------------------------------

    def newest(self, key: TopicPartitionKey) -> TrainingState:
        loaded = self.reader(key).read_head()
        assert loaded is not None, f"{key} has no checkpoint"
        assert loaded.manifest.offsets == {partition_key(key): self.group.end_offsets()[key]}
        assert isinstance(loaded.state, TrainingState)
        return loaded.state

    def newest_offset(self, key: TopicPartitionKey) -> int:
        """The offset in the slot's MANIFEST (0: none)."""
        manifest = self.reader(key).read().manifest
        return 0 if manifest is None else manifest.offsets.get(partition_key(key), 0)

    def judge(self) -> None:
        """Lost 0, twice 0 over every slot's newest checkpoint; each holds its own
        partition only."""
        learnt: Counter[Sample] = Counter()
        for key in self.group.all_partitions():
            counts = counts_of(self.newest(key).model)
            assert {p for p, _o, _k in counts} == {key[1]}
            learnt.update(counts)
        verdict = judge_counts(produced(self.group), learnt)
        assert (verdict.lost, verdict.twice, verdict.unexpected) == (0, 0, 0), verdict.line()
        assert verdict.produced == sum(self.group.end_offsets().values())


def produce(group: InMemoryGroup, per_partition: int) -> None:
    """``per_partition`` counting records on every partition: each carries its own
    partition, offset and a key id."""
    for p in range(PARTITIONS):
        for _ in range(per_partition):
            offset = len(group.log[T][p])
            x = {"partition": p, "offset": offset, "key": offset % KEYS}
            group.append(T, p, json.dumps({"x": x, "y": float(offset % 3)}).encode())


def produced(group: InMemoryGroup) -> list[Sample]:
    return [(p, o, o % KEYS) for p in range(PARTITIONS) for o in range(len(group.log[T][p]))]


def settled_owners(cluster: Cluster) -> dict[TopicPartitionKey, tuple[str, PartitionSlot]]:
    owners = {}
    for key in cluster.group.all_partitions():
        found = cluster.slot_of(key)
        assert found is not None, key
        owners[key] = found
    return owners


# -- 1. one member -------------------------------------------------------------------------


def test_one_member_learns_every_record_once_each_slot_holding_its_partition(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path, every_records=10, publish_every_records=12)
    cluster = Cluster(settings, LocalStore(tmp_path / "checkpoints"))
    produce(cluster.group, 25)
    a = cluster.add("a")
    cluster.drive(cluster.learnt_all)
    cluster.collect_writes()
    assert set(a.service.slots.slots) == set(cluster.group.all_partitions())
    periodic = len(cluster.group.commits)
    assert periodic >= PARTITIONS  # periodic checkpoints, each committed
    produce(cluster.group, 7)  # more while it runs
    cluster.drive(cluster.learnt_all)
    cluster.stop("a")
    ends = cluster.group.end_offsets()
    assert cluster.group.committed == ends
    assert cluster.group.violations == []
    assert cluster.problems == []
    assert cluster.checked == len(cluster.group.commits) > periodic
    cluster.judge()
    for key, end in ends.items():
        state = cluster.newest(key)
        assert state.offsets == {key: end}
        assert state.records_learnt == end
        assert state.ledger.as_json() == {partition_key(key): [[0, end]]}
    # Each slot publishes its own versions, under its own registry folder, as its own key.
    routing = Routing(KAFKA_KEY, settings.routing.partitioner, PARTITIONS, T)
    publishing = ScopedPublishing(
        settings, SCOPE, routing, None, build_metrics(CollectorRegistry())
    )
    for key, end in ends.items():
        champion = publishing.registry(partition_key(key)).champion()
        assert champion is not None and champion.version >= 2
        assert champion.metadata["scope_id"] == partition_key(key)
        [[start, learnt]] = champion.metadata["offsets_total"][partition_key(key)]
        assert start == 0 and 24 <= learnt <= end
        assert set(champion.metadata["offsets_total"]) == {partition_key(key)}
    event_keys = {entry.key for entry in cluster.group.log[settings.topics.versions][0]}
    assert event_keys == {f"m/partition/{partition_key(k)}".encode() for k in ends}


def test_a_revoke_writes_its_partitions_side_by_side_and_an_assign_restores_them_so(
    tmp_path: Path,
) -> None:
    """librdkafka holds every partition of the member while a rebalance callback runs, so
    the partitions that stay wait for it: the revoke's checkpoint writes and the assign's
    claims and restores of several partitions overlap instead of queueing."""
    settings = make_settings(tmp_path, every_records=1000)
    root = tmp_path / "checkpoints"
    cluster = Cluster(settings, LocalStore(root))
    half = PARTITIONS // 2
    leaving = OverlapStore(root, "put_if_absent", expected=half)  # a's revoke: checkpoint uploads
    joining = OverlapStore(root, "put_if_match", expected=half)  # b's claims
    produce(cluster.group, 9)
    cluster.add("a", store=leaving)
    cluster.drive(cluster.learnt_all)
    produce(cluster.group, 3)  # unsaved records in every slot: the revoke must write
    cluster.drive(cluster.learnt_all)
    leaving.armed = joining.armed = True
    cluster.add("b", store=joining)
    cluster.drive(cluster.learnt_all)
    leaving.armed = joining.armed = False
    moved = [e for e in cluster.events if e.kind == "revoked" and e.member == "a"]
    print(f"\nrevoke writes overlapping: {leaving.most}, assign claims: {joining.most}")
    assert [len(e.partitions) for e in moved] == [half]
    assert leaving.most == half
    assert joining.most == half
    cluster.stop("b")
    cluster.stop("a")
    assert cluster.group.violations == [] and cluster.problems == []
    cluster.judge()


# -- 2. three members, five rounds ---------------------------------------------------------

REVOKE_POINTS = ("in_revoke", "mid_handover")
ANY_POINTS = ("after_checkpoint", "after_learn")


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("mode", ["per_record", "mini_batch"])
def test_members_join_leave_expire_and_crash_without_losing_or_repeating(
    tmp_path: Path, mode: str, seed: int
) -> None:
    """5 rounds of join / leave / expire in a seeded order, each with a producer before
    it and a crash point (in_revoke, mid_handover, after_checkpoint, after_learn, and one
    round without) armed on a member that will reach it; then one member drains and
    stops. Partitions that stayed with their member were never revoked nor lost, and their
    slot never left training."""
    rng = random.Random(seed)
    settings = make_settings(tmp_path, every_records=5, mode=mode, publish_every_records=9)
    # A unit of 4 records, or what came within 1 s: a short tail waits a few rounds.
    cluster = Cluster(settings, LocalStore(tmp_path / "checkpoints"), seconds_per_round=0.25)
    group = cluster.group
    names = iter(f"m{i}" for i in range(100))
    for _ in range(3):
        cluster.add(next(names))
    produce(group, 8)
    cluster.drive(cluster.learnt_all)
    points: list[str | None] = [*REVOKE_POINTS, *ANY_POINTS, None]
    rng.shuffle(points)
    fired: list[str] = []
    gone: set[str] = set()  # members whose partitions all moved in the round
    for round_ in range(5):
        point = points[round_]
        live = sorted(cluster.members)
        actions = ["join"] if len(live) < 4 else []
        if len(live) > 2:
            actions += ["leave"] if point in REVOKE_POINTS else ["leave", "expire"]
        action = rng.choice(actions)
        before = settled_owners(cluster)
        first_event = len(cluster.events)
        produce(group, rng.randint(5, 9))
        victim: str | None = None
        gone.clear()
        if action == "join":
            cluster.add(next(names))
            losing = [m for m in live if cluster.members[m].source.owned - group.target(m)]
            pool = losing if point in REVOKE_POINTS else live
            victim = rng.choice(pool)
        elif action == "leave":
            leaver = rng.choice(live)
            group.leave(leaver)
            gone.add(leaver)
            staying = [m for m in live if m != leaver]
            victim = leaver if point in REVOKE_POINTS else rng.choice(staying)
        else:
            expired = rng.choice(live)
            group.expire(expired)
            gone.add(expired)
            victim = rng.choice([m for m in live if m != expired])
        if point is not None:
            cluster.members[victim].crash.arm(point)

        def crashed(member: Member) -> None:
            fired.append(str(member.crash.fired))
            gone.add(member.name)
            cluster.add(next(names))  # its replacement

        def round_done() -> bool:
            leaving = [m for n, m in cluster.members.items() if n in gone]
            return cluster.learnt_all() and not any(m.source.owned for m in leaving)

        cluster.drive(round_done, on_crash=crashed)
        assert point is None or fired[-1] == point, (round_, action, point, fired)
        for member in cluster.members.values():
            member.crash.armed = None
        # Leavers stop gracefully; expired members rejoin (as librdkafka does after a lost).
        for name in sorted(gone & set(cluster.members)):
            if action == "leave":
                cluster.stop(name)
            else:
                group.join(name, Recorder(name, cluster.members[name].service, cluster.events))
        cluster.drive(cluster.learnt_all)
        after = settled_owners(cluster)
        moved_away = {
            (event.member, key)
            for event in cluster.events[first_event:]
            if event.kind in ("revoked", "lost")
            for key in event.partitions
        }
        for key, (owner, slot) in before.items():
            if owner in gone or after[key][0] != owner:
                continue
            assert (owner, key) not in moved_away, (round_, action, key, owner)
            assert after[key][1] is slot, (round_, action, key)  # never left training
    assert sorted(fired) == sorted(p for p in points if p is not None)
    # Drain with one member, then stop it.
    last, *others = sorted(cluster.members)
    for name in others:
        cluster.stop(name)
    produce(group, 4)
    cluster.drive(cluster.learnt_all)
    cluster.stop(last)
    assert group.violations == []
    assert cluster.problems == []
    assert group.committed == group.end_offsets()
    cluster.judge()


# -- 3. a fenced slot ----------------------------------------------------------------------


def test_a_slot_claimed_behind_its_members_back_is_dropped_and_its_partition_paused(
    tmp_path: Path,
) -> None:
    """Another claimant takes (T, 2)'s slot: the member's next checkpoint of it is refused,
    it drops the slot, pauses the partition, counts the fence and commits nothing more for
    it; the other partitions keep training and committing."""
    settings = make_settings(tmp_path, every_records=5)
    cluster = Cluster(settings, LocalStore(tmp_path / "checkpoints"))
    group = cluster.group
    produce(group, 10)
    a = cluster.add("a")
    cluster.drive(cluster.learnt_all)
    cluster.collect_writes()
    fenced = (T, 2)
    ckpt = settings.checkpoint
    intruder = SlotStore(
        LocalStore(tmp_path / "checkpoints"),
        SCOPE,
        partition_key(fenced),
        "intruder",
        ckpt.key(),
        ckpt.allow_unsigned,
        ckpt.keep_last,
    )
    claimed = intruder.claim()
    assert claimed.owner == "intruder" and claimed.head is not None
    commits_of_fenced = [c for c in group.commits if c.partition == fenced]
    assert commits_of_fenced  # it was committed before the claim
    produce(group, 10)
    ends = group.end_offsets()
    others = {k: e for k, e in ends.items() if k != fenced}
    cluster.drive(lambda: fenced not in a.service.slots and cluster.learnt_all(others))
    assert a.metric("stream_trainer_slots_fenced_total") == 1
    assert a.metric("stream_trainer_checkpoint_failures_total") == 1  # its refused write
    assert a.metric("stream_trainer_slots", state="fenced") == 1
    assert fenced in a.source.owned and fenced in a.source.paused
    assert a.source.paused == frozenset([fenced])  # the others are not touched
    produce(group, 5)  # the others keep training; the fenced one is not read
    position = a.source.positions()[fenced]
    cluster.drive(lambda: cluster.learnt_all({k: e + 5 for k, e in others.items()}))
    assert a.source.positions()[fenced] == position
    cluster.stop("a")
    ends = group.end_offsets()
    assert [c for c in group.commits if c.partition == fenced] == commits_of_fenced
    assert {k: v for k, v in group.committed.items() if k != fenced} == {
        k: e for k, e in ends.items() if k != fenced
    }
    assert group.violations == []
    assert cluster.problems == []
    # The member wrote nothing more into the slot it lost: the claim stands as made.
    assert cluster.reader(fenced).read().manifest == claimed
    for key in others:
        counts = counts_of(cluster.newest(key).model)
        assert counts == Counter((key[1], o, o % KEYS) for o in range(ends[key]))


# -- 4. the store unavailable at assign ----------------------------------------------------


@pytest.mark.parametrize("failing", ["MANIFEST", "ckpt-"])
def test_a_slot_the_store_cannot_give_at_assign_is_claimed_on_retry(
    tmp_path: Path, failing: str
) -> None:
    """The first member dies after a checkpoint is durable and before its commit (the
    group is behind it). The next member cannot read that slot at assign
    (its MANIFEST, or its checkpoint after the claim): the partition stays paused while
    the others train; once RETRY_UNAVAILABLE_S has passed it is claimed, restored and
    learnt from the checkpoint's offset, not the group's: lost 0, twice 0."""
    settings = make_settings(tmp_path, every_records=5)
    flaky = FlakyStore(tmp_path / "checkpoints")
    cluster = Cluster(settings, flaky)
    group = cluster.group
    produce(group, 12)
    first = cluster.add("first")
    cluster.drive(cluster.learnt_all)
    first.crash.arm("after_checkpoint")  # the stop's first checkpoint, before its commit
    first.service.request_stop()
    with pytest.raises(Crashed):
        first.service.run()
    cluster.discard("first")
    ahead = [
        key
        for key in group.all_partitions()
        if cluster.newest_offset(key) > group.committed.get(key, 0)
    ]
    assert ahead  # its checkpoint's commit died with it
    held = ahead[0]
    checkpoint = cluster.newest_offset(held)
    committed = group.committed.get(held, 0)
    produce(group, 6)
    flaky.prefix, flaky.failures = f"partition/{T}/{held[1]}/{failing}", 1
    second = cluster.add("second")
    second.service.step()  # the assignment: every slot but one claimed
    assert flaky.failures == 0
    assert held not in second.service.slots
    assert second.source.paused == frozenset([held])
    assert second.metric("stream_trainer_slots", state="unavailable") == 1
    others = {k: e for k, e in group.end_offsets().items() if k != held}
    cluster.drive(lambda: cluster.learnt_all(others))
    assert held not in second.service.slots  # not before its retry time
    assert group.committed.get(held, 0) == committed
    cluster.clock.now += RETRY_UNAVAILABLE_S
    second.service.step()  # the retry: claimed, restored, sought to its checkpoint, resumed
    slot = second.service.slots.get(held)
    assert slot is not None and slot.restored
    assert held not in second.source.paused
    assert second.source.positions()[held] == checkpoint
    # The start rule, as at an assignment: the checkpoint the group is behind is committed
    # at once (the commit the first member died before).
    assert group.committed.get(held) == checkpoint
    cluster.drive(cluster.learnt_all)
    assert second.metric("stream_trainer_slots", state="unavailable") == 0
    assert slot.state.ledger.as_json()[partition_key(held)][-1][0] <= checkpoint
    cluster.stop("second")
    assert group.violations == []
    assert cluster.problems == []
    assert group.committed == group.end_offsets()
    cluster.judge()


# -- 5. a lost member's write lands after the new owner's claim ----------------------------


def test_a_lost_members_write_that_lands_after_the_new_owners_claim_is_refused(
    tmp_path: Path,
) -> None:
    """A member's periodic writes wait between upload and MANIFEST swap; its session
    expires and the next member claims every slot meanwhile. At its on_lost the writes
    go on: their swaps are refused (fenced), nothing is committed, and the new owner's
    slots learn every record once."""
    settings = make_settings(tmp_path, every_records=5)
    cluster = Cluster(settings, LocalStore(tmp_path / "checkpoints"))
    group = cluster.group
    produce(group, 10)
    gated = GatedStore(tmp_path / "checkpoints")
    a = cluster.add("a", store=gated)
    cluster.drive(cluster.learnt_all)
    cluster.collect_writes()
    commits_of_a = [c for c in group.commits if c.member == "a"]
    gated.closed = True
    produce(group, 10)
    for _ in range(50):
        a.service.step()
        if any(slot.checkpointer.in_flight for slot in a.service.slots.slots.values()):
            break
    assert gated.waiting.wait(10.0)
    learnt_by_a = {k: slot.state.offsets[k] for k, slot in a.service.slots.slots.items()}
    durable = {key: cluster.newest_offset(key) for key in group.all_partitions()}
    assert any(durable[k] < learnt_by_a[k] for k in durable)
    group.expire("a")
    b = cluster.add("b")
    b.service.step()  # its assignment: every slot claimed and restored
    restored = {k: slot.checkpoint_offset for k, slot in b.service.slots.slots.items()}
    assert restored == durable  # what a made durable, not what it learnt since
    gated.gate.set()
    a.service.step()  # on_lost: the writes in flight are waited for, and refused
    assert a.service.slots.slots == {}
    assert a.metric("stream_trainer_checkpoint_failures_total") >= 1  # the refused swaps
    assert [c for c in group.commits if c.member == "a"] == commits_of_a
    for key in group.all_partitions():
        manifest = cluster.reader(key).read().manifest
        assert manifest is not None and manifest.owner == "b"
        # Its head is b's own write, or the one b restored: none of a's late ones.
        head = parse_object_name(manifest.head or "")
        assert head is not None
        assert head[1] == manifest.token or manifest.offsets[partition_key(key)] == durable[key]
    cluster.drive(cluster.learnt_all)
    cluster.stop("b")
    cluster.stop("a")
    assert group.violations == []
    assert cluster.problems == []
    assert group.committed == group.end_offsets()
    cluster.judge()


class LockedSource:
    """A member's InMemorySource used under the test's lock: the in-memory group is not
    thread-safe, and the member's poll thread runs beside the test's."""

    def __init__(self, inner: Source, lock: threading.RLock) -> None:
        self._inner, self._lock = inner, lock

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def locked(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return attr(*args, **kwargs)

        return locked


def test_the_learner_keeps_learning_the_partitions_that_stay_while_a_revoke_writes(
    tmp_path: Path,
) -> None:
    """``run()`` learns on its own thread: a member's revoke callback is held inside its
    checkpoint write (the MANIFEST swap waits at a gate), and meanwhile the learner goes
    on with the records of the partitions that stay, from the read-ahead. Afterwards every
    record is learnt once, by one of the two members."""
    # Polls of 3000 records: the read-ahead fills far faster than the learner empties it.
    settings = make_settings(tmp_path, every_records=1_000_000, consume_batch_size=3000)
    cluster = Cluster(settings, LocalStore(tmp_path / "checkpoints"))
    group = cluster.group
    group_lock = threading.RLock()  # commits are made inside a poll's callbacks
    gated = GatedStore(tmp_path / "checkpoints")
    a = cluster.add("a", store=gated)
    produce(group, 5)
    cluster.drive(cluster.learnt_all)
    source = a.service.source
    a.service.source = LockedSource(source, group_lock)  # type: ignore[assignment]
    runner = threading.Thread(target=a.service.run, name="member-a")
    runner.start()
    try:
        with group_lock:
            produce(group, 3000)  # far more than the learner takes before the join
        gated.closed = True
        with group_lock:
            b = cluster.add("b")
            b.source.consume(1, 0.0)  # b joins: a's next poll revokes half its partitions
        assert gated.waiting.wait(30.0), "a's revoke never reached its checkpoint write"
        held = a.service.slots.slots
        at_gate = {key: slot.state.offsets[key] for key, slot in list(held.items())}
        assert len(at_gate) == PARTITIONS // 2  # the revoked ones are detached

        def advanced() -> bool:
            # Those whose records were read ahead before the revoke go on being learnt (a
            # poll takes 3000 records of one partition, so not necessarily all three).
            learnt = sum(slot.state.offsets[key] - at_gate[key] for key, slot in held.items())
            return learnt >= 3000

        deadline = time.monotonic() + 30.0
        while not advanced() and time.monotonic() < deadline:
            time.sleep(0.01)  # polling interval of a bounded wait
        moved_on = {key: slot.state.offsets[key] - at_gate[key] for key, slot in held.items()}
        print(f"\nlearnt by a's staying partitions while its revoke was held: {moved_on}")
        assert advanced(), moved_on
    finally:
        gated.gate.set()
        a.service.request_stop()
        runner.join(60.0)
    assert not runner.is_alive()
    a.service.source = source
    del cluster.members["a"]
    cluster.drive(cluster.learnt_all)
    cluster.stop("b")
    assert group.violations == [] and cluster.problems == []
    assert group.committed == group.end_offsets()
    cluster.judge()


def test_the_poll_thread_reads_ahead_while_the_learner_learns_a_unit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A unit is learnt outside the slots' lock: while the learner is held inside one, the
    poll thread goes on sorting records into the slots' pending units (with the unit under
    the lock, it waited for every unit to end and the read-ahead never filled). Afterwards
    every record is learnt once."""
    settings = make_settings(tmp_path, every_records=1_000_000, consume_batch_size=500)
    cluster = Cluster(settings, LocalStore(tmp_path / "checkpoints"))
    group = cluster.group
    group_lock = threading.RLock()
    a = cluster.add("a")
    produce(group, 5)
    cluster.drive(cluster.learnt_all)
    service = a.service
    inner = service._trainer.learn
    entered, gate = threading.Event(), threading.Event()

    def held_learn(state: Any, batch: Any) -> Any:
        if not gate.is_set():
            entered.set()
            gate.wait(30.0)
        return inner(state, batch)

    monkeypatch.setattr(service._trainer, "learn", held_learn)
    source = service.source
    service.source = LockedSource(source, group_lock)  # type: ignore[assignment]
    with group_lock:
        produce(group, 2000)
    runner = threading.Thread(target=service.run, name="member-a")
    runner.start()

    def pending() -> int:
        with service._lock:
            return sum(len(slot.pending) for slot in service.slots.slots.values())

    try:
        assert entered.wait(30.0), "the learner never took a unit"
        at_entry = pending()
        with group_lock:
            produce(group, 1000)  # arrives while the learner is inside its unit
        # Everything produced (12 000 + 6 000, one unit held) fits in the read-ahead. The
        # poll thread may still have been reading the first 12 000 at entry: at least the
        # 6 000 that arrived are read meanwhile, more if it was.
        arrived = 1000 * PARTITIONS
        deadline = time.monotonic() + 30.0
        while pending() < at_entry + arrived and time.monotonic() < deadline:
            time.sleep(0.01)  # polling interval of a bounded wait
        read = pending() - at_entry
        print(f"\nread ahead while the learner was held inside a unit: {read} (>= {arrived})")
        assert read >= arrived
    finally:
        gate.set()
        service.request_stop()
        runner.join(60.0)
    assert not runner.is_alive()
    service.source = source
    del cluster.members["a"]  # stopped: checkpointed and committed what it learnt
    cluster.add("b")
    cluster.drive(cluster.learnt_all)
    cluster.stop("b")
    assert group.violations == [] and cluster.problems == []
    assert group.committed == group.end_offsets()
    cluster.judge()


def test_a_unit_is_one_mini_batch_however_much_was_read_ahead(tmp_path: Path) -> None:
    """One poll reads 8 records of every partition ahead; mini-batches of 4 stay 4."""
    settings = make_settings(
        tmp_path, every_records=1000, mode="mini_batch", consume_batch_size=100
    )
    cluster = Cluster(settings, LocalStore(tmp_path / "checkpoints"))
    produce(cluster.group, 8)
    a = cluster.add("a")
    cluster.drive(cluster.learnt_all)
    batches = a.metric("stream_trainer_batches_total")
    learnt = a.metric("stream_trainer_batch_size_records_sum")
    assert (batches, learnt) == (2 * PARTITIONS, 8 * PARTITIONS)
    cluster.stop("a")
    cluster.judge()
