"""ModelReader serving partition- and key-scoped models from a real versions topic,
published by the trainer's own path (stream_trainer.publishing.scoped_publish).

Each slot's champion is published by a slot ModelPublisher into the design's 6.1 layout (a
folder, or SeaweedFS under a slot fence), its scoped event sent by ScopedEventPublisher,
and the reader must answer each key with its slot's model. For partition scope the keys'
partitions come from the broker itself: records produced with librdkafka
``partitioner=murmur2`` and read back.
"""

from __future__ import annotations

import json
import pickle
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from prometheus_client import CollectorRegistry

from stream_trainer.cli import EXIT_OK, main
from stream_trainer.config import Settings, settings_from_mapping
from stream_trainer.operations.app import new_state
from stream_trainer.operations.metrics import build_metrics
from stream_trainer.publishing.events import VersionEventPublisher
from stream_trainer.publishing.partitioner import scope_id_for_key
from stream_trainer.publishing.reader import ModelReader, NoModelForKey
from stream_trainer.publishing.registry import ModelRegistry, RegistryFenced, VersionInfo
from stream_trainer.publishing.routing_file import ROUTING_FILE
from stream_trainer.publishing.scoped_publish import ScopedPublishing
from stream_trainer.publishing.scoped_versions import Routing, partition_scope_id
from stream_trainer.publishing.store_registry import Fence
from stream_trainer.state.objectstore import ObjectStore, open_store
from stream_trainer.state.slot_fence import SlotFence
from stream_trainer.state.slot_store import SlotStore
from stream_trainer.testing.seaweedfs import SeaweedFS
from tests.conftest import KAFKA_ONLY
from tests.harness import settings_for
from tests.served_model import ConstantModel, VersionModel

pytestmark = pytest.mark.integration

SIGNING_KEY = b"scoped-reader-key"
MODEL = "fraud"  # partition scope
HMAC_ENV = "STREAM_TRAINER_CHECKPOINT__HMAC_KEY"
KEYED = "churn"  # key scope: one model has one scope (its ROUTING.json says which)
PARTITIONS = 6
WAIT_S = 30.0


@pytest.fixture
def producer(broker: Any) -> Iterator[Producer]:
    producer = Producer(
        {"bootstrap.servers": broker.bootstrap_servers, "enable.idempotence": True, "acks": "all"}
    )
    yield producer
    producer.flush(10)


def slot_config(root: Path | str, versions: str, model: str, bootstrap: str) -> dict[str, Any]:
    """The trainer's config of ``model`` (HMAC key from the environment)."""
    return {
        "kafka": {"bootstrap_servers": bootstrap, "group_id": "g"},
        "topics": {"input": ["orders"], "dead_letter": "dlq", "versions": versions},
        "record": {"features": ["f"], "labels": None},
        "model": {
            "name": model,
            "task": "regression",
            "learner": {"path": "sklearn.linear_model.SGDRegressor"},
        },
        "training": {"mode": "mini_batch"},
        "checkpoint": {"dir": "/tmp/unused"},
        "registry": {"root": str(root), "keep_last": 3},
    }


def scoped(
    root: Path | str,
    versions: str,
    scope: str,
    routing: Routing,
    producer: Producer,
    model: str = MODEL,
    store: ObjectStore | None = None,
) -> ScopedPublishing:
    """The trainer's publishing of ``model`` (scope ``scope``) under ``root``."""
    data = slot_config(root, versions, model, "unused:9092")
    settings: Settings = settings_from_mapping(data, env={HMAC_ENV: SIGNING_KEY.decode()})
    metrics = build_metrics(CollectorRegistry())
    return ScopedPublishing(settings, scope, routing, producer, metrics, store=store)


def publish_slot(
    publishing: ScopedPublishing, scope_id: str, value: str, fence: Fence | None = None
) -> VersionInfo:
    """A champion predicting ``value`` for slot ``scope_id``, published as the trainer
    does: reconcile after a (fresh) restore, then the gate, the registry and the event."""
    slot = publishing.slot(scope_id, fence)
    state = new_state(publishing.settings)
    state.model = cast(Any, ConstantModel(value))
    slot.publisher.reconcile(state)
    state.records_learnt = 1 + (state.model_version or 0)  # learnt since: not a repeat
    info = slot.publisher.publish(state, "manual", 0.0)
    assert info is not None, slot.publisher.last_rejection
    assert slot.events is not None and slot.registry.event_sent(info)
    return info


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


def new_reader(
    broker: Any, topic: str, scope: str, model: str = MODEL, **kwargs: Any
) -> ModelReader:
    conf = {"bootstrap.servers": broker.bootstrap_servers}
    return ModelReader(conf, topic, model, SIGNING_KEY, scope=scope, **kwargs)


