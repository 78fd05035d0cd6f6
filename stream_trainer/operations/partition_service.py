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
- **revoke**: learn what was consumed for it, checkpoint it, commit synchronously, then
  let it go. **lost**: drop it, write and commit nothing. Other partitions are untouched.

Everything that mutates a state runs on this one thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
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
from stream_trainer.state.checkpointer import Snapshot
from stream_trainer.state.ledger import TopicPartitionKey, partition_key
from stream_trainer.state.manager import PartitionSlot, PartitionSlots
from stream_trainer.training.trainers import Trainer, UnitResult

log = logging.getLogger(__name__)

# Pause before a slot the store could not give at assign is claimed again.
RETRY_UNAVAILABLE_S = 5.0
# Pause before a publish is tried again after the registry's store failed.
PUBLISH_RETRY_S = 5.0


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
        # Owned partitions whose slot the store could not give yet: retry time.
        self._unavailable: dict[TopicPartitionKey, float] = {}
        self._fenced: set[TopicPartitionKey] = set()
        self.commits = LoggedCommits(lambda: self.source)
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
            for key, slot in self.slots.slots.items()
            if key in slot.state.offsets
        }

    def run(self) -> int:
        """The poll loop. Returns 0 after a graceful stop."""
        self.started = True
        self._metrics.state.state("running")
        while not self._stop.is_set():
            try:
                self.step()
            except RegistryWaitInterrupted:
                break  # a stop ended the wait; the waiting records are not learnt
        self._shutdown()
        return 0

    def step(self) -> None:
        """One iteration: consume, learn the units that are ready, checkpoint and publish
        the slots that are due, retry slots the store could not give."""
        now = self._clock()
        self._heartbeat.beat()
        cfg = self.settings.kafka
        records = self.source.consume(cfg.consume_batch_size, cfg.consume_timeout_s)
        if records:
            self._metrics.records_consumed.inc(len(records))
            self._distribute(records, now)
        if self._unavailable:
            self._retry_unavailable(now)
        for slot in list(self.slots.slots.values()):
            if self._unit_ready(slot, now):
                self._learn(slot, self._take(slot))
        for key in list(self.slots.slots):
            slot = self.slots.slots[key]
            try:
                slot.checkpointer.tick(now)
            except CheckpointFenced as error:
                self._fence(key, str(error))
                continue
            self._publish_if_due(slot, now)
        self._report_slots()

    # -- units -----------------------------------------------------------------------------

    def _distribute(self, records: Sequence[Record], now: float) -> None:
        """Append each record to its partition's pending unit; records of a partition with
        no slot (claim pending, fenced) are dropped: it is paused and sought back to its
        slot's offset before it is fetched again."""
        for record in records:
            slot = self.slots.get((record.topic(), record.partition()))
            if slot is None:
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
    def _take(slot: PartitionSlot) -> list[Record]:
        records, slot.pending = slot.pending, []
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
            self.source.pause([key])
            self._report_slots()
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
        """Learn everything consumed for ``slot``."""
        self._learn(slot, self._take(slot))

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
        if slot.key not in slot.state.offsets or not slot.checkpointer.unsaved:
            slot.checkpointer.wait()
            durable = dict(slot.checkpointer.durable)
            if durable and before_commit is not None:
                self._crash.reached(before_commit)
                self.commits.commit(durable, asynchronous=False)
            return True
        return slot.checkpointer.now(reason, before_commit=before_commit)

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
            slot.pending.clear()
        self._fenced.add(key)
        self.source.pause([key])
        self._metrics.slots_fenced.inc()
        log.error(
            "partition slot fenced", extra={"partition": partition_key(key), "reason": reason}
        )

    # -- rebalance hooks (called by the Source on the poll thread, inside consume) --------

    def start_offsets(
        self, partitions: Sequence[TopicPartitionKey]
    ) -> dict[TopicPartitionKey, int]:
        """Claim and restore each new partition's slot; it starts at its checkpoint's
        offset (absent: a fresh slot starts at the group's offset, or the log start)."""
        starts: dict[TopicPartitionKey, int] = {}
        for key in partitions:
            self._fenced.discard(key)
            if key in self.slots:
                continue
            slot = self._open(key)
            if slot is not None and slot.checkpoint_offset is not None:
                starts[key] = slot.checkpoint_offset
        return starts

    def _open(self, key: TopicPartitionKey) -> PartitionSlot | None:
        self._heartbeat.beat()
        try:
            slot = self.slots.open(key)
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
        """Learn what was consumed for them, checkpoint them, commit synchronously, let
        them go. The other partitions are not touched."""
        self._metrics.rebalances.labels(kind="revoke").inc()
        self._crash.reached("in_revoke")
        for key in partitions:
            self._unavailable.pop(key, None)
            self._fenced.discard(key)
            slot = self.slots.get(key)
            if slot is None:
                continue
            try:
                self._flush(slot)
                if not self._checkpoint_now(slot, "revoke", before_commit="mid_handover"):
                    log.warning(
                        "revoked partition's checkpoint failed; its next owner learns again "
                        "from the previous one",
                        extra={"partition": slot.scope_id},
                    )
            except CheckpointFenced as error:
                self._metrics.slots_fenced.inc()
                log.error(
                    "partition slot fenced",
                    extra={"partition": slot.scope_id, "reason": str(error)},
                )
            finally:
                self.slots.close(key)
        self._metrics.assigned_partitions.set(len(self.source.owned - set(partitions)))
        self._report_slots()
        # Logged once they are checkpointed and committed: given up from here on.
        log.info("partitions revoked", extra={"partitions": [partition_key(k) for k in partitions]})

    def on_lost(self, partitions: Sequence[TopicPartitionKey]) -> None:
        """Drop them: nothing written, nothing committed, nothing else touched."""
        self._metrics.rebalances.labels(kind="lost").inc()
        for key in partitions:
            self._unavailable.pop(key, None)
            self._fenced.discard(key)
            slot = self.slots.get(key)
            if slot is None:
                continue
            slot.pending.clear()
            try:
                slot.checkpointer.forget()  # a write in flight may land; never committed
            except CheckpointFenced:
                pass  # it was claimed over: lost anyway
            finally:
                self.slots.close(key)
        self._metrics.assigned_partitions.set(len(self.source.owned))
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
            slot = self._open(key)
            if slot is None:
                continue
            offset = slot.checkpoint_offset
            if offset is None:
                offset = self.source.start_positions.get(key)
            if offset is not None:
                self.source.seek(key, offset)
                slot.state.offsets[key] = offset
                slot.checkpointer.resumed({key: offset})
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
        for key in list(self.slots.slots):
            slot = self.slots.slots[key]
            try:
                self._flush(slot)
                self._checkpoint_now(slot, "shutdown")
            except RegistryWaitInterrupted:
                log.warning("stopped while waiting for the schema registry; unit left unread")
            except CheckpointFenced as error:
                self._metrics.slots_fenced.inc()
                log.error(
                    "partition slot fenced",
                    extra={"partition": slot.scope_id, "reason": str(error)},
                )
            self.slots.close(key)
        closed = self.source.close(timeout_s=max(1.0, self.settings.shutdown.timeout_s / 3))
        log.info("stopped", extra={"consumer_closed": closed})
