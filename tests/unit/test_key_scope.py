"""Key scope's state: KeyedState, eviction to create-only signed objects, reload, the
no-key dead letter and a partition hand-over (a new owner restores the keys), on a
LocalStore with the counting learner. The poll loop runs for real; only the Kafka source
and the dead-letter producer are stand-ins (the Kafka paths: tests/integration)."""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry

from stream_trainer.config import ConfigError, RecordSettings, Settings, settings_from_mapping
from stream_trainer.ingest.deadletter import DeadLetterPublisher
from stream_trainer.ingest.records import InvalidRecord, RecordDecoder
from stream_trainer.ingest.source import Source
from stream_trainer.operations.app import new_state
from stream_trainer.operations.http import Heartbeat
from stream_trainer.operations.key_service import (
    KEY_HALTED,
    NO_MODEL_KEY,
    KeyedSlots,
    KeyReader,
    KeyService,
    NoModelKey,
    keyed,
    new_keyed_state,
    validate_keyed,
)
from stream_trainer.operations.metrics import Metrics, build_metrics
from stream_trainer.operations.partition_service import PartitionService
from stream_trainer.publishing.partitioner import scope_id_for_key
from stream_trainer.publishing.scoped_publish import ScopedPublishing
from stream_trainer.publishing.scoped_versions import KAFKA_KEY, Routing
from stream_trainer.state.keyed_state import KeyedState, KeyStateError, KeyStateObjects
from stream_trainer.state.ledger import TopicPartitionKey
from stream_trainer.state.objectstore import LocalStore, StoredObject
from stream_trainer.state.slot_store import SlotStore
from stream_trainer.testing.counting import FEATURES, RIVER_PATH, Sample, counts_of
from stream_trainer.training.learners import TESTING_ENV
from stream_trainer.training.trainers import build_trainer

TOPIC = "orders"
TP: TopicPartitionKey = (TOPIC, 0)
KEY = b"unit-test-key"


class Message:
    """A consumed record as confluent_kafka gives it."""

    def __init__(self, offset: int, key_id: int | None) -> None:
        self._offset, self._key_id = offset, key_id
        features = {"partition": 0, "offset": offset, "key": key_id or 0}
        self._value = json.dumps({"x": features, "y": 1.0}).encode()

    def topic(self) -> str:
        return TOPIC

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return None if self._key_id is None else str(self._key_id).encode()

    def value(self) -> bytes:
        return self._value

    def timestamp(self) -> tuple[int, int]:
        return 0, 0

    def error(self) -> None:
        return None

    def headers(self) -> None:
        return None


class FakeSource:
    """Owns partition 0 of TOPIC; hands out what ``feed`` queued."""

    def __init__(self) -> None:
        self.queued: list[Message] = []
        self.owned: frozenset[TopicPartitionKey] = frozenset({TP})
        self.paused: set[TopicPartitionKey] = set()
        self.start_positions: dict[TopicPartitionKey, int] = {TP: 0}
        self.committed: dict[TopicPartitionKey, int] = {}

    def consume(self, max_messages: int, timeout_s: float) -> list[Message]:
        out, self.queued = self.queued, []
        return [] if TP in self.paused else out

    def commit(
        self, offsets: Mapping[TopicPartitionKey, int], asynchronous: bool = False
    ) -> dict[TopicPartitionKey, int]:
        self.committed.update(offsets)
        return dict(offsets)

    def pause(self, keys: Sequence[TopicPartitionKey]) -> None:
        self.paused.update(keys)

    def resume(self, keys: Sequence[TopicPartitionKey]) -> None:
        self.paused.difference_update(keys)

    def seek(self, key: TopicPartitionKey, offset: int) -> None:
        pass

    def close(self, timeout_s: float) -> bool:
        return True


class DeadLetters:
    """Collects what would be dead-lettered."""

    def __init__(self) -> None:
        self.records: list[InvalidRecord] = []

    def publish(self, records: Sequence[InvalidRecord]) -> None:
        self.records.extend(records)

    def flush(self, timeout_s: float) -> int:
        return 0


