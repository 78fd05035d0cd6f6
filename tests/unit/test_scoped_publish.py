"""Publishing a scoped model's slots (stream_trainer.publishing.scoped_publish): the 6.1 layout, the
metadata, ROUTING.json written once, the one gate, per-slot sent-markers, the slot fence.

Registries are real (a folder, or LocalStore, which honours the same conditional writes as
S3); the producer is a stand-in that records what would be sent (the broker path is
tests/integration/test_scoped_reader.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from stream_trainer.config import Settings, settings_from_mapping
from stream_trainer.operations.app import new_state
from stream_trainer.operations.metrics import build_metrics
from stream_trainer.publishing.partitioner import scope_id_for_key
from stream_trainer.publishing.registry import RegistryFenced, VersionInfo
from stream_trainer.publishing.routing_file import (
    ROUTING_FILE,
    RoutingConflict,
    read_routing,
    write_routing,
)
from stream_trainer.publishing.scoped_publish import ScopedPublishing, SlotPublishing
from stream_trainer.publishing.scoped_versions import Routing, scoped_version_event
from stream_trainer.publishing.store_registry import StoreRegistry
from stream_trainer.state.objectstore import LocalStore
from stream_trainer.state.slot_fence import SlotFence
from stream_trainer.state.slot_store import SlotStore
from stream_trainer.state.training_state import TrainingState
from tests.unit.test_trainers_unscored import FEATURES, separable

MODEL = "fraud"
HMAC = "scoped-publish-unit-key"
ROUTING = Routing("kafka_key", "murmur2", 6, "orders")
T0 = 1_000.0


class Producer:
    """Records (topic, key, value) and acknowledges each at flush, as a broker would;
    ``fail`` makes the next flush report a delivery error instead."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []
        self._pending: list[tuple[tuple[str, bytes, bytes], Callable[[Any, Any], None]]] = []

    def produce(
        self, topic: str, *, key: bytes, value: bytes, on_delivery: Callable[[Any, Any], None]
    ) -> None:
        self._pending.append(((topic, key, value), on_delivery))

    def flush(self, _timeout: float) -> int:
        for message, on_delivery in self._pending:
            self.sent.append(message)
            on_delivery(None, None)
        self._pending.clear()
        return 0


def settings(root: str | Path) -> Settings:
    data: dict[str, Any] = {
        "kafka": {"bootstrap_servers": "localhost:9092", "group_id": "g"},
        "topics": {"input": ["orders"], "dead_letter": "dlq", "versions": "versions"},
        "record": {"features": FEATURES, "labels": [0, 1]},
        "model": {
            "name": MODEL,
            "task": "binary_classification",
            "learner": {"path": "sklearn.linear_model.SGDClassifier"},
        },
        "training": {"mode": "full_batch", "full_batch": {"fit_in_worker": False}},
        "evaluation": {"metrics": ["accuracy"]},
        "checkpoint": {"dir": "/tmp/ck"},
        "registry": {"root": str(root), "keep_last": 3},
    }
    return settings_from_mapping(data, env={"STREAM_TRAINER_CHECKPOINT__HMAC_KEY": HMAC})


def publishing(
    root: str | Path, producer: Producer | None, routing: Routing = ROUTING, **kwargs: Any
) -> ScopedPublishing:
    config = settings(root)
    metrics = build_metrics(CollectorRegistry())
    return ScopedPublishing(config, "partition", routing, producer, metrics, **kwargs)


def fitted(config: Settings, seed: int = 0) -> TrainingState:
    state = new_state(config)
    X, y = separable(200, seed=seed)
    state.model.fit(X, y, None)
    state.records_learnt = 200
    return state


def publish(slot: SlotPublishing, config: Settings, seed: int = 0) -> VersionInfo:
    info = slot.publisher.publish(fitted(config, seed), "manual", T0)
    assert info is not None, slot.publisher.last_rejection
    return info


# -- layout and metadata -----------------------------------------------------------------


def test_slots_publish_into_the_6_1_layout_with_the_models_name_and_scope(
    tmp_path: Path,
) -> None:
    producer = Producer()
    scoped = publishing(tmp_path, producer)
    config = settings(tmp_path)
    info = publish(scoped.slot("orders:3"), config)

    slot_dir = tmp_path / MODEL / "partition" / "orders" / "3"
    assert info.path == slot_dir / "versions" / "00000001"
    assert sorted(p.name for p in info.path.iterdir()) == ["metadata.json", "model.pkl"]
    assert json.loads((slot_dir / "CHAMPION").read_bytes())["version"] == 1
    assert (slot_dir / "events-sent" / "00000001").exists()
    assert not (tmp_path / MODEL / "versions").exists()  # nothing in the global layout
    stored = json.loads((info.path / "metadata.json").read_bytes())
    assert stored["model_name"] == MODEL  # the model, not its slot's folder
    assert (stored["scope"], stored["scope_id"]) == ("partition", "orders:3")
    assert "token" not in stored  # unfenced
    assert stored["gate"]["accepted"] is True

    # The event: the slot's key, the canonical scoped_version bytes of what was stored.
    [(topic, key, value)] = producer.sent
    assert topic == "versions" and key == b"fraud/partition/orders:3"
    assert value == scoped_version_event(
        MODEL, "partition", "orders:3", info.metadata, info.artifact_uri, ROUTING
    )
    event = json.loads(value)
    assert event["type"] == "scoped_version" and event["champion"] is True
    assert event["artifact_uri"].endswith("/fraud/partition/orders/3/versions/00000001/model.pkl")

    # Each slot numbers its own versions; a key slot sits under key/<hash>.
    assert publish(scoped.slot("orders:3"), config, seed=1).version == 2
    assert publish(scoped.slot("orders:0"), config).version == 1


