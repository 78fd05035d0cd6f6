"""The poll loop of ``model.scope: partition``: one model per input partition.

Each member of the consumer group trains the models of the partitions the group assigns
it (cooperative-sticky: a rebalance names only the partitions that move). Per partition
(docs/design/scale-out.md, 3.1):

- **assign** (inside the callback, before the partition is fetched): claim its slot in the
  shared store (the MANIFEST compare-and-swap fences the previous owner), restore the
  newest checkpoint that verifies, and start at that checkpoint's offset; a checkpoint
  ahead of the group's offset is committed at once. A slot the store cannot give (store
  down, claimed over) leaves the partition paused and is tried again from the loop.
- **train**: its records alone, in its own state (per record, or per mini-batch of its
  own records); checkpoint, publish and commit on its own cadence; offsets are committed
  only after the checkpoint holding them is durable, and only while owned.
- **revoke**: finish the unit being learnt, checkpoint it, commit synchronously, then
  let it go (records consumed for it but not learnt are past that checkpoint: its next
  owner reads them). **lost**: drop it, write and commit nothing. Other partitions are
  untouched.

Two threads (docs/design/scale-out.md, 4.5). The **poll thread** (:meth:`run`'s caller)
consumes, sorts records into their slots' pending units and runs the rebalance callbacks,
which librdkafka calls inside ``consume``. The **learner thread** learns the units,
checkpoints and publishes. Up to ``kafka.read_ahead_records`` records wait between them,
so while a callback holds the consumer (librdkafka pauses every partition for it and
fetches them again afterwards) the partitions that stay go on being learnt. They share
the slots under one lock, held only to move records and slots in and out, and for a
slot's checkpoint and publish: a unit is learnt outside it (key scope's member-wide
model bound keeps it), so the poll thread reads ahead while the learner learns. A callback
waits for the unit being learnt only if it is of a partition that moves; claims,
restores, the revoke's checkpoint writes and commits run outside the lock, on slots the
learner no longer (or not yet) holds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from confluent_kafka import KafkaError

from stream_trainer.config import Settings
from stream_trainer.ingest.deadletter import DeadLetterPublisher
from stream_trainer.ingest.records import DecodedBatch, RecordDecoder
from stream_trainer.ingest.source import Record, Source
from stream_trainer.ingest.wire import RegistryWaitInterrupted, WireDecoder
from stream_trainer.operations.faults import NO_CRASHES, CrashPoints
from stream_trainer.operations.http import Heartbeat
from stream_trainer.operations.metrics import Metrics
from stream_trainer.operations.unit_dead_letters import dead_letter_unit
from stream_trainer.publishing.registry import RegistryFenced, RegistryUnavailable
from stream_trainer.state.checkpoint import CheckpointError, CheckpointFenced
from stream_trainer.state.checkpointer import Begun, Snapshot
from stream_trainer.state.ledger import TopicPartitionKey, partition_key
from stream_trainer.state.manager import PartitionSlot, PartitionSlots
from stream_trainer.training.trainers import Trainer, UnitResult

log = logging.getLogger(__name__)

# Pause before a slot the store could not give at assign is claimed again.
RETRY_UNAVAILABLE_S = 5.0
# Pause before a publish is tried again after the registry's store failed.
PUBLISH_RETRY_S = 5.0
# Slots restored side by side in one assign callback (each mostly waits on the store).
RESTORE_THREADS = 8
# The learner's wait when no unit is ready: bounds how late a mini-batch's max_wait_s, a
# checkpoint or a publish due by time is seen.
IDLE_WAIT_S = 0.02
# The poll thread's wait for room in the read-ahead: it consumes at least this often, so a
# rebalance is served while the learner is busy (the bound is soft by one poll's records).
ROOM_WAIT_S = 0.5


class LoggedCommits:
    """The source as the checkpointers see it: every commit is logged with what it
    committed (the fault tests check each one against the member's own assignment)."""

    def __init__(self, source: Callable[[], Source]) -> None:
        self._source = source

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source(), name)

    def commit(
        self, offsets: Mapping[TopicPartitionKey, int], asynchronous: bool = False
    ) -> dict[TopicPartitionKey, int]:
        committed = self._source().commit(offsets, asynchronous=asynchronous)
        if committed:
            log.info(
                "offsets committed",
                extra={
                    "offsets": {partition_key(k): v for k, v in sorted(committed.items())},
                    "synchronous": not asynchronous,
                },
            )
        return committed