class Clock:
    """The service's monotonic clock, moved by the test: one second per step."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def step(service: KeyService) -> None:
    """One poll-loop iteration, a second after the previous one."""
    clock = service._clock
    assert isinstance(clock, Clock)
    clock.now += 1.0
    service.step()


def settings(tmp_path: Path, max_live: int, **model: Any) -> Settings:
    data = config_data(tmp_path, max_live)
    data["model"].update(model)
    return settings_from_mapping(data, env={"STREAM_TRAINER_CHECKPOINT__HMAC_KEY": KEY.decode()})


def config_data(tmp_path: Path, max_live: int) -> dict[str, Any]:
    return {
        "kafka": {"bootstrap_servers": "unused:9092", "group_id": "g"},
        "topics": {"input": [TOPIC], "dead_letter": "dlq", "versions": "v", "control": None},
        "record": {"features": list(FEATURES), "labels": None},
        "model": {
            "name": "m",
            "task": "regression",
            "learner": {"path": RIVER_PATH},
            "scope": "key",
            "key": {"max_live_models": max_live},
        },
        "training": {"mode": "per_record"},
        "checkpoint": {"dir": str(tmp_path / "ckpt"), "every_records": 1_000_000},
        "registry": {"root": str(tmp_path / "registry"), "publish_every_records": 3},
    }


def build(tmp_path: Path, cfg: Settings, member: str) -> tuple[KeyService, FakeSource, Metrics]:
    store = LocalStore(tmp_path / "ckpt")
    metrics = build_metrics(CollectorRegistry())
    source = FakeSource()
    clock = Clock()
    routing = Routing(KAFKA_KEY, "murmur2", 1, TOPIC)
    publishing = ScopedPublishing(cfg, "key", routing, None, metrics)

    def open_slot(scope_id: str) -> SlotStore:
        return SlotStore(store, "partition", scope_id, member, KEY, False, 3)

    def make_slots(service: PartitionService) -> KeyedSlots:
        assert isinstance(service, KeyService)
        return KeyedSlots(
            cfg,
            open_slot,
            new_keyed_state(cfg),
            validate_keyed(cfg),
            publishing,
            service.snapshot,
            lambda: cast("Source", service.commits),
            metrics,
            fenced_registry=False,
            clock=clock,
            on_close=service.forget_slot,
        )

    service = KeyService(
        cfg,
        make_slots,
        lambda _service: cast("Source", source),
        RecordDecoder(cfg.record, cfg.model.task),
        build_trainer(cfg),
        cast("DeadLetterPublisher", DeadLetters()),
        metrics,
        Heartbeat(metrics=metrics),
        objects=KeyStateObjects(store, KEY, False, cfg.config_hash()),
        publishing=publishing,
        new_state=lambda: new_state(cfg),
        fenced_registry=False,
        clock=clock,
    )
    # The consumer starts where the restored checkpoint says (the log start without one).
    source.start_positions = {TP: service.start_offsets([TP]).get(TP, 0)}
    service.on_assigned([TP])
    return service, source, metrics


def all_counts(state: KeyedState, objects: KeyStateObjects) -> dict[str, Counter[Sample]]:
    """Every key's counts: live, or read from the object the state names."""
    out = {h: counts_of(s.model) for h, s in state.live.items()}
    for key_hash, name in state.evicted.items():
        out[key_hash] = counts_of(objects.read(key_hash, name).model)
    return out


@pytest.fixture(autouse=True)
def _testing_learners(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TESTING_ENV, "1")


