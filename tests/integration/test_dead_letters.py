"""Dead letters for records that used to crash the service (issue 19), against real brokers.

Each test runs ``stream-trainer run`` as a process, produces hostile records among valid
ones, and judges by /metrics, the dead-letter topic read back and the final checkpoint: every
bad record is dead-lettered with its reason, every valid one learnt, and the process that
started is the one that stops (no crash, no restart).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

# The defining module: confluent_kafka.admin re-exports these without __all__ (mypy strict).
from confluent_kafka.admin._config import AlterConfigOpType, ConfigEntry, ConfigResource

from stream_trainer.laptop.datasets import get_dataset
from stream_trainer.laptop.embedded import create_topics
from stream_trainer.laptop.produce import poison_values
from tests.conftest import BrokerHandle
from tests.harness import ServiceProcess, read_topic, service_config, unique, wait_for
from tests.integration.test_training import (
    LEARNT,
    dead_lettered,
    encoded_rows,
    final_checkpoint,
    stop_cleanly,
    wait_exact,
)

pytestmark = pytest.mark.integration

CHECKPOINT_FAILURES = "stream_trainer_checkpoint_failures_total"
MB = 1_000_000
# The input topic accepts records up to 12 MB; the service's producer keeps librdkafka's
# default message.max.bytes (1 MB), so a dead letter of a bigger record must be cut.
TOPIC_MAX_BYTES = 12 * 1024 * 1024
DEPTH = 10_000


def produce_big(
    bootstrap: str, topic: str, values: Sequence[bytes | None]
) -> list[tuple[int, int]]:
    """Produce ``values`` in order to partition 0; returns (partition, offset) of each."""
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "linger.ms": 20,
            "message.max.bytes": TOPIC_MAX_BYTES,
        }
    )
    placed: list[tuple[int, int] | None] = [None] * len(values)
    failures: list[str] = []

    def delivered(index: int) -> Any:
        def callback(error: Any, message: Any) -> None:
            if error is not None:
                failures.append(str(error))
            else:
                placed[index] = (message.partition(), message.offset())

        return callback

    for index, value in enumerate(values):
        producer.produce(topic, value=value, partition=0, on_delivery=delivered(index))
        producer.poll(0)
    assert producer.flush(60) == 0
    assert not failures, failures[:3]
    return [p for p in placed if p is not None]


def big_input_config(
    tmp_path: Path, bootstrap: str, mode: str, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``service_config`` on a fresh 1-partition input topic that accepts 12 MB records."""
    config = service_config(tmp_path, bootstrap, "phishing", mode, overrides=overrides)
    topic = unique("phishing-big")
    create_topics(bootstrap, {topic: 1}, config={"max.message.bytes": str(TOPIC_MAX_BYTES)})
    config["topics"]["input"] = [topic]
    return config


def huge(size: int) -> bytes:
    """A record of ``size`` bytes that is valid but for its size."""
    features = get_dataset("phishing").features
    head = b'{"x": {' + b", ".join(b'"%s": 0.5' % f.encode() for f in features) + b'}, "y": '
    head += b'true, "pad": "'
    return head + b"p" * (size - len(head) - 2) + b'"}'


def dlq_by_offset(bootstrap: str, config: dict[str, Any], expected: int) -> dict[int, Any]:
    dead = read_topic(bootstrap, config["topics"]["dead_letter"], expected=expected)
    out = {}
    for message in dead:
        headers = dict(message.headers() or [])
        offset = int(headers["dlq.original.offset"])
        assert offset not in out, f"dead-lettered twice: {offset}"
        out[offset] = message
    return out


