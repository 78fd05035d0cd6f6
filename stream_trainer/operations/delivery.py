"""Produce one record and wait until the broker has it (control commands, lease claims).

For the rare record whose sender must know it landed before going on; streams of records
(dead letters, version events) keep a long-lived producer of their own.
"""

from __future__ import annotations

from typing import Any

from confluent_kafka import Producer

from stream_trainer.errors import StreamTrainerError


class NotDelivered(StreamTrainerError):
    """The broker refused the record or did not acknowledge it in time."""


def deliver_one(
    producer_config: dict[str, Any],
    topic: str,
    value: bytes,
    *,
    key: bytes | None = None,
    partition: int = -1,
    timeout_s: float = 10.0,
) -> tuple[int, int]:
    """Produce ``value`` to ``topic`` (``partition`` -1: the key's) and wait for its
    acknowledgement; returns (partition, offset). Raises NotDelivered naming why."""
    errors: list[str] = []
    where: list[tuple[int, int]] = []

    def _delivered(error: Any, message: Any) -> None:
        if error is not None:
            errors.append(str(error))
        else:
            where.append((message.partition(), message.offset()))

    producer = Producer(producer_config)
    producer.produce(topic, key=key, value=value, partition=partition, on_delivery=_delivered)
    if producer.flush(timeout_s) > 0:
        raise NotDelivered(f"not delivered to {topic} within {timeout_s} s")
    if errors or not where:
        raise NotDelivered(f"not delivered to {topic}: {errors[0] if errors else 'no report'}")
    return where[0]