def test_readers_serve_each_key_its_slots_model_and_global_readers_ignore_slots(
    broker: Any,
    make_topic: Callable[..., str],
    producer: Producer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = make_topic(PARTITIONS, prefix="orders")
    versions = make_topic(1, prefix="versions")
    routing = Routing("kafka_key", "murmur2", PARTITIONS, source)

    # A global champion (today's event) and scoped champions on the same versions topic.
    global_registry = ModelRegistry(tmp_path / "global", MODEL, SIGNING_KEY, keep_last=3)
    global_info = global_registry.publish(pickle.dumps(VersionModel(1)), {}, promote=True)
    VersionEventPublisher(producer, versions, MODEL).publish(global_info, global_registry)
    by_partitions = scoped(tmp_path, versions, "partition", routing, producer)
    for p in range(PARTITIONS):
        publish_slot(by_partitions, partition_scope_id(source, p), f"p{p}")
    by_keys = scoped(tmp_path, versions, "key", routing, producer, KEYED)
    for name in ("alice", "bob"):
        publish_slot(by_keys, scope_id_for_key(name.encode()), f"k-{name}")
    for model, scope in ((MODEL, "partition"), (KEYED, "key")):
        stored = json.loads((tmp_path / model / ROUTING_FILE).read_bytes())
        assert stored == {"model_name": model, "scope": scope, **routing.to_json()}

    unchanged = new_reader(broker, versions, "global")
    # The partition reader reads artifacts by the events' URIs, the key reader under
    # registry_root (the 6.1 layout): both ways of locating a slot's files are exercised.
    by_partition = new_reader(broker, versions, "partition", max_models=3)
    by_key = new_reader(broker, versions, "key", KEYED, registry_root=tmp_path)
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
        assert publish_slot(by_partitions, p0, "p0-v2").version == 2
        assert by_partition.wait_for_slot(p0, 2, WAIT_S)
        for key, partition in placed.items():
            expected = "p0-v2" if partition == 0 else f"p{partition}"
            assert by_partition.predict_one({}, key=key) == expected
        assert unchanged.version == 1

        # An operator rolls that slot back: the CLI announces a scoped_champion event
        # with the routing from ROUTING.json, and the slot's keys get version 1 again.
        config = tmp_path / "fraud.yaml"
        config.write_text(
            yaml.safe_dump(slot_config(tmp_path, versions, MODEL, broker.bootstrap_servers))
        )
        monkeypatch.setenv(HMAC_ENV, SIGNING_KEY.decode())
        command = ["versions", "rollback", "--slot", p0, "--config", str(config)]
        assert main(command) == EXIT_OK
        assert by_partition.wait_for_slot(p0, 1, WAIT_S)
        for key, partition in placed.items():
            assert by_partition.predict_one({}, key=key) == f"p{partition}"
        assert unchanged.version == 1
    finally:
        for reader in readers:
            reader.stop()
    assert all(reader.error is None and reader.failures == 0 for reader in readers)


def claimed(store: ObjectStore, scope_id: str, member: str) -> SlotFence:
    """``member``'s claim of the slot (its checkpoint MANIFEST) as the slot's fence."""
    slot = SlotStore(
        store, "partition", scope_id, member, SIGNING_KEY, allow_unsigned=False, keep_last=3
    )
    slot.claim()
    return SlotFence(slot)


@KAFKA_ONLY
def test_partition_slots_published_fenced_to_s3_and_served_with_a_read_only_identity(
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
    # Two members, each with its own clients: the slots' checkpoints and the registry.
    checkpoints_a = open_store(f"{s3_url}/checkpoints/{MODEL}", admin)
    checkpoints_b = open_store(f"{s3_url}/checkpoints/{MODEL}", admin)
    member_a = scoped(
        s3_url, versions, "partition", routing, producer, store=open_store(s3_url, admin)
    )
    fences = {
        p: claimed(checkpoints_a, partition_scope_id(source, p), "pod-a") for p in range(PARTITIONS)
    }
    for p in range(PARTITIONS):
        info = publish_slot(member_a, partition_scope_id(source, p), f"s3-p{p}", fences[p])
        assert info.artifact_uri.startswith(f"{s3_url}/{MODEL}/partition/{source}/{p}/versions/")
        assert info.metadata["model_name"] == MODEL and info.metadata["token"] == 1

    reading = settings_for(s3_server, tmp_path, s3_server.reader)
    reader = new_reader(broker, versions, "partition", store_settings=reading)
    reader.start()
    try:
        assert reader.wait_until_caught_up(WAIT_S), reader.error
        keys = [f"account-{i}".encode() for i in range(40)]
        placed = placed_keys(broker.bootstrap_servers, source, keys)
        for key, partition in placed.items():
            assert reader.predict_one({}, key=key) == f"s3-p{partition}"
        assert reader.loads == PARTITIONS  # each slot fetched once, then served from memory

        # A rebalance hands partition 0 to pod-b: pod-a's next publish of it is refused
        # by the store, and only pod-b's version reaches the readers.
        p0 = partition_scope_id(source, 0)
        fence_b = claimed(checkpoints_b, p0, "pod-b")
        with pytest.raises(RegistryFenced, match="pod-b"):
            publish_slot(member_a, p0, "stale", fences[0])
        member_b = scoped(
            s3_url, versions, "partition", routing, producer, store=open_store(s3_url, admin)
        )
        info = publish_slot(member_b, p0, "s3-p0-v2", fence_b)
        assert (info.version, info.metadata["token"], info.metadata["writer_token"]) == (2, 2, 2)
        assert reader.wait_for_slot(p0, 2, WAIT_S)
        for key, partition in placed.items():
            expected = "s3-p0-v2" if partition == 0 else f"s3-p{partition}"
            assert reader.predict_one({}, key=key) == expected
        assert reader.loads == PARTITIONS + 1
    finally:
        reader.stop()
    assert reader.error is None and reader.failures == 0
