"""Writes a dataset (optionally mixed with invalid records) to a Kafka topic.

Used by the ``produce`` and ``demo`` commands, the benchmark and the tests, so every
one of them streams records in the service's own wire format: plain JSON (default), or
Avro / JSON Schema in the Confluent wire format with the schema registered under the
subject ``<topic>-value`` (:class:`ValueEncoder`). The record layout is the same in every
format: the features object ``x`` and the label ``y``.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import fastavro
import msgspec
from confluent_kafka import KafkaException, Producer

from stream_trainer.errors import StreamTrainerError
from stream_trainer.ingest.wire import frame
from stream_trainer.laptop.datasets import Dataset

_encode = msgspec.json.Encoder().encode

ValueFormat = Literal["json", "avro", "json_schema"]
# Schema id no registry hands out in tests (Apicurio counts from 1): the unknown_schema poison.
_UNKNOWN_SCHEMA_ID = 2**31 - 1
_SAMPLE_ROWS = 200  # rows a schema's field types are inferred from


class SchemaRegistrationError(StreamTrainerError):
    """The registry refused the dataset's schema or could not be reached."""


def _kind(values: list[Any]) -> tuple[str, bool]:
    """(boolean | number | string, nullable) of one field over sample rows."""
    present = [v for v in values if v is not None]
    nullable = len(present) < len(values)
    if present and all(isinstance(v, bool) for v in present):
        return "boolean", nullable
    if present and all(isinstance(v, str) for v in present):
        return "string", nullable
    return "number", nullable


def _sample(dataset: Dataset) -> tuple[dict[str, tuple[str, bool]], tuple[str, bool]]:
    rows = list(dataset.rows(_SAMPLE_ROWS, seed=0))
    names = list(dataset.features)
    features = {n: _kind([x.get(n) for x, _ in rows]) for n in names}
    labels = list(dataset.labels) if dataset.labels else [y for _, y in rows]
    return features, _kind(labels)


def avro_schema(dataset: Dataset) -> dict[str, Any]:
    """The Avro schema of the dataset's records: record ``x`` of the features, label ``y``
    (a nullable field is a ``["null", type]`` union with default null)."""
    avro_type = {"boolean": "boolean", "string": "string", "number": "double"}
    features, (label_kind, _) = _sample(dataset)
    fields: list[dict[str, Any]] = []
    for name, (kind, nullable) in features.items():
        field_type: Any = avro_type[kind]
        if nullable:
            fields.append({"name": name, "type": ["null", field_type], "default": None})
        else:
            fields.append({"name": name, "type": field_type})
    return {
        "type": "record",
        "name": "Record",
        "namespace": "stream_trainer." + "".join(c if c.isalnum() else "_" for c in dataset.name),
        "fields": [
            {"name": "x", "type": {"type": "record", "name": "Features", "fields": fields}},
            {"name": "y", "type": avro_type[label_kind]},
        ],
    }


def json_schema(dataset: Dataset) -> dict[str, Any]:
    """The JSON Schema (draft 7) of the dataset's records (``x`` closed; a feature that is
    never missing is required, a nullable one may be null or absent)."""
    features, (label_kind, _) = _sample(dataset)
    props: dict[str, Any] = {}
    for name, (kind, nullable) in features.items():
        props[name] = {"type": [kind, "null"] if nullable else kind}
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": dataset.name,
        "type": "object",
        "properties": {
            "x": {
                "type": "object",
                "properties": props,
                # A nullable feature may also be absent (a missing value either way).
                "required": [name for name, (_, nullable) in features.items() if not nullable],
                "additionalProperties": False,
            },
            "y": {"type": label_kind},
        },
        "required": ["x", "y"],
    }


class ValueEncoder:
    """Encodes ``{"x": ..., "y": ...}`` records in one format. For avro / json_schema the
    schema is registered under ``<topic>-value`` once, at construction (a network call to
    the registry named by ``registry_config``, confluent-kafka client settings)."""

    def __init__(
        self,
        value_format: ValueFormat,
        dataset: Dataset,
        topic: str,
        registry_config: dict[str, Any] | None = None,
    ) -> None:
        self.format = value_format
        self.schema_id: int | None = None
        self.subject: str | None = None
        self._avro: Any = None
        if value_format == "json":
            return
        if not registry_config:
            raise ValueError(f"--format {value_format} needs a schema registry URL")
        # Lazy: ~240 ms of imports that JSON producers never need.
        from confluent_kafka.schema_registry import (  # noqa: PLC0415
            Schema,
            SchemaRegistryClient,
        )

        if value_format == "avro":
            document = avro_schema(dataset)
            self._avro = fastavro.parse_schema(document)
            schema = Schema(json.dumps(document), "AVRO")
        else:
            schema = Schema(json.dumps(json_schema(dataset)), "JSON")
        self.subject = f"{topic}-value"
        try:
            with SchemaRegistryClient(registry_config) as client:
                self.schema_id = int(client.register_schema(self.subject, schema))
        except Exception as exc:  # HTTP errors, transport errors, a bad URL
            raise SchemaRegistrationError(
                f"could not register the {value_format} schema under {self.subject} "
                f"at {registry_config.get('url')}: {type(exc).__name__}: {exc}"
            ) from exc

    def encode(self, record: dict[str, Any]) -> bytes:
        """One record in this encoder's format (framed for avro / json_schema)."""
        if self.schema_id is None:
            return _encode(record)
        if self._avro is None:
            return frame(self.schema_id, _encode(record))
        out = io.BytesIO()
        fastavro.schemaless_writer(out, self._avro, record)
        return frame(self.schema_id, out.getvalue())

    def poison(self, dataset: Dataset, max_bytes: int) -> list[tuple[str, bytes | None]]:
        """Invalid values with the reason the service gives them (see :func:`poison_values`)."""
        if self.schema_id is None:
            return poison_values(dataset, max_bytes)
        x, y = next(dataset.rows(1, seed=0))
        good = self.encode({"x": x, "y": y})
        malformed = "malformed_avro" if self._avro is not None else "malformed_json_schema"
        return [
            ("bad_frame", _encode({"x": x, "y": y})),  # plain JSON: no magic byte
            ("empty", b""),  # checked before the frame, as for JSON
            ("unknown_schema", frame(_UNKNOWN_SCHEMA_ID, good[5:])),
            (malformed, good[:-1] if self._avro is not None else good[:-2]),
        ]


