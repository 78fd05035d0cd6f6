"""model.scope key on a real broker: two members share six partitions and ~50 keys, with
room for only a few key models in memory, so keys are evicted and loaded back.

The model is the judge (the counting learner): each partition slot's newest checkpoint
holds a KeyedState; every key's model (live in it, or the evicted object it names) holds
the multiset of (partition, offset, key id) it learnt. Every produced record must be
learnt once, by its own key's model, and no key model may hold another key's record.
A reader in key scope then serves a key its own published model.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from stream_trainer.laptop.embedded import free_port
from stream_trainer.publishing.partitioner import scope_id_for_key
from stream_trainer.publishing.reader import ModelReader
from stream_trainer.state.keyed_state import KeyedState, KeyStateObjects
from stream_trainer.state.objectstore import LocalStore
from stream_trainer.state.slot_store import SlotStore
from stream_trainer.testing.counting import (
    FEATURES,
    RIVER_PATH,
    CountingProducer,
    Sample,
    counts_of,
    judge_counts,
    produced_samples,
)
from stream_trainer.training.learners import TESTING_ENV
from tests.conftest import BrokerHandle
from tests.faults.support import end_offsets, fault_config, topic_of
from tests.harness import HMAC_KEY, ServiceProcess, wait_for
from tests.integration.test_partition_scope import commits_outside_ownership, slot_offsets

pytestmark = pytest.mark.integration

PARTITIONS = 6
KEYS = 50
MAX_LIVE = 10
ENV = {TESTING_ENV: "1"}


def key_config(tmp_path: Path, broker: BrokerHandle, mode: str) -> dict[str, Any]:
    return fault_config(
        tmp_path,
        broker,
        PARTITIONS,
        {
            "record": {"features": list(FEATURES), "labels": None},
            "model": {
                "task": "regression",
                "preprocessing": [],
                "learner": {"path": RIVER_PATH},
                "scope": "key",
                "key": {"max_live_models": MAX_LIVE},
            },
            "topics": {"control": None},
            "training": {"mode": mode, "mini_batch": {"size": 200, "max_wait_s": 0.3}},
            "checkpoint": {"every_seconds": 0.5, "keep_last": 5},
            "registry": {"publish_every_records": 40},
        },
    )


def key_models(checkpoints: Path, topic: str) -> tuple[dict[str, tuple[int, Counter[Sample]]], int]:
    """Every key's model, by key hash: (its partition, what it learnt), read from the
    newest partition checkpoints (live keys) and the evicted objects they name, all
    verified; and how many were read from evicted objects. A key in two slots fails."""
    store = LocalStore(checkpoints)
    objects = KeyStateObjects(store, HMAC_KEY.encode(), False, config_hash="")
    models: dict[str, tuple[int, Counter[Sample]]] = {}
    evicted = 0
    for p in range(PARTITIONS):
        slot = SlotStore(store, "partition", f"{topic}:{p}", "reader", HMAC_KEY.encode(), False, 5)
        loaded = slot.read_head()
        assert loaded is not None, f"partition {p}: no checkpoint"
        state = loaded.state
        assert isinstance(state, KeyedState)
        objects._config_hash = loaded.manifest.config_hash  # the service's own config
        for key_hash, key_state in state.live.items():
            assert key_hash not in models, f"key {key_hash} in two slots"
            models[key_hash] = (p, counts_of(key_state.model))
        for key_hash, name in state.evicted.items():
            assert key_hash not in models, f"key {key_hash} in two slots"
            models[key_hash] = (p, counts_of(objects.read(key_hash, name).model))
            evicted += 1
    return models, evicted


@pytest.mark.parametrize("mode", ["per_record", "mini_batch"])
def test_two_members_train_one_model_per_key_with_eviction(
    tmp_path: Path, kafka_broker: BrokerHandle, mode: str
) -> None:
    config = key_config(tmp_path, kafka_broker, mode)
    topic = topic_of(config)
    bootstrap = config["kafka"]["bootstrap_servers"]
    producer = CountingProducer(bootstrap, topic, PARTITIONS, keys=KEYS, by_key=True)
    producer.produce(3000)
    # A failing wait must not leave members running.
    with contextlib.ExitStack() as members:
        first = members.enter_context(ServiceProcess(config, tmp_path, ENV, name="a"))
        checkpoints = Path(config["checkpoint"]["dir"])
        wait_for(lambda: len(slot_offsets(checkpoints, topic)) == PARTITIONS, 60, "six slots")
        second_config = {**config, "http": {"host": "127.0.0.1", "port": free_port()}}
        second = members.enter_context(ServiceProcess(second_config, tmp_path, ENV, name="b"))
        wait_for(
            lambda: second.metrics().get("stream_trainer_assigned_partitions", 0) > 0,
            60,
            "the second member owns partitions",
        )
        producer.produce(3000)
        ends = end_offsets(bootstrap, topic)
        wait_for(lambda: slot_offsets(checkpoints, topic) == ends, 90, "every slot at the end")
        loaded_a = first.metrics().get("stream_trainer_key_models_loaded_total", 0)
        evicted_a = first.metrics().get("stream_trainer_key_models_evicted_total", 0)
        live_b = second.metrics().get("stream_trainer_key_models_live", 0)
        assert first.stop() == 0
        assert second.stop() == 0

    models, from_objects = key_models(checkpoints, topic)
    total: Counter[Sample] = Counter()
    for key_hash, (partition, learnt) in models.items():
        ids = {sample[2] for sample in learnt}
        assert len(ids) == 1, f"key model {key_hash} learnt keys {sorted(ids)[:5]}"
        assert scope_id_for_key(str(ids.pop()).encode()) == key_hash, "a key's records elsewhere"
        assert {sample[0] for sample in learnt} == {partition}
        total += learnt
    verdict = judge_counts(produced_samples(bootstrap, topic), total)
    print(
        f"key scope, {mode}: {verdict.line()}; {len(models)} key models, {from_objects} "
        f"evicted in the checkpoints; member a loaded {loaded_a}, evicted {evicted_a}; "
        f"member b live {live_b}"
    )
    assert (verdict.lost, verdict.twice, verdict.unexpected) == (0, 0, 0)
    assert len(models) == KEYS
    # Evictions and reloads happened (how many keys the final checkpoints name as evicted
    # depends on timing: a slot with no new record keeps its last checkpoint, keys live).
    assert evicted_a > 0 and loaded_a > 0, "no eviction and reload"
    assert live_b <= MAX_LIVE
    for member in ("a", "b"):
        assert commits_outside_ownership(tmp_path / f"{member}.log") == []

    # Each key publishes its own versions; a key-scope reader serves a key its own model.
    registry = Path(config["registry"]["root"])
    assert list((registry / "model" / "key").rglob("metadata.json")), "no key published"
    reader = ModelReader(
        {"bootstrap.servers": bootstrap},
        config["topics"]["versions"],
        "model",
        HMAC_KEY.encode(),
        registry_root=registry,
        scope="key",
    )
    reader.start()
    try:
        assert reader.wait_until_caught_up(30), reader.error
        served = 0
        for key_id in range(KEYS):
            key = str(key_id).encode()
            if scope_id_for_key(key) not in reader.slots():
                continue
            reader.predict_one(dict.fromkeys(FEATURES, 0.0), key=key)  # NoModelForKey fails
            # The served model is the key's own: it learnt only this key's records.
            learnt = counts_of(reader._model(key=key))
            assert learnt and {sample[2] for sample in learnt} == {key_id}
            served += 1
        # ~120 records per key, a version due every 40 (published before any eviction).
        assert served == KEYS, f"only {served} keys served"
    finally:
        reader.stop()
    assert reader.error is None and reader.failures == 0
