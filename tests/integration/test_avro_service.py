"""Avro records through the real service: a real broker, the real registry (Apicurio).

Schema evolution across a run (v1 -> v2 adding an optional field -> v3 dropping a field
the model does not use) loses and dead-letters nothing; a schema that lacks a required
feature dead-letters its records naming the schema id; while the registry is unreachable a
record with a new schema id is neither learnt nor dead-lettered, and is learnt once the
registry answers. Values are written with fastavro and the wire frame, as any Confluent
producer writes them.
"""

from __future__ import annotations

import copy
import io
import json
import time
from pathlib import Path
from typing import Any

import fastavro
import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

from stream_trainer.ingest.wire import frame
from stream_trainer.laptop.datasets import get_dataset
from stream_trainer.laptop.produce import avro_schema, produce
from stream_trainer.testing.schema_registry import SchemaRegistry
from tests.conftest import BrokerHandle
from tests.harness import ServiceProcess, read_topic, service_config
from tests.integration.test_training import (
    LEARNT,
    dead_lettered,
    final_checkpoint,
    produce_values,
    stop_cleanly,
    wait_exact,
)
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

RETRIES = "stream_trainer_schema_registry_retries_total"
DATASET = get_dataset("transactions")


def schema_versions() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """v1: the dataset's schema plus a field the model does not use (merchant_name); v2:
    plus an optional field with a default (channel); v3: v2 without merchant_name; bad: v1
    without the required feature amount."""
    base = avro_schema(DATASET)

    def with_fields(change: Any) -> dict[str, Any]:
        schema = copy.deepcopy(base)
        fields = schema["fields"][0]["type"]["fields"]
        schema["fields"][0]["type"]["fields"] = change(fields)
        return schema

    v1 = with_fields(lambda f: [*f, {"name": "merchant_name", "type": "string"}])
    v2 = with_fields(
        lambda f: [
            *f,
            {"name": "merchant_name", "type": "string"},
            {"name": "channel", "type": ["null", "string"], "default": None},
        ]
    )
    v3 = with_fields(
        lambda f: [*f, {"name": "channel", "type": ["null", "string"], "default": None}]
    )
    bad = with_fields(lambda f: [g for g in f if g["name"] != "amount"])
    return v1, v2, v3, bad


def register(url: str, subject: str, schema: dict[str, Any]) -> int:
    with SchemaRegistryClient({"url": url}) as client:
        return int(client.register_schema(subject, Schema(json.dumps(schema), "AVRO")))


def avro_values(
    schema: dict[str, Any], schema_id: int, rows: list[tuple[dict[str, Any], bool]]
) -> list[bytes]:
    parsed = fastavro.parse_schema(schema)
    names = {f["name"] for f in schema["fields"][0]["type"]["fields"]}
    out = []
    for x, y in rows:
        record = {k: v for k, v in x.items() if k in names}
        if "merchant_name" in names:
            record["merchant_name"] = "corner shop"
        if "channel" in names:
            record["channel"] = "app"
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, parsed, {"x": record, "y": y})
        out.append(frame(schema_id, buffer.getvalue()))
    return out


def avro_config(tmp_path: Path, bootstrap: str, registry_url: str) -> dict[str, Any]:
    return service_config(
        tmp_path,
        bootstrap,
        DATASET,
        "per_record",
        overrides={
            "record": {"format": "avro"},
            "schema_registry": {
                "url": registry_url,
                "request_timeout_s": 2.0,
                "retry_backoff_initial_s": 0.2,
                "retry_backoff_max_s": 1.0,
            },
        },
    )


def test_schema_evolution_across_a_run_loses_and_dead_letters_nothing(
    broker: BrokerHandle, schema_registry: SchemaRegistry, tmp_path: Path
) -> None:
    bootstrap = broker.bootstrap_servers
    config = avro_config(tmp_path, bootstrap, schema_registry.url)
    topic = config["topics"]["input"][0]
    rows = list(DATASET.rows(3000, seed=5))
    v1, v2, v3, bad = schema_versions()
    ids = [register(schema_registry.url, f"{topic}-value", s) for s in (v1, v2, v3)]
    bad_id = register(schema_registry.url, f"{topic}-bad-value", bad)
    assert len(set(ids)) == 3
    values = [
        *avro_values(v1, ids[0], rows[:1000]),
        *avro_values(v2, ids[1], rows[1000:2000]),
        *avro_values(v3, ids[2], rows[2000:]),
    ]
    bad_values = avro_values(bad, bad_id, rows[:7])
    began = time.monotonic()
    with ServiceProcess(config, tmp_path) as service:
        produce_values(bootstrap, topic, [(0, v) for v in values[:1500]])
        wait_exact(service, LEARNT, 1500, timeout=90)
        produce_values(bootstrap, topic, [(0, v) for v in [*bad_values, *values[1500:]]])
        wait_exact(service, LEARNT, 3000, timeout=90)
        wait_exact(service, dead_lettered("missing_feature"), len(bad_values), timeout=30)
        snapshot = service.metrics()
        stop_cleanly(service)
    dead = read_topic(bootstrap, config["topics"]["dead_letter"], expected=len(bad_values))
    print(
        f"[{broker.name}] avro evolution v1->v2->v3 (ids {ids}): learnt 3000, "
        f"{len(dead)} dead letters (schema {bad_id} lacks a feature), "
        f"{time.monotonic() - began:.1f} s"
    )
    assert len(dead) == len(bad_values)
    for message in dead:
        headers = {k: v.decode() for k, v in message.headers() or []}
        assert headers["dlq.reason"] == "missing_feature"
        assert f"schema id {bad_id}" in headers["dlq.error.message"]
    total_dead = sum(v for k, v in snapshot.items() if "records_dead_lettered_total{" in k)
    assert total_dead == len(bad_values)
    state = final_checkpoint(config)
    assert state.records_learnt == 3000
    assert state.records_dead_lettered == len(bad_values)


