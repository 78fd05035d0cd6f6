"""DeadLetterPublisher against a fake producer; BadRecordBreaker trips and pickling."""

from __future__ import annotations

import hashlib
import pickle
from typing import Any

import numpy as np
import pytest
from confluent_kafka import KafkaError

from stream_trainer.config import DeadLetterSettings
from stream_trainer.ingest.deadletter import BadRecordBreaker, DeadLetterError, DeadLetterPublisher
from stream_trainer.ingest.records import InvalidRecord


class FakeProducer:
    """Records produce() calls; delivers on poll/flush; can refuse or fail deliveries."""

    def __init__(self, buffer_full: int = 0, fail: bool = False, hold: bool = False) -> None:
        self.produced: list[dict[str, Any]] = []
        self.queued: list[Any] = []
        self.buffer_full = buffer_full
        self.fail = fail
        self.hold = hold
        self.polls = 0

    def produce(self, topic: str, **kwargs: Any) -> None:
        if self.buffer_full > 0:
            self.buffer_full -= 1
            raise BufferError("Local: Queue full")
        self.produced.append({"topic": topic, **kwargs})
        self.queued.append(kwargs["on_delivery"])

    def _deliver(self) -> None:
        if self.hold:
            return
        for callback in self.queued:
            callback("KafkaError{MSG_TIMED_OUT}" if self.fail else None, object())
        self.queued.clear()

    def poll(self, timeout: float) -> int:
        self.polls += 1
        return 0

    def flush(self, timeout: float) -> int:
        self._deliver()
        return len(self.queued)


def record(offset: int, value: bytes | None = b"{bad", ts: int | None = 1234) -> InvalidRecord:
    return InvalidRecord(
        topic="events",
        partition=2,
        offset=offset,
        timestamp_ms=ts,
        value=value,
        key=b"k",
        stage="validate",
        reason="non_finite",
        error_class="NonFiniteFeature",
        message="feature 'a' is NaN",
    )


def test_publish_sets_value_key_and_provenance_headers() -> None:
    producer = FakeProducer()
    publisher = DeadLetterPublisher(producer, "dlq", "group-1", "1.2.3")
    publisher.publish([record(7), record(8, value=None, ts=None)])
    publisher.flush(1.0)
    assert publisher.pending == 0
    first, second = producer.produced
    assert first["topic"] == "dlq"
    assert (first["value"], first["key"]) == (b"{bad", b"k")
    assert dict(first["headers"]) == {
        "dlq.original.topic": b"events",
        "dlq.original.partition": b"2",
        "dlq.original.offset": b"7",
        "dlq.original.timestamp": b"1234",
        "dlq.consumer.group": b"group-1",
        "dlq.stage": b"validate",
        "dlq.reason": b"non_finite",
        "dlq.error.class": b"NonFiniteFeature",
        "dlq.error.message": b"feature 'a' is NaN",
        "dlq.service.version": b"1.2.3",
    }
    assert second["value"] is None  # a tombstone stays a tombstone
    assert dict(second["headers"])["dlq.original.timestamp"] == b"-1"
    assert dict(second["headers"])["dlq.original.offset"] == b"8"


def test_buffer_full_is_retried_after_polling() -> None:
    producer = FakeProducer(buffer_full=3)
    publisher = DeadLetterPublisher(producer, "dlq", "g", "v")
    publisher.publish([record(1)])
    assert len(producer.produced) == 1
    assert producer.polls >= 3


def test_buffer_full_forever_holds_the_letter_until_a_flush_delivers_it() -> None:
    producer = FakeProducer(buffer_full=10_000)
    publisher = DeadLetterPublisher(producer, "dlq", "g", "v", retry_interval_s=0.0)
    publisher.publish([record(1)])  # no exception: the poll loop goes on
    assert producer.produced == [] and publisher.held == 1
    with pytest.raises(DeadLetterError, match="1 held for retry"):
        publisher.flush(1.0)
    producer.buffer_full = 0
    publisher.flush(1.0)
    assert [p["value"] for p in producer.produced] == [b"{bad"]
    assert publisher.held == 0 and publisher.pending == 0


