"""Dead letters: rejected records go to a topic with provenance; floods halt a partition.

:class:`DeadLetterPublisher` produces each :class:`~stream_trainer.ingest.records.InvalidRecord`
with
its original bytes (cut to fit the producer's ``message.max.bytes`` when larger) and headers
naming where it came from and why; ``flush`` is the point after which the dead letters are
durable, so offsets may advance past them.
:class:`BadRecordBreaker` trips a partition on K invalid records in a row or on an invalid
ratio over a window, so a broken producer stops the partition instead of draining it into
the dead-letter topic.
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from confluent_kafka import KafkaError, KafkaException

from stream_trainer.config import DeadLetterSettings
from stream_trainer.errors import StreamTrainerError
from stream_trainer.ingest.records import MAX_MESSAGE_CHARS, InvalidRecord

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

# Headers added when a dead letter had to be cut to fit the producer's message.max.bytes.
SIZE_HEADER: Final = "dlq.original.size"
DIGEST_HEADER: Final = "dlq.original.sha256"
TRUNCATED_HEADER: Final = "dlq.truncated"

# librdkafka's default message.max.bytes (the producer's limit on one message).
DEFAULT_MESSAGE_MAX_BYTES: Final = 1_000_000
# Room left for the record and batch framing next to key, value and headers.
_FRAMING_BYTES: Final = 512

# A full local queue is retried after serving delivery reports for this long, this many
# times (about 30 s in all) before the dead letter is held for the next flush.
_BUFFER_FULL_POLL_S: Final = 0.5
_BUFFER_FULL_RETRIES: Final = 60
# Within one flush: send what is held, wait; a refused size is sent again without its value.
_FLUSH_ROUNDS: Final = 3


class DeadLetterError(StreamTrainerError):
    """Dead letters are not all durable: offsets past their records must not advance yet."""


@dataclass(frozen=True, slots=True)
class _Letter:
    """One dead letter as produced (value and key possibly cut), and where it came from."""

    value: bytes | None
    key: bytes | None
    headers: list[tuple[str, bytes]]
    origin: str  # topic[partition]@offset, for error messages

    def smaller(self) -> _Letter:
        """This letter without its value (or, when it has none, without its key), with the
        size headers of the original value unless it was cut already."""
        headers = self.headers
        if not any(name == TRUNCATED_HEADER for name, _ in headers):
            headers = [*headers, *_cut_headers(self.value or b"")]
        if self.value is not None:
            return _Letter(None, self.key, headers, self.origin)
        return _Letter(None, None, headers, self.origin)


def _cut_headers(value: bytes) -> list[tuple[str, bytes]]:
    return [
        (SIZE_HEADER, str(len(value)).encode()),
        (DIGEST_HEADER, hashlib.sha256(value).hexdigest().encode()),
        (TRUNCATED_HEADER, b"true"),
    ]


def _headers_size(headers: list[tuple[str, bytes]]) -> int:
    return sum(len(name) + len(value) + 10 for name, value in headers)  # + varint framing


class DeadLetterPublisher:
    """Produces rejected records to the dead-letter topic with provenance headers.

    Not thread-safe: call ``publish`` and ``flush`` from the thread that owns the producer.

    A value (with its key and headers) larger than the producer's ``message.max.bytes`` is cut
    to a prefix that fits, with headers ``dlq.original.size``, ``dlq.original.sha256`` and
    ``dlq.truncated``; one the broker still refuses as too large is sent again without a
    value. A tombstone stays a tombstone (null value). No dead letter is ever dropped: one
    that cannot be queued or delivered is held and sent again by every ``flush``, which
    raises until all are durable (the caller must not advance offsets meanwhile).
    """

    def __init__(
        self,
        producer: Any,
        topic: str,
        group_id: str,
        service_version: str,
        max_message_bytes: int = DEFAULT_MESSAGE_MAX_BYTES,
        retry_interval_s: float = 5.0,
    ) -> None:
        self._producer = producer
        self._topic = topic
        self._group = group_id.encode("utf-8")
        self._version = service_version.encode("utf-8")
        self._max_message_bytes = max_message_bytes
        self._pending = 0
        self._held: list[_Letter] = []  # not queued, or not delivered: sent again by flush
        self._last_error = ""
        # After a failed flush, the next one fails at once until then: a checkpoint due at
        # every step must not block the poll loop on a dead-letter topic that is down.
        self._retry_interval_s = retry_interval_s
        self._next_attempt = -math.inf

    @property
    def pending(self) -> int:
        """Dead letters produced but not yet acknowledged."""
        return self._pending

    @property
    def held(self) -> int:
        """Dead letters that failed and wait to be sent again by ``flush``."""
        return len(self._held)

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
        """Produce every record asynchronously; one that cannot be queued is held for
        ``flush`` (which then raises until it is durable), never dropped."""
        for record in records:
            self._produce(self._letter(record))

    def _letter(self, record: InvalidRecord) -> _Letter:
        """``record`` as a dead letter that fits ``message.max.bytes`` (value cut if needed)."""
        origin = f"{record.topic}[{record.partition}]@{record.offset}"
        headers = self.headers(record)
        value, key = record.value, record.key
        if value is None:
            return _Letter(None, key, headers, origin)
        room = self._max_message_bytes - _FRAMING_BYTES - len(key or b"") - _headers_size(headers)
        if len(value) <= room:
            return _Letter(value, key, headers, origin)
        cut = _cut_headers(value)
        room -= _headers_size(cut)
        if room < 0:  # the key alone does not fit: keep the provenance, drop key and value
            return _Letter(None, None, [*headers, *cut], origin)
        return _Letter(value[:room], key, [*headers, *cut], origin)

    def _produce(self, letter: _Letter) -> None:
        for _ in range(_BUFFER_FULL_RETRIES + 1):
            try:
                self._producer.produce(
                    self._topic,
                    value=letter.value,
                    key=letter.key,
                    headers=letter.headers,
                    on_delivery=functools.partial(self._on_delivery, letter),
                )
            except BufferError:
                # The local queue is full: serve delivery reports so it drains, then retry.
                self._producer.poll(_BUFFER_FULL_POLL_S)
                continue
            except KafkaException as error:
                self._refused(letter, error.args[0] if error.args else None, str(error))
                return
            self._pending += 1
            self._producer.poll(0)  # serve callbacks of earlier deliveries
            return
        self._hold(letter, "producer queue stayed full")

    def _on_delivery(self, letter: _Letter, error: Any, _message: Any) -> None:
        self._pending -= 1
        if error is not None:
            self._refused(letter, error, str(error))

    def _refused(self, letter: _Letter, error: Any, text: str) -> None:
        """A produce or delivery of ``letter`` failed: hold it (smaller if it was too big)."""
        code = error.code() if isinstance(error, KafkaError) else None
        if code == KafkaError.MSG_SIZE_TOO_LARGE:
            letter = letter.smaller()
        self._hold(letter, text)

    def _hold(self, letter: _Letter, text: str) -> None:
        self._held.append(letter)
        self._last_error = f"{letter.origin}: {text}"

    def flush(self, timeout_s: float) -> None:
        """Send the held dead letters again, then wait until every one is acknowledged.

        Raises DeadLetterError when some are still held or pending after ``timeout_s``:
        offsets must then not advance past their records; the next ``flush`` retries them.
        """
        now = time.monotonic()
        if (self._held or self._pending) and now < self._next_attempt:
            raise DeadLetterError(self._not_durable(f"retried in {self._next_attempt - now:.1f} s"))
        deadline = now + timeout_s
        for _ in range(_FLUSH_ROUNDS):
            held, self._held = self._held, []
            for letter in held:
                self._produce(letter)
            self._producer.flush(max(0.0, deadline - time.monotonic()))
            if not self._held or self._pending or time.monotonic() >= deadline:
                break
        if self._held or self._pending:
            self._next_attempt = time.monotonic() + self._retry_interval_s
            raise DeadLetterError(self._not_durable(f"waited {timeout_s} s"))

    def _not_durable(self, detail: str) -> str:
        return (
            f"dead letters to {self._topic} not durable ({len(self._held)} held for retry, "
            f"{self._pending} unacknowledged; {detail}); last error: {self._last_error or '-'}"
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