def test_a_key_slot_lives_under_its_hash(tmp_path: Path) -> None:
    config = settings(tmp_path / "reg")
    producer = Producer()
    scoped = ScopedPublishing(config, "key", ROUTING, producer, build_metrics(CollectorRegistry()))
    scope_id = scope_id_for_key(b"customer-42")
    info = publish(scoped.slot(scope_id), config)
    assert info.path == tmp_path / "reg" / MODEL / "key" / scope_id / "versions" / "00000001"
    assert b"customer-42" not in info.path.as_posix().encode()
    [(_, key, value)] = producer.sent
    assert key == f"fraud/key/{scope_id}".encode() and b"customer-42" not in value
    assert json.loads(value)["metadata"]["scope"] == "key"


# -- ROUTING.json --------------------------------------------------------------------------


def test_routing_json_is_written_once_and_a_different_routing_is_refused(tmp_path: Path) -> None:
    scoped = publishing(tmp_path, None)
    path = tmp_path / MODEL / ROUTING_FILE
    written = path.read_bytes()
    assert json.loads(written) == {
        "model_name": MODEL,
        "scope": "partition",
        "key_source": "kafka_key",
        "partitioner": "murmur2",
        "partitions": 6,
        "topic": "orders",
    }
    assert scoped.routing_document == json.loads(written)
    publishing(tmp_path, None)  # a second writer with the same routing: fine
    grown = Routing("kafka_key", "murmur2", 12, "orders")
    with pytest.raises(RoutingConflict) as refused:
        publishing(tmp_path, None, grown)
    message = str(refused.value)
    assert '"partitions": 6' in message and '"partitions": 12' in message
    with pytest.raises(RoutingConflict, match='"scope": "key"'):
        ScopedPublishing(
            settings(tmp_path), "key", ROUTING, None, build_metrics(CollectorRegistry())
        )
    assert path.read_bytes() == written  # the refusals changed nothing
    assert [p.name for p in path.parent.iterdir()] == [ROUTING_FILE]  # no temp file left


def test_routing_json_on_a_store_is_create_only_too(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "bucket")
    crc = Routing("kafka_key", "crc32", 6, "orders")
    assert write_routing(store, MODEL, "partition", ROUTING)["partitioner"] == "murmur2"
    assert write_routing(store, MODEL, "partition", ROUTING)["partitioner"] == "murmur2"
    with pytest.raises(RoutingConflict, match="crc32"):
        write_routing(store, MODEL, "partition", crc)
    stored = json.loads(store.get(f"{MODEL}/{ROUTING_FILE}").data)
    assert stored["partitioner"] == "murmur2"
    # Another model's routing is its own file.
    assert write_routing(store, "other", "key", crc)["partitioner"] == "crc32"
    assert read_routing(store, MODEL) == ("partition", ROUTING)
    assert read_routing(store, "other") == ("key", crc)
    assert read_routing(store, "nothing-yet") is None
    assert read_routing(tmp_path, MODEL) is None
    write_routing(tmp_path, MODEL, "partition", crc)
    assert read_routing(tmp_path, MODEL) == ("partition", crc)
    store.put(f"broken/{ROUTING_FILE}", b'{"model_name": "broken", "scope": "global"}')
    with pytest.raises(RoutingConflict, match="not a routing of 'broken'"):
        read_routing(store, "broken")


# -- the gate ----------------------------------------------------------------------------


def test_a_candidate_the_gate_rejects_is_recorded_in_the_slot_and_sends_no_event(
    tmp_path: Path,
) -> None:
    producer = Producer()
    config = settings(tmp_path)
    slot = publishing(tmp_path, producer).slot("orders:1")
    publish(slot, config)  # the champion: right on separable data
    candidate = fitted(config, seed=3)
    X, y = separable(100, seed=4)
    # The candidate's own earlier predictions on recent records were all wrong; the
    # champion predicts them now and is right: worse than the margin.
    candidate.recent.extend(X, y, predictions=(1 - y).astype(object))
    assert slot.publisher.publish(candidate, "records", T0) is None
    assert "champion - margin" in (slot.publisher.last_rejection or "")

    assert len(producer.sent) == 1  # only the champion's event
    assert [info.version for info in slot.registry.list()] == [1]
    decisions = slot.registry.decisions()
    assert [d["action"] for d in decisions] == ["promote", "reject"]
    slot_dir = tmp_path / MODEL / "partition" / "orders" / "1"
    [record] = [json.loads(p.read_bytes()) for p in (slot_dir / "rejected").iterdir()]
    assert record["model_name"] == MODEL
    assert record["metadata"]["scope_id"] == "orders:1"
    assert record["metadata"]["gate"]["code"] == "worse_than_margin"


