"""Dead letters: rejected records go to a topic with provenance; floods halt a partition.

:class:`DeadLetterPublisher` produces each :class:`~stream_trainer.records.InvalidRecord` with
its original bytes and headers naming where it came from and why; ``flush`` is the point
after which the dead letters are durable, so offsets may advance past them.
:class:`BadRecordBreaker` trips a partition on K invalid records in a row or on an invalid
ratio over a window, so a broken producer stops the partition instead of draining it into
the dead-letter topic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from stream_trainer.config import DeadLetterSettings
from stream_trainer.records import MAX_MESSAGE_CHARS, InvalidRecord

TopicPartitionKey = tuple[str, int]

HEADER_NAMES: Final[tuple[str, ...]] = (
    "dlq.original.topic",
    "dlq.original.partition",
    "dlq.original.offset",
    "dlq.original.timestamp",
    "dlq.consumer.group",
    "dlq.stage",
    "dlq.reason",
    "dlq.error.class",
    "dlq.error.message",
    "dlq.service.version",
)

# A full local queue is retried after serving delivery reports for this long, this many
# times (about 30 s in all) before the publisher gives up.
_BUFFER_FULL_POLL_S: Final = 0.5
_BUFFER_FULL_RETRIES: Final = 60


class DeadLetterError(Exception):
    """A dead letter could not be produced or was not durably delivered."""


class DeadLetterPublisher:
    """Produces rejected records to the dead-letter topic with provenance headers.

    Not thread-safe: call ``publish`` and ``flush`` from the thread that owns the producer.
    A delivery failure is sticky: every later ``flush`` raises, because the publisher cannot
    tell which offsets the lost dead letter covered (the service must restart from its
    checkpoint).
    """

    def __init__(self, producer: Any, topic: str, group_id: str, service_version: str) -> None:
        self._producer = producer
        self._topic = topic
        self._group = group_id.encode("utf-8")
        self._version = service_version.encode("utf-8")
        self._pending = 0
        self._failures: list[str] = []

    @property
    def pending(self) -> int:
        """Dead letters produced but not yet acknowledged."""
        return self._pending

    def headers(self, record: InvalidRecord) -> list[tuple[str, bytes]]:
        """The provenance headers of ``record`` (timestamp ``-1`` when unknown)."""
        timestamp = -1 if record.timestamp_ms is None else record.timestamp_ms
        values = (
            record.topic,
            str(record.partition),
            str(record.offset),
            str(timestamp),
            None,
            record.stage,
            record.reason,
            record.error_class,
            record.message[:MAX_MESSAGE_CHARS],
            None,
        )
        out: list[tuple[str, bytes]] = []
        for name, value in zip(HEADER_NAMES, values, strict=True):
            if name == "dlq.consumer.group":
                out.append((name, self._group))
            elif name == "dlq.service.version":
                out.append((name, self._version))
            else:
                out.append((name, str(value).encode("utf-8")))
        return out

    def publish(self, records: Sequence[InvalidRecord]) -> None:
        """Produce every record (asynchronously); raises DeadLetterError if one cannot be queued."""
        for record in records:
            self._produce(record)

    def _produce(self, record: InvalidRecord) -> None:
        value = record.value if record.value is not None else b""
        headers = self.headers(record)
        for _ in range(_BUFFER_FULL_RETRIES + 1):
            try:
                self._producer.produce(
                    self._topic,
                    value=value,
                    key=record.key,
                    headers=headers,
                    on_delivery=self._on_delivery,
                )
            except BufferError:
                # The local queue is full: serve delivery reports so it drains, then retry.
                self._producer.poll(_BUFFER_FULL_POLL_S)
                continue
            except Exception as error:  # KafkaException: e.g. the value is over message.max.bytes
                raise DeadLetterError(
                    f"cannot produce dead letter for {record.topic}[{record.partition}]@"
                    f"{record.offset}: {error}"
                ) from error
            self._pending += 1
            self._producer.poll(0)  # serve callbacks of earlier deliveries
            return
        raise DeadLetterError(
            f"producer queue stayed full; dead letter for {record.topic}[{record.partition}]@"
            f"{record.offset} not queued"
        )

    def _on_delivery(self, error: Any, message: Any) -> None:
        self._pending -= 1
        if error is not None:
            self._failures.append(str(error))

    def flush(self, timeout_s: float) -> None:
        """Wait until every dead letter is acknowledged.

        Raises DeadLetterError when a delivery failed (now or earlier) or some are still
        pending after ``timeout_s``; offsets must then not advance.
        """
        self._producer.flush(timeout_s)
        if self._failures:
            raise DeadLetterError(
                f"{len(self._failures)} dead letter(s) not delivered to {self._topic}: "
                f"{self._failures[0]}"
            )
        if self._pending > 0:
            raise DeadLetterError(
                f"{self._pending} dead letter(s) not acknowledged within {timeout_s} s"
            )


class _PartitionState:
    """Consecutive-invalid run at the end, and the last ``ratio_window`` outcomes."""

    __slots__ = ("run", "window")

    def __init__(self) -> None:
        self.run = 0
        self.window: npt.NDArray[np.bool_] = np.zeros(0, dtype=np.bool_)  # True = invalid


class BadRecordBreaker:
    """Halts a partition on a flood of invalid records: K consecutive, or ratio over a window.

    The ratio is evaluated after every record once the partition has seen at least
    ``ratio_window`` records (a few bad records at the start never trip it). Picklable.
    """

    def __init__(self, settings: DeadLetterSettings) -> None:
        self._max_run = settings.max_consecutive_invalid
        self._window = settings.ratio_window
        # Trip when invalid count in the window exceeds this (ratio strictly greater).
        self._max_ratio = settings.max_invalid_ratio
        self._states: dict[TopicPartitionKey, _PartitionState] = {}
        self._tripped: dict[TopicPartitionKey, str] = {}

    def observe(
        self, partition: TopicPartitionKey, valid: Sequence[bool] | npt.NDArray[np.bool_]
    ) -> str | None:
        """Record outcomes of ``partition``'s records in offset order.

        Returns "consecutive" or "ratio" while the partition is tripped (it stays tripped,
        and ignores further outcomes, until ``reset``), else None.
        """
        if partition in self._tripped:
            return self._tripped[partition]
        invalid = ~np.asarray(valid, dtype=np.bool_).reshape(-1)
        n = invalid.size
        if n == 0:
            return None
        state = self._states.setdefault(partition, _PartitionState())
        positions = np.arange(n)

        # Run length of invalid records ending at each position, carrying the previous run.
        last_valid = np.maximum.accumulate(np.where(invalid, -1 - state.run, positions))
        runs = positions - last_valid
        run_hits = np.flatnonzero(runs >= self._max_run)
        first_run = int(run_hits[0]) if run_hits.size else n

        # Invalid count over the window ending at each position with a full window.
        history = np.concatenate([state.window, invalid])
        sums = np.concatenate([[0], np.cumsum(history, dtype=np.int64)])
        ends = np.arange(max(state.window.size + 1, self._window), history.size + 1)
        counts = sums[ends] - sums[ends - self._window]
        ratio_hits = np.flatnonzero(counts > self._max_ratio * self._window)
        first_ratio = int(ends[ratio_hits[0]] - state.window.size - 1) if ratio_hits.size else n

        state.run = int(runs[-1])
        state.window = history[-self._window :].copy()
        if first_run < n or first_ratio < n:
            reason = "consecutive" if first_run <= first_ratio else "ratio"
            self._tripped[partition] = reason
            return reason
        return None

    def tripped(self) -> dict[TopicPartitionKey, str]:
        """The tripped partitions and why."""
        return dict(self._tripped)

    def reset(self, partition: TopicPartitionKey) -> None:
        """Clear ``partition``'s trip and history (after an operator fixed the producer)."""
        self._tripped.pop(partition, None)
        self._states.pop(partition, None)
