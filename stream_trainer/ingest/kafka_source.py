"""The Kafka side of the input: batch consumption, positions, commits, rebalances.

Offsets are never stored or committed automatically: the service decides where each
assigned partition starts (its checkpoint) and commits only offsets a durable checkpoint
covers, and only for partitions this member owns.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    OFFSET_INVALID,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from stream_trainer.errors import StreamTrainerError
from stream_trainer.ingest.source import RebalanceListener, Record
from stream_trainer.state.ledger import TopicPartitionKey

# RebalanceListener is re-exported: it lived here before stream_trainer.ingest.source existed.
__all__ = ["KafkaSource", "RebalanceListener", "RetentionGap"]

log = logging.getLogger(__name__)


class RetentionGap(StreamTrainerError):
    """Offsets needed for replay were removed from Kafka by retention."""

    def __init__(self, gaps: Mapping[TopicPartitionKey, tuple[int, int]]) -> None:
        self.gaps = dict(gaps)
        named = ", ".join(
            f"{topic}[{partition}] needs offset {wanted} but the log starts at {low}"
            for (topic, partition), (wanted, low) in sorted(self.gaps.items())
        )
        super().__init__(
            f"retention removed offsets the checkpoint needs: {named}. Records in between "
            "would be skipped; set checkpoint.accept_retention_gap: true to start anyway"
        )


def _key(tp: TopicPartition) -> TopicPartitionKey:
    return tp.topic, tp.partition


COOPERATIVE = "cooperative-sticky"
# At most this long per rebalance callback when a leader does not answer the wake-up.
WAKE_TIMEOUT_S = 0.5


def cooperative_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with the cooperative-sticky assignor of the classic protocol.

    KafkaSource's callbacks call ``incremental_assign`` / ``incremental_unassign``, which
    librdkafka refuses (``_STATE``) under an eager assignor, so another strategy in
    ``kafka.extra`` is overridden. ``group.protocol=consumer`` (KIP-848) has no client-side
    assignor (librdkafka refuses the property there) and is always incremental.
    """
    conf = dict(config)
    if str(conf.get("group.protocol", "classic")) == "consumer":
        conf.pop("partition.assignment.strategy", None)
        return conf
    wanted = conf.get("partition.assignment.strategy")
    if wanted not in (None, COOPERATIVE):
        log.warning(
            "partition.assignment.strategy overridden: the consumer rebalances incrementally",
            extra={"configured": wanted, "used": COOPERATIVE},
        )
    conf["partition.assignment.strategy"] = COOPERATIVE
    return conf


