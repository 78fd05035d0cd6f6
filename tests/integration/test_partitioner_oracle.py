"""The broker is the oracle: librdkafka places keyed records, we predict where.

Records are produced with ``partitioner=murmur2`` (the Java client's placement) and
``partitioner=consistent`` (CRC-32) to 6-partition topics, read back, and every key's
partition must be the one :mod:`stream_trainer.publishing.partitioner` computes.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from stream_trainer.publishing.partitioner import (
    crc32_partition,
    key_bytes_from_field,
    murmur2_partition,
    partition_for,
)

pytestmark = pytest.mark.integration

PARTITIONS = 6


def varied_keys() -> list[bytes]:
    """A few hundred keys: empty, 1..7 bytes (every murmur2 tail), ids, unicode, long,
    raw binary, and the field encodings of strings and integers."""
    rng = random.Random(20261205)
    keys = [b"", b"\x00", b"21", b"foobar", b"abc", b"customer-42"]
    keys += [bytes(rng.randrange(256) for _ in range(n)) for n in range(1, 8) for _ in range(5)]
    keys += [f"customer-{i}".encode() for i in range(100)]
    keys += [key_bytes_from_field(i) for i in (0, 1, -1, 7, 2**31, -(2**63), 10**30)]
    keys += [key_bytes_from_field(s) for s in ("zürich", "東京", "🌵 cactus", "Ωmega", "ǅ")]
    keys += [("é" * n).encode() for n in (2, 50)]
    keys += [bytes(rng.randrange(256) for _ in range(rng.randrange(8, 200))) for _ in range(80)]
    keys += [b"x" * 1000, b"long-" * 2000, "ключ-".encode() * 300]
    unique = list(dict.fromkeys(keys))  # short random keys may repeat
    assert len(unique) > 200
    return unique


def produce_and_read_back(
    bootstrap: str, topic: str, partitioner: str, keys: list[bytes]
) -> dict[bytes, set[int]]:
    """Each key's partitions as stored by the broker (values carry the key's index)."""
    producer = Producer({"bootstrap.servers": bootstrap, "partitioner": partitioner})
    errors: list[Any] = []
    for index, key in enumerate(keys):
        # Twice each: a hash is stable, so both copies must land together.
        for _ in range(2):
            producer.produce(
                topic,
                key=key,
                value=str(index).encode(),
                on_delivery=lambda error, _m: errors.append(error) if error else None,
            )
        producer.poll(0)
    assert producer.flush(30) == 0
    assert errors == []

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"oracle-{uuid.uuid4().hex}"})
    placed: dict[bytes, set[int]] = {}
    try:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
        seen = 0
        for _ in range(400):
            if seen == 2 * len(keys):
                break
            for message in consumer.consume(500, timeout=0.5):
                assert message.error() is None, message.error()
                value, partition = message.value(), message.partition()
                assert value is not None and partition is not None
                key = keys[int(value)]
                assert message.key() == key or (key == b"" and not message.key())
                placed.setdefault(key, set()).add(partition)
                seen += 1
        assert seen == 2 * len(keys)
    finally:
        consumer.close()
    return placed


@pytest.mark.parametrize(
    ("librdkafka", "ours", "function"),
    [("murmur2", "murmur2", murmur2_partition), ("consistent", "crc32", crc32_partition)],
)
def test_our_partitioners_place_every_key_as_librdkafka_does(
    broker: Any,
    make_topic: Callable[..., str],
    librdkafka: str,
    ours: str,
    function: Callable[[bytes, int], int],
) -> None:
    topic = make_topic(PARTITIONS, prefix=f"oracle-{librdkafka}")
    keys = varied_keys()
    placed = produce_and_read_back(broker.bootstrap_servers, topic, librdkafka, keys)
    wrong = {
        key[:40]: (sorted(parts), function(key, PARTITIONS))
        for key, parts in placed.items()
        if parts != {function(key, PARTITIONS)}
    }
    assert wrong == {}
    assert all(partition_for(ours, k, PARTITIONS) == function(k, PARTITIONS) for k in keys)
    # Not a trivial pass: the keys cover every partition, and the two hashes disagree.
    assert {p for parts in placed.values() for p in parts} == set(range(PARTITIONS))
    other = crc32_partition if function is murmur2_partition else murmur2_partition
    assert sum(function(k, PARTITIONS) != other(k, PARTITIONS) for k in keys) > len(keys) // 2