def test_keys_evict_to_named_objects_load_back_and_survive_a_hand_over(tmp_path: Path) -> None:
    cfg = settings(tmp_path, max_live=2)
    service, source, metrics = build(tmp_path, cfg, "a")
    key_ids = [0, 1, 2, 3, 4, 0, 1, None, 2, 4]
    source.queued = [Message(offset, k) for offset, k in enumerate(key_ids)]
    step(service)
    state = keyed(service.slots.slots[TP])
    assert len(state.live) == 2 and len(state.evicted) == 3
    assert state.offsets[TP] == len(key_ids)
    for key_hash, name in state.evicted.items():
        assert name.startswith(f"key/{key_hash}/state-p0-t1-")
        assert (tmp_path / "ckpt" / name).is_file()
        assert str(KEY) not in name
    # The record without a key is dead-lettered, not learnt.
    dlq = cast("DeadLetters", service._dlq)
    assert [(r.offset, r.reason) for r in dlq.records] == [(7, NO_MODEL_KEY)]
    assert state.records_learnt == 9 and state.records_dead_lettered == 1

    # Key 0 was evicted: its next record loads it back (create-only name kept on disk).
    evicted_before = metrics.key_models_evicted._value.get()
    loaded_before = metrics.key_models_loaded._value.get()
    zero = scope_id_for_key(b"0")
    assert zero in state.evicted
    source.queued = [Message(10, 0)]
    step(service)
    assert zero in state.live and zero not in state.evicted
    assert metrics.key_models_loaded._value.get() == loaded_before + 1
    assert metrics.key_models_evicted._value.get() > evicted_before
    assert metrics.key_models_live._value.get() == 2

    objects = KeyStateObjects(LocalStore(tmp_path / "ckpt"), KEY, False, cfg.config_hash())
    expected = {
        scope_id_for_key(str(k).encode()): Counter(
            (0, o, k) for o, kk in enumerate([*key_ids, 0]) if kk == k
        )
        for k in range(5)
    }
    assert all_counts(state, objects) == expected

    # Hand-over: revoke checkpoints and commits; the next owner restores every key.
    service.on_revoked([TP])
    assert source.committed == {TP: 11}
    other, _source, _metrics = build(tmp_path, cfg, "b")
    restored = keyed(other.slots.slots[TP])
    assert restored.offsets[TP] == 11
    assert all_counts(restored, objects) == expected
    # Each key published its own versions under key/<hash>/ (cadence: 3 records).
    registry = tmp_path / "registry" / "m" / "key"
    assert any(registry.rglob("metadata.json"))


def test_the_service_collects_key_objects_no_checkpoint_can_name_again(tmp_path: Path) -> None:
    cfg = settings(tmp_path, max_live=1, key={"max_live_models": 1, "collect_interval_s": 3})
    service, source, metrics = build(tmp_path, cfg, "a")
    key_ids = [0, 1] * 6  # room for one key: every record loads one key and evicts the other
    for offset, key_id in enumerate(key_ids):
        source.queued = [Message(offset, key_id)]
        step(service)
        service._checkpoint_now(service.slots.slots[TP], "test")
        if service._collecting is not None:
            service._collecting.result(timeout=30)
    evictions = metrics.key_models_evicted._value.get()
    deleted = metrics.key_objects_deleted._value.get()
    left = list((tmp_path / "ckpt" / "key").rglob("*.ckpt"))
    assert deleted > 0 and len(left) == evictions - deleted
    # What was deleted was needed by nobody: the next owner restores every key whole.
    service.on_revoked([TP])
    other, _source, _metrics = build(tmp_path, cfg, "b")
    objects = KeyStateObjects(LocalStore(tmp_path / "ckpt"), KEY, False, cfg.config_hash())
    expected = {
        scope_id_for_key(str(k).encode()): Counter(
            (0, o, k) for o, kk in enumerate(key_ids) if kk == k
        )
        for k in range(2)
    }
    assert all_counts(keyed(other.slots.slots[TP]), objects) == expected


def test_collect_interval_zero_never_deletes_a_key_object(tmp_path: Path) -> None:
    cfg = settings(tmp_path, max_live=1, key={"max_live_models": 1, "collect_interval_s": 0})
    service, source, metrics = build(tmp_path, cfg, "a")
    for offset, key_id in enumerate([0, 1] * 6):
        source.queued = [Message(offset, key_id)]
        step(service)  # a second a step: twelve seconds, no collection
        service._checkpoint_now(service.slots.slots[TP], "test")
    left = list((tmp_path / "ckpt" / "key").rglob("*.ckpt"))
    assert service._collecting is None
    assert metrics.key_objects_deleted._value.get() == 0
    assert len(left) == metrics.key_models_evicted._value.get() > 0


