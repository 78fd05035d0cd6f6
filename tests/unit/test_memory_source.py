"""The in-memory group's own contract: cooperative order, commit checks, pause/seek."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import pytest

from stream_trainer.ingest.kafka_source import KafkaSource
from stream_trainer.ingest.kafka_source import RebalanceListener as ReExported
from stream_trainer.ingest.source import RebalanceListener, Source
from stream_trainer.state.ledger import TopicPartitionKey
from stream_trainer.testing.memory_source import (
    InMemoryGroup,
    InMemoryGroupError,
    InMemorySource,
    Violation,
    sticky_assignment,
)

T = "in"


# Checked by mypy (strict), not at run time: both implementations satisfy the protocol.
def _kafka_is_a_source(source: KafkaSource) -> Source:
    return source


def _memory_is_a_source(source: InMemorySource) -> Source:
    return source


class Recorder:
    """A listener that records its callbacks; ``on_revoke`` runs inside the revoke."""

    def __init__(
        self,
        name: str,
        events: list[tuple[str, str, list[TopicPartitionKey]]],
        starts: Mapping[TopicPartitionKey, int] | None = None,
    ) -> None:
        self.name = name
        self.events = events
        self.starts = dict(starts or {})
        self.on_revoke: Callable[[Sequence[TopicPartitionKey]], None] | None = None

    def start_offsets(
        self, partitions: Sequence[TopicPartitionKey]
    ) -> Mapping[TopicPartitionKey, int]:
        return {k: self.starts[k] for k in partitions if k in self.starts}

    def on_assigned(self, partitions: Sequence[TopicPartitionKey]) -> None:
        self.events.append((self.name, "assign", list(partitions)))

    def on_revoked(self, partitions: Sequence[TopicPartitionKey]) -> None:
        self.events.append((self.name, "revoke", list(partitions)))
        if self.on_revoke is not None:
            self.on_revoke(partitions)

    def on_lost(self, partitions: Sequence[TopicPartitionKey]) -> None:
        self.events.append((self.name, "lost", list(partitions)))


def _group(partitions: int = 6, per_partition: int = 5) -> InMemoryGroup:
    group = InMemoryGroup({T: partitions})
    for p in range(partitions):
        for i in range(per_partition):
            group.append(T, p, f"{p}-{i}".encode(), key=b"k", timestamp_ms=1000 + i)
    return group


def _ps(*numbers: int) -> list[TopicPartitionKey]:
    return [(T, n) for n in numbers]


def _no_partition_held_twice(group: InMemoryGroup, sources: Sequence[InMemorySource]) -> None:
    held = [tp for s in sources for tp in s.owned]
    assert len(held) == len(set(held)), held


def test_the_listener_protocol_is_re_exported_by_consumer() -> None:
    assert ReExported is RebalanceListener


def test_a_single_member_reads_every_partition_in_offset_order() -> None:
    group = _group(3, 4)
    group.committed[(T, 1)] = 2
    events: list[tuple[str, str, list[TopicPartitionKey]]] = []
    source = group.join("a", Recorder("a", events, starts={(T, 2): 3}))
    assert source.owned == frozenset()  # nothing before the first consume
    records = list(source.consume(5, 1.0))
    assert events == [("a", "assign", _ps(0, 1, 2))]
    assert dict(source.start_positions) == {(T, 0): 0, (T, 1): 2, (T, 2): 3}
    assert len(records) == 5
    records += source.consume(100, 1.0)
    assert source.consume(100, 1.0) == []
    got = sorted((r.partition(), r.offset()) for r in records)
    assert got == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    by_partition: dict[int, list[int]] = {}
    for r in records:
        by_partition.setdefault(r.partition(), []).append(r.offset())
    assert all(offsets == sorted(offsets) for offsets in by_partition.values())
    first = next(r for r in records if (r.partition(), r.offset()) == (0, 0))
    assert (first.topic(), first.key(), first.value(), first.timestamp()) == (
        T,
        b"k",
        b"0-0",
        (1, 1000),
    )
    assert first.headers() is None
    group.append(T, 1, b"new")
    [new] = source.consume(10, 1.0)
    assert (new.partition(), new.offset(), new.value()) == (1, 4, b"new")


def test_a_joiner_gets_partitions_only_after_their_owner_revoked_them() -> None:
    group = _group()
    events: list[tuple[str, str, list[TopicPartitionKey]]] = []
    a = group.join("a", Recorder("a", events))
    a.consume(100, 1.0)
    b = group.join("b", Recorder("b", events))
    assert b.consume(100, 1.0) == []  # A still holds everything: B waits
    assert b.owned == frozenset()
    assert not group.settled()
    a.consume(100, 1.0)  # A's revoke runs in here
    _no_partition_held_twice(group, [a, b])
    b.consume(100, 1.0)
    assert group.settled()
    assert events == [
        ("a", "assign", _ps(0, 1, 2, 3, 4, 5)),
        ("a", "revoke", _ps(3, 4, 5)),
        ("b", "assign", _ps(3, 4, 5)),
    ]
    assert a.owned == frozenset(_ps(0, 1, 2)) and b.owned == frozenset(_ps(3, 4, 5))
    c = group.join("c", Recorder("c", events))
    for source in (c, a, b, c):
        source.consume(100, 1.0)
        _no_partition_held_twice(group, [a, b, c])
    assert group.settled()
    # Sticky: one partition moved from each, none between A and B.
    assert events[3:] == [
        ("a", "revoke", _ps(2)),
        ("b", "revoke", _ps(5)),
        ("c", "assign", _ps(2, 5)),
    ]


def test_the_revoker_commits_inside_its_revoke_and_the_new_owner_starts_there() -> None:
    group = _group(2, 10)
    events: list[tuple[str, str, list[TopicPartitionKey]]] = []
    recorder = Recorder("a", events)
    a = group.join("a", recorder)
    a.consume(100, 1.0)
    committed_in_revoke: list[dict[TopicPartitionKey, int]] = []
    recorder.on_revoke = lambda parts: committed_in_revoke.append(
        a.commit(dict.fromkeys(parts, 7), asynchronous=False)
    )
    b = group.join("b", Recorder("b", events))
    a.consume(100, 1.0)
    assert committed_in_revoke == [{(T, 1): 7}]
    assert a.commit({(T, 0): 10, (T, 1): 9}) == {(T, 0): 10}  # (T, 1) is not A's any more
    [*records] = b.consume(100, 1.0)
    assert dict(b.start_positions) == {(T, 1): 7}
    assert [r.offset() for r in records] == [7, 8, 9]
    assert group.committed == {(T, 0): 10, (T, 1): 7}
    assert group.violations == []


def test_leave_revokes_on_the_leaver_first_then_assigns_to_the_others() -> None:
    group = _group(4, 1)
    events: list[tuple[str, str, list[TopicPartitionKey]]] = []
    a = group.join("a", Recorder("a", events))
    b = group.join("b", Recorder("b", events))
    for source in (a, b, a, b):
        source.consume(100, 1.0)
    assert group.settled() and group.members == ["a", "b"]
    events.clear()
    group.leave("b")
    a.consume(100, 1.0)  # B has not revoked yet: nothing for A
    assert events == []
    b.consume(100, 1.0)
    assert group.members == ["a"]
    a.consume(100, 1.0)
    assert events == [("b", "revoke", _ps(2, 3)), ("a", "assign", _ps(2, 3))]
    assert a.owned == frozenset(_ps(0, 1, 2, 3)) and b.owned == frozenset()


def test_close_revokes_inside_close() -> None:
    group = _group(2, 1)
    events: list[tuple[str, str, list[TopicPartitionKey]]] = []
    a = group.join("a", Recorder("a", events))
    b = group.join("b", Recorder("b", events))
    for source in (a, b, a, b):
        source.consume(100, 1.0)
    events.clear()
    assert b.close(1.0) is True
    assert events == [("b", "revoke", _ps(1))]
    assert group.members == ["a"]
    a.consume(100, 1.0)
    assert a.owned == frozenset(_ps(0, 1))
    with pytest.raises(InMemoryGroupError, match="closed"):
        b.consume(1, 1.0)


def test_an_expired_member_owns_nothing_and_its_commits_are_violations() -> None:
    group = _group(2, 5)
    events: list[tuple[str, str, list[TopicPartitionKey]]] = []
    a = group.join("a", Recorder("a", events))
    b = group.join("b", Recorder("b", events))
    for source in (a, b, a, b):
        source.consume(100, 1.0)
    events.clear()
    group.expire("b")
    assert group.owner((T, 1)) is None
    # B does not know yet (no consume since): a zombie commit is refused and recorded.
    assert b.commit({(T, 1): 5}) == {}
    assert group.violations == [Violation("b", (T, 1), 5, None)]
    assert (T, 1) not in group.committed
    a.consume(100, 1.0)  # A takes B's partition at once: no revoke to wait for
    assert group.owner((T, 1)) == "a"
    b.consume(100, 1.0)
    assert events == [("a", "assign", _ps(1)), ("b", "lost", _ps(1))]
    assert b.owned == frozenset()
    assert b.commit({(T, 1): 5}) == {}  # its own view now: skipped, no new violation
    assert len(group.violations) == 1
    again = group.join("b", Recorder("b", events))
    assert again is b  # the same source comes back, as a restarted consumer would
    for source in (a, b, a, b):
        source.consume(100, 1.0)
    assert b.owned == frozenset(_ps(1))


def test_pause_resume_and_seek_as_librdkafka() -> None:
    group = _group(2, 5)
    events: list[tuple[str, str, list[TopicPartitionKey]]] = []
    a = group.join("a", Recorder("a", events))
    a.consume(0, 1.0)  # the assignment only
    a.pause([(T, 0), (T, 9)])  # not owned: ignored
    assert a.paused == frozenset(_ps(0))
    assert {r.partition() for r in a.consume(100, 1.0)} == {1}
    a.seek((T, 0), 3)
    assert a.consume(100, 1.0) == []  # sought while paused: still paused
    a.resume([(T, 0)])
    assert [r.offset() for r in a.consume(100, 1.0)] == [3, 4]
    a.seek((T, 1), 1)
    assert [r.offset() for r in a.consume(100, 1.0)] == [1, 2, 3, 4]
    with pytest.raises(InMemoryGroupError, match="not assigned"):
        a.seek((T, 7), 0)
    # A pause does not outlive the assignment: B gets (T, 1) unpaused.
    a.pause([(T, 1)])
    b = group.join("b", Recorder("b", events))
    a.consume(100, 1.0)
    b.consume(0, 1.0)
    assert b.owned == frozenset(_ps(1)) and b.paused == frozenset()
    assert a.paused == frozenset()


def test_sticky_assignment_is_balanced_and_keeps_what_it_can() -> None:
    parts = _ps(*range(7))
    first = sticky_assignment({}, ["a", "b"], parts)
    assert sorted(len(v) for v in first.values()) == [3, 4]
    second = sticky_assignment(first, ["a", "b", "c"], parts)
    assert sorted(len(v) for v in second.values()) == [2, 2, 3]
    assert second["a"] <= first["a"] and second["b"] <= first["b"]
    assert set().union(*second.values()) == set(parts)
    third = sticky_assignment(second, ["a", "c"], parts)
    assert third["a"] >= second["a"] and third["c"] >= second["c"]
    assert sticky_assignment({}, [], parts) == {}


def test_misuse_is_refused() -> None:
    group = _group(1, 1)
    events: list[tuple[str, str, list[TopicPartitionKey]]] = []
    group.join("a", Recorder("a", events))
    with pytest.raises(InMemoryGroupError, match="already a member"):
        group.join("a", Recorder("a", events))
    for action in (group.leave, group.expire):
        with pytest.raises(InMemoryGroupError, match="not a member"):
            action("z")


def test_partitions_added_to_a_topic_are_assigned_at_the_next_consume() -> None:
    group = _group(2, 1)
    events: list[tuple[str, str, list[TopicPartitionKey]]] = []
    a = group.join("a", Recorder("a", events))
    b = group.join("b", Recorder("b", events))
    for source in (a, b, a, b):
        source.consume(100, 1.0)
    group.add_partitions(T, 4)
    group.append(T, 3, b"new")
    records = [*a.consume(100, 1.0), *b.consume(100, 1.0)]
    assert [(r.partition(), r.offset()) for r in records] == [(3, 0)]
    assert a.owned | b.owned == frozenset(_ps(0, 1, 2, 3))
    assert events[-2:] == [("a", "assign", _ps(2)), ("b", "assign", _ps(3))]
    with pytest.raises(InMemoryGroupError, match="already"):
        group.add_partitions(T, 3)
