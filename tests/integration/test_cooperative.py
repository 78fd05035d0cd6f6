"""Cooperative (incremental) rebalancing of :class:`KafkaSource`, on both brokers.

The spike of docs/design/scale-out.md (appendix) as a test: members A, B, C of one group
join a 6-partition topic one after another, then B leaves. A join revokes from the
existing members only the partitions that move; a partition that stays is never revoked
and keeps being consumed through the rebalance; no partition is owned by two members at
once; after each step the members' owned sets cover all 6 partitions; with commits on
revoke every record is consumed exactly once across the members.

Then the service: two ``stream-trainer`` members in one group (the second stands by), and
a foreign cooperative member that takes some of the active member's partitions for a while:
the active member gives up only those, and its model still learns every record exactly once.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from stream_trainer.ingest.kafka_source import KafkaSource, RetentionGap
from stream_trainer.laptop.embedded import create_topics, free_port
from stream_trainer.state.ledger import TopicPartitionKey
from tests.conftest import BrokerHandle
from tests.faults.support import (
    LEARNT,
    Verdict,
    end_offsets,
    fault_config,
    judge,
    load_final,
    manifest_offsets,
    produce_records,
    topic_of,
    wait_checkpointed,
)
from tests.harness import ForeignMember, ServiceProcess, deep_merge, unique

pytestmark = pytest.mark.integration

PARTITIONS = 6
# Tansu answers a join after about half the session timeout and took ~9 s to hand a
# leaver's partitions on in the spike: generous bounds, left as soon as the fact holds.
SETTLE_S = 90.0
# Tansu gave a joiner its share ~8-11 s after the join in the spike.
INTRUDER_S = 45.0


@dataclass
class Member:
    """One KafkaSource in the group, with what its callbacks and consume() saw."""

    name: str
    source: KafkaSource = field(init=False)
    revoked: list[tuple[float, list[int]]] = field(default_factory=list)
    assigned: list[tuple[float, list[int]]] = field(default_factory=list)
    lost: list[tuple[float, list[int]]] = field(default_factory=list)
    # Next offset of every partition this member consumed (committed on revoke).
    positions: dict[TopicPartitionKey, int] = field(default_factory=dict)
    # (partition, offset, monotonic time) of every record consumed.
    records: list[tuple[int, int, float]] = field(default_factory=list)

    # -- RebalanceListener ----------------------------------------------------------------

    def start_offsets(
        self, partitions: Sequence[TopicPartitionKey]
    ) -> dict[TopicPartitionKey, int]:
        return {}  # the group's committed offset

    def on_assigned(self, partitions: Sequence[TopicPartitionKey]) -> None:
        self.assigned.append((time.monotonic(), sorted(p for _t, p in partitions)))

    def on_revoked(self, partitions: Sequence[TopicPartitionKey]) -> None:
        self.revoked.append((time.monotonic(), sorted(p for _t, p in partitions)))
        # As the service does: commit what was consumed before giving the partitions up.
        self.source.commit({k: v for k, v in self.positions.items() if k in partitions})

    def on_lost(self, partitions: Sequence[TopicPartitionKey]) -> None:
        self.lost.append((time.monotonic(), sorted(p for _t, p in partitions)))

    # -- the poll thread ------------------------------------------------------------------

    def pump(self) -> None:
        for message in self.source.consume(200, 0.05):
            topic, partition, offset = message.topic(), message.partition(), message.offset()
            assert topic is not None and partition is not None and offset is not None
            self.positions[(topic, partition)] = offset + 1
            self.records.append((partition, offset, time.monotonic()))

    @property
    def owned(self) -> set[int]:
        return {p for _t, p in self.source.owned}

    def revoked_since(self, since: float) -> set[int]:
        return {p for at, parts in self.revoked if at >= since for p in parts}

    def consumed_between(self, start: float, end: float) -> set[int]:
        return {p for p, _o, at in self.records if start <= at <= end}


class Group:
    """Members of one consumer group pumped in turn, with a trickle of new records."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap, self.topic = bootstrap, topic
        self.group = f"g-{topic}"
        self.members: dict[str, Member] = {}
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
        self.produced = 0
        self.overlaps: list[tuple[str, str, set[int]]] = []

    def join(self, name: str) -> Member:
        member = Member(name)
        conf = {
            "bootstrap.servers": self.bootstrap,
            "group.id": self.group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 500,
            "topic.metadata.refresh.interval.ms": 5000,
        }
        member.source = KafkaSource(conf, [self.topic], member)
        self.members[name] = member
        return member

    def leave(self, name: str) -> Member:
        member = self.members.pop(name)
        assert member.source.close(timeout_s=30.0), f"{name} did not close"
        return member

    def produce_round(self) -> None:
        for partition in range(PARTITIONS):
            self.producer.produce(self.topic, value=b"x", partition=partition)
        self.produced += PARTITIONS
        self.producer.poll(0)

    def pump(self) -> None:
        """One consume on every member, then check that no partition has two owners."""
        self.produce_round()
        for member in list(self.members.values()):
            member.pump()
        names = sorted(self.members)
        for i, first in enumerate(names):
            for second in names[i + 1 :]:
                both = self.members[first].owned & self.members[second].owned
                if both:
                    self.overlaps.append((first, second, both))

    def settled(self) -> bool:
        """Together all partitions, none twice, balanced (shares differ by at most one).

        Balanced, not just covered: Tansu sometimes gets there in more than the two
        cooperative rounds (once 3/2/1 after C's join, then 2/2/2).
        """
        owned = [m.owned for m in self.members.values()]
        union = set().union(*owned)
        sizes = [len(o) for o in owned]
        return (
            union == set(range(PARTITIONS))
            and sum(sizes) == PARTITIONS
            and max(sizes) - min(sizes) <= 1
        )

    def pump_until(self, done: Callable[[], bool], what: str) -> float:
        """Pump until ``done`` holds (bounded); returns the seconds it took."""
        start = time.monotonic()
        while not done():
            assert time.monotonic() - start < SETTLE_S, f"{what}: not within {SETTLE_S} s; " + (
                ", ".join(f"{m.name} owns {sorted(m.owned)}" for m in self.members.values())
            )
            self.pump()
        return time.monotonic() - start

    def owners(self) -> dict[str, set[int]]:
        return {name: set(m.owned) for name, m in self.members.items()}

    def close(self) -> None:
        for name in list(self.members):
            self.leave(name)
        self.producer.flush(10.0)