def test_an_unreadable_evicted_key_halts_its_partition_with_nothing_learnt(
    tmp_path: Path,
) -> None:
    cfg = settings(tmp_path, max_live=1)
    service, source, _metrics = build(tmp_path, cfg, "a")
    source.queued = [Message(0, 1), Message(1, 2)]
    step(service)
    state = keyed(service.slots.slots[TP])
    one = scope_id_for_key(b"1")
    path = tmp_path / "ckpt" / state.evicted[one]
    path.write_bytes(path.read_bytes()[:-1] + b"!")  # tampered payload
    learnt = state.records_learnt
    source.queued = [Message(2, 2), Message(3, 1)]
    step(service)
    assert state.halted == {TP: KEY_HALTED}
    assert state.records_learnt == learnt and state.offsets[TP] == 2
    # The learner asks; the poll thread, the one that drives the consumer, pauses it.
    service.poll_step(wait_for_room=False)
    assert TP in source.paused


class MeetingStore(LocalStore):
    """A folder store whose reads of key objects wait until ``parties`` of them are in
    flight together (a reader that fetches one at a time breaks the barrier)."""

    def __init__(self, root: Path, parties: int) -> None:
        super().__init__(root)
        self.meeting = threading.Barrier(parties, timeout=10)

    def get(self, key: str) -> StoredObject:
        if key.startswith("key/"):
            self.meeting.wait()
        return super().get(key)


def test_evicted_keys_are_fetched_side_by_side_and_read_all_or_nothing(tmp_path: Path) -> None:
    cfg = settings(tmp_path, max_live=1)
    writer = KeyStateObjects(LocalStore(tmp_path / "ckpt"), KEY, False, cfg.config_hash())
    hashes = [scope_id_for_key(str(k).encode()) for k in range(3)]
    named = {h: writer.write(h, 0, 1, i + 1, new_state(cfg)) for i, h in enumerate(hashes)}
    meeting = MeetingStore(tmp_path / "ckpt", parties=3)
    objects = KeyStateObjects(meeting, KEY, False, cfg.config_hash())
    with ThreadPoolExecutor(8) as pool:
        loaded = objects.read_many(named, pool)
        assert sorted(loaded) == sorted(hashes)
        assert all(state.records_learnt == 0 for state in loaded.values())
        # One object that fails verification: the whole read fails, naming it.
        tampered = tmp_path / "ckpt" / named[hashes[1]]
        tampered.write_bytes(tampered.read_bytes()[:-1] + b"!")
        with pytest.raises(KeyStateError, match=named[hashes[1]]):
            objects.read_many(named, pool)


def test_key_objects_are_create_only_and_verified(tmp_path: Path) -> None:
    cfg = settings(tmp_path, max_live=1)
    store = LocalStore(tmp_path / "ckpt")
    objects = KeyStateObjects(store, KEY, False, cfg.config_hash())
    key_hash = scope_id_for_key(b"k")
    state = new_state(cfg)
    first = objects.write(key_hash, 0, 1, 1, state)
    # Sequence 1 is taken: never overwritten, the next one is used.
    second = objects.write(key_hash, 0, 1, 1, state)
    assert first != second and second.endswith("-000000000002.ckpt")
    assert objects.read(key_hash, first).records_learnt == 0
    with pytest.raises(KeyStateError):
        objects.read(scope_id_for_key(b"other"), first)  # another key's name
    other_key = KeyStateObjects(store, b"another-key", False, cfg.config_hash())
    with pytest.raises(KeyStateError):
        other_key.read(key_hash, first)  # signature does not verify
    with pytest.raises(KeyStateError):
        objects.read(key_hash, f"key/{key_hash}/state-p0-t1-000000000009.ckpt")  # missing


def config_error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        settings_from_mapping(data, env={"STREAM_TRAINER_CHECKPOINT__HMAC_KEY": "k"})
    return str(info.value)


def test_key_scope_configuration_is_validated(tmp_path: Path) -> None:
    cfg = settings(tmp_path, 5, key={"source": "field", "field": "customer", "max_live_models": 5})
    assert (cfg.model.key.source, cfg.model.key.field) == ("field", "customer")
    assert settings(tmp_path, 5).model.key.max_live_models == 5
    data = config_data(tmp_path, 5)
    data["model"]["key"] = {"source": "field"}
    assert "model.key.field" in config_error(data)
    data = config_data(tmp_path, 5)
    data["training"] = {"mode": "full_batch"}
    assert "key scope trains per_record or mini_batch" in config_error(data)
    data = config_data(tmp_path, 5)
    data["topics"]["control"] = "ctl"
    assert "model.scope key" in config_error(data)
    data = config_data(tmp_path, 5)
    data["model"]["key"] = {"max_live_models": 0}
    assert "max_live_models" in config_error(data)


