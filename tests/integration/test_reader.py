"""Model versions end to end against real brokers: events, hot swap, tampering, crash repeat."""

from __future__ import annotations

import json
import pickle
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from stream_trainer.publishing.events import VersionEventPublisher
from stream_trainer.publishing.reader import ModelReader
from stream_trainer.publishing.registry import ModelRegistry, VersionInfo, sent_marker

pytestmark = pytest.mark.integration

KEY = b"integration-registry-key"
MODEL = "m"
WAIT_S = 30.0


class VersionModel:
    """A model whose every prediction is the version it was published as."""

    def __init__(self, version: int) -> None:
        self.version = version

    def predict_one(self, x: dict[str, float]) -> int:
        return self.version

    def predict_many(self, X: list[dict[str, float]]) -> list[int]:
        return [self.version] * len(X)


@pytest.fixture
def topic(make_topic: Callable[..., str]) -> str:
    return make_topic(1, prefix="versions")


@pytest.fixture
def producer(broker: Any) -> Iterator[Producer]:
    producer = Producer(
        {"bootstrap.servers": broker.bootstrap_servers, "enable.idempotence": True, "acks": "all"}
    )
    yield producer
    producer.flush(10)


def reader_for(broker: Any, topic: str, key: bytes | None = KEY) -> ModelReader:
    conf = {"bootstrap.servers": broker.bootstrap_servers, "session.timeout.ms": 6000}
    return ModelReader(conf, topic, MODEL, key)


def publish_model(
    registry: ModelRegistry, publisher: VersionEventPublisher, version: int, promote: bool = True
) -> VersionInfo:
    assert registry.next_version() == version
    info = registry.publish(pickle.dumps(VersionModel(version)), {"parent": version - 1}, promote)
    publisher.publish(info)
    return info


def read_topic(broker: Any, topic: str) -> list[tuple[bytes | None, bytes | None]]:
    """Every (key, value) on partition 0 of ``topic``, up to its end."""
    consumer = Consumer(
        {"bootstrap.servers": broker.bootstrap_servers, "group.id": f"check-{uuid.uuid4().hex}"}
    )
    try:
        _, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        records: list[tuple[bytes | None, bytes | None]] = []
        polls = 0
        while len(records) < high and polls < 200:
            polls += 1
            for message in consumer.consume(100, timeout=0.5):
                assert message.error() is None, message.error()
                records.append((message.key(), message.value()))
        assert len(records) == high
        return records
    finally:
        consumer.close()


def test_hot_swap_under_concurrent_predictions_and_tampered_refused(
    broker: Any, topic: str, producer: Producer, tmp_path: Path
) -> None:
    registry = ModelRegistry(tmp_path, MODEL, KEY, keep_last=20)
    publisher = VersionEventPublisher(producer, topic, MODEL)
    publish_model(registry, publisher, 1)
    reader = reader_for(broker, topic)
    reader.start()
    try:
        assert reader.wait_for_version(1, WAIT_S)

        stop = threading.Event()
        seen: list[list[int]] = [[] for _ in range(4)]
        errors: list[BaseException] = []

        def predict(out: list[int]) -> None:
            while not stop.is_set():
                try:
                    out.append(reader.predict_one({"f0": 1.0}))
                    assert reader.predict_many([{"f0": 1.0}]) != []
                except BaseException as error:
                    errors.append(error)
                    return

        threads = [threading.Thread(target=predict, args=(out,)) for out in seen]
        for thread in threads:
            thread.start()
        try:
            for version in range(2, 6):
                publish_model(registry, publisher, version)
                assert reader.wait_for_version(version, WAIT_S), f"version {version} not served"

            # A tampered artifact (bytes swapped after publish, event still sent) is refused.
            tampered = registry.publish(pickle.dumps(VersionModel(6)), {}, promote=True)
            tampered.artifact_path.write_bytes(pickle.dumps(VersionModel(666)))
            publisher.publish(tampered)
            assert reader.wait_for_failures(1, WAIT_S)
            assert reader.version == 5

            # A version published without promotion is not served; the next champion is.
            publish_model(registry, publisher, 7, promote=False)
            publish_model(registry, publisher, 8)
            assert reader.wait_for_version(8, WAIT_S)
        finally:
            stop.set()
            for thread in threads:
                thread.join(WAIT_S)
    finally:
        reader.stop()

    assert errors == []
    assert reader.error is None and reader.failures == 1
    predictions = [p for out in seen for p in out]
    assert len(predictions) > 100
    assert set(predictions) <= {1, 2, 3, 4, 5, 8}
    assert 666 not in predictions and 6 not in predictions and 7 not in predictions
    for out in seen:  # each thread only ever moved forward
        assert out == sorted(out)


def test_crash_between_files_and_event_repeats_identical_event(
    broker: Any, topic: str, producer: Producer, tmp_path: Path
) -> None:
    registry = ModelRegistry(tmp_path, MODEL, KEY, keep_last=20)
    # Crash after the files are durable, before the event: nothing was sent.
    info = registry.publish(pickle.dumps(VersionModel(1)), {"parent": None}, promote=True)
    assert read_topic(broker, topic) == []

    restarted = VersionEventPublisher(producer, topic, MODEL)
    assert restarted.republish_pending(ModelRegistry(tmp_path, MODEL, KEY, keep_last=20)) == [1]
    # Crash after delivery, before the marker: the next start sends the event again.
    sent_marker(info).unlink()
    again = VersionEventPublisher(producer, topic, MODEL)
    assert again.republish_pending(ModelRegistry(tmp_path, MODEL, KEY, keep_last=20)) == [1]
    assert again.republish_pending(registry) == []

    records = read_topic(broker, topic)
    assert len(records) == 2
    assert records[0] == records[1]  # key and value byte-identical
    assert records[0][0] == MODEL.encode()
    assert json.loads(records[0][1] or b"")["version"] == 1
    assert [p.name for p in registry.versions_dir.iterdir()] == ["00000001"]

    # The repeat is harmless to a reader: it serves version 1, no failure.
    reader = reader_for(broker, topic)
    reader.start()
    try:
        assert reader.wait_for_version(1, WAIT_S)
    finally:
        reader.stop()
    assert reader.failures == 0


def test_reader_starts_on_newest_champion_and_follows_rollback(
    broker: Any, topic: str, producer: Producer, tmp_path: Path
) -> None:
    registry = ModelRegistry(tmp_path, MODEL, KEY, keep_last=20)
    publisher = VersionEventPublisher(producer, topic, MODEL)
    for version in (1, 2, 3):
        publish_model(registry, publisher, version)

    wrong_key = reader_for(broker, topic, key=b"not-the-key")
    reader = reader_for(broker, topic)
    wrong_key.start()
    reader.start()
    try:
        assert reader.wait_for_version(3, WAIT_S)
        assert reader.failures == 0  # catching up loads only the newest champion

        rolled_back = registry.rollback("operator rollback")
        assert rolled_back.version == 2
        publisher.publish_champion(rolled_back, "operator rollback")
        assert reader.wait_for_version(2, WAIT_S)

        # A wrong key refuses every version (falling back through older ones at start).
        assert wrong_key.wait_for_failures(4, WAIT_S)
        assert wrong_key.version is None
        with pytest.raises(RuntimeError, match="no version"):
            wrong_key.predict_one({"f0": 1.0})
    finally:
        reader.stop()
        wrong_key.stop()
    assert reader.error is None and wrong_key.error is None
