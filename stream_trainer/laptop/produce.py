"""Writes a dataset (optionally mixed with invalid records) to a Kafka topic.

Used by the ``produce`` and ``demo`` commands, the benchmark and the tests, so every
one of them streams records in the service's own wire format.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
from confluent_kafka import KafkaException, Producer

from stream_trainer.laptop.datasets import Dataset

_encode = msgspec.json.Encoder().encode


def poison_values(dataset: Dataset, max_bytes: int = 65_536) -> list[tuple[str, bytes | None]]:
    """One invalid value per kind the record contract rejects, with the expected reason."""
    first = dataset.features[0]
    good = dict.fromkeys(dataset.features, 0.5)
    label: Any = dataset.labels[0] if dataset.labels else 1.0

    def record(x: dict[str, Any], y: Any = label) -> bytes:
        return _encode({"x": x, "y": y})

    return [
        ("malformed_json", b'{"x": {"' + first.encode() + b'": 1.0'),
        ("non_finite", record(good).replace(b"0.5", b"NaN", 1)),
        ("non_finite", record(good).replace(b"0.5", b"Infinity", 1)),
        ("non_finite", record(good).replace(b"0.5", b"1e999", 1)),
        ("wrong_type", record({**good, first: "0.5"})),
        ("missing_label", _encode({"x": good})),
        ("unknown_label", record(good, "no-such-label" if dataset.labels else "NaN-ish")),
        ("unknown_feature", record({**good, "not_a_feature": 1.0})),
        ("missing_feature", record({k: v for k, v in good.items() if k != first})),
        ("too_large", record({**good, "padding": "p" * max_bytes})),
        ("empty", b""),
        ("not_object", b"[1, 2, 3]"),
    ]


@dataclass
class ProduceReport:
    """What was written: counts and, per partition, the offsets of each kind."""

    valid: int = 0
    invalid: int = 0
    invalid_reasons: dict[str, int] = field(default_factory=dict)
    offsets: dict[int, list[int]] = field(default_factory=dict)


def records(
    dataset: Dataset, count: int, bad_ratio: float, seed: int, max_bytes: int = 65_536
) -> Iterator[tuple[bytes | None, str | None]]:
    """``count`` values: dataset rows, with invalid ones mixed in at ``bad_ratio``.

    Yields ``(value, reason)`` where reason is None for a valid record.
    """
    rng = random.Random(seed)
    poison = poison_values(dataset, max_bytes)
    rows = dataset.rows(count, seed)
    for i in range(count):
        if bad_ratio > 0 and rng.random() < bad_ratio:
            reason, value = poison[i % len(poison)]
            yield value, reason
            continue
        try:
            x, y = next(rows)
        except StopIteration:
            return
        yield _encode({"x": x, "y": y}), None


def produce(
    producer_config: dict[str, Any],
    topic: str,
    dataset: Dataset,
    count: int,
    partitions: int = 1,
    bad_ratio: float = 0.0,
    seed: int = 42,
    on_progress: Callable[[int], None] | None = None,
) -> ProduceReport:
    """Produce ``count`` records round-robin over ``partitions``; waits for every delivery.

    Raises KafkaException when a record could not be delivered.
    """
    conf = {
        # Retries on a just-created topic (leader not elected yet) must not reorder
        # batches: without idempotence a retried batch can land after a later one, and a
        # replay of the "same" topic would then train a different model.
        "enable.idempotence": True,
        "linger.ms": 20,
        "batch.num.messages": 10_000,
        "compression.type": "lz4",
        "queue.buffering.max.messages": 500_000,
        **producer_config,
    }
    producer = Producer(conf)
    report = ProduceReport()
    failures: list[str] = []

    def delivered(error: Any, message: Any) -> None:
        if error is not None:
            failures.append(str(error))
        else:
            report.offsets.setdefault(message.partition(), []).append(message.offset())

    for i, (value, reason) in enumerate(records(dataset, count, bad_ratio, seed)):
        while True:
            try:
                producer.produce(
                    topic, value=value, partition=i % partitions, on_delivery=delivered
                )
                break
            except BufferError:
                producer.poll(0.1)  # the local queue is full: let deliveries drain
        if reason is None:
            report.valid += 1
        else:
            report.invalid += 1
            report.invalid_reasons[reason] = report.invalid_reasons.get(reason, 0) + 1
        if i % 10_000 == 0:
            producer.poll(0)
            if on_progress is not None:
                on_progress(i)
    remaining = producer.flush(60.0)
    if remaining or failures:
        raise KafkaException(
            f"{remaining} records undelivered, {len(failures)} failed: {failures[:3]}"
        )
    return report