def test_failed_delivery_is_held_and_sent_again_until_durable() -> None:
    producer = FakeProducer(fail=True)
    publisher = DeadLetterPublisher(producer, "dlq", "g", "v", retry_interval_s=0.0)
    publisher.publish([record(1)])
    with pytest.raises(DeadLetterError, match="MSG_TIMED_OUT"):
        publisher.flush(1.0)
    with pytest.raises(DeadLetterError):
        publisher.flush(1.0)  # still failing: still held, never dropped
    producer.fail = False
    publisher.flush(1.0)
    offsets = [dict(p["headers"])["dlq.original.offset"] for p in producer.produced]
    assert offsets[-1] == b"1" and publisher.held == 0


def test_a_failed_flush_is_not_retried_before_the_interval() -> None:
    producer = FakeProducer(fail=True)
    publisher = DeadLetterPublisher(producer, "dlq", "g", "v", retry_interval_s=3600.0)
    publisher.publish([record(1)])
    with pytest.raises(DeadLetterError):
        publisher.flush(1.0)
    sent = len(producer.produced)
    with pytest.raises(DeadLetterError, match="retried in"):
        publisher.flush(1.0)
    assert len(producer.produced) == sent  # the poll loop was not held up


def test_a_value_over_message_max_bytes_is_cut_to_fit_with_size_and_digest() -> None:
    producer = FakeProducer()
    publisher = DeadLetterPublisher(producer, "dlq", "g", "v", max_message_bytes=10_000)
    big = bytes(range(256)) * 4000  # 1 024 000 bytes
    publisher.publish([record(1, value=big), record(2, value=b"x" * 9000)])
    publisher.flush(1.0)
    cut, kept = producer.produced
    headers = dict(cut["headers"])
    assert big.startswith(cut["value"]) and len(cut["value"]) > 0
    size = len(cut["value"]) + len(cut["key"]) + sum(len(k) + len(v) for k, v in cut["headers"])
    assert size <= 10_000
    assert headers["dlq.original.size"] == b"1024000"
    assert headers["dlq.original.sha256"] == hashlib.sha256(big).hexdigest().encode()
    assert headers["dlq.truncated"] == b"true"
    assert kept["value"] == b"x" * 9000 and "dlq.truncated" not in dict(kept["headers"])


class SizeLimitedProducer(FakeProducer):
    """Accepts the produce, but the broker refuses any value (a topic with a lower limit)."""

    def __init__(self) -> None:
        super().__init__()
        self.values: list[bytes | None] = []

    def _deliver(self) -> None:
        for callback, value in zip(self.queued, self.values, strict=True):
            too_large = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE) if value is not None else None
            callback(too_large, object())
        self.queued.clear()
        self.values.clear()

    def produce(self, topic: str, **kwargs: Any) -> None:
        super().produce(topic, **kwargs)
        self.values.append(kwargs["value"])


def test_a_value_the_broker_refuses_as_too_large_is_sent_again_without_it() -> None:
    producer = SizeLimitedProducer()
    publisher = DeadLetterPublisher(producer, "dlq", "g", "v")
    publisher.publish([record(1, value=b"v" * 5000)])
    publisher.flush(1.0)
    first, second = producer.produced
    assert first["value"] == b"v" * 5000
    assert second["value"] is None and second["key"] == b"k"
    headers = dict(second["headers"])
    assert headers["dlq.original.size"] == b"5000" and headers["dlq.truncated"] == b"true"
    assert headers["dlq.original.offset"] == b"1"


def test_flush_timeout_raises() -> None:
    producer = FakeProducer(hold=True)
    publisher = DeadLetterPublisher(producer, "dlq", "g", "v")
    publisher.publish([record(1), record(2)])
    with pytest.raises(DeadLetterError, match="2 unacknowledged"):
        publisher.flush(0.01)


def settings(k: int = 5, ratio: float = 0.5, window: int = 10) -> DeadLetterSettings:
    return DeadLetterSettings(
        max_consecutive_invalid=k, max_invalid_ratio=ratio, ratio_window=window
    )