@contextmanager
def group_on(broker: BrokerHandle, topic: str) -> Iterator[Group]:
    group = Group(broker.bootstrap_servers, topic)
    try:
        yield group
    finally:
        group.close()


def _join_moves_only_what_moves(group: Group, name: str) -> tuple[float, dict[str, set[int]]]:
    """``name`` joins; returns the settle time and what each existing member gave up,
    after asserting that it is exactly what moved and that what stayed kept flowing."""
    before = group.owners()
    joined = time.monotonic()
    group.join(name)
    took = group.pump_until(group.settled, f"{name} joining")
    settled_at = time.monotonic()
    after = group.owners()
    moved: dict[str, set[int]] = {}
    for other, had in before.items():
        member = group.members[other]
        kept, gave = had & after[other], had - after[other]
        revoked = member.revoked_since(joined)
        # A partition that does not move is never revoked (eager would revoke all of them).
        assert revoked == gave, (other, sorted(revoked), sorted(gave))
        assert after[other] <= had, f"{other} gained partitions on {name}'s join"
        # ... and is consumed throughout the rebalance: records produced during it arrive.
        flowing = member.consumed_between(joined, settled_at)
        assert kept <= flowing, (other, sorted(kept), sorted(flowing))
        moved[other] = gave
    assert set().union(*moved.values()) == after[name]
    return took, moved


def test_only_moved_partitions_are_revoked(
    broker: BrokerHandle, make_topic: Callable[..., str]
) -> None:
    topic = make_topic(PARTITIONS, prefix="coop")
    with group_on(broker, topic) as group:
        for _ in range(100):
            group.produce_round()  # 600 records before anyone joins
        group.join("A")
        took_a = group.pump_until(group.settled, "A alone")
        assert group.members["A"].owned == set(range(PARTITIONS))
        took_b, moved_b = _join_moves_only_what_moves(group, "B")
        took_c, moved_c = _join_moves_only_what_moves(group, "C")
        # C takes from both: the sticky assignor balances 2/2/2.
        assert sorted(len(o) for o in group.owners().values()) == [2, 2, 2]
        assert all(moved_c.values()), moved_c

        before = group.owners()
        left = time.monotonic()
        b = group.leave("B")
        took_leave = group.pump_until(group.settled, "B leaving")
        after = group.owners()
        for name, had in before.items():
            if name != "B":
                assert had <= after[name], f"{name} lost partitions when B left"
                assert group.members[name].revoked_since(left) == set(), name
        assert set().union(*after.values()) == set(range(PARTITIONS))
        assert b.revoked[-1][1] == sorted(before["B"]), "B's close revokes what it owned"

        # Drain what the trickle left, then every record was consumed exactly once.
        group.producer.flush(10.0)
        ends = end_offsets(broker.bootstrap_servers, topic)
        everyone = [*group.members.values(), b]

        def drained() -> bool:
            got = {(p, o) for m in everyone for p, o, _ in m.records}
            return all((k[1], e - 1) in got for k, e in ends.items() if e)

        while not drained():
            assert time.monotonic() - left < SETTLE_S, "the survivors did not drain"
            for member in group.members.values():
                member.pump()
        seen: dict[tuple[int, int], int] = {}
        for member in everyone:
            for p, o, _ in member.records:
                seen[(p, o)] = seen.get((p, o), 0) + 1
        twice = sum(n - 1 for n in seen.values())
        missing = sum(1 for (t, p), e in ends.items() for o in range(e) if (p, o) not in seen)
        lost = [m.lost for m in everyone if m.lost]
        print(
            f"\n[{broker.name}] A alone {took_a:.1f} s; B joins: moved {moved_b} in "
            f"{took_b:.1f} s; C joins: moved {moved_c} in {took_c:.1f} s; B leaves: "
            f"reassigned {sorted(before['B'])} in {took_leave:.1f} s; final {group.owners()}; "
            f"records {sum(ends.values())}, missing {missing}, twice {twice}"
        )
        assert group.overlaps == [], group.overlaps[:5]
        assert lost == []
        assert missing == 0
        assert twice == 0


