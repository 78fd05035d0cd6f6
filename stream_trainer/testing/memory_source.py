"""An in-memory consumer group, so the service's guarantees get millisecond tests.

:class:`InMemoryGroup` holds the log (topic → partition → list of entries), the committed
offsets, the members and a sticky, balanced assignment; :class:`InMemorySource` is one
member's :class:`stream_trainer.ingest.source.Source`. Tests drive the group:
:meth:`~InMemoryGroup.join`,
:meth:`~InMemoryGroup.leave`, :meth:`~InMemoryGroup.expire`, :meth:`~InMemoryGroup.append`,
and each member's ``consume()`` (or a service's ``step()``).

librdkafka's cooperative-sticky protocol, reduced to what a member sees:

- A membership change computes the new target assignment at once. A member acts on it only
  inside its own ``consume()`` (or ``close()``), where librdkafka runs the rebalance
  callbacks: first ``on_lost`` (the group expired it), then ``on_revoked`` for the
  partitions it must give up, then ``on_assigned`` for target partitions nobody holds. So a
  partition moving from A to B reaches B at B's first ``consume()`` after A's revoke
  returned: the protocol's two rounds, and no partition is ever held by two members.
- Ownership, against which every commit is checked: the revoker owns a partition until its
  ``on_revoked`` returns; the new owner from just before its ``on_assigned`` (its resumed
  offsets may be committed in there); an expired member owns nothing from ``expire()`` on,
  though it hears ``on_lost`` only at its next ``consume()``.
- ``commit`` sends, like ``KafkaSource.commit``, only the partitions in the member's own
  view; one the group says the member does not own at that moment (a zombie's) is recorded
  in :attr:`InMemoryGroup.violations` and not applied, where a broker refuses the stale
  generation. Synchronous and asynchronous commits apply at once.
- ``consume()`` never waits (``timeout_s`` is ignored: tests never sleep) and has no fetch
  buffer: it returns what the log holds past the positions, up to ``max_messages``, each
  partition in offset order, rotating which partition goes first.
- ``pause``/``resume`` ignore partitions not owned; a pause lasts until ``resume`` or until
  the partition leaves the member; ``seek`` of an owned partition moves its position (a
  paused one stays paused), of another raises :class:`InMemoryGroupError`.
- Callbacks are never called with an empty list. The log has no retention (it starts at 0)
  and a position past the end just waits for records (no ``auto.offset.reset``). Partitions
  added to a topic (:meth:`InMemoryGroup.add_partitions`) are rebalanced at once: the
  stale assignment a static member gets back from Kafka is not modelled.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from stream_trainer.errors import StreamTrainerError
from stream_trainer.ingest.source import RebalanceListener, Record
from stream_trainer.state.ledger import TopicPartitionKey

# confluent_kafka.TIMESTAMP_CREATE_TIME: the producer's time.
TIMESTAMP_CREATE_TIME = 1


class InMemoryGroupError(StreamTrainerError):
    """A test used the in-memory group in a way the real one would refuse."""


@dataclass(frozen=True)
class LogEntry:
    """One record as produced: what the log keeps of it."""

    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]] | None
    timestamp_ms: int


@dataclass(frozen=True)
class Violation:
    """A commit for a partition the member did not own when it committed."""

    member: str
    partition: TopicPartitionKey
    offset: int
    owner: str | None


@dataclass(frozen=True)
class Commit:
    """An applied commit (the group's history, for assertions on order)."""

    member: str
    partition: TopicPartitionKey
    offset: int


class MemoryRecord:
    """A consumed record (the :class:`stream_trainer.ingest.source.Record` protocol)."""

    __slots__ = ("_entry", "_offset", "_partition", "_topic")

    def __init__(self, topic: str, partition: int, offset: int, entry: LogEntry) -> None:
        self._topic, self._partition, self._offset, self._entry = topic, partition, offset, entry

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._entry.key

    def value(self) -> bytes | None:
        return self._entry.value

    def timestamp(self) -> tuple[int, int]:
        return TIMESTAMP_CREATE_TIME, self._entry.timestamp_ms

    def headers(self) -> list[tuple[str, bytes | None]] | None:
        return self._entry.headers


def sticky_assignment(
    current: Mapping[str, set[TopicPartitionKey]],
    members: Sequence[str],
    partitions: Sequence[TopicPartitionKey],
) -> dict[str, set[TopicPartitionKey]]:
    """Balanced (sizes differ by at most one) and sticky: each member keeps as many of its
    ``current`` partitions as its share allows; the larger shares go to the members that
    hold the most, ties in ``members`` order; freed partitions fill the others in order."""
    if not members:
        return {}
    base, extra = divmod(len(partitions), len(members))
    valid = set(partitions)
    held = {m: sorted(current.get(m, set()) & valid) for m in members}
    by_size = sorted(members, key=lambda m: (-len(held[m]), members.index(m)))
    share = {m: base + (1 if i < extra else 0) for i, m in enumerate(by_size)}
    result = {m: set(held[m][: share[m]]) for m in members}
    taken = set().union(*result.values())
    free = iter(tp for tp in sorted(valid) if tp not in taken)
    for m in members:
        while len(result[m]) < share[m]:
            result[m].add(next(free))
    return result


@dataclass
class InMemoryGroup:
    """One consumer group over in-memory topics (see the module doc).

    ``on_commit(member, applied)`` is called after each applied commit: a test's hook to
    check, at that very moment, that a durable checkpoint covers the offsets.
    """

    partitions: Mapping[str, int]  # the topics the members subscribe to, and their sizes
    on_commit: Callable[[str, Mapping[TopicPartitionKey, int]], None] | None = None
    log: dict[str, list[list[LogEntry]]] = field(init=False)
    committed: dict[TopicPartitionKey, int] = field(default_factory=dict)
    violations: list[Violation] = field(default_factory=list)
    commits: list[Commit] = field(default_factory=list)
    members: list[str] = field(default_factory=list)  # in join order
    _target: dict[str, set[TopicPartitionKey]] = field(default_factory=dict)
    _owner: dict[TopicPartitionKey, str] = field(default_factory=dict)
    _leaving: set[str] = field(default_factory=set)
    _sources: dict[str, InMemorySource] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.partitions = dict(self.partitions)
        self.log = {topic: [[] for _ in range(count)] for topic, count in self.partitions.items()}

    # -- the log ----------------------------------------------------------------------------

    def append(
        self,
        topic: str,
        partition: int,
        value: bytes | None,
        *,
        key: bytes | None = None,
        headers: list[tuple[str, bytes | None]] | None = None,
        timestamp_ms: int = 0,
    ) -> int:
        """Produce one record; returns its offset."""
        entries = self.log[topic][partition]
        entries.append(LogEntry(key, value, headers, timestamp_ms))
        return len(entries) - 1

    def add_partitions(self, topic: str, count: int) -> None:
        """Grow ``topic`` to ``count`` partitions and rebalance (the leader saw the count
        change): the new partitions go to the members at their next ``consume()``."""
        if count <= self.partitions[topic]:
            raise InMemoryGroupError(f"{topic} has {self.partitions[topic]} partitions already")
        self.log[topic].extend([] for _ in range(count - self.partitions[topic]))
        self.partitions = {**self.partitions, topic: count}
        self._rebalance()

    def end_offsets(self) -> dict[TopicPartitionKey, int]:
        """The next offset of every partition of the group's topics (its high watermark)."""
        return {
            (topic, p): len(entries)
            for topic in self.partitions
            for p, entries in enumerate(self.log[topic])
        }

    def all_partitions(self) -> list[TopicPartitionKey]:
        """Every partition of the group's topics (what it assigns), sorted."""
        return sorted(self.end_offsets())

    # -- membership -------------------------------------------------------------------------

    def join(self, member: str, listener: RebalanceListener) -> InMemorySource:
        """Add ``member`` (its callbacks go to ``listener``) and rebalance; returns its
        source. A member that left or expired may join again: it gets the same source."""
        if member in self.members:
            raise InMemoryGroupError(f"{member} is already a member")
        source = self._sources.get(member)
        if source is None:
            source = self._sources[member] = InMemorySource(self, member, listener)
        else:
            source._rejoin(listener)
        self.members.append(member)
        self._rebalance()
        return source

    def leave(self, member: str) -> None:
        """``member`` leaves gracefully: its next ``consume()`` (or its ``close()``) revokes
        everything it holds; the others get those partitions after that."""
        if member not in self.members:
            raise InMemoryGroupError(f"{member} is not a member")
        self._leaving.add(member)
        self._rebalance()
        if not self._sources[member].owned:
            self._remove(member)

    def expire(self, member: str) -> None:
        """``member``'s session expires: it owns nothing from now on (its partitions go to
        the others at once) and hears ``on_lost`` at its next ``consume()``."""
        if member not in self.members:
            raise InMemoryGroupError(f"{member} is not a member")
        source = self._sources[member]
        source._lose()
        for tp in [tp for tp, owner in self._owner.items() if owner == member]:
            del self._owner[tp]
        self._remove(member)

    def owner(self, tp: TopicPartitionKey) -> str | None:
        """The member allowed to commit ``tp`` now."""
        return self._owner.get(tp)

    def target(self, member: str) -> frozenset[TopicPartitionKey]:
        """What the last rebalance assigned to ``member`` (held once the callbacks ran)."""
        return frozenset(self._target.get(member, set()))

    def settled(self) -> bool:
        """Every member holds exactly its target: no callback is due anywhere."""
        return all(self._sources[m].owned == self.target(m) for m in self.members)

    def _remove(self, member: str) -> None:
        self.members.remove(member)
        self._leaving.discard(member)
        self._target.pop(member, None)
        self._rebalance()

    def _rebalance(self) -> None:
        active = [m for m in self.members if m not in self._leaving]
        self._target = sticky_assignment(self._target, active, self.all_partitions())
        for member in self._leaving:
            self._target[member] = set()

    # -- called by the members' sources ------------------------------------------------------

    def _released(self, member: str, partitions: Sequence[TopicPartitionKey]) -> None:
        for tp in partitions:
            if self._owner.get(tp) == member:
                del self._owner[tp]
        if member in self._leaving and not self._sources[member].owned:
            self._remove(member)

    def _claimable(
        self, member: str, held: frozenset[TopicPartitionKey]
    ) -> list[TopicPartitionKey]:
        return sorted(tp for tp in self.target(member) - held if tp not in self._owner)

    def _take(self, member: str, partitions: Sequence[TopicPartitionKey]) -> None:
        for tp in partitions:
            self._owner[tp] = member

    def _commit(
        self, member: str, offsets: Mapping[TopicPartitionKey, int]
    ) -> dict[TopicPartitionKey, int]:
        applied: dict[TopicPartitionKey, int] = {}
        for tp, offset in sorted(offsets.items()):
            owner = self._owner.get(tp)
            if owner != member:
                self.violations.append(Violation(member, tp, offset, owner))
                continue
            self.committed[tp] = offset
            self.commits.append(Commit(member, tp, offset))
            applied[tp] = offset
        if applied and self.on_commit is not None:
            self.on_commit(member, applied)
        return applied


class InMemorySource:
    """One member of an :class:`InMemoryGroup`: a :class:`stream_trainer.ingest.source.Source`.

    Made by :meth:`InMemoryGroup.join`; see the module doc for the semantics.
    """

    def __init__(self, group: InMemoryGroup, member: str, listener: RebalanceListener) -> None:
        self.member = member
        self._group = group
        self._listener = listener
        self._owned: set[TopicPartitionKey] = set()
        self._paused: set[TopicPartitionKey] = set()
        self._positions: dict[TopicPartitionKey, int] = {}
        self._starts: dict[TopicPartitionKey, int] = {}
        self._lost: list[TopicPartitionKey] = []
        self._turn = 0
        self._closed = False

    def _rejoin(self, listener: RebalanceListener) -> None:
        if self._closed:
            raise InMemoryGroupError(f"{self.member}'s source is closed")
        self._listener = listener

    def _lose(self) -> None:
        self._lost = sorted(self._owned)

    def _drop(self, partitions: Sequence[TopicPartitionKey]) -> None:
        for tp in partitions:
            self._owned.discard(tp)
            self._paused.discard(tp)
            self._positions.pop(tp, None)
            self._starts.pop(tp, None)

    # -- rebalance callbacks, run inside consume() and close() ---------------------------

    def _callbacks(self) -> None:
        group = self._group
        if self._lost:
            lost, self._lost = self._lost, []
            self._drop(lost)  # as KafkaSource: not owned any more when on_lost runs
            self._listener.on_lost(lost)
        if self.member not in group.members:
            return
        revoked = sorted(self._owned - group.target(self.member))
        if revoked:
            try:
                self._listener.on_revoked(revoked)
            finally:
                self._drop(revoked)
                group._released(self.member, revoked)
            if self.member not in group.members:  # it left
                return
        assigned = group._claimable(self.member, frozenset(self._owned))
        if not assigned:
            return
        group._take(self.member, assigned)
        wanted = self._listener.start_offsets(assigned)
        for tp in assigned:
            start = wanted.get(tp)
            if start is None:
                start = group.committed.get(tp, 0)  # else the log start: no retention here
            self._owned.add(tp)
            self._positions[tp] = start
            self._starts[tp] = start
        self._listener.on_assigned(assigned)

    # -- the Source protocol ------------------------------------------------------------

    @property
    def owned(self) -> frozenset[TopicPartitionKey]:
        """Partitions this member holds (its own view)."""
        return frozenset(self._owned)

    @property
    def paused(self) -> frozenset[TopicPartitionKey]:
        """Owned partitions not being fetched."""
        return frozenset(self._paused & self._owned)

    @property
    def start_positions(self) -> Mapping[TopicPartitionKey, int]:
        """Where each held partition started when it was assigned."""
        return dict(self._starts)

    def positions(self) -> dict[TopicPartitionKey, int]:
        """The next offset each held partition will return (for tests)."""
        return dict(self._positions)

    def consume(self, max_messages: int, timeout_s: float) -> list[Record]:
        """Run due callbacks, then return up to ``max_messages`` records (never waits)."""
        if self._closed:
            raise InMemoryGroupError(f"{self.member}'s source is closed")
        self._callbacks()
        fetchable = sorted(self._owned - self._paused)
        if not fetchable:
            return []
        self._turn = (self._turn + 1) % len(fetchable)
        records: list[Record] = []
        for topic, partition in fetchable[self._turn :] + fetchable[: self._turn]:
            room = max_messages - len(records)
            if room <= 0:
                break
            position = self._positions[(topic, partition)]
            entries = self._group.log[topic][partition][position : position + room]
            records.extend(
                MemoryRecord(topic, partition, position + i, entry)
                for i, entry in enumerate(entries)
            )
            self._positions[(topic, partition)] = position + len(entries)
        return records

    def commit(
        self, offsets: Mapping[TopicPartitionKey, int], asynchronous: bool = False
    ) -> dict[TopicPartitionKey, int]:
        """Commit the held partitions among ``offsets``; returns what the group applied."""
        mine = {tp: offset for tp, offset in offsets.items() if tp in self._owned}
        if not mine:
            return {}
        return self._group._commit(self.member, mine)

    def pause(self, keys: Sequence[TopicPartitionKey]) -> None:
        """Stop returning records of these held partitions."""
        self._paused.update(k for k in keys if k in self._owned)

    def resume(self, keys: Sequence[TopicPartitionKey]) -> None:
        """Return records of these partitions again."""
        self._paused.difference_update(keys)

    def seek(self, key: TopicPartitionKey, offset: int) -> None:
        """Move a held partition's position (a paused partition stays paused)."""
        if key not in self._owned:
            raise InMemoryGroupError(f"{self.member} cannot seek {key}: not assigned")
        self._positions[key] = offset

    def close(self, timeout_s: float) -> bool:
        """Leave the group, revoking what is held inside this call (as librdkafka does)."""
        if self._closed:
            return True
        if self.member in self._group.members:
            self._group.leave(self.member)
        self._callbacks()
        self._closed = True
        return True


class InMemoryProducer:
    """The part of ``confluent_kafka.Producer`` the dead-letter and version-event
    publishers use, appending to an :class:`InMemoryGroup`'s log (a topic it does not
    know gets one partition). Deliveries succeed and are reported by ``poll``/``flush``."""

    def __init__(self, group: InMemoryGroup) -> None:
        self._group = group
        self._reports: list[Callable[[object, object], None]] = []

    def produce(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: list[tuple[str, bytes | None]] | None = None,
        on_delivery: Callable[[object, object], None] | None = None,
    ) -> None:
        self._group.log.setdefault(topic, [[]])
        self._group.append(topic, 0, value, key=key, headers=headers)
        if on_delivery is not None:
            self._reports.append(on_delivery)

    def poll(self, timeout: float = 0.0) -> int:
        reports, self._reports = self._reports, []
        for report in reports:
            report(None, None)
        return len(reports)

    def flush(self, timeout: float = 0.0) -> int:
        self.poll()
        return 0