def test_non_finite_parameters_are_refused_whatever_the_scores(tmp_path: Path) -> None:
    producer = Producer()
    config = settings(tmp_path)
    slot = publishing(tmp_path, producer).slot("orders:2")
    state = fitted(config)
    state.model._pipeline[-1].coef_[0, 0] = np.nan  # type: ignore[attr-defined]
    assert slot.publisher.publish(state, "manual", T0) is None
    assert slot.publisher.last_rejection == "candidate has non-finite parameters"
    assert producer.sent == [] and slot.registry.list() == []


# -- sent-markers --------------------------------------------------------------------------


class Crash(BaseException):
    """Stands for the process dying (not an error anything would catch)."""


def test_an_event_sent_but_not_marked_is_resent_byte_identical_on_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    producer = Producer()
    config = settings(tmp_path)
    slot = publishing(tmp_path, producer).slot("orders:4")
    other = publishing(tmp_path, producer).slot("orders:5")
    publish(other, config)  # another slot, fully sent

    def crash(_info: VersionInfo) -> None:
        raise Crash

    monkeypatch.setattr(slot.registry, "mark_event_sent", crash)
    with pytest.raises(Crash):
        slot.publisher.publish(fitted(config), "manual", T0)
    assert len(producer.sent) == 2  # delivered, then the "crash" before the marker
    first = producer.sent[-1]
    marker = tmp_path / MODEL / "partition" / "orders" / "4" / "events-sent" / "00000001"
    assert not marker.exists()

    # Restart: new objects over the same folder; reconcile resends what is unmarked.
    for restarted in (publishing(tmp_path, producer).slot(s) for s in ("orders:5", "orders:4")):
        restarted.publisher.reconcile(new_state(config))
    assert producer.sent[2:] == [first]  # the same key and bytes, once, only slot 4's
    assert marker.exists()
    publishing(tmp_path, producer).slot("orders:4").publisher.reconcile(new_state(config))
    assert len(producer.sent) == 3  # marked: not sent again


# -- fencing -------------------------------------------------------------------------------


def claimed(tmp_path: Path, member: str) -> SlotStore:
    slots = SlotStore(
        LocalStore(tmp_path / "checkpoints"),
        "partition",
        "orders:3",
        member,
        HMAC.encode(),
        allow_unsigned=False,
        keep_last=3,
    )
    slots.claim()
    return slots


def test_a_slot_claimed_by_another_member_cannot_publish(tmp_path: Path) -> None:
    producer = Producer()
    store = LocalStore(tmp_path / "registry")
    root = "s3://models/prod"  # the settings' root; the store stands in for it
    config = settings(root)
    a = claimed(tmp_path, "member-a")
    slot_a = publishing(root, producer, store=store).slot("orders:3", SlotFence(a))
    assert isinstance(slot_a.registry, StoreRegistry)
    first = publish(slot_a, config)
    assert first.metadata["token"] == first.metadata["writer_token"] == 1
    assert first.metadata["scope_id"] == "orders:3"

    b = claimed(tmp_path, "member-b")  # a rebalance handed the partition to b
    with pytest.raises(RegistryFenced, match=r"claimed over.*token 2.*member-b"):
        slot_a.publisher.publish(fitted(config, seed=1), "manual", T0)
    assert [info.version for info in slot_a.registry.list()] == [1]
    assert len(producer.sent) == 1  # the fenced member sent nothing

    slot_b = publishing(root, producer, store=store).slot("orders:3", SlotFence(b))
    second = publish(slot_b, config, seed=2)
    assert (second.version, second.metadata["token"]) == (2, 2)
    assert json.loads(store.get(f"{MODEL}/partition/orders/3/CHAMPION").data)["token"] == 2

    # Even a member that claims again sees b's token in the slot's registry objects, but a
    # fence never claimed refuses before anything.
    unclaimed = SlotStore(
        LocalStore(tmp_path / "checkpoints"), "partition", "orders:3", "c", None, True, 3
    )
    slot_c = publishing(root, producer, store=store).slot("orders:3", SlotFence(unclaimed))
    with pytest.raises(RegistryFenced, match="not claimed by c"):
        slot_c.publisher.publish(fitted(config), "manual", T0)


def test_a_fence_needs_an_object_store_registry(tmp_path: Path) -> None:
    a = claimed(tmp_path, "member-a")
    with pytest.raises(ValueError, match="object-store registry"):
        publishing(tmp_path / "reg", None).slot("orders:3", SlotFence(a))