# -- the service: two stream-trainer members, and a foreign member taking partitions ----

STANDBY = 'stream_trainer_state{stream_trainer_state="standby"}'
REVOKES = 'stream_trainer_rebalances_total{kind="revoke"}'


def _revoke_lines(log_path: Path) -> list[list[str]]:
    """The partitions of every "partitions revoked" line of a service's JSON log."""
    found = []
    for line in log_path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and entry.get("event") == "partitions revoked":
            found.append(list(entry["partitions"]))
    return found


@dataclass
class _Trickle:
    """Service ``a`` on a 6-partition topic fed 600 records every 0.3 s while it runs."""

    config: dict[str, Any]
    tmp_path: Path
    produced: list[int] = field(default_factory=lambda: [6000])
    stop: threading.Event = field(default_factory=threading.Event)
    producer: threading.Thread | None = None

    def _produce(self) -> None:
        batch = 0
        while not self.stop.wait(0.3):
            batch += 1
            produce_records(self.config, 600, PARTITIONS, seed=100 + batch)
            self.produced[0] += 600

    @contextmanager
    def running(self) -> Iterator[ServiceProcess]:
        produce_records(self.config, 6000, PARTITIONS)
        self.producer = threading.Thread(target=self._produce, name="producer")
        service = ServiceProcess(self.config, self.tmp_path, name="a").start()
        self.producer.start()
        try:
            service.wait_metric(LEARNT, 1000, 90)
            yield service
        finally:
            self._stop_producing()
            service.__exit__()

    def _stop_producing(self) -> None:
        self.stop.set()
        if self.producer is not None:
            self.producer.join(60)  # its last batch is in the topic and counted

    def finish(self, service: ServiceProcess) -> tuple[Verdict, dict[TopicPartitionKey, int]]:
        """Stop producing, let ``service`` checkpoint everything, stop it, judge its ledger."""
        self._stop_producing()
        ends = end_offsets(str(self.config["kafka"]["bootstrap_servers"]), topic_of(self.config))
        wait_checkpointed(self.config, ends, service, timeout=SETTLE_S + 60)
        assigned = service.metric("stream_trainer_assigned_partitions")
        assert service.stop() == 0, service.tail()
        state = load_final(self.config).state
        assert state.records_learnt == self.produced[0]
        assert assigned == PARTITIONS
        return judge([state], ends), ends


def _service_config(tmp_path: Path, broker: BrokerHandle) -> dict[str, Any]:
    return fault_config(tmp_path / "a", broker, PARTITIONS, {"checkpoint": {"every_seconds": 0.5}})


def test_two_service_members_learn_every_record_once(broker: BrokerHandle, tmp_path: Path) -> None:
    """A trains; B (same group, own folder) joins, stands by and leaves: A is never
    revoked, keeps training, and its model learns every record exactly once."""
    config = _service_config(tmp_path, broker)
    other = deep_merge(
        config,
        {"checkpoint": {"dir": str(tmp_path / "b" / "checkpoints")}, "http": {"port": free_port()}},
    )
    run = _Trickle(config, tmp_path)
    with run.running() as a:
        b = ServiceProcess(other, tmp_path, name="b").start()
        try:
            b.wait_metric(STANDBY, 1, SETTLE_S)
            learnt = a.metric(LEARNT)
            a.wait_metric(LEARNT, learnt + 600, 60)  # the active member keeps training
            assert b.http("/readyz")[0] == 503
            assert b.stop() == 0, b.tail()
        finally:
            b.__exit__()
        revokes = a.metric(REVOKES, -1)
        verdict, _ends = run.finish(a)
    print(
        f"\n[{broker.name}] produced {run.produced[0]}; a revoked {revokes:.0f}x; {verdict.line()}"
    )
    assert revokes == 0, "a standby never joins the training group"
    assert not manifest_offsets(other), "the standby must not checkpoint a model"
    assert verdict.lost == 0, verdict.holes
    assert verdict.twice == 0