class KafkaSource:
    """A subscribed consumer that hands out message batches and commits on request: the
    :class:`stream_trainer.ingest.source.Source` of a real Kafka group.

    Rebalances are cooperative (incremental): a callback names only the partitions that
    move, and the owned set is a union updated by them. A partition that does not move
    keeps being fetched, its pause and start position untouched. A callback with an empty
    list (every member gets one at every rebalance) changes nothing.
    """

    def __init__(
        self,
        config: dict[str, Any],
        topics: Sequence[str],
        listener: RebalanceListener,
        on_error: Callable[[KafkaError], None] | None = None,
        on_stats: Callable[[str], None] | None = None,
        accept_retention_gap: bool = False,
        on_retention_gap: Callable[[RetentionGap], None] | None = None,
        sole_member: bool = False,
        on_commit_failed: Callable[[dict[TopicPartitionKey, int]], None] | None = None,
    ) -> None:
        """``sole_member``: this member is the group's only active one (it holds the lease),
        so every partition of ``topics`` is its own (see :meth:`_complete`).
        ``on_commit_failed``: the offsets of an asynchronous commit the broker refused or
        never answered (a rebalance in progress, an outage), on the poll thread."""
        self._listener = listener
        self._on_commit_failed = on_commit_failed
        self._topics = list(topics)
        self._sole_member = sole_member
        self._on_error = on_error
        self._accept_gap = accept_retention_gap
        self._on_gap = on_retention_gap
        conf = cooperative_config(config)
        conf["error_cb"] = self._error
        if on_stats is not None:
            conf["stats_cb"] = on_stats
        if on_commit_failed is not None:
            conf["on_commit"] = self._committed
        self._consumer = Consumer(conf)
        # Read here, never inside a rebalance callback: list_topics() on the consumer being
        # polled resets confluent_kafka's per-thread call state, and the next callback that
        # poll serves (a log line, an error) then aborts the process (CallState_get assert).
        self._partitions_at_start = self._read_partitions() if sole_member else {}
        # Mirrors librdkafka's assignment: added right after incremental_assign, removed
        # with incremental_unassign.
        self._owned: set[TopicPartitionKey] = set()
        # Held while a commit checks ownership and is made, and while partitions are
        # forgotten: a lost partition is never committed once this member let it go,
        # whichever thread commits (close() runs its callbacks on its own thread).
        self._ownership = threading.Lock()
        # Owned partitions the group did not assign (taken by _complete).
        self._taken: set[TopicPartitionKey] = set()
        self._paused: set[TopicPartitionKey] = set()
        # Owned partitions held paused because retention removed offsets they need.
        self._gaps: dict[TopicPartitionKey, tuple[int, int]] = {}
        self._unreported: dict[TopicPartitionKey, tuple[int, int]] = {}
        # Records consume() took in the call that found a gap: returned by the next call.
        self._held_back: list[Message] = []
        # Explicit start offset of each owned partition (absent: the log's beginning).
        self.start_positions: dict[TopicPartitionKey, int] = {}
        self._consumer.subscribe(
            list(topics), on_assign=self._assign, on_revoke=self._revoke, on_lost=self._lost
        )

    # -- callbacks (run on the poll thread inside consume) --------------------------------

    def _error(self, error: KafkaError) -> None:
        if self._on_error is not None:
            self._on_error(error)
        if error.fatal():
            log.error("fatal kafka error", extra={"code": error.name(), "reason": error.str()})
        else:
            log.warning("kafka error", extra={"code": error.name(), "reason": error.str()})

    def _committed(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """librdkafka's answer to a commit (served inside consume): report what failed."""
        failed = {
            _key(tp): tp.offset
            for tp in partitions
            if (error is not None or tp.error is not None) and tp.offset >= 0
        }
        if failed and self._on_commit_failed is not None:
            self._on_commit_failed(failed)

    def _read_partitions(self) -> dict[str, list[int]]:
        """The partitions of the subscribed topics now ({} when metadata cannot be read)."""
        try:
            metadata = self._consumer.list_topics(timeout=10.0)
        except KafkaException as error:
            log.warning("could not read the topics' partitions", extra={"reason": str(error)})
            return {}
        return {
            topic: sorted(metadata.topics[topic].partitions)
            for topic in self._topics
            if topic in metadata.topics and metadata.topics[topic].error is None
        }

    def _complete(self, partitions: list[TopicPartition]) -> None:
        """Add the partitions of the subscribed topics neither owned nor being assigned.

        A static member that rejoins gets its cached assignment back without a rebalance,
        so partitions added to a topic while it was down stay unassigned (Kafka rebalances
        only when the leader sees the count change, and a restarted leader never saw the
        old count). The sole active member owns them all, so it takes them itself; when a
        later rebalance assigns one properly it is already owned and stays as it is.
        """
        assigned = self._owned | {_key(tp) for tp in partitions}
        missing = [
            TopicPartition(topic, partition)
            for topic, numbers in self._partitions_at_start.items()
            for partition in numbers
            if (topic, partition) not in assigned
        ]
        if missing:
            log.warning(
                "the group's assignment lacks partitions (added while this member was down); "
                "taking them too: this member is the only active one",
                extra={"partitions": [f"{tp.topic}:{tp.partition}" for tp in missing]},
            )
            partitions.extend(missing)
            self._taken.update(_key(tp) for tp in missing)

    def _assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Only what is added. A partition already owned was taken by _complete before the
        # group assigned it: it is positioned and fetching; assigning it again is _CONFLICT.
        self._taken.difference_update(_key(tp) for tp in partitions)
        new = [tp for tp in partitions if _key(tp) not in self._owned]
        if not new:
            consumer.incremental_assign([])
            self._wake_fetchers(consumer)
            return
        if self._sole_member:
            self._complete(new)
        keys = [_key(tp) for tp in new]
        gaps = self._position(consumer, new)
        held: dict[TopicPartitionKey, tuple[int, int]] = {}
        if gaps:
            gap = RetentionGap(gaps)
            if self._accept_gap:
                log.warning("accepting retention gap", extra={"reason": str(gap)})
                for tp in new:
                    if _key(tp) in gaps:
                        # Start at the log start explicitly: auto.offset.reset=latest would
                        # otherwise skip every retained record too.
                        tp.offset = gaps[_key(tp)][1]
                if self._on_gap is not None:
                    self._on_gap(gap)
            else:
                # Only these partitions: owned at the offset they need, held paused so
                # nothing past the gap is delivered. Raising inside a callback is
                # swallowed by librdkafka, so consume() reports it.
                held = gaps
        consumer.incremental_assign(new)  # it clears pauses: pause after it
        if held:
            # A first fetch may still race the pause and reset the position to the log
            # start ("offset out of range"); harmless: nothing is delivered while paused,
            # and a held partition is never resumed, only revoked (positioned anew).
            consumer.pause([tp for tp in new if _key(tp) in held])
        self._owned.update(keys)
        self._paused.difference_update(keys)
        self._paused.update(held)
        self._gaps.update(held)
        self._unreported.update(held)
        self.start_positions.update({_key(tp): tp.offset for tp in new if tp.offset >= 0})
        self._listener.on_assigned(keys)
        self._wake_fetchers(consumer)

    def _wake_fetchers(self, consumer: Consumer) -> None:
        """Have librdkafka fetch the owned partitions again now, not up to 1 s later.

        librdkafka pauses every assigned partition while a rebalance callback is pending and
        resumes them once it returns, but it applies the resume on its main thread: a
        broker thread that went idle meanwhile (nothing left to fetch) sleeps out its 1 s
        wait before it sees them, and the partitions that did not move stall that long
        (measured: ~1 s, in about half of the joins, twice per join: the cooperative
        protocol's two rebalances). Any request to a broker wakes its thread; ListOffsets
        for every owned partition is one parallel round trip to their leaders (1-10 ms
        here). Best effort: a broker that does not answer costs at most the timeout.
        """
        # As a "timestamp", OFFSET_END (-1) asks for the end of the log: any answer does.
        owned = [TopicPartition(t, p, OFFSET_END) for t, p in sorted(self._owned)]
        if not owned:
            return
        try:
            consumer.offsets_for_times(owned, timeout=WAKE_TIMEOUT_S)
        except KafkaException as error:
            log.debug("waking the fetchers failed", extra={"reason": str(error)})

    def _position(
        self, consumer: Consumer, partitions: list[TopicPartition]
    ) -> dict[TopicPartitionKey, tuple[int, int]]:
        """Set each partition's start offset (the start rule); return the retention gaps."""
        wanted = dict(self._listener.start_offsets([_key(tp) for tp in partitions]))
        committed = {}
        try:
            committed = {_key(tp): tp.offset for tp in consumer.committed(partitions, timeout=10.0)}
        except KafkaException as error:
            log.warning("could not read committed offsets", extra={"reason": str(error)})
        gaps: dict[TopicPartitionKey, tuple[int, int]] = {}
        for tp in partitions:
            key = _key(tp)
            start = wanted.get(key)
            group = committed.get(key, OFFSET_INVALID)
            if start is None:
                tp.offset = group if group >= 0 else OFFSET_BEGINNING
            else:
                if group > start:
                    # Only this model trains the group (the lease's claim), so commits ahead
                    # of its checkpoint are its own from a newer checkpoint that was lost
                    # (quarantined, deleted): those records are not in the model; learn them.
                    log.warning(
                        "the group's offset is ahead of the restored checkpoint: a newer "
                        "checkpoint was lost; learning from the checkpoint's offset",
                        extra={
                            "partition": f"{key[0]}:{key[1]}",
                            "checkpoint": start,
                            "group": group,
                        },
                    )
                tp.offset = start
            if tp.offset >= 0:
                low, _high = consumer.get_watermark_offsets(tp, timeout=10.0, cached=False)
                if tp.offset < low:
                    gaps[key] = (tp.offset, low)
        return gaps

    def _forget(self, keys: Sequence[TopicPartitionKey]) -> None:
        """Drop the bookkeeping of partitions no longer owned (only theirs)."""
        with self._ownership:
            self._owned.difference_update(keys)
        self._taken.difference_update(keys)
        self._paused.difference_update(keys)
        for key in keys:
            self.start_positions.pop(key, None)
            self._gaps.pop(key, None)
            self._unreported.pop(key, None)

    def _unassign(self, consumer: Consumer, keys: Sequence[TopicPartitionKey]) -> None:
        """incremental_unassign ``keys``: only ever owned ones (librdkafka refuses others)."""
        consumer.incremental_unassign([TopicPartition(t, p) for t, p in keys])

    def _revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = [key for key in map(_key, partitions) if key in self._owned]
        if not keys:
            consumer.incremental_unassign([])
            return
        try:
            # Still owned here, so the listener's commit covers them.
            self._listener.on_revoked(keys)
        finally:
            self._forget(keys)
            self._unassign(consumer, keys)

    def _lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # The group's assignment is gone; the partitions _complete took go with it (the
        # next assignment takes them again if the group still lacks them).
        lost = {key for key in map(_key, partitions) if key in self._owned} | self._taken
        keys = sorted(lost)
        if not keys:
            consumer.incremental_unassign([])
            return
        self._forget(keys)  # before the listener: nothing of theirs may be committed
        try:
            self._listener.on_lost(keys)
        finally:
            self._unassign(consumer, keys)

    # -- the poll thread's API ------------------------------------------------------------

    @property
    def owned(self) -> frozenset[TopicPartitionKey]:
        """Partitions currently assigned to this member."""
        return frozenset(self._owned)

    def consume(self, max_messages: int, timeout_s: float) -> list[Record]:
        """Up to ``max_messages`` records; error events are reported, never returned.

        Raises RetentionGap once for the partitions of an assignment that need offsets
        retention removed (they stay owned and paused, the others are fetched); the records
        that call took are returned by the next one. Raises KafkaException on a fatal
        client error.
        """
        if self._held_back:
            messages, self._held_back = self._held_back, []
        else:
            messages = self._consumer.consume(num_messages=max_messages, timeout=timeout_s)
        if self._unreported:
            gap, self._unreported = RetentionGap(self._unreported), {}
            self._held_back = messages
            raise gap
        records: list[Message] = []
        for message in messages:
            error = message.error()
            if error is None:
                records.append(message)
            elif error.fatal():
                raise KafkaException(error)
            elif self._on_error is not None:
                self._on_error(error)
        # An error-free consumed message always carries its topic, partition and offset.
        return cast("list[Record]", records)

    def commit(
        self, offsets: Mapping[TopicPartitionKey, int], asynchronous: bool = False
    ) -> dict[TopicPartitionKey, int]:
        """Commit next-offsets for the owned partitions among ``offsets``.

        Synchronous by default (a revoke must commit before returning); ``asynchronous``
        only enqueues the commit, so a broker outage cannot block the caller.

        Returns what was committed. Never commits a partition this member does not own.
        """
        with self._ownership:
            owned = {key: offset for key, offset in offsets.items() if key in self._owned}
            if not owned:
                return {}
            tps = [TopicPartition(t, p, o) for (t, p), o in owned.items()]
            if asynchronous:
                self._consumer.commit(offsets=tps, asynchronous=True)
            else:
                self._consumer.commit(offsets=tps, asynchronous=False)
        return owned

    def pause(self, keys: Sequence[TopicPartitionKey]) -> None:
        """Stop fetching these partitions (poll keeps going, membership is kept)."""
        todo = [k for k in keys if k in self._owned and k not in self._paused]
        if todo:
            self._consumer.pause([TopicPartition(t, p) for t, p in todo])
            self._paused.update(todo)

    def resume(self, keys: Sequence[TopicPartitionKey]) -> None:
        """Fetch these partitions again, except those held by a retention gap (a fetch
        would silently reset them past the gap)."""
        todo = [k for k in keys if k in self._paused and k not in self._gaps]
        if todo:
            self._consumer.resume([TopicPartition(t, p) for t, p in todo])
            self._paused.difference_update(todo)

    def seek(self, key: TopicPartitionKey, offset: int) -> None:
        """Move an owned partition's fetch position (used after a state reload)."""
        self._consumer.seek(TopicPartition(key[0], key[1], offset))

    # -- lag (read by metrics.LagTracker from the statistics callback) ---------------------

    @property
    def retention_gaps(self) -> Mapping[TopicPartitionKey, tuple[int, int]]:
        """Owned partitions held paused by a retention gap: ``(needed offset, log start)``."""
        return dict(self._gaps)

    @property
    def paused(self) -> frozenset[TopicPartitionKey]:
        """Owned partitions not being fetched (halted by the breaker or paused by command)."""
        return frozenset(self._paused & self._owned)

    def query_watermarks(self, key: TopicPartitionKey, timeout_s: float) -> tuple[int, int] | None:
        """``(log start, end offset)`` of ``key`` asked from the broker now, not the fetch
        cache (stale for a paused partition); None if it does not answer within ``timeout_s``.
        """
        try:
            marks = self._consumer.get_watermark_offsets(
                TopicPartition(key[0], key[1]), timeout=timeout_s, cached=False
            )
        except KafkaException as error:
            # Lag is monitoring: a broker that does not answer must not stop training.
            log.debug("watermark query failed", extra={"reason": str(error)})
            return None
        if marks is None:
            return None
        return int(marks[0]), int(marks[1])

    def close(self, timeout_s: float) -> bool:
        """Leave the group; bounded because ``close()`` can hang on an unreachable broker.

        Returns False when the close did not finish within ``timeout_s``.
        """
        done = threading.Event()

        def _close() -> None:
            try:
                self._consumer.close()
            except (KafkaException, RuntimeError) as error:
                log.warning("consumer close failed", extra={"reason": str(error)})
            finally:
                done.set()

        threading.Thread(target=_close, name="consumer-close", daemon=True).start()
        return done.wait(timeout_s)