TP = ("events", 0)


def test_consecutive_trip_across_batches() -> None:
    breaker = BadRecordBreaker(settings(k=5, ratio=1.0, window=1000))
    assert breaker.observe(TP, [True, False, False, False]) is None
    assert breaker.observe(TP, [False]) is None  # run of 4
    assert breaker.observe(TP, [False, True]) == "consecutive"  # run of 5 mid-batch
    assert breaker.tripped() == {TP: "consecutive"}
    assert breaker.observe(TP, [True] * 10) == "consecutive"  # stays tripped


def test_valid_record_breaks_the_run() -> None:
    breaker = BadRecordBreaker(settings(k=3, ratio=1.0, window=1000))
    assert breaker.observe(TP, [False, False, True, False, False, True]) is None
    assert breaker.observe(TP, np.array([False, False])) is None
    assert breaker.observe(TP, np.array([False])) == "consecutive"


def test_ratio_trip_only_with_a_full_window() -> None:
    breaker = BadRecordBreaker(settings(k=100, ratio=0.5, window=10))
    # 4 invalid of the first 4: far over the ratio, but the window is not full yet.
    assert breaker.observe(TP, [False] * 4) is None
    assert breaker.observe(TP, [True] * 4) is None
    assert breaker.observe(TP, [False]) is None  # 9 seen, 5 invalid
    assert breaker.tripped() == {}
    assert breaker.observe(TP, [False]) == "ratio"  # 10 seen, 6/10 > 0.5
    assert breaker.tripped() == {TP: "ratio"}


def test_no_trip_at_the_threshold_and_partitions_are_independent() -> None:
    breaker = BadRecordBreaker(settings(k=4, ratio=0.6, window=10))
    pattern = np.array([False, True] * 500)  # 50% invalid, runs of 1
    assert breaker.observe(TP, pattern) is None
    assert breaker.observe(("events", 1), [False] * 3) is None
    assert breaker.observe(TP, [False, False]) is None  # last 10: 6/10, not > 0.6; run 2
    assert breaker.observe(("events", 1), [False]) == "consecutive"
    assert breaker.tripped() == {("events", 1): "consecutive"}
    assert breaker.observe(TP, [False]) is None  # still 6/10; run 3
    # Run 4 and 7/10 on the same record: the run is reported.
    assert breaker.observe(TP, [False]) == "consecutive"


def test_reset_clears_trip_and_history() -> None:
    breaker = BadRecordBreaker(settings(k=2, ratio=1.0, window=10))
    assert breaker.observe(TP, [False, False]) == "consecutive"
    breaker.reset(TP)
    assert breaker.tripped() == {}
    assert breaker.observe(TP, [False]) is None  # run starts afresh
    assert breaker.observe(TP, [False]) == "consecutive"


def test_pickle_round_trip_keeps_state() -> None:
    breaker = BadRecordBreaker(settings(k=3, ratio=1.0, window=10))
    breaker.observe(TP, [True, False, False])
    breaker.observe(("other", 1), [False, False, False])
    restored = pickle.loads(pickle.dumps(breaker))
    assert restored.tripped() == {("other", 1): "consecutive"}
    assert restored.observe(TP, [False]) == "consecutive"  # the run of 2 survived


def test_large_batch_matches_reference() -> None:
    rng = np.random.default_rng(3)
    valid = rng.random(5000) > 0.3
    k, window, ratio = 7, 200, 0.45
    expected = None
    run, history = 0, []
    for v in valid.tolist():
        run = 0 if v else run + 1
        history.append(not v)
        if run >= k:
            expected = "consecutive"
            break
        if len(history) >= window and sum(history[-window:]) > ratio * window:
            expected = "ratio"
            break
    breaker = BadRecordBreaker(settings(k=k, ratio=ratio, window=window))
    got = None
    for chunk in np.array_split(valid, 37):
        got = breaker.observe(TP, chunk) or got
    assert got == expected
    assert expected is not None
