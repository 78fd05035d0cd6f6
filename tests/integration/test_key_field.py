"""model.key.source field on a real broker: the key is the top-level JSON field
``customer``, the Kafka key a decoy that every record shares.

Keys are integers (sent now as 7, now as "7": one key), strings with '/', '..', accents,
CJK, an emoji and a 20 000-character one; records whose field is missing, null, an object
(a dotted path is not supported: ``{"customer": {"id": ...}}`` has no key), an array, a
float or a boolean are dead-lettered ``no_model_key``; invalid UTF-8 in the value or a
lone-surrogate escape in the key ``malformed_json``; a 1 MB key ``too_large``. One member with
``max_live_models`` far below the key count, so keys are evicted and loaded back, is
stopped and started again between the two halves of the input.

The oracle (the counting learner, read as test_key_scope reads it): every produced record
is either learnt once, by its own key's model, or dead-lettered once with its case's
reason; the restarted member learns exactly the second half; keys appear in object and
registry names only as their sha256 prefix.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from stream_trainer.publishing.partitioner import (
    key_bytes_from_field,
    murmur2_partition,
    scope_id_for_key,
)
from stream_trainer.publishing.reader import ModelReader
from stream_trainer.testing.counting import Sample, counts_of, judge_counts
from tests.conftest import BrokerHandle
from tests.faults.support import end_offsets, topic_of
from tests.harness import HMAC_KEY, ServiceProcess, deep_merge, read_topic, wait_for
from tests.integration.test_key_scope import ENV, PARTITIONS, key_config, key_models
from tests.integration.test_partition_scope import slot_offsets

pytestmark = pytest.mark.integration

FIELD = "customer"
KEYS = 24
MAX_LIVE = 4
GOOD_PER_HALF = 240
# Keys whose text would be a path, or not ASCII, if it were ever put in a name.
SPECIAL = {8: "shop/8", 9: "../9", 10: "café-ü/10", 11: "客户-11", 12: "🌵 12"}
LONG_KEY = 13  # 20 000 characters: a valid key, under record.max_bytes
HUGE = 1_000_000  # characters of the too-large key (over record.max_bytes, under the broker's)

# Bad case -> (dlq.reason, what dlq.error.message must say).
BAD: dict[str, tuple[str, str]] = {
    "missing": ("no_model_key", "is missing"),
    "null": ("no_model_key", "is null"),
    "object": ("no_model_key", "is an object"),
    "array": ("no_model_key", "is an array"),
    "float": ("no_model_key", "non-integer number"),
    "bool": ("no_model_key", "is a boolean"),
    # Strict JSON (msgspec) refuses a lone surrogate escape anywhere, before the key is read.
    "surrogate": ("malformed_json", "not strict JSON"),
    "bad_utf8": ("malformed_json", ""),
    "huge": ("too_large", ""),
}
BAD_FIELD: dict[str, Any] = {
    "null": None,
    "object": {"id": 1001},
    "array": [1001],
    "float": 1001.0,
    "bool": True,
    "surrogate": "\ud800",  # json.dumps writes the escape "\ud800": valid JSON, no UTF-8
    "huge": "k" * HUGE,
}


def key_value(key_id: int, turn: int) -> str | int:
    """The field value of ``key_id``'s record number ``turn``: integer keys alternate
    between the JSON integer and its decimal string, which are one key."""
    if key_id < 8:
        return 1000 + key_id if turn % 2 == 0 else str(1000 + key_id)
    if key_id == LONG_KEY:
        return "x" * 20_000 + str(key_id)
    return SPECIAL.get(key_id, f"cust-{key_id}")


def key_hash(key_id: int) -> str:
    return scope_id_for_key(key_bytes_from_field(key_value(key_id, 0)))


class FieldKeyProducer:
    """Counting records (partition, offset, key id in the features) with the key in
    ``customer``, each in its key's murmur2 partition; the bad cases round-robin. The
    topic's only writer, from offset 0: offsets are predicted, and the oracle reads them
    back from the broker. Every record carries its case in the header ``case``."""

    def __init__(self, bootstrap: str, topic: str, flat: bool) -> None:
        self._topic, self._flat = topic, flat
        self._next = dict.fromkeys(range(PARTITIONS), 0)
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "enable.idempotence": True,
                "linger.ms": 5,
                "message.max.bytes": 2 * HUGE,  # the 1 MB key reaches the broker
            }
        )

    def _send(self, partition: int, case: str, value: bytes, failures: list[str]) -> None:
        def delivered(error: Any, _message: Any) -> None:
            if error is not None:
                failures.append(f"{case}: {error}")

        self._producer.produce(
            self._topic,
            value,
            key=b"decoy",
            partition=partition,
            headers={"case": case.encode()},
            on_delivery=delivered,
        )
        self._next[partition] += 1
        self._producer.poll(0)

    def produce_half(self) -> None:
        failures: list[str] = []
        for i in range(GOOD_PER_HALF):
            key_id = i * 7 % KEYS  # every key in turn, 7 apart: evictions and reloads
            value = key_value(key_id, i // KEYS)
            partition = murmur2_partition(key_bytes_from_field(value), PARTITIONS)
            record = self._record(partition, key_id)
            record[FIELD] = value
            self._send(partition, "good", json.dumps(record).encode(), failures)
        for n, case in enumerate(BAD):
            partition = n % PARTITIONS
            record = self._record(partition, -1)
            if case in BAD_FIELD:
                record[FIELD] = BAD_FIELD[case]
            payload = json.dumps(record).encode()
            if case == "bad_utf8":  # "café" in Latin-1 inside the key string
                payload = payload[:-1] + b', "' + FIELD.encode() + b'": "caf\xe9"}'
            self._send(partition, case, payload, failures)
        assert self._producer.flush(60) == 0 and not failures, failures

    def _record(self, partition: int, key_id: int) -> dict[str, Any]:
        offset = self._next[partition]
        features = {"partition": partition, "offset": offset, "key": key_id}
        return {**features, "y": 0.0} if self._flat else {"x": features, "y": 0.0}


def produced(bootstrap: str, topic: str) -> tuple[set[Sample], dict[tuple[int, int], str]]:
    """The topic as the broker holds it: the good records' (partition, offset, key id),
    and the bad records' case by (partition, offset)."""
    good: set[Sample] = set()
    bad: dict[tuple[int, int], str] = {}
    for message in read_topic(bootstrap, topic):
        where = (int(message.partition()), int(message.offset()))
        case = dict(message.headers())["case"].decode()
        if case == "good":
            value = json.loads(message.value())
            key_id = int(value.get("x", value)["key"])
            good.add((*where, key_id))
        else:
            bad[where] = case
    return good, bad


