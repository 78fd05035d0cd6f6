"""The dead letters of one learnt unit, shared by the global and the partition loops."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from stream_trainer.ingest.deadletter import DeadLetterPublisher
from stream_trainer.ingest.records import DecodedBatch, invalid_from_message
from stream_trainer.ingest.source import Record
from stream_trainer.operations.metrics import Metrics
from stream_trainer.training.trainers import Refusal


class CountsDeadLetters(Protocol):
    """A checkpointed state that counts its dead letters."""

    records_dead_lettered: int


def dead_letter_unit(
    dlq: DeadLetterPublisher,
    metrics: Metrics,
    state: CountsDeadLetters,
    records: Sequence[Record],
    batch: DecodedBatch,
    refused: Sequence[Refusal],
) -> None:
    """Send the unit's invalid records, then those the learner refused, to the dead-letter
    topic (queued: durable once the next checkpoint flushes them), counted in ``state``
    and by reason."""
    invalid = list(batch.invalid)
    invalid.extend(
        invalid_from_message(
            records[r.message_index], "learn", "learner_error", r.error_class, r.message
        )
        for r in refused
    )
    if not invalid:
        return
    dlq.publish(invalid)
    state.records_dead_lettered += len(invalid)
    for record in invalid:
        metrics.records_dead_lettered.labels(reason=record.reason).inc()