# Tansu (embedded, this repository's version): when a *static* member (group.instance.id,
# the service's default) gives partitions up in the first cooperative round, the follow-up
# round never assigns them (none of 6 partitions' 3 in 34 s; dynamic members: 8 s). Strict:
# a Tansu that fixes it turns this into a failure to remove the mark.
TANSU_STATIC_COOPERATIVE = pytest.mark.xfail(
    reason="Tansu: revoked partitions of a static member are never reassigned (cooperative)",
    strict=True,
    raises=AssertionError,
)


@pytest.mark.parametrize(
    "broker", ["kafka", pytest.param("tansu", marks=TANSU_STATIC_COOPERATIVE)], indirect=True
)
def test_foreign_member_takes_only_the_partitions_that_move(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    """A foreign cooperative member (commits nothing) joins the service's group, takes
    some partitions and gives them back. The service gives up only those (checkpoint +
    commit), trains the others throughout, resumes them from its own state: its model
    learns every record exactly once."""
    config = _service_config(tmp_path, broker)
    run = _Trickle(config, tmp_path)
    with run.running() as a:
        with ForeignMember(
            broker.bootstrap_servers, config["kafka"]["group_id"], [topic_of(config)]
        ) as intruder:
            took = intruder.pump_until(lambda: intruder.owned, INTRUDER_S, "an intruder's share")
            learnt = a.metric(LEARNT)
            # A trains its other partitions meanwhile.
            intruder.pump_until(
                lambda: a.metric(LEARNT) >= learnt + 600, 60, "A training during the rebalance"
            )
            assert intruder.owned == took, "the intruder's share changed"
        revokes = _revoke_lines(a.log_path)
        verdict, _ends = run.finish(a)
    print(
        f"\n[{broker.name}] produced {run.produced[0]}; the intruder took {sorted(took)} and "
        f"gave them back; a revoked {revokes}; {verdict.line()}"
    )
    assert [sorted(r) for r in revokes] == [sorted(f"{t}:{p}" for t, p in took)]
    assert verdict.lost == 0, verdict.holes
    assert verdict.twice == 0


# -- a retention gap holds only its own partition -----------------------------------------


class _FromCheckpoint(Member):
    """A member whose (pretend) checkpoint needs every partition from offset 0."""

    def start_offsets(
        self, partitions: Sequence[TopicPartitionKey]
    ) -> dict[TopicPartitionKey, int]:
        return dict.fromkeys(partitions, 0)


def test_retention_gap_holds_only_its_partition(kafka_broker: BrokerHandle) -> None:
    """Retention removed the start of partition 1 only: consume() reports that partition
    once; the others are fetched (nothing consumed in that call is lost), partition 1 stays
    owned, paused at the offset it needs, and a resume does not fetch it past the gap.
    (Apache Kafka only: DeleteRecords.)"""
    topic = unique("gap")
    create_topics(kafka_broker.bootstrap_servers, {topic: 3}, timeout=30.0)
    producer = Producer({"bootstrap.servers": kafka_broker.bootstrap_servers})
    for i in range(150):
        producer.produce(topic, value=b"x", partition=i % 3)
    assert producer.flush(30.0) == 0
    admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap_servers})
    for future in admin.delete_records([TopicPartition(topic, 1, 20)]).values():
        future.result(timeout=30)
    member = _FromCheckpoint("A")
    member.source = KafkaSource(
        {
            "bootstrap.servers": kafka_broker.bootstrap_servers,
            "group.id": f"g-{topic}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
        },
        [topic],
        member,
    )
    try:
        deadline = time.monotonic() + SETTLE_S
        gap: RetentionGap | None = None
        while gap is None:
            assert time.monotonic() < deadline, "no retention gap reported"
            try:
                member.pump()
            except RetentionGap as raised:
                gap = raised
        assert gap.gaps == {(topic, 1): (0, 20)}
        assert member.source.retention_gaps == {(topic, 1): (0, 20)}
        assert member.owned == {0, 1, 2}
        member.source.resume(sorted(member.source.owned))  # e.g. a control resume
        while sum(1 for p, _o, _t in member.records if p != 1) < 100:
            assert time.monotonic() < deadline, "the partitions without a gap were not fetched"
            member.pump()  # raises no more: reported once
        drain = time.monotonic() + 1.0  # a bounded window: nothing of partition 1 arrives
        while time.monotonic() < drain:
            member.pump()
        assert (topic, 1) in member.source.paused
    finally:
        assert member.source.close(30.0)
    offsets = sorted((p, o) for p, o, _t in member.records)
    print(f"\n[kafka] gap {gap.gaps}; consumed {len(offsets)} records of partitions 0 and 2")
    assert offsets == [(p, o) for p in (0, 2) for o in range(50)]