def test_records_over_the_producer_limit_are_dead_lettered_cut_and_tombstones_stay_null(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    bootstrap = broker.bootstrap_servers
    config = big_input_config(
        tmp_path, bootstrap, "per_record", {"kafka": {"decode_worker": False}}
    )
    topic = config["topics"]["input"][0]
    valid = encoded_rows("phishing", 300)
    bad: dict[int, tuple[bytes | None, str]] = {
        50: (huge(1_300_000), "too_large"),
        120: (huge(10 * MB), "too_large"),
        200: (None, "empty"),  # a tombstone
    }
    values: list[bytes | None] = []
    reasons: dict[int, str] = {}
    for i, value in enumerate(valid):
        if i in bad:
            reasons[len(values)] = bad[i][1]
            values.append(bad[i][0])
        values.append(value)
    began = time.monotonic()
    with ServiceProcess(config, tmp_path) as service:
        pid = service.pid
        placed = produce_big(bootstrap, topic, values)
        wait_exact(service, LEARNT, len(valid), timeout=90)
        wait_exact(service, dead_lettered("too_large"), 2, timeout=30)
        wait_exact(service, dead_lettered("empty"), 1, timeout=30)
        assert service.alive() and service.pid == pid
        stop_cleanly(service)
    seconds = time.monotonic() - began
    dead = dlq_by_offset(bootstrap, config, expected=len(bad))
    assert set(dead) == {placed[i][1] for i in reasons}
    sizes = {}
    for index, reason in reasons.items():
        message = dead[placed[index][1]]
        headers = {k: v.decode() for k, v in message.headers() or []}
        assert headers["dlq.reason"] == reason
        original = values[index]
        if original is None:
            assert message.value() is None, "a tombstone must stay null in the dead-letter topic"
            assert "dlq.truncated" not in headers
            continue
        cut = message.value()
        assert cut and original.startswith(cut) and len(cut) < MB
        assert headers["dlq.truncated"] == "true"
        assert int(headers["dlq.original.size"]) == len(original)
        assert headers["dlq.original.sha256"] == hashlib.sha256(original).hexdigest()
        sizes[len(original)] = len(cut)
    state = final_checkpoint(config)
    print(
        f"[{broker.name}] huge records: {len(valid)} learnt, dead letters cut "
        f"{sizes} (original -> kept bytes), tombstone kept null, {seconds:.1f} s"
    )
    assert state.records_learnt == len(valid)
    assert state.records_dead_lettered == len(bad)
    assert state.offsets == {(topic, 0): len(values)}


def test_a_dead_letter_the_broker_refuses_as_too_large_is_resent_without_its_value(
    kafka_broker: BrokerHandle, tmp_path: Path
) -> None:
    # The dead-letter topic takes less than the producer may send: the broker refuses the
    # dead letter after it was queued, so only the delivery report says so. (Apache Kafka
    # only: Tansu does not enforce a topic's max.message.bytes.)
    broker = kafka_broker
    bootstrap = broker.bootstrap_servers
    config = service_config(tmp_path, bootstrap, "phishing", "per_record")
    dlq = unique("small-dlq")
    create_topics(bootstrap, {dlq: 1}, config={"max.message.bytes": "20000"})
    config["topics"]["dead_letter"] = dlq
    topic = config["topics"]["input"][0]
    valid = encoded_rows("phishing", 200)
    big = huge(70_000)  # over record.max_bytes (65 536), under the producer's 1 MB
    values = [*valid[:100], big, *valid[100:]]
    with ServiceProcess(config, tmp_path) as service:
        pid = service.pid
        produce_big(bootstrap, topic, values)
        wait_exact(service, LEARNT, len(valid), timeout=90)
        wait_exact(service, dead_lettered("too_large"), 1, timeout=30)
        # The checkpoint covers the record only once its dead letter is durable.
        wait_for_checkpoint_offset(config, topic, len(values), service)
        assert service.pid == pid
        stop_cleanly(service)
    [message] = read_topic(bootstrap, dlq, expected=1)
    headers = {k: v.decode() for k, v in message.headers() or []}
    print(f"[{broker.name}] refused dead letter resent: value {message.value()!r}, {headers}")
    assert message.value() is None
    assert headers["dlq.original.offset"] == "100"
    assert headers["dlq.reason"] == "too_large"
    assert headers["dlq.truncated"] == "true"
    assert int(headers["dlq.original.size"]) == len(big)
    assert headers["dlq.original.sha256"] == hashlib.sha256(big).hexdigest()


def test_an_undeliverable_dead_letter_holds_checkpoints_back_until_it_is_durable(
    kafka_broker: BrokerHandle, tmp_path: Path
) -> None:
    # A dead-letter topic that refuses even the provenance headers: the dead letter cannot
    # be delivered in any form until an operator raises the topic's limit.
    broker = kafka_broker
    bootstrap = broker.bootstrap_servers
    config = service_config(tmp_path, bootstrap, "phishing", "per_record")
    dlq = unique("tiny-dlq")
    create_topics(bootstrap, {dlq: 1}, config={"max.message.bytes": "200"})
    config["topics"]["dead_letter"] = dlq
    topic = config["topics"]["input"][0]
    valid = encoded_rows("phishing", 200)
    values = [*valid[:100], huge(70_000), *valid[100:]]
    with ServiceProcess(config, tmp_path) as service:
        pid = service.pid
        produce_big(bootstrap, topic, values)
        wait_exact(service, LEARNT, len(valid), timeout=90)
        held_back = service.wait_metric(CHECKPOINT_FAILURES, 2, timeout=60)
        state = final_checkpoint_or_none(config)
        covered = state.offsets.get((topic, 0), 0) if state is not None else 0
        assert covered <= 100, f"a checkpoint covers offset {covered}, past the undelivered one"
        assert read_topic(bootstrap, dlq) == []
        admin = AdminClient({"bootstrap.servers": bootstrap})
        resource = ConfigResource(
            ConfigResource.Type.TOPIC,
            dlq,
            incremental_configs=[
                ConfigEntry(
                    "max.message.bytes",
                    "1048588",
                    incremental_operation=AlterConfigOpType.SET,
                )
            ],
        )
        for future in admin.incremental_alter_configs([resource]).values():
            future.result(timeout=30)
        began = time.monotonic()
        wait_for_checkpoint_offset(config, topic, len(values), service)
        recovered = time.monotonic() - began
        assert service.alive() and service.pid == pid
        stop_cleanly(service)
    dead = read_topic(bootstrap, dlq, expected=1)
    print(
        f"[{broker.name}] undeliverable dead letter: {held_back:.0f} checkpoints held back, "
        f"last durable offset {covered} (bad record at 100), checkpoint caught up "
        f"{recovered:.1f} s after the topic was fixed, {len(dead)} dead letter"
    )
    assert len(dead) == 1
    headers = {k: v.decode() for k, v in dead[0].headers() or []}
    assert headers["dlq.original.offset"] == "100" and headers["dlq.reason"] == "too_large"
    assert final_checkpoint(config).records_dead_lettered == 1


def final_checkpoint_or_none(config: dict[str, Any]) -> Any:
    try:
        return final_checkpoint(config)
    except AssertionError:  # none written yet
        return None


def wait_for_checkpoint_offset(
    config: dict[str, Any], topic: str, offset: int, service: ServiceProcess
) -> None:
    def check() -> bool:
        assert service.alive(), service.tail()
        try:
            return final_checkpoint(config).offsets.get((topic, 0)) == offset
        except AssertionError:
            return False

    wait_for(check, 60, f"a checkpoint at offset {offset}", interval=0.5)


def hostile_values() -> list[tuple[str, bytes | None]]:
    """Records nobody listed before issue 19, each with the reason it must get."""
    dataset = get_dataset("phishing")
    first = dataset.features[0]
    body = b'{"x": {' + b", ".join(b'"%s": 0.5' % f.encode() for f in dataset.features) + b"}, "
    nested = b"[" * DEPTH + b"]" * DEPTH
    return [
        ("malformed_json", body + b'"y": true, "meta": ' + nested + b"}"),
        (
            "malformed_json",
            body.replace(b'"%s": 0.5' % first.encode(), b'"%s": ' % first.encode() + nested)
            + b'"y": true}',
        ),
        ("malformed_json", body + b'"y": true, "note": "caf\xe9"}'),  # Latin-1, not UTF-8
        ("malformed_json", body + b'"y": true, "note": "\xed\xa0\x80"}'),  # a surrogate
        ("malformed_json", body + b'"y": true, "note": "a\x00b"}'),  # a raw NUL
        ("too_large", huge(1_300_000)),
        ("empty", None),
        ("not_object", b"[" + b"1," * 10 + b"1]"),
        ("not_object", b'"just a string"'),
        ("unknown_label", body + b'"y": ' + b"9" * 30 + b"}"),  # past int64
        *poison_values(dataset),
    ]


@pytest.mark.parametrize("mode", ["mini_batch", "per_record"])
def test_a_poison_mix_nobody_listed_is_dead_lettered_and_the_service_never_exits(
    broker: BrokerHandle, tmp_path: Path, mode: str
) -> None:
    bootstrap = broker.bootstrap_servers
    overrides = {"training": {"mini_batch": {"size": 100}}} if mode == "mini_batch" else {}
    config = big_input_config(tmp_path, bootstrap, mode, overrides)  # decode worker on
    topic = config["topics"]["input"][0]
    valid = encoded_rows("phishing", 1000)
    poison = hostile_values()
    values: list[bytes | None] = []
    reasons: dict[int, str] = {}
    every = len(valid) // len(poison)
    for i, value in enumerate(valid):
        values.append(value)
        k = i // every
        if i % every == every - 1 and k < len(poison):
            reasons[len(values)] = poison[k][0]
            values.append(poison[k][1])
    assert len(reasons) == len(poison)
    counts: dict[str, int] = {}
    for reason in reasons.values():
        counts[reason] = counts.get(reason, 0) + 1
    began = time.monotonic()
    with ServiceProcess(config, tmp_path) as service:
        pid = service.pid
        placed = produce_big(bootstrap, topic, values)
        wait_exact(service, LEARNT, len(valid), timeout=120)
        for reason, count in counts.items():
            wait_exact(service, dead_lettered(reason), count, timeout=30)
        assert service.alive() and service.pid == pid
        stop_cleanly(service)
    seconds = time.monotonic() - began
    dead = dlq_by_offset(bootstrap, config, expected=len(poison))
    assert set(dead) == {placed[i][1] for i in reasons}
    for index, reason in reasons.items():
        message = dead[placed[index][1]]
        headers = {k: v.decode() for k, v in message.headers() or []}
        assert headers["dlq.reason"] == reason, (index, headers)
        if values[index] is None:
            assert message.value() is None
        elif "dlq.truncated" not in headers:
            assert message.value() == values[index]
    state = final_checkpoint(config)
    print(
        f"[{broker.name}] {mode} hostile poison mix: {len(valid)} learnt, {len(poison)} dead "
        f"letters {counts}, one process (pid {pid}), {seconds:.1f} s"
    )
    assert state.records_learnt == len(valid)
    assert state.records_dead_lettered == len(poison)
    assert state.model.parameters_finite()
    assert state.offsets == {(topic, 0): len(values)}
