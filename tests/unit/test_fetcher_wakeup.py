"""KafkaSource wakes librdkafka's fetchers at the end of every assign callback.

librdkafka pauses every assigned partition while a rebalance callback is pending and
applies the resume on its main thread; a broker thread that went idle meanwhile only sees
it after its 1 s wait, so the partitions that did not move stalled ~1 s per rebalance
(docs/performance.md). A request to each leader wakes its thread: these tests pin down
that the callbacks make one, for every owned partition, and that a failed one is harmless.
The effect itself is measured by ``bench --members`` (the unmoved partitions' pause).
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import OFFSET_END, KafkaError, KafkaException, TopicPartition

from stream_trainer.ingest.kafka_source import WAKE_TIMEOUT_S, KafkaSource
from tests.harness import NoCommits


class RecordingConsumer:
    """The calls a rebalance callback makes on the consumer it is given."""

    def __init__(self, fail_wake: bool = False) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail_wake = fail_wake

    def incremental_assign(self, partitions: list[TopicPartition]) -> None:
        self.calls.append(("assign", [(tp.topic, tp.partition) for tp in partitions]))

    def incremental_unassign(self, partitions: list[TopicPartition]) -> None:
        self.calls.append(("unassign", [(tp.topic, tp.partition) for tp in partitions]))

    def committed(self, partitions: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, -1001) for tp in partitions]

    def get_watermark_offsets(
        self, tp: TopicPartition, timeout: float, cached: bool
    ) -> tuple[int, int]:
        return 0, 10

    def offsets_for_times(
        self, partitions: list[TopicPartition], timeout: float
    ) -> list[TopicPartition]:
        asked = sorted((tp.topic, tp.partition, tp.offset) for tp in partitions)
        self.calls.append(("wake", (asked, timeout)))
        if self.fail_wake:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT))
        return partitions


@pytest.fixture
def source() -> Iterator[KafkaSource]:
    # Nothing polls it: the callbacks get the recording consumer. Its connection attempts
    # to the closed port are not logged (log_level 0).
    conf = {"bootstrap.servers": "127.0.0.1:9", "group.id": "wake-test", "log_level": 0}
    source = KafkaSource(conf, ["t"], NoCommits())
    yield source
    source.close(timeout_s=2.0)


def tps(*partitions: int) -> list[TopicPartition]:
    return [TopicPartition("t", p) for p in partitions]


def wakes(consumer: RecordingConsumer) -> list[Any]:
    return [args for name, args in consumer.calls if name == "wake"]


def test_an_assignment_wakes_the_fetchers_of_every_owned_partition_after_assigning(
    source: KafkaSource,
) -> None:
    consumer = RecordingConsumer()
    source._assign(consumer, tps(0, 1))  # type: ignore[arg-type]
    names = [name for name, _ in consumer.calls]
    assert names == ["assign", "wake"], "the wake-up must follow the assign (resume) call"
    assert wakes(consumer) == [([("t", 0, OFFSET_END), ("t", 1, OFFSET_END)], WAKE_TIMEOUT_S)]


def test_the_empty_assign_after_a_revoke_wakes_the_partitions_kept(source: KafkaSource) -> None:
    consumer = RecordingConsumer()
    source._assign(consumer, tps(0, 1, 2, 3))  # type: ignore[arg-type]
    source._revoke(consumer, tps(0, 1))  # type: ignore[arg-type]
    consumer.calls.clear()
    # The cooperative protocol's assign after a revoke (and its second rebalance) names
    # no partition, but librdkafka paused the kept ones for it all the same.
    source._assign(consumer, [])  # type: ignore[arg-type]
    assert consumer.calls[0] == ("assign", [])
    assert wakes(consumer) == [([("t", 2, OFFSET_END), ("t", 3, OFFSET_END)], WAKE_TIMEOUT_S)]


def test_nothing_owned_nothing_asked(source: KafkaSource) -> None:
    consumer = RecordingConsumer()
    source._assign(consumer, [])  # type: ignore[arg-type]
    assert wakes(consumer) == []


def test_a_wake_up_the_broker_does_not_answer_is_harmless(source: KafkaSource) -> None:
    consumer = RecordingConsumer(fail_wake=True)
    source._assign(consumer, tps(0))  # type: ignore[arg-type]
    assert source.owned == {("t", 0)}
    assert len(wakes(consumer)) == 1


def test_a_refused_asynchronous_commit_is_reported_with_its_offsets() -> None:
    """librdkafka's commit answer (served inside consume): what failed goes to the hook,
    so the partition service makes it again; what landed does not."""
    conf = {"bootstrap.servers": "127.0.0.1:9", "group.id": "commit-test", "log_level": 0}
    failed: list[dict[tuple[str, int], int]] = []
    source = KafkaSource(conf, ["t"], NoCommits(), on_commit_failed=failed.append)
    try:
        source._committed(None, [TopicPartition("t", 0, 5)])
        # What librdkafka hands back for a partition it could not commit (the error field
        # of a TopicPartition cannot be set from Python).
        refused: Any = SimpleNamespace(
            topic="t", partition=1, offset=7, error=KafkaError(KafkaError.REBALANCE_IN_PROGRESS)
        )
        source._committed(None, [TopicPartition("t", 0, 6), refused])
        source._committed(KafkaError(KafkaError._TRANSPORT), [TopicPartition("t", 2, 9)])
    finally:
        source.close(5.0)
    assert failed == [{("t", 1): 7}, {("t", 2): 9}]