def test_registry_outage_holds_new_schema_records_until_it_answers(
    broker: BrokerHandle, schema_registry: SchemaRegistry, tmp_path: Path
) -> None:
    bootstrap = broker.bootstrap_servers
    assert schema_registry.port is not None
    with TcpProxy(("127.0.0.1", schema_registry.port)) as proxy:
        url = schema_registry.url.replace(f":{schema_registry.port}/", f":{proxy.port}/")
        config = avro_config(tmp_path, bootstrap, url)
        topic = config["topics"]["input"][0]
        rows = list(DATASET.rows(1000, seed=6))
        v1, v2, _v3, _bad = schema_versions()
        first = register(schema_registry.url, f"{topic}-value", v1)
        with ServiceProcess(config, tmp_path) as service:
            produce_values(bootstrap, topic, [(0, v) for v in avro_values(v1, first, rows[:500])])
            wait_exact(service, LEARNT, 500, timeout=90)
            proxy.set_mode("refuse")
            # A new schema version appears while the service cannot reach the registry.
            second = register(schema_registry.url, f"{topic}-value", v2)
            produce_values(bootstrap, topic, [(0, v) for v in avro_values(v2, second, rows[500:])])
            retries = service.wait_metric(RETRIES, 3, timeout=60)
            held = service.metrics()
            assert service.alive()
            proxy.set_mode("forward")
            wait_exact(service, LEARNT, 1000, timeout=90)
            after = service.metrics()
            stop_cleanly(service)
    dead_before = sum(v for k, v in held.items() if "records_dead_lettered_total{" in k)
    dead_after = sum(v for k, v in after.items() if "records_dead_lettered_total{" in k)
    print(
        f"[{broker.name}] registry outage: {retries:.0f} retries while held, learnt "
        f"{held[LEARNT]:.0f} during the outage, {after[LEARNT]:.0f} after; dead letters "
        f"{dead_before:.0f} / {dead_after:.0f}"
    )
    assert held[LEARNT] == 500, "a record with an unfetchable schema was learnt"
    assert dead_before == 0 and dead_after == 0
    assert final_checkpoint(config).records_learnt == 1000


def test_json_schema_records_learnt_and_bad_ones_dead_lettered(
    broker: BrokerHandle, schema_registry: SchemaRegistry, tmp_path: Path
) -> None:
    """``record.format: json_schema``: typed records validated against their registered
    JSON Schema and the contract; learnt = valid exactly, the rest dead-lettered."""
    bootstrap = broker.bootstrap_servers
    config = avro_config(tmp_path, bootstrap, schema_registry.url)
    config["record"]["format"] = "json_schema"
    topic = config["topics"]["input"][0]
    report = produce(
        {"bootstrap.servers": bootstrap},
        topic,
        DATASET,
        1200,
        bad_ratio=0.05,
        seed=3,
        value_format="json_schema",
        registry_config={"url": schema_registry.url},
    )
    with ServiceProcess(config, tmp_path) as service:
        wait_exact(service, LEARNT, report.valid, timeout=90)
        dead_total = "stream_trainer_records_dead_lettered_total{"
        snapshot = service.metrics()
        stop_cleanly(service)
    dead = read_topic(bootstrap, config["topics"]["dead_letter"], expected=report.invalid)
    reasons: dict[str, int] = {}
    for message in dead:
        headers = {k: v.decode() for k, v in message.headers() or []}
        reasons[headers["dlq.reason"]] = reasons.get(headers["dlq.reason"], 0) + 1
    print(
        f"[{broker.name}] json_schema: learnt {report.valid}, dead-lettered {len(dead)} {reasons}"
    )
    assert len(dead) == report.invalid
    assert reasons == report.invalid_reasons
    assert sum(v for k, v in snapshot.items() if k.startswith(dead_total)) == report.invalid
    state = final_checkpoint(config)
    assert state.records_learnt == report.valid
