"""Scoped version events (design 6.2) and ModelReader's routing by key (6.3), no broker:
events are fed to the reader as its follower thread would, artifacts are in a folder."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from stream_trainer.publishing.events import version_event
from stream_trainer.publishing.partitioner import (
    crc32_partition,
    murmur2_partition,
    scope_id_for_key,
)
from stream_trainer.publishing.reader import ModelReader, NoModelForKey, RoutingError
from stream_trainer.publishing.registry import ModelRegistry, VersionInfo
from stream_trainer.publishing.scoped_versions import (
    Routing,
    ScopedEventError,
    partition_scope_id,
    scope_prefix,
    scoped_champion_event,
    scoped_event_key,
    scoped_version_event,
)
from tests.served_model import ConstantModel

SIGNING_KEY = b"unit-signing-key"
MODEL = "fraud"
ROUTING = Routing("kafka_key", "murmur2", 6, "orders")


def publish(root: Path, scope: str, scope_id: str, value: str, promote: bool = True) -> VersionInfo:
    registry = ModelRegistry(root, scope_prefix(MODEL, scope, scope_id), SIGNING_KEY, keep_last=5)
    return registry.publish(pickle.dumps(ConstantModel(value)), {}, promote)


def event(scope: str, scope_id: str, info: VersionInfo, routing: Routing = ROUTING) -> bytes:
    return scoped_version_event(MODEL, scope, scope_id, info.metadata, info.artifact_uri, routing)


def reader(root: Path | None, scope: str, max_models: int = 1000) -> ModelReader:
    # Never started: no consumer is created, the tests call what the follower would.
    return ModelReader(
        {"bootstrap.servers": "127.0.0.1:9"},
        "versions",
        MODEL,
        SIGNING_KEY,
        root,
        scope=scope,
        max_models=max_models,
    )


# -- events ------------------------------------------------------------------------------


def test_scoped_version_event_is_canonical_and_complete(tmp_path: Path) -> None:
    info = publish(tmp_path, "partition", "orders:3", "p3")
    value = event("partition", "orders:3", info)
    assert value == event("partition", "orders:3", info)  # byte-identical repeats
    assert value == json.dumps(json.loads(value), sort_keys=True, separators=(",", ":")).encode()
    decoded = json.loads(value)
    assert decoded == {
        "type": "scoped_version",
        "model_name": MODEL,
        "scope": "partition",
        "scope_id": "orders:3",
        "version": 1,
        "champion": True,
        "artifact_uri": info.artifact_uri,
        "routing": {
            "key_source": "kafka_key",
            "partitioner": "murmur2",
            "partitions": 6,
            "topic": "orders",
        },
        "metadata": info.metadata,
    }
    assert info.artifact_uri.endswith("/fraud/partition/orders/3/versions/00000001/model.pkl")
    assert scoped_event_key(MODEL, "partition", "orders:3") == b"fraud/partition/orders:3"


def test_scoped_champion_event_and_key_scope(tmp_path: Path) -> None:
    scope_id = scope_id_for_key(b"customer-42")
    info = publish(tmp_path, "key", scope_id, "c42")
    routing = Routing("field:customer_id", "crc32", 6)
    decoded = json.loads(scoped_champion_event(MODEL, "key", scope_id, info, "rollback", routing))
    assert decoded["type"] == "scoped_champion" and decoded["reason"] == "rollback"
    assert decoded["champion"] is True and decoded["scope_id"] == scope_id
    assert decoded["routing"] == {
        "key_source": "field:customer_id",
        "partitioner": "crc32",
        "partitions": 6,
    }
    assert scope_prefix(MODEL, "key", scope_id) == f"fraud/key/{scope_id}"
    assert b"customer-42" not in scoped_event_key(MODEL, "key", scope_id)


@pytest.mark.parametrize(
    ("model", "scope", "scope_id", "match"),
    [
        (MODEL, "key", "customer-42", "32 lowercase hex"),  # a raw key must never leak
        (MODEL, "partition", "orders", "'<topic>:<p>'"),
        (MODEL, "partition", "orders:x", "'<topic>:<p>'"),
        (MODEL, "global", "x", "scope must be one of"),
        ("a/b", "partition", "orders:1", "without '/'"),
    ],
)
def test_malformed_scopes_are_refused(model: str, scope: str, scope_id: str, match: str) -> None:
    with pytest.raises(ScopedEventError, match=match):
        scoped_event_key(model, scope, scope_id)


def test_malformed_routing_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ScopedEventError, match="partitioner"):
        Routing("kafka_key", "consistent", 6)
    with pytest.raises(ScopedEventError, match="partitions"):
        Routing("kafka_key", "murmur2", 0)
    with pytest.raises(ScopedEventError, match="key_source"):
        Routing("field:", "murmur2", 6)
    with pytest.raises(ScopedEventError, match="routing must be an object"):
        Routing.from_json(None)
    info = publish(tmp_path, "partition", "orders:1", "p1")
    with pytest.raises(ScopedEventError, match=r"routing\.topic 'orders'"):
        event("partition", "payments:1", info)
    assert partition_scope_id("orders", 3) == "orders:3"


def test_an_unchanged_global_reader_ignores_scoped_events(tmp_path: Path) -> None:
    global_reader = reader(None, "global")
    info = publish(tmp_path, "partition", "orders:3", "p3")
    assert global_reader._relevant(event("partition", "orders:3", info)) is None
    champion = scoped_champion_event(MODEL, "partition", "orders:3", info, "promote", ROUTING)
    assert global_reader._relevant(champion) is None
    # ... while it still takes the global version events (it could have failed above).
    as_global = {**info.metadata, "model_name": MODEL}
    assert global_reader._relevant(version_event(as_global, info.artifact_uri)) is not None


# -- routing ------------------------------------------------------------------------------


def test_partition_scope_routes_each_key_to_its_partitions_model(tmp_path: Path) -> None:
    scoped = reader(tmp_path, "partition")
    for p in range(6):
        info = publish(tmp_path, "partition", f"orders:{p}", f"p{p}")
        scoped._note_scoped(event("partition", f"orders:{p}", info))
    keys = [f"customer-{i}".encode() for i in range(60)] + [b"", "zürich".encode()]
    for key in keys:
        expected = f"p{murmur2_partition(key, 6)}"
        assert scoped.predict_one({}, key=key) == expected
        assert scoped.predict_record({"f": 1}, key=key, topic="orders") == expected
    assert set(scoped.loaded()) == {f"orders:{p}" for p in range(6)}
    assert scoped.slots() == {f"orders:{p}": 1 for p in range(6)}
    assert scoped.version is None
    with pytest.raises(NoModelForKey, match="null key"):
        scoped.predict_one({}, key=None)
    with pytest.raises(NoModelForKey, match="no slot of topic 'payments'"):
        scoped.predict_one({}, key=b"a", topic="payments")


def test_partition_scope_follows_the_events_partitioner_and_count(tmp_path: Path) -> None:
    scoped = reader(tmp_path, "partition")
    crc = Routing("kafka_key", "crc32", 4, "orders")
    for p in range(4):
        info = publish(tmp_path, "partition", f"orders:{p}", f"p{p}")
        scoped._note_scoped(event("partition", f"orders:{p}", info, crc))
    key = next(
        k for i in range(100) if crc32_partition(k := str(i).encode(), 4) != murmur2_partition(k, 4)
    )
    assert scoped.slot_for_key(key) == f"orders:{crc32_partition(key, 4)}"
    assert scoped.predict_one({}, key=key) == f"p{crc32_partition(key, 4)}"


def test_partition_scope_with_two_topics_needs_topic(tmp_path: Path) -> None:
    scoped = reader(tmp_path, "partition")
    for topic in ("orders", "payments"):
        info = publish(tmp_path, "partition", f"{topic}:0", topic)
        scoped._note_scoped(
            event("partition", f"{topic}:0", info, Routing("kafka_key", "murmur2", 1, topic))
        )
    with pytest.raises(RoutingError, match="pass topic="):
        scoped.predict_one({}, key=b"k")
    assert scoped.predict_one({}, key=b"k", topic="payments") == "payments"


def test_key_scope_lru_forward_only_rollback_and_refusal(tmp_path: Path) -> None:
    scoped = reader(tmp_path, "key", max_models=2)
    ids = {name: scope_id_for_key(name.encode()) for name in ("alice", "bob", "carol")}
    for name, scope_id in ids.items():
        scoped._note_scoped(event("key", scope_id, publish(tmp_path, "key", scope_id, name)))
    assert [scoped.predict_one({}, key=n.encode()) for n in ("alice", "bob", "carol")] == [
        "alice",
        "bob",
        "carol",
    ]
    assert scoped.loads == 3 and set(scoped.loaded()) == {ids["bob"], ids["carol"]}  # LRU
    assert scoped.predict_one({}, key=b"alice") == "alice" and scoped.loads == 4  # reloaded
    with pytest.raises(NoModelForKey, match="no champion for slot") as raised:
        scoped.predict_one({}, key=b"dave")
    assert isinstance(raised.value, KeyError) and "dave" not in str(raised.value)

    # Version 2 of alice's slot, then a late repeat of version 1's event: 2 keeps serving.
    alice = ids["alice"]
    first = ModelRegistry(tmp_path, scope_prefix(MODEL, "key", alice), SIGNING_KEY, 5).get(1)
    second = publish(tmp_path, "key", alice, "alice-2")
    scoped._note_scoped(event("key", alice, second))
    scoped._note_scoped(event("key", alice, first))
    assert scoped.predict_one({}, key=b"alice") == "alice-2"
    # A scoped_champion event moves it back (manual rollback).
    scoped._note_scoped(scoped_champion_event(MODEL, "key", alice, first, "rollback", ROUTING))
    assert scoped.predict_one({}, key=b"alice") == "alice"

    # A tampered champion is refused: the loaded older model keeps serving...
    third = publish(tmp_path, "key", alice, "alice-3")
    third.artifact_path.write_bytes(pickle.dumps(ConstantModel("evil")))
    scoped._note_scoped(event("key", alice, third))
    assert scoped.predict_one({}, key=b"alice") == "alice"
    assert scoped.failures == 1
    # ... and once evicted, the key has no servable model (counted once, not per call).
    scoped.predict_one({}, key=b"bob")
    scoped.predict_one({}, key=b"carol")
    for _ in range(2):
        with pytest.raises(NoModelForKey, match="version 3 was refused"):
            scoped.predict_one({}, key=b"alice")
    assert scoped.failures == 1  # remembered as refused: not fetched again per call


def test_scoped_reader_skips_other_scopes_models_and_global_events(tmp_path: Path) -> None:
    scoped = reader(tmp_path, "key")
    info = publish(tmp_path, "partition", "orders:0", "p0")
    scoped._note_scoped(event("partition", "orders:0", info))  # another scope
    scoped._note_scoped(version_event(info.metadata, info.artifact_uri))  # a global event
    scoped._note_scoped(b"not json")
    assert scoped.slots() == {}
    not_champion = publish(tmp_path, "key", scope_id_for_key(b"k"), "k", promote=False)
    scoped._note_scoped(event("key", scope_id_for_key(b"k"), not_champion))
    assert scoped.slots() == {}
    with pytest.raises(ValueError, match="scope must be"):
        reader(tmp_path, "customer")
    with pytest.raises(ValueError, match="without '/'"):
        ModelReader({}, "versions", "a/b", None, scope="key")
    with pytest.raises(ValueError, match="max_models"):
        reader(tmp_path, "key", max_models=0)