class Valued(Message):
    """A record whose value is ``value`` and whose Kafka key is ``kafka_key``."""

    def __init__(self, value: bytes, kafka_key: bytes | None = None) -> None:
        super().__init__(0, None)
        self._value, self._kafka_key = value, kafka_key

    def key(self) -> bytes | None:
        return self._kafka_key


def test_the_key_is_the_kafka_key_or_a_string_or_integer_field() -> None:
    by_kafka = KeyReader("kafka_key", None)
    assert by_kafka(Valued(b"{}", b"alice")) == scope_id_for_key(b"alice")
    assert by_kafka(Valued(b"{}", None)) is None
    by_field = KeyReader("field", "customer")
    # The field's canonical bytes: a string's UTF-8, an integer's decimal text.
    assert by_field(Valued(b'{"customer": "alice"}', b"x")) == scope_id_for_key(b"alice")
    assert by_field(Valued(b'{"customer": 42}')) == scope_id_for_key(b"42")
    for refused in (b'{"customer": true}', b'{"customer": 1.5}', b'{"other": 1}', b"[1]", b"{"):
        assert by_field(Valued(refused)) is None, refused
    # The routing readers follow names the same field.
    assert Routing("field:customer", "murmur2", 6, TOPIC).key_source == "field:customer"


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (b'{"other": 1}', "model.key.field 'customer' is missing"),
        (b'{"customer": null}', "model.key.field 'customer' is null"),
        (b'{"customer": {"id": 7}}', "is an object, not a string or an integer"),
        (b'{"customer": [7]}', "is an array, not a string or an integer"),
        (b'{"customer": 7.0}', "is a non-integer number (decimal point or exponent)"),
        (b'{"customer": true}', "is a boolean, not a string or an integer"),
        (b'{"customer": "\\ud800"}', "unpaired surrogate escape"),
        (b'{"customer.id": 7}', "is missing"),  # one top-level name, not a path
    ],
)
def test_a_record_without_a_usable_key_field_says_why(value: bytes, why: str) -> None:
    with pytest.raises(NoModelKey, match=re.escape(why)) as raised:
        KeyReader("field", "customer").read(Valued(value))
    assert "7" not in str(raised.value)  # the value is not echoed (keys are often ids)
    with pytest.raises(NoModelKey, match="Kafka key is null"):
        KeyReader("kafka_key", None).read(Valued(b"{}", None))


def test_the_key_field_is_a_known_field_of_the_flat_layout() -> None:
    record = RecordSettings(features=["a"], labels=None, features_field=None)
    value = b'{"a": 1.5, "y": 0.0, "customer": {"any": "shape"}}'
    # Without it, unknown_features: reject dead-letters every record for the key field.
    plain = RecordDecoder(record, "regression").decode_values([value])
    assert [r.reason for _, r in plain.rejects] == ["unknown_feature"]
    keyed_decoder = RecordDecoder(record, "regression", known_fields=("customer",))
    decoded = keyed_decoder.decode_values([value, b'{"a": 1, "y": 0, "b": 2}'])
    assert decoded.valid_index.tolist() == [0] and decoded.X.tolist() == [[1.5]]
    assert [(i, r.reason) for i, r in decoded.rejects] == [(1, "unknown_feature")]
    # Its value is the key reader's to judge: not parsed (a 400-digit integer is a key).
    big = b'{"a": 1, "y": 0, "customer": 1' + b"0" * 400 + b"}"
    assert keyed_decoder.decode_values([big]).valid_index.tolist() == [0]
    # A key field that is also a feature stays a feature.
    both = RecordDecoder(record, "regression", known_fields=("a",)).decode_values(
        [b'{"a": 2, "y": 0}']
    )
    assert both.X.tolist() == [[2.0]]


def test_the_decoder_knows_the_key_field_only_in_key_scope_by_field(tmp_path: Path) -> None:
    assert settings(tmp_path, 5).model.key_field is None  # the Kafka key
    by_field = {"source": "field", "field": "customer"}
    assert settings(tmp_path, 5, key=by_field).model.key_field == "customer"
    assert settings(tmp_path, 5, key=by_field, scope="partition").model.key_field is None
