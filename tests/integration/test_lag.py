"""Consumer lag of paused and halted partitions, against each real broker.

librdkafka stops fetching a paused partition, and its statistics keep the end offset of the
last fetch: ``consumer_lag`` read 0 exactly while a halted partition fell behind. The lag
gauge must be end offset - the service's position for every owned partition; it is checked
against an independent measurement (the producer's delivery reports give the end, the
group's committed offsets, read by a separate consumer, give the service's position).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import msgspec
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from stream_trainer.laptop.datasets import get_dataset
from stream_trainer.laptop.produce import poison_values
from stream_trainer.operations.control import send_command
from tests.conftest import BrokerHandle
from tests.harness import ServiceProcess, service_config, unique, wait_for

pytestmark = pytest.mark.integration

LEARNT = "stream_trainer_records_learnt_total"
HALTED = "stream_trainer_partitions_halted"
PAUSED = 'stream_trainer_state{stream_trainer_state="paused"}'
_encode = msgspec.json.Encoder().encode


def lag_series(topic: str, partition: int) -> str:
    return f'stream_trainer_consumer_lag_records{{partition="{partition}",topic="{topic}"}}'


def produce(
    bootstrap: str, topic: str, values: Sequence[tuple[int, bytes | None]]
) -> dict[int, int]:
    """Produce ``(partition, value)``; returns each partition's end offset by delivery reports."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    ends: dict[int, int] = {}
    failures: list[str] = []

    def delivered(error: object, message: object) -> None:
        if error is not None:
            failures.append(str(error))
            return
        partition, offset = message.partition(), message.offset()  # type: ignore[attr-defined]
        ends[partition] = max(ends.get(partition, 0), offset + 1)

    for partition, value in values:
        producer.produce(topic, value=value, partition=partition, on_delivery=delivered)
        producer.poll(0)
    assert producer.flush(60) == 0
    assert not failures, failures[:3]
    return ends


def committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    """The group's committed offsets, read by a consumer that does not join the group; a
    partition with none starts at the log start, 0 on these fresh topics."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        tps = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return {tp.partition: max(tp.offset, 0) for tp in tps}
    finally:
        consumer.close()


def wait_lags(service: ServiceProcess, topic: str, expected: dict[int, int]) -> dict[int, float]:
    """Wait until the lag gauges of ``topic`` equal ``expected``; fail naming the last seen."""
    last: dict[int, float] = {}

    def equal() -> dict[int, float] | None:
        samples = service.metrics()
        last.update({p: samples.get(lag_series(topic, p), -1.0) for p in expected})
        return dict(last) if last == expected else None

    try:
        seen: dict[int, float] = wait_for(equal, 30, "lag gauges")
    except AssertionError as error:
        raise AssertionError(f"{error}: wanted {expected}, last seen {last}") from None
    return seen


def test_lag_counts_halted_and_paused_partitions(broker: BrokerHandle, tmp_path: Path) -> None:
    bootstrap = broker.bootstrap_servers
    dataset = get_dataset("phishing")
    more = 1000
    config = service_config(
        tmp_path,
        bootstrap,
        dataset,
        "per_record",
        partitions=2,
        overrides={
            "dead_letter": {"max_consecutive_invalid": 50},
            "kafka": {"statistics_interval_ms": 500, "group_id": unique("lag")},
        },
    )
    topic = config["topics"]["input"][0]
    group = config["kafka"]["group_id"]
    nan_value = next(v for r, v in poison_values(dataset) if r == "non_finite")
    rows = [_encode({"x": x, "y": y}) for x, y in dataset.rows(300 + 4 * more)]
    with ServiceProcess(config, tmp_path) as service:
        # A flood of invalid records halts partition 0; partition 1 keeps learning.
        ends = produce(bootstrap, topic, [(0, nan_value)] * 200 + [(1, v) for v in rows[:300]])
        service.wait_metric(HALTED, 1, timeout=60)
        service.wait_metric(LEARNT, 300, timeout=60)
        batch = rows[300 : 300 + 2 * more]
        ends |= produce(bootstrap, topic, [(i % 2, v) for i, v in enumerate(batch)])
        service.wait_metric(LEARNT, 300 + more, timeout=60)
        # The service's position as the group sees it (committed after each checkpoint).
        positions = wait_for(
            lambda: (c := committed(bootstrap, group, topic, 2)).get(1) == ends[1] and c,
            30,
            "the other partition's checkpoint committed",
        )
        expected = {p: ends[p] - positions[p] for p in (0, 1)}

        halted_seen = wait_lags(service, topic, expected)
        print(
            f"[{broker.name}] halted partition 0: end {ends[0]}, committed {positions[0]}, "
            f"independent lag {expected[0]}, gauge {halted_seen[0]:.0f}; partition 1 gauge "
            f"{halted_seen[1]:.0f}"
        )
        assert halted_seen[0] >= more
        if broker.name == "tansu":
            # Tansu answers ListOffsets(latest) with its last batch's base offset + 1, and with
            # every partition paused nothing is fetched: no client can learn the end offset.
            assert service.stop() == 0
            return

        # `control pause` stops every partition; both fall behind by what is produced next.
        send_command(
            {"bootstrap.servers": bootstrap},
            config["topics"]["control"],
            config["model"]["name"],
            "pause",
        )
        service.wait_metric(PAUSED, 1, timeout=30)
        batch = rows[300 + 2 * more :]
        ends |= produce(bootstrap, topic, [(i % 2, v) for i, v in enumerate(batch)])
        expected = {p: ends[p] - positions[p] for p in (0, 1)}
        paused_seen = wait_lags(service, topic, expected)
        print(
            f"[{broker.name}] paused: ends {ends}, committed {positions}, independent lag "
            f"{expected}, gauges {paused_seen}"
        )
        assert paused_seen[1] == more
        assert service.metric(LEARNT) == 300 + more
        assert service.stop() == 0
