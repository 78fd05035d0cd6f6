"""The wire decoder against a real Schema Registry (Apicurio 2.4.2, Confluent API).

Values are written by confluent-kafka's own serializers (what producers in the field use)
and read by :class:`stream_trainer.ingest.wire.WireDecoder`. The outage tests put a pausable TCP
proxy between the decoder and the registry rather than stopping the registry: Apicurio
keeps schemas in memory, so a restart would turn every id into a 404 and test a different
thing (an unknown schema), not an outage.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.json_schema import JSONSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from stream_trainer.config import SchemaRegistrySettings
from stream_trainer.ingest.wire import (
    JSON_SCHEMA_INVALID,
    MALFORMED_AVRO,
    UNKNOWN_SCHEMA,
    RegistryWaitInterrupted,
    SchemaRegistryUnavailable,
    WireDecoder,
    WireFormatError,
    frame,
    schema_ids,
)
from stream_trainer.laptop.datasets import get_dataset
from stream_trainer.laptop.produce import ValueFormat, produce
from stream_trainer.testing.schema_registry import SchemaRegistry
from tests.conftest import BrokerHandle
from tests.harness import read_topic
from tests.tcp_proxy import Mode, TcpProxy

pytestmark = pytest.mark.integration


def _record(name: str, fields: list[dict[str, Any]]) -> str:
    return json.dumps({"type": "record", "name": name, "namespace": "test", "fields": fields})


X_V1: list[dict[str, Any]] = [
    {"name": "amount", "type": "double"},
    {"name": "country", "type": "string"},
    {"name": "card_present", "type": "boolean"},
    {
        "name": "device",
        "type": ["null", {"type": "enum", "name": "Device", "symbols": ["web", "app"]}],
    },
]
# v2 adds an optional field with a default; v3 drops "country" (a field the model may not use).
X_V2 = [*X_V1, {"name": "merchant", "type": ["null", "string"], "default": None}]
X_V3 = [f for f in X_V2 if f["name"] != "country"]


def _txn(x_fields: list[dict[str, Any]]) -> str:
    return _record(
        "Txn",
        [
            {"name": "x", "type": {"type": "record", "name": "X", "fields": x_fields}},
            {"name": "y", "type": "int"},
        ],
    )


@pytest.fixture
def client(schema_registry: SchemaRegistry) -> Iterator[Any]:
    with SchemaRegistryClient({"url": schema_registry.url}) as sr:
        yield sr


@pytest.fixture
def make_decoder() -> Iterator[Callable[..., WireDecoder]]:
    """``make_decoder(url, **settings)``: decoders closed at the test's end (their HTTP
    clients hold sockets)."""
    made: list[WireDecoder] = []

    def _make(url: str, **overrides: Any) -> WireDecoder:
        made.append(WireDecoder(SchemaRegistrySettings(url=url, **overrides)))
        return made[-1]

    yield _make
    for decoder in made:
        decoder.close()


def _serialize_avro(client: Any, schema: str, topic: str, value: dict[str, Any]) -> bytes:
    serializer = AvroSerializer(client, schema)
    data: bytes = serializer(value, SerializationContext(topic, MessageField.VALUE))
    return data


def test_avro_round_trip_matches_confluents_deserializer(
    schema_registry: SchemaRegistry, client: Any, make_decoder: Callable[..., WireDecoder]
) -> None:
    topic = f"avro-{uuid.uuid4().hex[:8]}"
    records = [
        {"x": {"amount": 12.5, "country": "DE", "card_present": True, "device": "app"}, "y": 1},
        {"x": {"amount": -3.0, "country": "FR", "card_present": False, "device": None}, "y": 0},
    ]
    values = [_serialize_avro(client, _txn(X_V1), topic, r) for r in records]
    assert {v[0] for v in values} == {0}  # the Confluent frame, not plain Avro
    decoder = make_decoder(schema_registry.url)
    ids = schema_ids(values)
    assert len(ids) == 1
    decoder.ensure(ids)
    decoded = [decoder.decode(v) for v in values]
    assert [obj for obj, _ in decoded] == records  # enum -> str, null union -> None
    assert {sid for _, sid in decoded} == ids
    reference = AvroDeserializer(client)
    ctx = SerializationContext(topic, MessageField.VALUE)
    assert [reference(v, ctx) for v in values] == records
    # A value framed with the right id but a payload of another shape is rejected.
    with pytest.raises(WireFormatError) as info:
        decoder.decode(frame(next(iter(ids)), b"\x02"))
    assert info.value.reason == MALFORMED_AVRO


def test_evolution_v1_v2_v3_under_one_subject_all_decode(
    schema_registry: SchemaRegistry, client: Any, make_decoder: Callable[..., WireDecoder]
) -> None:
    topic = f"evolve-{uuid.uuid4().hex[:8]}"
    v1 = {"x": {"amount": 1.0, "country": "DE", "card_present": True, "device": None}, "y": 1}
    v2 = {"x": {**v1["x"], "merchant": "m-7"}, "y": 0}  # type: ignore[dict-item]
    v3 = {"x": {k: v for k, v in v2["x"].items() if k != "country"}, "y": 1}  # type: ignore[attr-defined]
    values = [
        _serialize_avro(client, _txn(X_V1), topic, v1),
        _serialize_avro(client, _txn(X_V2), topic, v2),
        _serialize_avro(client, _txn(X_V3), topic, v3),
    ]
    assert client.get_versions(f"{topic}-value") == [1, 2, 3]
    ids = schema_ids(values)
    assert len(ids) == 3
    decoder = make_decoder(schema_registry.url)
    decoder.ensure(ids)
    decoded = [decoder.decode(v)[0] for v in values]
    assert decoded == [v1, v2, v3]
    assert "merchant" not in decoded[0]["x"] and "country" not in decoded[2]["x"]


def test_json_schema_round_trip_and_validation_failure(
    schema_registry: SchemaRegistry, client: Any, make_decoder: Callable[..., WireDecoder]
) -> None:
    topic = f"json-{uuid.uuid4().hex[:8]}"
    schema = json.dumps(
        {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "properties": {
                "x": {
                    "type": "object",
                    "properties": {
                        "amount": {"type": "number"},
                        "country": {"type": "string", "enum": ["DE", "FR"]},
                        "card_present": {"type": "boolean"},
                    },
                    "required": ["amount", "card_present"],
                },
                "y": {"type": "integer"},
            },
            "required": ["x", "y"],
        }
    )
    serializer = JSONSerializer(schema, client)
    record = {"x": {"amount": 2.5, "country": "FR", "card_present": False}, "y": 1}
    value: bytes = serializer(record, SerializationContext(topic, MessageField.VALUE))
    schema_id = int.from_bytes(value[1:5], "big")
    assert client.get_schema(schema_id).schema_type == "JSON"  # Apicurio kept the type
    decoder = make_decoder(schema_registry.url)
    decoder.ensure(schema_ids([value]))
    assert decoder.decode(value) == (record, schema_id)
    bad = frame(schema_id, b'{"x": {"amount": "2.5", "card_present": false}, "y": 1}')
    with pytest.raises(WireFormatError) as info:
        decoder.decode(bad)
    assert info.value.reason == JSON_SCHEMA_INVALID
    assert "x/amount" in info.value.message and str(schema_id) in info.value.message
    unlisted = frame(
        schema_id, b'{"x": {"amount": 1, "country": "XX", "card_present": true}, "y": 1}'
    )
    with pytest.raises(WireFormatError, match="x/country"):
        decoder.decode(unlisted)


def test_unknown_schema_id_is_a_404_then_unknown_schema(
    schema_registry: SchemaRegistry, make_decoder: Callable[..., WireDecoder]
) -> None:
    missing = 987_654_321
    decoder = make_decoder(schema_registry.url)
    retries: list[SchemaRegistryUnavailable] = []
    decoder.ensure({missing}, on_retry=retries.append)
    assert retries == []  # a 404 is an answer, not an outage
    assert decoder.known(missing)
    with pytest.raises(WireFormatError) as info:
        decoder.decode(frame(missing, b"\x00"))
    assert info.value.reason == UNKNOWN_SCHEMA
    assert str(missing) in info.value.message


@pytest.fixture
def proxy(schema_registry: SchemaRegistry) -> Iterator[TcpProxy]:
    assert schema_registry.port is not None
    with TcpProxy(("127.0.0.1", schema_registry.port)) as tcp:
        yield tcp


@pytest.mark.parametrize("mode", ["refuse", "hang"])
def test_ensure_waits_through_an_outage_and_returns_when_the_registry_answers(
    schema_registry: SchemaRegistry,
    client: Any,
    proxy: TcpProxy,
    mode: Mode,
    make_decoder: Callable[..., WireDecoder],
) -> None:
    topic = f"outage-{uuid.uuid4().hex[:8]}"
    record = {"x": {"amount": 7.0, "country": "DE", "card_present": True, "device": "web"}, "y": 1}
    value = _serialize_avro(client, _txn(X_V1), topic, record)
    url = schema_registry.url.replace(f":{schema_registry.port}/", f":{proxy.port}/")
    decoder = make_decoder(
        url, request_timeout_s=0.5, retry_backoff_initial_s=0.02, retry_backoff_max_s=0.1
    )
    proxy.set_mode(mode)
    errors: list[SchemaRegistryUnavailable] = []
    outage_retries = 4

    def on_retry(error: SchemaRegistryUnavailable) -> None:
        errors.append(error)
        if len(errors) == outage_retries:
            proxy.set_mode("forward")  # the registry comes back during the wait

    decoder.ensure(schema_ids([value]), on_retry=on_retry)
    assert len(errors) == outage_retries
    assert all(isinstance(e, SchemaRegistryUnavailable) for e in errors)
    if mode == "hang":
        assert "Timeout" in str(errors[0]), errors[0]
    assert decoder.decode(value) == (record, int.from_bytes(value[1:5], "big"))
    print(f"{mode}: {len(errors)} retries, first error: {errors[0]}")


def test_ensure_during_an_outage_can_be_interrupted(
    schema_registry: SchemaRegistry,
    client: Any,
    proxy: TcpProxy,
    make_decoder: Callable[..., WireDecoder],
) -> None:
    value = _serialize_avro(
        client,
        _txn(X_V1),
        f"stop-{uuid.uuid4().hex[:8]}",
        {"x": {"amount": 1.0, "country": "DE", "card_present": True, "device": None}, "y": 0},
    )
    url = schema_registry.url.replace(f":{schema_registry.port}/", f":{proxy.port}/")
    decoder = make_decoder(url, retry_backoff_initial_s=0.02, retry_backoff_max_s=0.05)
    proxy.set_mode("refuse")
    stop = threading.Event()
    errors: list[SchemaRegistryUnavailable] = []

    def on_retry(error: SchemaRegistryUnavailable) -> None:
        errors.append(error)
        if len(errors) == 3:
            stop.set()

    with pytest.raises(RegistryWaitInterrupted):
        decoder.ensure(schema_ids([value]), should_stop=stop.is_set, on_retry=on_retry)
    assert len(errors) == 3
    assert not decoder.known(int.from_bytes(value[1:5], "big"))  # neither cached nor absent


@pytest.mark.parametrize("value_format", ["avro", "json_schema"])
def test_produce_writes_registered_wire_format_records_the_decoder_reads(
    schema_registry: SchemaRegistry,
    broker: BrokerHandle,
    make_topic: Callable[..., str],
    make_decoder: Callable[..., WireDecoder],
    value_format: ValueFormat,
) -> None:
    topic = make_topic(2)
    dataset = get_dataset("phishing")
    count = 300
    report = produce(
        {"bootstrap.servers": broker.bootstrap_servers},
        topic,
        dataset,
        count,
        partitions=2,
        bad_ratio=0.05,
        seed=3,
        value_format=value_format,
        registry_config={"url": schema_registry.url},
    )
    with SchemaRegistryClient({"url": schema_registry.url}) as client:
        latest = client.get_latest_version(f"{topic}-value")
    assert latest.schema_id == report.schema_id
    assert latest.schema.schema_type == ("AVRO" if value_format == "avro" else "JSON")
    values = [m.value() for m in read_topic(broker.bootstrap_servers, topic, expected=count)]
    decoder = make_decoder(schema_registry.url)
    decoder.ensure(schema_ids(values))
    good: list[Any] = []
    rejected: dict[str, int] = {}
    for value in values:
        try:
            good.append(decoder.decode(value)[0])
        except WireFormatError as exc:
            rejected[exc.reason] = rejected.get(exc.reason, 0) + 1
    assert len(good) == report.valid and sum(rejected.values()) == report.invalid > 0
    assert set(rejected) <= {"bad_frame", UNKNOWN_SCHEMA, MALFORMED_AVRO, "malformed_json_schema"}
    expected_rows = [{"x": x, "y": y} for x, y in dataset.rows(report.valid, seed=3)]
    # Partitions interleave: compare as multisets of canonical JSON.
    canon = sorted(json.dumps(r, sort_keys=True) for r in good)
    assert canon == sorted(json.dumps(r, sort_keys=True) for r in expected_rows)


def test_produce_cli_avro_reports_the_schema_id_and_fails_cleanly_without_registry(
    schema_registry: SchemaRegistry, tansu_broker: BrokerHandle
) -> None:
    def cli(*words: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "stream_trainer", "produce", *words],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    topic = f"cli-{uuid.uuid4().hex[:8]}"
    base = ["--bootstrap-servers", tansu_broker.bootstrap_servers, "--topic", topic]
    ok = cli(*base, "--records", "50", "--format", "avro", "--schema-registry", schema_registry.url)
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["format"] == "avro" and isinstance(report["schema_id"], int)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{closed.getsockname()[1]}"
        failed = cli(*base, "--records", "5", "--format", "avro", "--schema-registry", down)
    assert failed.returncode == 1
    assert "Traceback" not in failed.stderr and len(failed.stderr.strip().splitlines()) == 1
    assert f"{topic}-value" in failed.stderr and down in failed.stderr