def _raise_to(
    newest: dict[TopicPartitionKey, int], offsets: Mapping[TopicPartitionKey, int]
) -> None:
    """Each partition of ``offsets`` in ``newest`` at the larger of the two offsets."""
    for key, offset in offsets.items():
        newest[key] = max(offset, newest.get(key, offset))


class PollThreadCommits:
    """Commits as the checkpointers make them, but only ever from the poll thread.

    librdkafka blocks a commit made on another thread while a rebalance callback runs on
    the poll thread, and that callback waits for the learner: the learner's commits are
    queued (the newest offset per partition) and made, asynchronously, before the poll
    thread's next poll. Those offsets' checkpoints are durable already; a partition that
    is revoked or lost meanwhile drops its queued offset (:meth:`drop`). An asynchronous
    commit the broker refused (a rebalance in progress, an outage) is queued again
    (:meth:`retry`): an idle partition would otherwise keep a stale group offset, and
    lag, until its next checkpoint. Until :meth:`bind` names the poll thread (a test
    driving ``step``), every commit is made at once.
    """

    def __init__(self, inner: LoggedCommits) -> None:
        self._inner = inner
        self._poll_thread: int | None = None
        self._queued: dict[TopicPartitionKey, int] = {}
        self._dropped: set[TopicPartitionKey] = set()  # revoked or lost, not assigned since
        self._newest: dict[TopicPartitionKey, int] = {}  # the newest offset sent or queued
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def bind(self) -> None:
        """The calling thread is the poll thread from now on."""
        self._poll_thread = threading.get_ident()

    def commit(
        self, offsets: Mapping[TopicPartitionKey, int], asynchronous: bool = False
    ) -> dict[TopicPartitionKey, int]:
        with self._lock:
            _raise_to(self._newest, offsets)
            if self._poll_thread is not None and threading.get_ident() != self._poll_thread:
                _raise_to(self._queued, offsets)
                return dict(offsets)
        return self._inner.commit(offsets, asynchronous=asynchronous)

    def flush(self) -> None:
        """Make the queued commits (the poll thread, outside any callback)."""
        with self._lock:
            queued, self._queued = self._queued, {}
        if queued:
            self._inner.commit(queued, asynchronous=True)

    def retry(self, failed: Mapping[TopicPartitionKey, int]) -> None:
        """An asynchronous commit of ``failed`` did not land: make it again at the next
        flush (unless a newer offset is queued, or the partition was dropped since)."""
        with self._lock:
            # Only the newest: an older offset made again would move the group back.
            again = {
                key: offset
                for key, offset in failed.items()
                if key not in self._dropped and offset >= self._newest.get(key, offset)
            }
            _raise_to(self._queued, again)
        if again:
            log.info(
                "offset commit refused; made again at the next poll",
                extra={"offsets": {partition_key(k): v for k, v in sorted(again.items())}},
            )

    def drop(self, keys: Sequence[TopicPartitionKey]) -> None:
        with self._lock:
            for key in keys:
                self._queued.pop(key, None)
                self._dropped.add(key)

    def owned_again(self, keys: Sequence[TopicPartitionKey]) -> None:
        """``keys`` were assigned (again): their failed commits may be retried."""
        with self._lock:
            self._dropped.difference_update(keys)


