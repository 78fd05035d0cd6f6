"""ModelReader serving partition- and key-scoped models from a real versions topic.

Artifacts are published by hand into the design's 6.1 layout (a folder, or SeaweedFS),
scoped events are produced to a versions topic, and the reader must answer each key with
its slot's model. For partition scope the keys' partitions come from the broker itself:
records produced with librdkafka ``partitioner=murmur2`` and read back.
"""

from __future__ import annotations

import pickle
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from stream_trainer.config import ObjectStoreSettings
from stream_trainer.partitioner import scope_id_for_key
from stream_trainer.reader import ModelReader, NoModelForKey
from stream_trainer.registry import ModelRegistry, VersionInfo, open_registry
from stream_trainer.scoped_versions import (
    Routing,
    partition_scope_id,
    scope_prefix,
    scoped_event_key,
    scoped_version_event,
)
from stream_trainer.testing.seaweedfs import SeaweedFS
from stream_trainer.versions import VersionEventPublisher
from tests.conftest import KAFKA_ONLY
from tests.integration.test_object_store import settings_for
from tests.served_model import ConstantModel, VersionModel

pytestmark = pytest.mark.integration

SIGNING_KEY = b"scoped-reader-key"
MODEL = "fraud"
PARTITIONS = 6
WAIT_S = 30.0


@pytest.fixture
def producer(broker: Any) -> Iterator[Producer]:
    producer = Producer(
        {"bootstrap.servers": broker.bootstrap_servers, "enable.idempotence": True, "acks": "all"}
    )
    yield producer
    producer.flush(10)


def publish_slot(
    root: Path | str,
    scope: str,
    scope_id: str,
    value: str,
    settings: ObjectStoreSettings | None = None,
) -> VersionInfo:
    """A champion predicting ``value``, in the slot's own registry (design 6.1 layout)."""
    registry = open_registry(
        root, scope_prefix(MODEL, scope, scope_id), SIGNING_KEY, 3, store_settings=settings
    )
    metadata = {"scope": scope, "scope_id": scope_id}
    return registry.publish(pickle.dumps(ConstantModel(value)), metadata, promote=True)


def send_scoped(
    producer: Producer, topic: str, scope: str, scope_id: str, info: VersionInfo, routing: Routing
) -> None:
    errors: list[Any] = []
    producer.produce(
        topic,
        key=scoped_event_key(MODEL, scope, scope_id),
        value=scoped_version_event(
            MODEL, scope, scope_id, info.metadata, info.artifact_uri, routing
        ),
        on_delivery=lambda error, _message: errors.append(error),
    )
    assert producer.flush(WAIT_S) == 0 and errors == [None]


def placed_keys(bootstrap: str, topic: str, keys: list[bytes]) -> dict[bytes, int]:
    """Each key's partition as the broker stored it (produced with partitioner=murmur2)."""
    producer = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2"})
    for index, key in enumerate(keys):
        producer.produce(topic, key=key, value=str(index).encode())
    assert producer.flush(WAIT_S) == 0
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"p-{uuid.uuid4().hex}"})
    placed: dict[bytes, int] = {}
    try:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
        for _ in range(200):
            if len(placed) == len(keys):
                break
            for message in consumer.consume(500, timeout=0.5):
                value, partition = message.value(), message.partition()
                assert message.error() is None and value is not None and partition is not None
                placed[keys[int(value)]] = partition
    finally:
        consumer.close()
    assert len(placed) == len(keys)
    return placed


def new_reader(broker: Any, topic: str, scope: str, **kwargs: Any) -> ModelReader:
    conf = {"bootstrap.servers": broker.bootstrap_servers}
    return ModelReader(conf, topic, MODEL, SIGNING_KEY, scope=scope, **kwargs)


