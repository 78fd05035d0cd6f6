"""The poll loop: consume, decode, dead-letter, train, checkpoint, publish, commit.

Everything that mutates the training state runs on this one thread. The order of the
guarantees in DESIGN.md is kept here: dead letters are flushed before a checkpoint; a
checkpoint is durable before a version is published; offsets are committed only after the
checkpoint holding them is durable, and only for partitions this member owns.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from confluent_kafka import KafkaError

from stream_trainer.config import Settings
from stream_trainer.ingest.deadletter import DeadLetterPublisher
from stream_trainer.ingest.decode_worker import InlineDecoder, UnitDecoder
from stream_trainer.ingest.records import DecodedBatch, RecordDecoder
from stream_trainer.ingest.source import Record, Source
from stream_trainer.ingest.wire import (
    RegistryWaitInterrupted,
    SchemaRegistryUnavailable,
    WireDecoder,
)
from stream_trainer.operations.cadence import Cadence
from stream_trainer.operations.control import Ack, ControlChannel, Incoming, Outcome
from stream_trainer.operations.faults import NO_CRASHES, CrashPoints
from stream_trainer.operations.http import Heartbeat
from stream_trainer.operations.metrics import Metrics
from stream_trainer.operations.unit_dead_letters import dead_letter_unit
from stream_trainer.publishing.publisher import ModelPublisher
from stream_trainer.publishing.registry import RegistryUnavailable
from stream_trainer.state.checkpoint import BackgroundWriter, CheckpointFenced, CheckpointWriter
from stream_trainer.state.checkpointer import Checkpointer, Snapshot
from stream_trainer.state.kafka_lease import KafkaLease
from stream_trainer.state.ledger import TopicPartitionKey, partition_key
from stream_trainer.state.store_lease import LeaseKeeper, LeaseLost
from stream_trainer.state.training_state import TrainingState
from stream_trainer.training.trainers import FullBatchTrainer, Trainer, UnitResult

log = logging.getLogger(__name__)

# Pause before a publish is tried again after the registry's store failed.
PUBLISH_RETRY_S = 5.0

# The prequential gauges (window metrics re-read the whole window: ~3 % of a mini-batch
# unit when set per unit) are set at most this often while busy, and whenever idle.
PREQUENTIAL_REFRESH_S = 1.0


@dataclass
class _PendingUnit:
    """Messages consumed but not yet trained on (a mini-batch filling up)."""

    messages: list[Record] = field(default_factory=list)
    started: float = 0.0

    def add(self, messages: Sequence[Record], now: float) -> None:
        if not self.messages:
            self.started = now
        self.messages.extend(messages)

    def take(self) -> list[Record]:
        messages, self.messages = self.messages, []
        return messages


def _group_by_partition(batch: DecodedBatch) -> dict[TopicPartitionKey, np.ndarray]:
    """Message indexes per partition, in consumption (offset) order; vectorised."""
    topics, partitions = batch.message_topics, batch.message_partitions
    if not topics:
        return {}
    if topics.count(topics[0]) == len(topics):  # the usual case: one input topic
        return {(topics[0], int(p)): np.flatnonzero(partitions == p) for p in np.unique(partitions)}
    groups: dict[TopicPartitionKey, list[int]] = {}
    for index, key in enumerate(zip(topics, partitions.tolist(), strict=True)):
        groups.setdefault(key, []).append(index)
    return {key: np.asarray(indexes) for key, indexes in groups.items()}


class Service:
    """Trains ``state`` on the configured topics until :meth:`request_stop` is called.

    Built by the composition root (:mod:`stream_trainer.operations.app`); every collaborator is
    injected. ``run`` returns the process exit code.
    """

    def __init__(
        self,
        settings: Settings,
        state: TrainingState,
        make_source: Callable[[Service], Source],
        decoder: RecordDecoder,
        trainer: Trainer,
        store: CheckpointWriter,
        dead_letters: DeadLetterPublisher,
        publisher: ModelPublisher,
        metrics: Metrics,
        heartbeat: Heartbeat,
        control: ControlChannel | None = None,
        unit_decoder: UnitDecoder | None = None,
        reload_state: Callable[[], TrainingState] | None = None,
        crash: CrashPoints = NO_CRASHES,
        clock: Callable[[], float] = time.monotonic,
        lease: KafkaLease | None = None,
        wire: WireDecoder | None = None,
        store_leases: LeaseKeeper | None = None,
    ) -> None:
        self.settings = settings
        self._wire = wire  # Avro / JSON Schema: the schemas the decoder reads values with
        self._lease = lease
        self._store_leases = store_leases
        self.state = state
        self._decoder = decoder
        # Decodes the next unit (possibly in a worker process) while this one is learnt.
        self._unit_decoder = unit_decoder if unit_decoder is not None else InlineDecoder(decoder)
        self._decoding: list[Record] | None = None  # the unit in the unit decoder
        self._trainer = trainer
        self._store = store
        self._dlq = dead_letters
        self._publisher = publisher
        self._metrics = metrics
        self._heartbeat = heartbeat
        self._control = control
        self._reload_state = reload_state
        self._crash = crash
        self._clock = clock
        self._stop = threading.Event()
        self._pending = _PendingUnit()
        now = clock()
        # Every checkpoint and every commit: it counts records processed (dead-lettered
        # included, a checkpoint also moves their offsets); the restored state's offsets
        # are the durable ones.
        self._checkpointer = Checkpointer(
            store,
            self._snapshot,
            lambda: self.source,
            Cadence(
                settings.checkpoint.every_records, settings.checkpoint.every_seconds, since=now
            ),
            metrics,
            durable=state.offsets,
            clock=clock,
            crash=crash,
        )
        self._publish_wanted: str | None = None
        self._publish_retry_at = 0.0
        self._mode = settings.training.mode
        self._batch_target = settings.training.mini_batch.size if self._mode == "mini_batch" else 0
        self._drifts_reported = state.drift_detections
        self._prequential_stale = True  # the restored state's scores are not shown yet
        self._prequential_at = -math.inf
        self.restored = False
        self._record_control_offsets()
        self._install_cadences(now)
        self.source = make_source(self)

    @property
    def _writer(self) -> BackgroundWriter:
        """The checkpointer's background writer (a test freezes a kill -9 by closing it)."""
        return self._checkpointer.writer

    def _install_cadences(self, now: float) -> None:
        """Start the publish and retrain periods at ``now`` (this install or a reload) with
        the counts the state carries: a restored state does not fire the instant it lands."""
        self._publisher.install(self.state, now)
        if isinstance(self._trainer, FullBatchTrainer):
            self._trainer.install(self.state, now)

    @property
    def _manual_pause(self) -> bool:
        """``control pause`` is in force (checkpointed: it outlasts a restart)."""
        return self.state.paused

    def _record_control_offsets(self) -> None:
        """Copy the control channel's read positions into the state (checkpointed)."""
        control = self._control
        if (
            control is not None
            and control.connected
            and control.positions
            and self.state.control_offsets != control.positions
        ):
            self.state.control_offsets = dict(control.positions)

    # -- lifecycle -------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask the loop to drain, checkpoint, commit and return (thread- and signal-safe)."""
        self._stop.set()

    def ready(self) -> tuple[bool, str]:
        """Readiness: restored and owning partitions, not stopping."""
        if self._stop.is_set():
            return False, "stopping"
        if not self.restored:
            return False, "restoring state"
        if not self.source.owned:
            return False, "no partitions assigned yet"
        return True, "ok"

    def run(self) -> int:
        """The poll loop. Returns 0 after a graceful stop."""
        if self._control is not None:
            self._send_owed_acks()  # a crash came between a command's checkpoint and its ack
            # Commands queued while no service ran act before any record is learnt (a
            # queued pause means no training at all).
            self._commands(self._control.catch_up(self.settings.kafka.consume_timeout_s + 10.0))
        self.restored = True
        self._report_selection()  # a restored selection is visible before the first unit
        self._metrics.state.state("paused" if self._manual_pause else "running")
        while not self._stop.is_set():
            try:
                self.step()
            except RegistryWaitInterrupted:
                break  # a stop ended the wait; the waiting unit is not learnt
        self._shutdown()
        return 0

    def step(self) -> None:
        """One loop iteration: never blocks longer than the consume timeout plus one unit."""
        now = self._clock()
        self._heartbeat.beat()
        cfg = self.settings.kafka
        want = cfg.consume_batch_size
        if self._batch_target:
            want = max(1, self._batch_target - len(self._pending.messages))
        messages = self.source.consume(want, cfg.consume_timeout_s)
        if self._lease is not None:
            # Serves the lease group only. Losing the lease (a broker outage longer than the
            # session) stops nothing: the claim on the lease topic keeps any other model
            # off this group, and the lease comes back when the broker does.
            self._lease.poll(0.0)
        if self._store_leases is not None:
            try:
                self._store_leases.tick()
            except LeaseLost as error:
                # Another member writes this model now: stop, committing nothing.
                raise CheckpointFenced(str(error)) from None
        if self._control is not None:
            self._commands(self._control.poll())
        if messages:
            self._metrics.records_consumed.inc(len(messages))
            self._pending.add(messages, now)
        if self._unit_ready(now):
            self._advance(self._pending.take())
        elif not messages and self._decoding is not None:
            self._drain_decoding()  # idle: do not hold a decoded unit back
        if not messages:
            self._refresh_prequential()  # idle: the gauges show the last unit
        if isinstance(self._trainer, FullBatchTrainer):
            outcome = self._trainer.poll_retrain(self.state, now)
            if not self._manual_pause:
                self._metrics.state.state("retraining" if self._trainer.retraining else "running")
            if outcome is not None:
                self._metrics.retrains.labels(trigger=outcome.trigger).inc()
                self._metrics.retrain_duration.observe(outcome.duration_s)
                if outcome.search is not None:
                    self._record_search(outcome.search)
                if outcome.accepted:
                    if self.settings.registry.publish_after_retrain:
                        self._publish_wanted = "retrain"
                else:
                    self._publisher.record_rejection(self.state, outcome)
        self._checkpointer.tick(now)
        trigger = (
            self._publisher.due(self.state, self._publish_wanted, now)
            if now >= self._publish_retry_at
            else None
        )
        if trigger is not None:
            self._publish_wanted = None
            self.checkpoint_now("publish")
            try:
                self._publisher.publish(self.state, trigger, now)
            except RegistryUnavailable as error:
                # An object store outage: training goes on, checkpoints are local, and the
                # same trigger is tried again after a pause (the store's own timeout bounds
                # each try). Anything else from the registry (fencing) still stops us.
                self._publish_wanted = trigger
                self._publish_retry_at = now + PUBLISH_RETRY_S
                log.warning(
                    "registry unavailable, publish retried later",
                    extra={"trigger": trigger, "retry_in_s": PUBLISH_RETRY_S, "reason": str(error)},
                )
            self._update_model_metrics()

    # -- units -----------------------------------------------------------------------------

    def _unit_ready(self, now: float) -> bool:
        if not self._pending.messages:
            return False
        if not self._batch_target:
            return True
        return (
            len(self._pending.messages) >= self._batch_target
            or now - self._pending.started >= self.settings.training.mini_batch.max_wait_s
        )

    def _advance(self, unit: list[Record]) -> None:
        """Hand ``unit`` to the decoder, then train on the unit decoded before it (if any):
        the two overlap when the decoder is a worker process."""
        self._ensure_schemas(unit)  # first: an interrupted wait leaves the decoder as it was
        previous = self._decoding
        batch = self._decoded() if previous is not None else None
        self._unit_decoder.submit(unit)
        self._decoding = unit
        if previous is not None:
            self._process(previous, batch)
            self._crash.reached("after_learn")

    def _drain_decoding(self) -> None:
        """Train on the unit in the decoder, if any (before commands, revokes and stops)."""
        unit = self._decoding
        if unit is None:
            return
        self._decoding = None
        self._process(unit, self._decoded())
        self._crash.reached("after_learn")

    def _ensure_schemas(self, unit: list[Record]) -> None:
        """Fetch the schemas of ``unit``'s new schema ids before it is decoded. While the
        registry is unreachable, slow or failing this waits and retries (counted, logged
        once per outage; the heartbeat keeps beating): a dependency that blinked must not
        dead-letter good records. A stop request ends the wait (RegistryWaitInterrupted):
        the unit is then neither learnt nor committed."""
        wire = self._wire
        if wire is None:
            return
        ids = wire.schema_ids([message.value() for message in unit])
        if all(wire.known(i) for i in ids):
            return
        started = time.perf_counter()
        retries = 0

        def on_retry(error: SchemaRegistryUnavailable) -> None:
            nonlocal retries
            retries += 1
            self._metrics.schema_registry_retries.inc()
            self._heartbeat.beat()
            if retries == 1:
                log.warning(
                    "schema registry unavailable; records wait for it",
                    extra={"schema_ids": sorted(ids), "error": str(error)},
                )

        def should_stop() -> bool:
            self._heartbeat.beat()
            return self._stop.is_set()

        wire.ensure(ids, should_stop=should_stop, on_retry=on_retry)
        waited = time.perf_counter() - started
        self._metrics.schema_registry_wait.observe(waited)
        if retries:
            log.info(
                "schema registry answered",
                extra={"retries": retries, "waited_s": round(waited, 3)},
            )

    def _decoded(self) -> DecodedBatch:
        started = time.perf_counter()
        batch = self._unit_decoder.result()
        self._metrics.decode_wait.observe(time.perf_counter() - started)
        return batch

    def _process(self, messages: list[Record], batch: DecodedBatch | None = None) -> None:
        """Dead-letter, train and account for one unit of messages (decoded here unless
        ``batch`` is its decoding already)."""
        state = self.state
        records = messages
        if batch is None:
            try:
                self._ensure_schemas(messages)
            except RegistryWaitInterrupted:
                # Stopping: the unit is neither learnt nor committed, so it is read again.
                log.warning("stopped while waiting for the schema registry; unit left unread")
                return
            batch = self._decoder.decode(records)
        by_partition = _group_by_partition(batch)
        if self._trip_breaker(batch, by_partition):
            # Stop the flood here: the halted partitions' records in this unit are neither
            # learnt nor dead-lettered, and their offsets do not advance past them.
            records = [
                records[i]
                for i, key in enumerate(
                    zip(batch.message_topics, batch.message_partitions.tolist(), strict=True)
                )
                if key not in state.halted
            ]
            batch = self._decoder.decode(records)
            by_partition = _group_by_partition(batch)

        result = self._trainer.learn(state, batch)
        dead_letter_unit(self._dlq, self._metrics, state, records, batch, result.refused)
        offsets = batch.message_offsets
        for key, indexes in by_partition.items():
            last = int(offsets[indexes[-1]])
            start = state.offsets.get(key, int(offsets[indexes[0]]))
            state.ledger.add(key, start, last + 1)
            state.offsets[key] = last + 1
        self._publisher.observe(state, result.learnt)
        self._checkpointer.observe(len(records))
        self._report_unit(len(records), result)

    def _trip_breaker(
        self, batch: DecodedBatch, by_partition: dict[TopicPartitionKey, np.ndarray]
    ) -> bool:
        """Feed the bad-record breaker; pause partitions it halts. True if any is halted."""
        state = self.state
        valid = np.zeros(len(batch.message_offsets), dtype=bool)
        valid[batch.valid_index] = True
        for key, indexes in by_partition.items():
            if key in state.halted:
                continue
            reason = state.breaker.observe(key, valid[indexes])
            if reason is not None:
                state.halted[key] = reason
                self.source.pause([key])
                log.error(
                    "partition halted by the bad-record breaker",
                    extra={
                        "partition": partition_key(key),
                        "reason": reason,
                        "offset": int(batch.message_offsets[indexes[0]]),
                    },
                )
        self._metrics.partitions_halted.set(len(state.halted))
        return any(key in state.halted for key in by_partition)

    def _report_unit(self, consumed: int, result: UnitResult) -> None:
        """Per-unit metric updates (never per record)."""
        state, m = self.state, self._metrics
        m.records_learnt.inc(result.learnt)
        m.records_unscored.inc(result.unscored)
        m.batches.inc()
        m.batch_size.observe(consumed)
        if result.learn_seconds:
            m.learn_duration.observe(result.learn_seconds)
        if result.predict_seconds:
            m.predict_duration.observe(result.predict_seconds)
        new_drifts = state.drift_detections - self._drifts_reported
        if new_drifts > 0:
            m.drift_detections.inc(new_drifts)
        self._drifts_reported = state.drift_detections
        self._prequential_stale = True
        if self._clock() - self._prequential_at >= PREQUENTIAL_REFRESH_S:
            self._refresh_prequential()

    def _report_selection(self) -> None:
        """Online selection gauges: live candidates, leader, scores, CPU seconds."""
        selection = self.state.selection
        if selection is None:
            return
        m = self._metrics
        m.selection_live.set(len(selection.live))
        leader = selection.leader
        for candidate in selection.candidates:
            m.selection_leader.labels(candidate=candidate.name).set(candidate is leader)
            m.selection_score.labels(candidate=candidate.name).set(candidate.score())
            m.selection_cpu.labels(candidate=candidate.name).set(candidate.cpu_seconds)

    def _refresh_prequential(self) -> None:
        """Set the prequential gauges if a unit was scored since they were last set."""
        if not self._prequential_stale:
            return
        evaluator = self.state.evaluator
        self._metrics.set_prequential(evaluator.window_values(), "window")
        self._metrics.set_prequential(evaluator.total_values(), "total")
        self._report_selection()
        self._prequential_at = self._clock()
        self._prequential_stale = False

    def _flush_pending(self) -> None:
        """Train on everything consumed: the unit in the decoder, then the pending one."""
        self._drain_decoding()
        if self._pending.messages:
            self._process(self._pending.take())

    # -- commands --------------------------------------------------------------------------

    def _commands(self, incoming: list[Incoming]) -> None:
        """Act on ``incoming`` in order, persist the effects with the control offsets past
        them (one synchronous checkpoint), then acknowledge each.

        Effect and offset are checkpointed together, so across a crash a command is either
        in the restored state with its offset, or read and acted on again from the state
        before it. The acks are checkpointed too, as owed until delivered, so one lost to a
        crash after the checkpoint is sent at the next start (an ack may repeat; same id,
        same outcome). A checkpoint that fails is retried with the next one; the acks go
        out regardless.
        """
        if not incoming:
            self._record_control_offsets()  # skipped records (acks, other models) only
            return
        acks: list[Ack] = []
        for item in incoming:
            command = item.command
            self._drain_decoding()  # commands act on a loop with nothing in flight
            if item.stale is not None:
                outcome: Outcome = "refused"
                reason = item.stale
            else:
                outcome, reason = self._command(command.command)
            log.info(
                "control command",
                extra={
                    "command": command.command,
                    "id": command.id,
                    "outcome": outcome,
                    "reason": reason,
                    "offset": command.offset,
                },
            )
            acks.append(
                Ack(
                    command.id,
                    command.model,
                    command.command,
                    outcome,
                    reason,
                    time.time(),
                    command.partition,
                    command.offset,
                )
            )
        self._record_control_offsets()
        self.state.acks_owed = [*(self.state.acks_owed or []), *acks]
        self._crash.reached("after_command")
        if not self.checkpoint_now("control"):
            # Retried when the next periodic checkpoint is due, even with nothing consumed
            # (paused): the commands' effects must reach a checkpoint.
            self._checkpointer.observe(1)
        self._crash.reached("before_ack")
        self._send_owed_acks()

    def _send_owed_acks(self) -> None:
        """Deliver the acks the state owes; they stay owed if the broker does not take them."""
        owed = self.state.acks_owed
        if owed and self._control is not None and self._control.acknowledge(owed):
            self.state.acks_owed = None

    def _command(self, command: str) -> tuple[Outcome, str]:
        """Act on one command; its outcome and why."""
        if command == "retrain":
            if not isinstance(self._trainer, FullBatchTrainer):
                return "refused", (
                    f"retrain needs training.mode full_batch; this model runs {self._mode}"
                )
            self.state.retrain_wanted = "manual"
            return "done", (
                "retrain queued (trigger manual): it starts once the window holds "
                f"{self.settings.training.full_batch.min_records} records and no retrain runs"
            )
        if command == "publish":
            return self._publish_manual()
        if command == "pause":
            already = self.state.paused
            self.state.paused = True
            self.source.pause(sorted(self.source.owned))
            self._metrics.state.state("paused")
            return "done", "already paused" if already else "paused: every partition, until resume"
        # resume
        was_paused, halted = self.state.paused, len(self.state.halted)
        self.state.paused = False
        for key in list(self.state.halted):
            self.state.breaker.reset(key)
            del self.state.halted[key]
            if key in self.source.owned and key in self.state.offsets:
                self.source.seek(key, self.state.offsets[key])
        self.source.resume(sorted(self.source.owned))
        self._metrics.partitions_halted.set(0)
        self._metrics.state.state("running")
        done = "resumed" if was_paused else "was not paused"
        return "done", f"{done}; {halted} halted partition(s) cleared"

    def _publish_manual(self) -> tuple[Outcome, str]:
        """Publish now (checkpoint first, as every publish); the ack says which version.

        Repeated after a crash (the command read again), it is skipped as "nothing learnt
        since" the version the first one published.
        """
        if not self.state.model.is_fitted():
            return "refused", "nothing learnt yet: there is no model to publish"
        self._publish_wanted = None
        self.checkpoint_now("publish")
        info = self._publisher.publish(self.state, "manual", self._clock())
        self._update_model_metrics()
        if info is not None:
            return "done", f"published version {info.version}"
        rejection = self._publisher.last_rejection
        if rejection is not None:
            return "refused", f"the promotion gate rejected the candidate: {rejection}"
        return "done", (
            f"nothing learnt since version {self.state.model_version}; it stays the champion"
        )

    # -- checkpoints -----------------------------------------------------------------------

    def _manifest_fields(self, reason: str) -> dict[str, Any]:
        state = self.state
        return {
            "offsets": {partition_key(k): v for k, v in sorted(state.offsets.items())},
            "model_version": state.model_version,
            "config_hash": self.settings.config_hash(),
            "records_learnt": state.records_learnt,
            "metrics": state.metrics_snapshot(),
            "extra": {
                "reason": reason,
                "records_dead_lettered": state.records_dead_lettered,
                "processed": state.ledger.as_json(),
                "mode": self._mode,
            },
        }

    def _snapshot(self, reason: str) -> Snapshot:
        """The state serialized for the checkpointer, on this thread."""
        # Dead letters must be durable before the offsets that skip their records are.
        self._dlq.flush(self.settings.shutdown.timeout_s)
        payload = self._store.serialize(self.state)
        return Snapshot(payload, self._manifest_fields(reason), dict(self.state.offsets))

    def checkpoint_now(self, reason: str) -> bool:
        """Write a checkpoint synchronously and commit its offsets; False if it failed."""
        return self._checkpointer.now(reason)

    # -- rebalance hooks (called by the Source on the poll thread, inside consume) --------

    def start_offsets(
        self, partitions: Sequence[TopicPartitionKey]
    ) -> dict[TopicPartitionKey, int]:
        """Resume each partition where the checkpointed state stops."""
        return {k: self.state.offsets[k] for k in partitions if k in self.state.offsets}

    def on_assigned(self, partitions: Sequence[TopicPartitionKey]) -> None:
        """Count, and re-pause partitions the breaker halted before a restart."""
        self._metrics.rebalances.labels(kind="assign").inc()
        self._metrics.assigned_partitions.set(len(self.source.owned))
        starts: dict[TopicPartitionKey, int] = {}
        for key in partitions:
            # Where the consumer really starts (the group may be ahead of the checkpoint, or
            # retention may have moved the log start): the ledger's next range starts here,
            # so it never claims records this model did not process.
            start = self.source.start_positions.get(key)
            if start is not None:
                self.state.offsets[key] = start
                starts[key] = start
        # A checkpoint whose asynchronous commit died with the previous process (kill -9)
        # is ahead of the group: commit it now, or lag reads wrong until the next checkpoint.
        self._checkpointer.resumed(starts)
        halted = [k for k in partitions if k in self.state.halted]
        if halted or self._manual_pause:
            self.source.pause(sorted(self.source.owned) if self._manual_pause else halted)
        log.info(
            "partitions assigned", extra={"partitions": [partition_key(k) for k in partitions]}
        )

    def on_revoked(self, partitions: Sequence[TopicPartitionKey]) -> None:
        """Finish the unit in progress, checkpoint and commit before giving them up.

        Only ``partitions`` go (cooperative rebalancing); the one global state is still
        checkpointed whole, which is right for it and commits every owned partition.
        """
        self._metrics.rebalances.labels(kind="revoke").inc()
        self._crash.reached("in_revoke")
        self._flush_pending()
        self.checkpoint_now("revoke")
        self._metrics.assigned_partitions.set(len(self.source.owned - set(partitions)))
        log.info("partitions revoked", extra={"partitions": [partition_key(k) for k in partitions]})

    def on_lost(self, partitions: Sequence[TopicPartitionKey]) -> None:
        """Commit nothing; drop what was learnt since the last checkpoint.

        A lost ends the whole group assignment (classic and KIP-848 protocols alike), so
        the one global state is reloaded; a partition still owned would be moved back to
        the reloaded offsets so the ledger never claims records the state lacks.
        """
        self._metrics.rebalances.labels(kind="lost").inc()
        self._pending.take()
        if self._decoding is not None:  # keep the decoder in step; learn none of it
            self._decoding = None
            self._unit_decoder.result()
        self._checkpointer.forget()  # lost: commit nothing, not even a write that lands
        if self._reload_state is not None:
            self.state = self._reload_state()
            self._checkpointer.restart(self.state.offsets)
            self._install_cadences(self._clock())  # the reloaded state's counts
            if self._control is not None:
                # Commands read since that checkpoint are read (and acted on) again.
                self._control.seek(self.state.control_offsets or self._control.started_at)
                self._record_control_offsets()
            for key in sorted(self.source.owned):
                if key in self.state.offsets:
                    self.source.seek(key, self.state.offsets[key])
        self._metrics.assigned_partitions.set(len(self.source.owned))
        log.warning("partitions lost", extra={"partitions": [partition_key(k) for k in partitions]})

    def on_kafka_error(self, error: KafkaError) -> None:
        """Count client errors by code; transient ones never stop the loop."""
        self._metrics.kafka_errors.labels(code=error.name()).inc()

    # -- stop ------------------------------------------------------------------------------

    def _record_search(self, search: dict[str, Any]) -> None:
        """A finished search's trials, best score and duration (SearchSummary.as_dict)."""
        for state, count in search["counts"].items():
            if count:
                self._metrics.search_trials.labels(state=state).inc(count)
        best = search.get("best")
        if best is not None and best.get("score") is not None:
            self._metrics.search_best_score.set(best["score"])
        self._metrics.search_duration.observe(search["duration_s"])
        peak = search.get("peak_memory_mb")
        if peak is not None:
            self._metrics.search_trial_peak_memory.set(peak * 1024 * 1024)
        log.info(
            "hyperparameter search finished",
            extra={
                "trials": search["counts"],
                "best": None if best is None else best["params"],
                "best_score": None if best is None else best["score"],
                "baseline_score": search.get("baseline_score"),
                "seconds": search["duration_s"],
                "workers": search.get("workers", 1),
                "peak_memory_mb": peak,
            },
        )

    def _update_model_metrics(self) -> None:
        version = self.state.model_version
        if version is not None:
            self._metrics.model_version.set(version)

    def _shutdown(self) -> None:
        """Drain, checkpoint, commit, close. The caller bounds the total time."""
        self._metrics.state.state("stopping")
        log.info("stopping: finishing the unit in progress")
        if isinstance(self._trainer, FullBatchTrainer):
            self._trainer.close()
        self._flush_pending()
        self._refresh_prequential()
        if self._checkpointer.unsaved:
            self.checkpoint_now("shutdown")
        else:
            self._checkpointer.wait()
        self._checkpointer.close(self.settings.shutdown.timeout_s)
        self._unit_decoder.close()
        if self._control is not None:
            self._control.close()
        closed = self.source.close(timeout_s=max(1.0, self.settings.shutdown.timeout_s / 3))
        log.info(
            "stopped",
            extra={"records_learnt": self.state.records_learnt, "consumer_closed": closed},
        )
