"""What the poll loop needs of its input: records, positions, commits, rebalances.

Two implementations: :class:`stream_trainer.ingest.kafka_source.KafkaSource` (a subscribed
librdkafka consumer) and :class:`stream_trainer.testing.memory_source.InMemorySource`
(one member of an in-memory group, for millisecond tests of the service's guarantees).

Contract shared by both, which the service relies on:

- the :class:`RebalanceListener` is called only on the poll thread, inside ``consume()``
  (and inside ``close()``, which gives up what is owned), never from another thread;
- ``commit`` never commits a partition this member does not own (it skips it), and a
  commit is only for offsets a durable checkpoint covers (the caller's duty);
- ``pause``/``resume``/``seek`` act on owned partitions only; a pause lasts until
  ``resume`` or until the partition is unassigned;
- a partition is owned from its ``on_assigned`` until its ``on_revoked`` returns or its
  ``on_lost`` is called.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from stream_trainer.state.ledger import TopicPartitionKey


class Record(Protocol):
    """One consumed record: what ``confluent_kafka.Message`` gives for an error-free message.

    A superset of :class:`stream_trainer.ingest.records.MessageLike` (what the decoder reads)."""

    def topic(self) -> str: ...
    def partition(self) -> int: ...
    def offset(self) -> int: ...
    def key(self) -> bytes | None: ...
    def value(self) -> bytes | None: ...
    def timestamp(self) -> tuple[int, int]: ...
    def headers(self) -> list[tuple[str, bytes | None]] | None: ...


class RebalanceListener(Protocol):
    """Hooks called on the poll thread, inside ``consume()``, during a rebalance.

    Each names only the partitions that move (cooperative rebalancing), never an empty
    list; partitions not named stay owned and fetching throughout.
    """

    def start_offsets(
        self, partitions: Sequence[TopicPartitionKey]
    ) -> Mapping[TopicPartitionKey, int]:
        """Where each newly assigned partition starts (absent: the group's committed offset)."""

    def on_assigned(self, partitions: Sequence[TopicPartitionKey]) -> None:
        """Called after the partitions are added to the owned set and positioned."""

    def on_revoked(self, partitions: Sequence[TopicPartitionKey]) -> None:
        """Must checkpoint and commit ``partitions`` before returning (still owned here)."""

    def on_lost(self, partitions: Sequence[TopicPartitionKey]) -> None:
        """Must commit nothing: the partitions, already out of the owned set, belong to
        another member."""


class Source(Protocol):
    """A member of a consumer group, driven by one poll thread (see the module doc)."""

    @property
    def owned(self) -> frozenset[TopicPartitionKey]:
        """Partitions currently assigned to this member."""

    @property
    def paused(self) -> frozenset[TopicPartitionKey]:
        """Owned partitions not being fetched."""

    @property
    def start_positions(self) -> Mapping[TopicPartitionKey, int]:
        """Where each assigned partition really started (read in ``on_assigned``): the
        listener's start offset, else the group's committed offset, else the log start
        (a retention gap accepted moves it to the log start)."""

    def consume(self, max_messages: int, timeout_s: float) -> Sequence[Record]:
        """Up to ``max_messages`` records of owned, unpaused partitions, in offset order per
        partition; rebalance callbacks run in here. Waits at most ``timeout_s``."""

    def commit(
        self, offsets: Mapping[TopicPartitionKey, int], asynchronous: bool = False
    ) -> dict[TopicPartitionKey, int]:
        """Commit next-offsets of the owned partitions among ``offsets``; returns those."""

    def pause(self, keys: Sequence[TopicPartitionKey]) -> None:
        """Stop fetching these owned partitions (membership is kept)."""

    def resume(self, keys: Sequence[TopicPartitionKey]) -> None:
        """Fetch these partitions again."""

    def seek(self, key: TopicPartitionKey, offset: int) -> None:
        """Move an owned partition's fetch position."""

    def close(self, timeout_s: float) -> bool:
        """Leave the group (revoking what is owned); False if not done within ``timeout_s``."""