def test_readers_serve_each_key_its_slots_model_and_global_readers_ignore_slots(
    broker: Any, make_topic: Callable[..., str], producer: Producer, tmp_path: Path
) -> None:
    source = make_topic(PARTITIONS, prefix="orders")
    versions = make_topic(1, prefix="versions")
    routing = Routing("kafka_key", "murmur2", PARTITIONS, source)

    # A global champion (today's event) and scoped champions on the same versions topic.
    global_registry = ModelRegistry(tmp_path / "global", MODEL, SIGNING_KEY, keep_last=3)
    global_info = global_registry.publish(pickle.dumps(VersionModel(1)), {}, promote=True)
    VersionEventPublisher(producer, versions, MODEL).publish(global_info, global_registry)
    for p in range(PARTITIONS):
        scope_id = partition_scope_id(source, p)
        info = publish_slot(tmp_path, "partition", scope_id, f"p{p}")
        send_scoped(producer, versions, "partition", scope_id, info, routing)
    for name in ("alice", "bob"):
        scope_id = scope_id_for_key(name.encode())
        info = publish_slot(tmp_path, "key", scope_id, f"k-{name}")
        send_scoped(producer, versions, "key", scope_id, info, routing)

    unchanged = new_reader(broker, versions, "global")
    # The partition reader reads artifacts by the events' URIs, the key reader under
    # registry_root (the 6.1 layout): both ways of locating a slot's files are exercised.
    by_partition = new_reader(broker, versions, "partition", max_models=3)
    by_key = new_reader(broker, versions, "key", registry_root=tmp_path)
    readers = (unchanged, by_partition, by_key)
    for reader in readers:
        reader.start()
    try:
        assert unchanged.wait_for_version(1, WAIT_S), unchanged.error
        assert by_partition.wait_until_caught_up(WAIT_S), by_partition.error
        assert by_key.wait_until_caught_up(WAIT_S), by_key.error
        assert len(by_partition.slots()) == PARTITIONS and len(by_key.slots()) == 2

        keys = [f"customer-{i}".encode() for i in range(120)] + [b"", "zürich".encode()]
        placed = placed_keys(broker.bootstrap_servers, source, keys)
        assert set(placed.values()) == set(range(PARTITIONS))
        for key, partition in placed.items():
            assert by_partition.predict_one({"f": 1.0}, key=key) == f"p{partition}"
        assert len(by_partition.loaded()) == 3  # max_models bounds what stays loaded
        with pytest.raises(NoModelForKey):
            by_partition.predict_one({}, key=None)

        assert by_key.predict_record({"f": 1.0}, key=b"alice") == "k-alice"
        assert by_key.predict_one({}, key=b"bob") == "k-bob"
        with pytest.raises(NoModelForKey, match="no champion for slot"):
            by_key.predict_one({}, key=b"carol")

        # The global reader never took a slot's model for the model.
        assert unchanged.version == 1 and unchanged.predict_one({}) == 1

        # A new champion of one slot, live: only that slot's keys change model.
        p0 = partition_scope_id(source, 0)
        send_scoped(
            producer,
            versions,
            "partition",
            p0,
            publish_slot(tmp_path, "partition", p0, "p0-v2"),
            routing,
        )
        assert by_partition.wait_for_slot(p0, 2, WAIT_S)
        for key, partition in placed.items():
            expected = "p0-v2" if partition == 0 else f"p{partition}"
            assert by_partition.predict_one({}, key=key) == expected
        assert unchanged.version == 1
    finally:
        for reader in readers:
            reader.stop()
    assert all(reader.error is None and reader.failures == 0 for reader in readers)


@KAFKA_ONLY
def test_partition_slots_served_from_s3_with_a_read_only_identity(
    broker: Any,
    make_topic: Callable[..., str],
    producer: Producer,
    s3_server: SeaweedFS,
    s3_url: str,
    tmp_path: Path,
) -> None:
    source = make_topic(PARTITIONS, prefix="orders")
    versions = make_topic(1, prefix="versions")
    routing = Routing("kafka_key", "murmur2", PARTITIONS, source)
    admin = settings_for(s3_server, tmp_path, s3_server.admin)
    for p in range(PARTITIONS):
        scope_id = partition_scope_id(source, p)
        info = publish_slot(s3_url, "partition", scope_id, f"s3-p{p}", admin)
        assert info.artifact_uri.startswith(f"{s3_url}/{MODEL}/partition/{source}/{p}/versions/")
        send_scoped(producer, versions, "partition", scope_id, info, routing)

    reading = settings_for(s3_server, tmp_path, s3_server.reader)
    reader = new_reader(broker, versions, "partition", store_settings=reading)
    reader.start()
    try:
        assert reader.wait_until_caught_up(WAIT_S), reader.error
        keys = [f"account-{i}".encode() for i in range(40)]
        for key, partition in placed_keys(broker.bootstrap_servers, source, keys).items():
            assert reader.predict_one({}, key=key) == f"s3-p{partition}"
        assert reader.loads == PARTITIONS  # each slot fetched once, then served from memory
    finally:
        reader.stop()
    assert reader.error is None and reader.failures == 0