def poison_values(dataset: Dataset, max_bytes: int = 65_536) -> list[tuple[str, bytes | None]]:
    """One invalid value per kind the record contract rejects, with the expected reason."""
    first = dataset.features[0]
    good = dict.fromkeys(dataset.features, 0.5)
    label: Any = dataset.labels[0] if dataset.labels else 1.0

    def record(x: dict[str, Any], y: Any = label) -> bytes:
        return _encode({"x": x, "y": y})

    return [
        ("malformed_json", b'{"x": {"' + first.encode() + b'": 1.0'),
        ("non_finite", record(good).replace(b"0.5", b"NaN", 1)),
        ("non_finite", record(good).replace(b"0.5", b"Infinity", 1)),
        ("non_finite", record(good).replace(b"0.5", b"1e999", 1)),
        ("wrong_type", record({**good, first: "0.5"})),
        ("missing_label", _encode({"x": good})),
        ("unknown_label", record(good, "no-such-label" if dataset.labels else "NaN-ish")),
        ("unknown_feature", record({**good, "not_a_feature": 1.0})),
        ("missing_feature", record({k: v for k, v in good.items() if k != first})),
        ("too_large", record({**good, "padding": "p" * max_bytes})),
        ("empty", b""),
        ("not_object", b"[1, 2, 3]"),
    ]


@dataclass
class ProduceReport:
    """What was written: counts and, per partition, the offsets of each kind."""

    valid: int = 0
    invalid: int = 0
    invalid_reasons: dict[str, int] = field(default_factory=dict)
    offsets: dict[int, list[int]] = field(default_factory=dict)
    schema_id: int | None = None  # the registered schema (avro / json_schema)


def records(
    dataset: Dataset,
    count: int,
    bad_ratio: float,
    seed: int,
    max_bytes: int = 65_536,
    encoder: ValueEncoder | None = None,
) -> Iterator[tuple[bytes | None, str | None]]:
    """``count`` values: dataset rows, with invalid ones mixed in at ``bad_ratio``, in
    ``encoder``'s format (plain JSON without one).

    Yields ``(value, reason)`` where reason is None for a valid record.
    """
    rng = random.Random(seed)
    encode = encoder.encode if encoder is not None else _encode
    poison = (
        encoder.poison(dataset, max_bytes)
        if encoder is not None
        else poison_values(dataset, max_bytes)
    )
    rows = dataset.rows(count, seed)
    for i in range(count):
        if bad_ratio > 0 and rng.random() < bad_ratio:
            reason, value = poison[i % len(poison)]
            yield value, reason
            continue
        try:
            x, y = next(rows)
        except StopIteration:
            return
        yield encode({"x": x, "y": y}), None


def produce(
    producer_config: dict[str, Any],
    topic: str,
    dataset: Dataset,
    count: int,
    partitions: int = 1,
    bad_ratio: float = 0.0,
    seed: int = 42,
    on_progress: Callable[[int], None] | None = None,
    value_format: ValueFormat = "json",
    registry_config: dict[str, Any] | None = None,
) -> ProduceReport:
    """Produce ``count`` records round-robin over ``partitions``; waits for every delivery.

    ``value_format`` avro / json_schema registers the dataset's schema under
    ``<topic>-value`` in the registry ``registry_config`` names (confluent-kafka
    ``SchemaRegistryClient`` settings) and writes Confluent wire-format values.

    Raises KafkaException when a record could not be delivered, ValueError without a
    registry for avro / json_schema, and the registry client's errors when it refuses.
    """
    encoder = ValueEncoder(value_format, dataset, topic, registry_config)
    conf = {
        # Retries on a just-created topic (leader not elected yet) must not reorder
        # batches: without idempotence a retried batch can land after a later one, and a
        # replay of the "same" topic would then train a different model.
        "enable.idempotence": True,
        "linger.ms": 20,
        "batch.num.messages": 10_000,
        "compression.type": "lz4",
        "queue.buffering.max.messages": 500_000,
        **producer_config,
    }
    producer = Producer(conf)
    report = ProduceReport(schema_id=encoder.schema_id)
    failures: list[str] = []

    def delivered(error: Any, message: Any) -> None:
        if error is not None:
            failures.append(str(error))
        else:
            report.offsets.setdefault(message.partition(), []).append(message.offset())

    for i, (value, reason) in enumerate(records(dataset, count, bad_ratio, seed, encoder=encoder)):
        while True:
            try:
                producer.produce(
                    topic, value=value, partition=i % partitions, on_delivery=delivered
                )
                break
            except BufferError:
                producer.poll(0.1)  # the local queue is full: let deliveries drain
        if reason is None:
            report.valid += 1
        else:
            report.invalid += 1
            report.invalid_reasons[reason] = report.invalid_reasons.get(reason, 0) + 1
        if i % 10_000 == 0:
            producer.poll(0)
            if on_progress is not None:
                on_progress(i)
    remaining = producer.flush(60.0)
    if remaining or failures:
        raise KafkaException(
            f"{remaining} records undelivered, {len(failures)} failed: {failures[:3]}"
        )
    return report
