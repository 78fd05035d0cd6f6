"""When checkpoints are written and which offsets are committed: one place for both.

The :class:`Checkpointer` owns the background writer, the write in flight, the offsets of
the newest durable checkpoint and every call to ``Source.commit``. Its one contract: an
offset is committed only when it belongs to a checkpoint this member has just written
successfully, or to the checkpoint it restored (:meth:`Checkpointer.resumed`). Everything
runs on the poll thread except the write itself (the writer's worker thread).

The state it checkpoints is the caller's: ``snapshot(reason)`` serializes it on the poll
thread (dead letters flushed first) and says which offsets the checkpoint holds. Today one
state is checkpointed as a whole; the methods take no ``slots`` yet, and a later
``slots`` argument (``now(reason, slots)``, ``forget(slots)``) narrows what they touch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaException

from stream_trainer.ingest.deadletter import DeadLetterError
from stream_trainer.ingest.source import Source
from stream_trainer.operations.cadence import Cadence
from stream_trainer.operations.faults import NO_CRASHES, CrashPoints
from stream_trainer.operations.memory import release_free_memory
from stream_trainer.operations.metrics import Metrics
from stream_trainer.state.checkpoint import (
    BackgroundWriter,
    CheckpointError,
    CheckpointFenced,
    CheckpointWriter,
    WriteResult,
)
from stream_trainer.state.ledger import TopicPartitionKey

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    """A state serialized on the poll thread: what to write and the offsets it holds."""

    payload: bytes
    fields: dict[str, Any]  # the manifest fields (CheckpointWriter.write)
    offsets: dict[TopicPartitionKey, int]


@dataclass
class _InFlight:
    """An asynchronous checkpoint write and the offsets it will make committable."""

    future: Future[WriteResult[Any]]
    offsets: dict[TopicPartitionKey, int]
    started: float


@dataclass(frozen=True)
class Begun:
    """A synchronous checkpoint whose write was started (:meth:`Checkpointer.begin`)."""

    flight: _InFlight
    reason: str


class Checkpointer:
    """Checkpoints ``snapshot(reason)`` into ``store`` and commits the offsets it holds.

    ``cadence`` counts the records processed since the last checkpoint started (the caller
    :meth:`observe` s them); ``durable`` are the restored checkpoint's offsets. ``source``
    is read at each commit (the source is built after its listener, the service).
    ``snapshot`` may raise DeadLetterError: the checkpoint is then held back (counted as a
    failure) and tried again one period later. CheckpointFenced (another member writes this
    model) propagates from :meth:`tick`, :meth:`now` and :meth:`forget`, committing nothing.
    """

    def __init__(
        self,
        store: CheckpointWriter,
        snapshot: Callable[[str], Snapshot],
        source: Callable[[], Source],
        cadence: Cadence,
        metrics: Metrics,
        durable: Mapping[TopicPartitionKey, int],
        clock: Callable[[], float],
        crash: CrashPoints = NO_CRASHES,
    ) -> None:
        self._store = store
        self._writer = BackgroundWriter(store)
        self._snapshot = snapshot
        self._source = source
        self._cadence = cadence
        self._metrics = metrics
        self._clock = clock
        self._crash = crash
        self._in_flight: _InFlight | None = None
        # Offsets of the newest durable checkpoint (the restored state's at start): the only
        # positions that may be committed outside a checkpoint just written.
        self._durable: dict[TopicPartitionKey, int] = dict(durable)

    # -- what the loop reads ---------------------------------------------------------------

    @property
    def writer(self) -> BackgroundWriter:
        """The background writer (a test closes it to freeze a simulated kill -9)."""
        return self._writer

    @property
    def durable(self) -> Mapping[TopicPartitionKey, int]:
        """Offsets of the newest durable checkpoint this member knows of."""
        return self._durable

    @property
    def in_flight(self) -> bool:
        """A background write was started and not collected yet."""
        return self._in_flight is not None

    @property
    def unsaved(self) -> bool:
        """Records were processed since the last checkpoint started, or one is in flight:
        a stop must checkpoint."""
        return bool(self._cadence.count) or self._in_flight is not None

    def observe(self, records: int) -> None:
        """``records`` more processed (dead-lettered included): they move offsets too."""
        self._cadence.observe(records)

    # -- the four entry points -------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Collect a finished background write (commit its offsets asynchronously); then
        start one if the cadence is due and none is in flight."""
        self._collect(wait=False)
        if self._in_flight is None and self._cadence.due(now):
            self._start(now)

    def now(self, reason: str, before_commit: str | None = None) -> bool:
        """Write a checkpoint synchronously (after the one in flight, collected and
        committed) and commit its offsets synchronously; False if it failed (counted).
        ``before_commit``: a crash point reached between the write and the commit (the
        hand-over's ``mid_handover``)."""
        begun = self.begin(reason, background=False)
        return begun is not None and self.finish(begun, before_commit)

    def begin(self, reason: str, *, background: bool = True) -> Begun | None:
        """The first half of :meth:`now`: collect the write in flight, serialize on this
        thread and start writing (on the writer's thread; ``background=False``: here, done
        when this returns). None if the snapshot was held back (counted). Several
        checkpointers' writes run side by side this way (a revoke of many partitions);
        :meth:`finish` each one, and call nothing else on it in between."""
        self._collect(wait=True)
        started = self._clock()
        try:
            snap = self._snapshot(reason)
        except DeadLetterError as error:
            self._dead_letters_not_durable(error, started)
            return None
        future: Future[WriteResult[Any]] | None
        if background:
            future = self._writer.submit(snap.payload, snap.fields)
            if future is None:  # cannot happen after the collect above: the writer is idle
                raise RuntimeError("checkpoint writer busy after its write was collected")
        else:
            future = Future()
            try:
                future.set_result(self._store.write(snap.payload, snap.fields))
            except CheckpointError as error:  # CheckpointFenced too: finish() sorts them
                future.set_exception(error)
        return Begun(_InFlight(future, snap.offsets, started), reason)

    def finish(self, begun: Begun, before_commit: str | None = None) -> bool:
        """Wait for :meth:`begin`'s write and commit its offsets synchronously; False if
        the write failed (counted). CheckpointFenced propagates, committing nothing."""
        flight = begun.flight
        try:
            result = flight.future.result()
        except CheckpointFenced:
            self._metrics.checkpoint_failures.inc()
            raise  # another member writes this model now: stop, committing nothing
        except CheckpointError as error:
            self._metrics.checkpoint_failures.inc()
            log.error("checkpoint failed", extra={"reason": str(error), "trigger": begun.reason})
            return False
        self._cadence.reset(flight.started)
        self._done(result, flight.offsets, wait_commit=True, before_commit=before_commit)
        return True

    def resumed(self, offsets: Mapping[TopicPartitionKey, int]) -> None:
        """The start rule: of ``offsets`` (where the consumer really starts), commit those
        equal to the durable checkpoint's. A checkpoint whose asynchronous commit died with
        the previous process (kill -9) is ahead of the group: committing it now keeps lag
        right before the next checkpoint. Asynchronous: it never blocks the assign."""
        due = {k: v for k, v in offsets.items() if self._durable.get(k) == v}
        if due:
            self._commit(due, wait=False)

    def forget(self) -> None:
        """The partitions are lost: wait for the write in flight (it may still land: a
        consistent state, and it becomes the durable one) but commit none of its offsets."""
        self._collect(wait=True, commit=False)

    # -- lifecycle -------------------------------------------------------------------------

    def restart(self, durable: Mapping[TopicPartitionKey, int]) -> None:
        """A reloaded state: its checkpoint's offsets are the durable ones. Nothing may be
        in flight (call :meth:`forget` first); the cadence keeps counting."""
        if self._in_flight is not None:
            raise RuntimeError("restart with a checkpoint write in flight")
        self._durable = dict(durable)

    def close(self, timeout_s: float) -> bool:
        """Stop the writer; True when no write is left running (call after the last
        :meth:`now` or :meth:`forget`: nothing is collected or committed here)."""
        return self._writer.close(timeout_s)

    def wait(self) -> None:
        """Collect the write in flight, if any, and commit its offsets (synchronously
        waited for, committed asynchronously as every background write)."""
        self._collect(wait=True)

    # -- internals -------------------------------------------------------------------------

    def _dead_letters_not_durable(self, error: DeadLetterError, now: float) -> None:
        """No checkpoint may cover a record whose dead letter is not durable: this one is
        held back (counted as a failure: alert) and retried, with the dead letters, when due."""
        self._metrics.checkpoint_failures.inc()
        self._cadence.defer(now)
        log.error("dead letters not durable; checkpoint held back", extra={"reason": str(error)})

    def _start(self, now: float) -> None:
        try:
            snap = self._snapshot("periodic")
        except DeadLetterError as error:
            self._dead_letters_not_durable(error, now)
            return
        future = self._writer.submit(snap.payload, snap.fields)
        if future is None:
            return
        self._in_flight = _InFlight(future, snap.offsets, now)
        self._cadence.reset(now)

    def _collect(self, wait: bool, commit: bool = True) -> None:
        flight = self._in_flight
        if flight is None or (not wait and not flight.future.done()):
            return
        self._in_flight = None
        try:
            result = flight.future.result()
        except CheckpointFenced:
            self._metrics.checkpoint_failures.inc()
            raise  # another member writes this model now: stop, committing nothing
        except CheckpointError as error:
            self._metrics.checkpoint_failures.inc()
            self._cadence.observe(1)  # try again at the next due time
            log.error(
                "checkpoint failed; offsets stay at the previous one", extra={"reason": str(error)}
            )
            return
        # Periodic: commit asynchronously, so an unreachable broker never blocks the loop.
        self._done(result, flight.offsets, wait_commit=False, commit=commit)
        release_free_memory()

    def _done(
        self,
        result: WriteResult[Any],
        offsets: Mapping[TopicPartitionKey, int],
        wait_commit: bool,
        commit: bool = True,
        before_commit: str | None = None,
    ) -> None:
        m = self._metrics
        m.checkpoint_duration.observe(result.duration_s)
        m.checkpoint_size.set(result.size_bytes)
        m.checkpoint_last_success.set(time.time())
        self._durable = dict(offsets)
        self._crash.reached("after_checkpoint")
        if before_commit is not None:
            self._crash.reached(before_commit)
        committed = self._commit(offsets, wait=wait_commit) if commit else {}
        log.debug(
            "checkpoint durable", extra={"sequence": result.sequence, "committed": len(committed)}
        )

    def _commit(
        self, offsets: Mapping[TopicPartitionKey, int], wait: bool
    ) -> dict[TopicPartitionKey, int]:
        """Commit durable ``offsets`` of owned partitions; a failure is counted, not raised."""
        try:
            return self._source().commit(offsets, asynchronous=not wait)
        except KafkaException as error:
            # Commits only feed lag monitoring; the checkpoint is already durable. A broker
            # outage must not stop training: the next checkpoint commits again.
            code = error.args[0].name() if error.args else "unknown"
            self._metrics.kafka_errors.labels(code=code).inc()
            log.warning(
                "offset commit failed; the next checkpoint commits again",
                extra={"reason": str(error)},
            )
            return {}