class PartitionService:
    """Trains one model per owned partition until :meth:`request_stop`; see the module
    docstring. ``make_slots(service)`` builds the state manager (its checkpointers read the
    source through the service); ``make_source(service)`` the source, listening to it."""

    def __init__(
        self,
        settings: Settings,
        make_slots: Callable[[PartitionService], PartitionSlots],
        make_source: Callable[[PartitionService], Source],
        decoder: RecordDecoder,
        trainer: Trainer,
        dead_letters: DeadLetterPublisher,
        metrics: Metrics,
        heartbeat: Heartbeat,
        *,
        wire: WireDecoder | None = None,
        crash: CrashPoints = NO_CRASHES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._decoder = decoder
        self._trainer = trainer
        self._dlq = dead_letters
        self._metrics = metrics
        self._heartbeat = heartbeat
        self._wire = wire
        self._crash = crash
        self._clock = clock
        self._stop = threading.Event()
        self._batch_target = (
            settings.training.mini_batch.size if settings.training.mode == "mini_batch" else 0
        )
        # Records in one unit: a mini-batch, or per record what one poll takes. The read-ahead
        # holds more: a unit is what the learner does while holding the lock.
        self._unit_size = self._batch_target or settings.kafka.consume_batch_size
        # Owned partitions whose slot the store could not give yet: retry time.
        self._unavailable: dict[TopicPartitionKey, float] = {}
        self._fenced: set[TopicPartitionKey] = set()
        # The learner and the callbacks take turns on the slots (module docstring); the
        # condition wakes the learner (records) and the poll thread (room).
        self._lock = threading.RLock()
        self._turn = threading.Condition(self._lock)
        self._read_ahead = settings.kafka.read_ahead_records
        # The partition whose unit the learner is learning, outside the lock: a callback
        # that moves it waits for the unit to end (revoke: it is in the checkpoint).
        self._learning: TopicPartitionKey | None = None
        # Partitions the learner wants paused (breaker, fence): paused by the poll thread,
        # the one that drives the consumer.
        self._pause_wanted: list[TopicPartitionKey] = []
        self._learner_error: BaseException | None = None
        self.commits = PollThreadCommits(LoggedCommits(lambda: self.source))
        self.slots = make_slots(self)
        self.source = make_source(self)
        self.started = False

    # -- lifecycle -------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask the loop to learn what it consumed, checkpoint, commit and return."""
        self._stop.set()

    def ready(self) -> tuple[bool, str]:
        """Ready once running; a member with no partition (more members than partitions)
        is ready too: idle is healthy."""
        if self._stop.is_set():
            return False, "stopping"
        if not self.started:
            return False, "starting"
        return True, "ok"

    def next_offsets(self) -> dict[TopicPartitionKey, int]:
        """The next offset each held slot learns (the lag gauges read it)."""
        return {
            key: slot.state.offsets[key]
            for key, slot in list(self.slots.slots.items())
            if key in slot.state.offsets
        }

    def run(self) -> int:
        """The poll loop, with the learner on its own thread. Returns 0 after a graceful
        stop; an error of either thread ends both and is raised here."""
        self.started = True
        self._metrics.state.state("running")
        self.commits.bind()
        learner = threading.Thread(target=self._learner, name="learner")
        learner.start()
        try:
            while not self._stop.is_set():
                self.poll_step(wait_for_room=True)
        finally:
            self._stop.set()
            with self._turn:
                self._turn.notify_all()
            learner.join()
        if self._learner_error is not None:
            raise self._learner_error
        self._shutdown()
        return 0

    def step(self) -> None:
        """One iteration of both threads' work on the calling thread (tests drive it):
        consume, then learn the units that are ready, checkpoint and publish."""
        self.poll_step(wait_for_room=False)
        self.learn_step()

    def poll_step(self, wait_for_room: bool) -> None:
        """The poll thread's iteration: pause what the learner asked to, consume (the
        rebalance callbacks run in it), sort the records into their slots, claim again the
        slots the store could not give; then, with ``wait_for_room``, wait (bounded) until
        the read-ahead has room."""
        self._apply_pauses()
        self.commits.flush()
        cfg = self.settings.kafka
        records = self.source.consume(cfg.consume_batch_size, cfg.consume_timeout_s)
        now = self._clock()
        if records:
            self._metrics.records_consumed.inc(len(records))
            with self._turn:
                self._distribute(records, now)
                self._turn.notify_all()
        if self._unavailable:
            self._retry_unavailable(now)
        if wait_for_room:
            with self._turn:
                self._turn.wait_for(self._room, timeout=ROOM_WAIT_S)

    def _room(self) -> bool:
        """Room to poll: under the read-ahead bound, or under twice it while a held slot has
        nothing pending. After an assign, the new partitions' backlogs fill librdkafka's
        queue ahead of the staying partitions' records: read on to reach those rather than
        let the staying ones starve until the backlog is learnt."""
        if self._stop.is_set():
            return True
        held = self.slots.slots.values()
        pending = sum(len(slot.pending) for slot in held)
        if pending < self._read_ahead:
            return True
        return pending < 2 * self._read_ahead and any(not slot.pending for slot in held)

    def _learner(self) -> None:
        """The learner thread: learn until the stop; an error stops the poll thread too."""
        try:
            while not self._stop.is_set():
                if self.learn_step():
                    continue
                with self._turn:
                    if not self._stop.is_set():
                        self._turn.wait(IDLE_WAIT_S)
        except RegistryWaitInterrupted:
            pass  # a stop ended the wait; the waiting records are not learnt
        except BaseException as error:  # raised on the poll thread by run()
            self._learner_error = error
        finally:
            self._stop.set()
            with self._turn:
                self._turn.notify_all()

    def learn_step(self) -> bool:
        """The learner's iteration: learn the units that are ready, then checkpoint and
        publish the slots that are due, the lock taken per slot. True if it learnt."""
        now = self._clock()
        self._heartbeat.beat()
        learnt = False
        with self._lock:
            keys = list(self.slots.slots)
        for key in keys:
            with self._turn:
                slot = self.slots.get(key)
                if slot is None or not self._unit_ready(slot, now):
                    continue
                records = self._take(slot, self._unit_size, now)
                self._learning = key
                self._turn.notify_all()  # room in the read-ahead
            try:
                self._learn(slot, records)
            finally:
                with self._turn:
                    self._learning = None
                    self._turn.notify_all()  # a callback waiting for this unit
            learnt = True
        for key in keys:
            with self._lock:
                slot = self.slots.get(key)
                if slot is None:
                    continue
                try:
                    slot.checkpointer.tick(now)
                except CheckpointFenced as error:
                    self._fence(key, str(error))
                    continue
                self._publish_if_due(slot, now)
        with self._lock:
            self._report_slots()
        return learnt

    def _apply_pauses(self) -> None:
        with self._lock:
            wanted, self._pause_wanted = self._pause_wanted, []
        if wanted:
            self.source.pause(wanted)

    def _pause(self, key: TopicPartitionKey) -> None:
        """Pause ``key`` from either thread: the poll thread does it before its next poll
        (records consumed before that are dropped: no slot, or a halted one)."""
        with self._lock:
            self._pause_wanted.append(key)

    # -- units -----------------------------------------------------------------------------

    def _distribute(self, records: Sequence[Record], now: float) -> None:
        """Append each record to its partition's pending unit; records of a partition with
        no slot (claim pending, fenced) or a halted one are dropped: it is paused, and
        sought back to its slot's offset (or read again by a restart) before it is learnt."""
        for record in records:
            key = (record.topic(), record.partition())
            slot = self.slots.get(key)
            if slot is None or key in slot.state.halted:
                continue
            if not slot.pending:
                slot.pending_since = now
            slot.pending.append(record)

    def _unit_ready(self, slot: PartitionSlot, now: float) -> bool:
        if not slot.pending:
            return False
        if not self._batch_target:
            return True
        return (
            len(slot.pending) >= self._batch_target
            or now - slot.pending_since >= self.settings.training.mini_batch.max_wait_s
        )

    @staticmethod
    def _take(slot: PartitionSlot, limit: int | None = None, now: float = 0.0) -> list[Record]:
        """``slot``'s pending records, the first ``limit`` of them (a unit), else all."""
        if limit is None or len(slot.pending) <= limit:
            records, slot.pending = slot.pending, []
        else:
            records, slot.pending = slot.pending[:limit], slot.pending[limit:]
            slot.pending_since = now  # the rest's age restarts: their arrival is not kept
        return records

    def _learn(self, slot: PartitionSlot, records: list[Record]) -> None:
        """Decode, dead-letter, learn and account for one unit of ``slot``'s records."""
        if not records:
            return
        self._ensure_schemas(records)
        state, key = slot.state, slot.key
        batch = self._decoder.decode(records)
        valid = np.zeros(len(records), dtype=bool)
        valid[batch.valid_index] = True
        reason = state.breaker.observe(key, valid)
        if reason is not None:
            # A flood of bad records: this partition stops here, nothing of the unit learnt
            # or dead-lettered; its owner's restart reads it again from the checkpoint.
            state.halted[key] = reason
            with self._lock:
                self._take(slot)  # consumed after the halted unit: read again by a restart
                self._report_slots()
            self._pause(key)
            log.error(
                "partition halted by the bad-record breaker",
                extra={"partition": slot.scope_id, "reason": reason, "offset": records[0].offset()},
            )
            return
        result = self._train(slot, records, batch)
        if result is None:
            return
        dead_letter_unit(self._dlq, self._metrics, state, records, batch, result.refused)
        first, last = records[0].offset(), records[-1].offset()
        start = state.offsets.get(key, first)
        state.ledger.add(key, start, last + 1)
        state.offsets[key] = last + 1
        slot.checkpointer.observe(len(records))
        self._crash.reached("after_learn")
        m = self._metrics
        m.records_learnt.inc(result.learnt)
        m.slot_records_learnt.labels(topic=key[0], partition=str(key[1])).inc(result.learnt)
        m.records_unscored.inc(result.unscored)
        m.batches.inc()
        m.batch_size.observe(len(records))
        if result.learn_seconds:
            m.learn_duration.observe(result.learn_seconds)
        # One line per unit at DEBUG: bench --members reads each partition's progress from
        # it to the millisecond (its /metrics scrapes see only every 50 ms).
        log.debug("unit learnt", extra={"partition": slot.scope_id, "records": result.learnt})

    def _train(
        self, slot: PartitionSlot, records: list[Record], batch: DecodedBatch
    ) -> UnitResult | None:
        """Learn ``batch`` (decoded from ``records``) in ``slot``'s state and count it
        toward the slot's next version. Key scope overrides it (:mod:`key_service`): it
        may add to ``batch.invalid`` (dead-lettered by the caller) and returns None when
        the partition halted with nothing of the unit learnt."""
        result = self._trainer.learn(slot.state, batch)
        slot.publisher.observe(slot.state, result.learnt)
        return result

    def _ensure_schemas(self, records: list[Record]) -> None:
        """Wait for the schemas of ``records`` (Avro / JSON Schema) while the registry is
        unreachable; a stop ends the wait (RegistryWaitInterrupted)."""
        wire = self._wire
        if wire is None:
            return
        ids = wire.schema_ids([record.value() for record in records])
        if all(wire.known(i) for i in ids):
            return

        def should_stop() -> bool:
            self._heartbeat.beat()
            return self._stop.is_set()

        wire.ensure(
            ids,
            should_stop=should_stop,
            on_retry=lambda _error: self._metrics.schema_registry_retries.inc(),
        )

    def _flush(self, slot: PartitionSlot) -> None:
        """Learn everything consumed for ``slot``, a unit at a time."""
        while slot.pending:
            self._learn(slot, self._take(slot, self._unit_size, self._clock()))

    # -- checkpoints and publishing --------------------------------------------------------

    def snapshot(self, slot: PartitionSlot, reason: str) -> Snapshot:
        """``slot``'s state serialized for its checkpointer, on this thread."""
        # Dead letters must be durable before the offsets that skip their records are.
        self._dlq.flush(self.settings.shutdown.timeout_s)
        state, key = slot.state, slot.key
        offset = state.offsets[key]
        fields: dict[str, Any] = {
            "offsets": {slot.scope_id: offset},
            "model_version": state.model_version,
            "config_hash": self.settings.config_hash(),
            "records_learnt": state.records_learnt,
            "metrics": state.metrics_snapshot(),
            "extra": {
                "reason": reason,
                "records_dead_lettered": state.records_dead_lettered,
                "processed": state.ledger.as_json(),
                "mode": self.settings.training.mode,
            },
        }
        return Snapshot(slot.store.serialize(state), fields, {key: offset})

    def _checkpoint_now(
        self, slot: PartitionSlot, reason: str, before_commit: str | None = None
    ) -> bool:
        """Checkpoint ``slot`` synchronously and commit its offset synchronously (a slot
        that never read a record has nothing to write: its in-flight write is collected)."""
        return self._finish_checkpoint(slot, self._begin_checkpoint(slot, reason), before_commit)

    def _begin_checkpoint(self, slot: PartitionSlot, reason: str) -> Begun | bool:
        """The first half of :meth:`_checkpoint_now`: the write started (serialized on this
        thread); True when there is nothing to write, False when it was held back."""
        if slot.key not in slot.state.offsets or not slot.checkpointer.unsaved:
            return True
        return slot.checkpointer.begin(reason) or False

    def _finish_checkpoint(
        self, slot: PartitionSlot, begun: Begun | bool, before_commit: str | None = None
    ) -> bool:
        """The second half: wait for the write and commit it synchronously."""
        if isinstance(begun, Begun):
            return slot.checkpointer.finish(begun, before_commit=before_commit)
        if begun:  # nothing new: the write in flight, if any, and the durable offsets
            slot.checkpointer.wait()
            durable = dict(slot.checkpointer.durable)
            if durable and before_commit is not None:
                self._crash.reached(before_commit)
                self.commits.commit(durable, asynchronous=False)
        return begun

    def _publish_if_due(self, slot: PartitionSlot, now: float) -> None:
        if now < slot.publish_retry_at:
            return
        trigger = slot.publisher.due(slot.state, slot.publish_wanted, now)
        if trigger is None:
            return
        slot.publish_wanted = None
        try:
            self._checkpoint_now(slot, "publish")
            slot.publisher.publish(slot.state, trigger, now)
        except (CheckpointFenced, RegistryFenced) as error:
            self._fence(slot.key, str(error))
        except RegistryUnavailable as error:
            slot.publish_wanted = trigger
            slot.publish_retry_at = now + PUBLISH_RETRY_S
            log.warning(
                "registry unavailable, publish retried later",
                extra={"partition": slot.scope_id, "trigger": trigger, "reason": str(error)},
            )

    def _fence(self, key: TopicPartitionKey, reason: str) -> None:
        """Another member claimed ``key``'s slot: this one is a zombie for it. Drop the slot
        (nothing more written or committed) and pause the partition until Kafka revokes it."""
        slot = self.slots.close(key)
        if slot is not None:
            self._take(slot)
        self._fenced.add(key)
        self._pause(key)
        self._metrics.slots_fenced.inc()
        log.error(
            "partition slot fenced", extra={"partition": partition_key(key), "reason": reason}
        )

    # -- rebalance hooks (called by the Source on the poll thread, inside consume) --------

    def start_offsets(
        self, partitions: Sequence[TopicPartitionKey]
    ) -> dict[TopicPartitionKey, int]:
        """Claim and restore each new partition's slot; it starts at its checkpoint's
        offset (absent: a fresh slot starts at the group's offset, or the log start).
        Several are restored side by side, and without the lock: the learner goes on."""
        self.commits.owned_again(partitions)
        with self._lock:
            for key in partitions:
                self._fenced.discard(key)
            new = [key for key in partitions if key not in self.slots]
        if len(new) > 1:
            with ThreadPoolExecutor(min(len(new), RESTORE_THREADS), "slot-restore") as pool:
                restored = list(pool.map(self._restore, new))
        else:
            restored = [self._restore(key) for key in new]
        opened = [slot for slot in restored if slot is not None]
        with self._lock:
            for slot in opened:
                self.slots.hold(slot)
        return {
            slot.key: slot.checkpoint_offset
            for slot in opened
            if slot.checkpoint_offset is not None
        }

    def _restore(self, key: TopicPartitionKey) -> PartitionSlot | None:
        """``key``'s slot claimed and restored, not held yet; None (and a retry planned)
        when the store cannot give it."""
        self._heartbeat.beat()
        try:
            slot = self.slots.restore(key)
        except (CheckpointError, RegistryUnavailable) as error:
            # Store down or claimed over: the partition is held paused and tried again.
            self._unavailable[key] = self._clock() + RETRY_UNAVAILABLE_S
            log.error(
                "partition slot unavailable; partition paused, claim retried",
                extra={"partition": partition_key(key), "reason": str(error)},
            )
            return None
        self._unavailable.pop(key, None)
        return slot

    def on_assigned(self, partitions: Sequence[TopicPartitionKey]) -> None:
        """Start each slot's ledger where the consumer really starts; commit a checkpoint
        the group is behind; hold partitions without a slot paused."""
        self._metrics.rebalances.labels(kind="assign").inc()
        self._metrics.assigned_partitions.set(len(self.source.owned))
        # First: the commits below are made as the owner.
        log.info(
            "partitions assigned", extra={"partitions": [partition_key(k) for k in partitions]}
        )
        with self._lock:
            for key in partitions:
                slot = self.slots.get(key)
                if slot is None:
                    self.source.pause([key])
                    continue
                start = self.source.start_positions.get(key)
                if start is not None:
                    slot.state.offsets[key] = start
                    slot.checkpointer.resumed({key: start})

    def on_revoked(self, partitions: Sequence[TopicPartitionKey]) -> None:
        """Finish the unit being learnt, checkpoint them, commit synchronously, let them
        go. The other partitions are not touched: the learner goes on with them while the
        revoked ones are written side by side."""
        self._metrics.rebalances.labels(kind="revoke").inc()
        self._crash.reached("in_revoke")
        released = self._detach(partitions)
        begun: list[tuple[PartitionSlot, Begun | bool]] = []
        for slot in released:
            try:
                begun.append((slot, self._begin_checkpoint(slot, "revoke")))
            except CheckpointFenced as error:
                self._count_fenced(slot, error)
                self.slots.release(slot)
        for slot, started in begun:
            try:
                if not self._finish_checkpoint(slot, started, before_commit="mid_handover"):
                    log.warning(
                        "revoked partition's checkpoint failed; its next owner learns again "
                        "from the previous one",
                        extra={"partition": slot.scope_id},
                    )
            except CheckpointFenced as error:
                self._count_fenced(slot, error)
            finally:
                self.slots.release(slot)
        self._metrics.assigned_partitions.set(len(self.source.owned - set(partitions)))
        with self._lock:
            self._report_slots()
        # Logged once they are checkpointed and committed: given up from here on.
        log.info("partitions revoked", extra={"partitions": [partition_key(k) for k in partitions]})

    def _detach(self, partitions: Sequence[TopicPartitionKey]) -> list[PartitionSlot]:
        """Take ``partitions``' slots from the learner (after the unit it is learning, if
        it is one of theirs), their pending records dropped: the caller writes or forgets,
        then releases them."""
        detached = []
        moving = set(partitions)
        with self._turn:
            self._turn.wait_for(lambda: self._learning not in moving)
            self.commits.drop(partitions)
            for key in partitions:
                self._unavailable.pop(key, None)
                self._fenced.discard(key)
                slot = self.slots.detach(key)
                if slot is not None:
                    self._take(slot)
                    detached.append(slot)
            self._turn.notify_all()
        return detached

    def _count_fenced(self, slot: PartitionSlot, error: CheckpointFenced) -> None:
        """A slot being given up (revoke, stop) was claimed over: nothing of it was
        committed; counted and logged."""
        self._metrics.slots_fenced.inc()
        log.error("partition slot fenced", extra={"partition": slot.scope_id, "reason": str(error)})

    def on_lost(self, partitions: Sequence[TopicPartitionKey]) -> None:
        """Drop them: nothing written, nothing committed, nothing else touched."""
        self._metrics.rebalances.labels(kind="lost").inc()
        for slot in self._detach(partitions):
            try:
                slot.checkpointer.forget()  # a write in flight may land; never committed
            except CheckpointFenced:
                pass  # it was claimed over: lost anyway
            finally:
                self.slots.release(slot)
        self._metrics.assigned_partitions.set(len(self.source.owned))
        with self._lock:
            self._report_slots()
        log.warning("partitions lost", extra={"partitions": [partition_key(k) for k in partitions]})

    def on_kafka_error(self, error: KafkaError) -> None:
        """Count client errors by code; transient ones never stop the loop."""
        self._metrics.kafka_errors.labels(code=error.name()).inc()

    def _retry_unavailable(self, now: float) -> None:
        """Claim again the slots the store could not give at assign; on success seek the
        partition to the slot's offset, apply the start rule as :meth:`on_assigned` does
        (a checkpoint the group is behind is committed at once) and resume it."""
        for key, at in list(self._unavailable.items()):
            if now < at or key not in self.source.owned:
                continue
            slot = self._restore(key)
            if slot is None:
                continue
            offset = slot.checkpoint_offset
            if offset is None:
                offset = self.source.start_positions.get(key)
            with self._lock:
                self.slots.hold(slot)
                if offset is not None:
                    slot.state.offsets[key] = offset
                    slot.checkpointer.resumed({key: offset})
            if offset is not None:
                self.source.seek(key, offset)
            self.source.resume([key])
            log.info("partition slot claimed after a retry", extra={"partition": slot.scope_id})

    def _report_slots(self) -> None:
        g = self._metrics.slots
        g.labels(state="training").set(len(self.slots.slots))
        g.labels(state="unavailable").set(len(self._unavailable))
        g.labels(state="fenced").set(len(self._fenced))
        # Derived from the slots held, so a halted partition that moves away stops counting.
        self._metrics.partitions_halted.set(
            sum(slot.key in slot.state.halted for slot in self.slots.slots.values())
        )

    # -- stop ------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        """Learn what was consumed, checkpoint and commit every slot, close the consumer."""
        self._metrics.state.state("stopping")
        log.info("stopping: learning what was consumed, checkpointing every partition")
        self.commits.flush()
        for key in list(self.slots.slots):
            slot = self.slots.slots[key]
            try:
                self._flush(slot)
                self._checkpoint_now(slot, "shutdown")
            except RegistryWaitInterrupted:
                log.warning("stopped while waiting for the schema registry; unit left unread")
            except CheckpointFenced as error:
                self._count_fenced(slot, error)
            self.slots.close(key)
        closed = self.source.close(timeout_s=max(1.0, self.settings.shutdown.timeout_s / 3))
        log.info("stopped", extra={"consumer_closed": closed})