def hex_names(root: Path) -> set[str]:
    """The folder names under ``root`` (each must be a key hash: nothing else is there)."""
    names = {path.name for path in root.iterdir()} if root.exists() else set()
    assert all(re.fullmatch(r"[0-9a-f]{32}", name) for name in names), sorted(names)[:5]
    return names


# flat: features at the top level beside the key field (unknown_features: reject), which
# must not make the key field an unknown feature.
@pytest.mark.parametrize("layout", ["nested", "flat"])
def test_keys_from_a_record_field_learn_once_and_bad_keys_are_dead_lettered(
    tmp_path: Path, kafka_broker: BrokerHandle, layout: str
) -> None:
    config = deep_merge(
        key_config(tmp_path, kafka_broker, "per_record"),
        {
            "model": {"key": {"source": "field", "field": FIELD, "max_live_models": MAX_LIVE}},
            "record": {"features_field": None if layout == "flat" else "x"},
            "registry": {"publish_every_records": 10},  # each key: 10 records a half
            # Small polls: a key's records span many units, so evicted keys come back.
            "kafka": {"consume_batch_size": 5},
        },
    )
    topic = topic_of(config)
    bootstrap = config["kafka"]["bootstrap_servers"]
    checkpoints = Path(config["checkpoint"]["dir"])
    producer = FieldKeyProducer(bootstrap, topic, flat=layout == "flat")
    runs: list[dict[str, float]] = []
    for half in ("first", "second"):
        producer.produce_half()
        ends = end_offsets(bootstrap, topic)
        with contextlib.ExitStack() as running:  # a failing wait must not leave it running
            member = running.enter_context(ServiceProcess(config, tmp_path, ENV, name=half))
            at_ends = lambda ends=ends: slot_offsets(checkpoints, topic) == ends  # noqa: E731
            wait_for(at_ends, 45, f"{half} half")
            runs.append(member.metrics())
            assert member.stop() == 0

    # Every good record learnt once, by its own key's model.
    good, bad = produced(bootstrap, topic)
    models, from_objects = key_models(checkpoints, topic)
    total: Counter[Sample] = Counter()
    for hashed, (partition, learnt) in models.items():
        ids = {sample[2] for sample in learnt}
        assert len(ids) == 1, f"key model {hashed} learnt keys {sorted(ids)}"
        assert key_hash(ids.pop()) == hashed, "a key's records in another key's model"
        assert {sample[0] for sample in learnt} == {partition}
        total += learnt
    verdict = judge_counts(good, total)
    print(
        f"key field, {layout}: {verdict.line()}; {len(models)} key models, {from_objects} evicted"
    )
    assert (verdict.lost, verdict.twice, verdict.unexpected) == (0, 0, 0), verdict.examples
    assert set(models) == {key_hash(k) for k in range(KEYS)}  # 7 and "7": one model

    # Every bad record dead-lettered once, with its case's reason and why.
    assert sorted(Counter(bad.values()).items()) == sorted((case, 2) for case in BAD)
    dead: Counter[tuple[int, int]] = Counter()
    for message in read_topic(bootstrap, config["topics"]["dead_letter"]):
        headers = {k: v.decode() for k, v in message.headers()}
        where = (int(headers["dlq.original.partition"]), int(headers["dlq.original.offset"]))
        dead[where] += 1
        reason, why = BAD[bad[where]]  # KeyError: a good record dead-lettered
        assert headers["dlq.reason"] == reason, (bad[where], headers)
        assert why in headers["dlq.error.message"], (bad[where], headers)
        assert "1001" not in headers["dlq.error.message"]  # the key's value is not echoed
    assert dead == Counter(dict.fromkeys(bad, 1))

    # Evicted and loaded back in both runs; the restart resumed: it learnt the second half only.
    for metrics in runs:
        assert metrics["stream_trainer_key_models_evicted_total"] > 0
        assert metrics["stream_trainer_key_models_loaded_total"] > 0
        assert metrics["stream_trainer_key_models_live"] <= MAX_LIVE
    assert runs[1]["stream_trainer_records_learnt_total"] == GOOD_PER_HALF

    # Keys are named by hash only: '/' , '..' and unicode never reach a path.
    registry = Path(config["registry"]["root"]) / "model"
    assert hex_names(checkpoints / "key") <= set(models)
    assert hex_names(registry / "key") <= set(models)
    routing = json.loads((registry / "ROUTING.json").read_text())
    assert routing["key_source"] == f"field:{FIELD}"

    # A serving process finds a field key's model from the field's canonical bytes.
    reader = ModelReader(
        {"bootstrap.servers": bootstrap},
        config["topics"]["versions"],
        "model",
        HMAC_KEY.encode(),
        registry_root=Path(config["registry"]["root"]),
        scope="key",
    )
    reader.start()
    try:
        assert reader.wait_until_caught_up(30), reader.error
        served = set()
        for key_id in range(KEYS):
            key = key_bytes_from_field(key_value(key_id, 1))
            if scope_id_for_key(key) in reader.slots():
                assert {s[2] for s in counts_of(reader._model(key=key))} == {key_id}
                served.add(key_id)
        # Every key learnt 10 records a half: each published (before it could be evicted).
        assert served == set(range(KEYS)), f"keys not served: {set(range(KEYS)) - served}"
    finally:
        reader.stop()
