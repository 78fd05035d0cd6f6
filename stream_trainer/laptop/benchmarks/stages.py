"""The three references the service is measured against, each in this process.

* ingest ceiling: batch consume + the service's decoder + conversion to the learner's input;
* learner ceiling: the configured learner's predict + learn on records already in memory;
* naive script: ``poll()`` one message, ``json.loads``, predict / learn, commit every 1000.

Each returns a :class:`StageRun`. Rates leave out the first unit (or message), whose wait
includes connection and group set-up: the service is measured the same way, from its first
learnt record.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from stream_trainer.config import Settings
from stream_trainer.errors import StreamTrainerError
from stream_trainer.ingest.decode_worker import InlineDecoder, UnitDecoder, build_unit_decoder
from stream_trainer.ingest.features import FeatureContract
from stream_trainer.ingest.records import DecodedBatch
from stream_trainer.ingest.wire import WireDecoder
from stream_trainer.laptop.benchmarks.workload import (
    InMemory,
    ensure_schemas,
    record_decoder,
    unique,
)

UNIT = 1000  # records per consume batch / mini-batch, as in the service defaults


class StageTimeout(StreamTrainerError):
    """A stage did not see every record in time (broker or workload problem)."""


@dataclass
class StageRun:
    """Records timed and the seconds they took; ``extra`` holds stage-specific numbers."""

    records: int
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Records per second (0 when nothing was timed)."""
        return self.records / self.seconds if self.seconds > 0 else 0.0


def _consumer(bootstrap: str, tuned: Settings | None) -> Consumer:
    """A consumer with librdkafka's defaults, or with the service's fetch tuning."""
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "group.id": unique("bench"),
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "enable.partition.eof": False,
    }
    if tuned is not None:
        conf["fetch.queue.backoff.ms"] = tuned.kafka.fetch_queue_backoff_ms
        conf["queued.max.messages.kbytes"] = tuned.kafka.prefetch_max_kbytes
    return Consumer(conf)


def _to_learner_input(batch: DecodedBatch, per_record: bool) -> None:
    if per_record:
        batch.x_dicts()
    else:
        np.ascontiguousarray(batch.X)


def ingest_ceiling(
    bootstrap: str, topic: str, partitions: int, total: int, *, settings: Settings, timeout_s: float
) -> StageRun:
    """Consume every record in batches of 1000, decode, convert; no learning.

    Decodes as the service does (``kafka.decode_worker``): in the worker process, one unit
    ahead of the conversion, so the ceiling gets the same second core the service gets; a
    wire format (Avro, JSON Schema) inline, after fetching the unit's schemas."""
    decoder: UnitDecoder
    wire: WireDecoder | None = None
    if settings.record.format == "json":
        decoder = build_unit_decoder(
            settings.record, settings.model.task, settings.kafka.decode_worker
        )
    else:
        record, wire = record_decoder(settings)
        decoder = InlineDecoder(record)
    per_record = settings.training.mode == "per_record"
    consumer = _consumer(bootstrap, tuned=settings)
    seen = timed = 0
    started = 0.0
    deadline = time.monotonic() + timeout_s
    try:
        # Wait for the worker's start-up outside the timing, as the service's rate is taken
        # from its first learnt record.
        decoder.submit([])
        decoder.result()
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        while seen < total:
            if time.monotonic() > deadline:
                raise StageTimeout(f"ingest ceiling: {seen} of {total} records")
            messages: list[Any] = [m for m in consumer.consume(UNIT, 1.0) if m.error() is None]
            if not messages:
                continue
            previous = decoder.result() if decoder.busy else None
            if wire is not None:  # JSON (the numeric path) skips the values list entirely
                ensure_schemas(wire, [m.value() for m in messages], deadline)
            decoder.submit(messages)
            if previous is not None:
                _to_learner_input(previous, per_record)
            if seen == 0:
                started = time.perf_counter()
            else:
                timed += len(messages)
            seen += len(messages)
        _to_learner_input(decoder.result(), per_record)
        elapsed = time.perf_counter() - started
    finally:
        decoder.close()
        consumer.close()
        if wire is not None:
            wire.close()
    return StageRun(timed, elapsed)


def learner_ceiling(data: InMemory, settings: Settings) -> StageRun:
    """Predict + learn with a fresh model on in-memory records; only those calls are timed.

    per_record: ``predict_one`` + ``learn_one`` per record (dicts built outside the timing,
    as the service builds them: a typed contract's River tokens, missing values left out);
    mini_batch: ``predict_many`` + ``learn_many`` per 1000; full_batch: ``predict_many`` per
    1000 on a model fitted on the first window (the poll loop only predicts; the fit runs
    beside it and is reported as ``fit_s``).
    """
    from stream_trainer.training.learners import build_model  # noqa: PLC0415 - keeps the CLI fast

    model = build_model(settings)
    mode = settings.training.mode
    names = list(settings.record.feature_names)
    contract = FeatureContract.from_settings(settings.record)
    river_dict = None if contract.plain else contract.river_dict
    n = len(data.y)
    seconds = 0.0
    extra: dict[str, float] = {}
    if mode == "full_batch":
        window = min(settings.training.full_batch.window_records, n)
        t0 = time.perf_counter()
        model.fit(data.X[:window], data.y[:window], None)
        extra["fit_s"] = time.perf_counter() - t0
        extra["fit_records"] = float(window)
    for start in range(0, n, UNIT):
        X, y = data.X[start : start + UNIT], data.y[start : start + UNIT]
        if mode == "per_record":
            if river_dict is None:
                xs = [dict(zip(names, row, strict=True)) for row in X.tolist()]
            else:
                xs = [river_dict(names, row) for row in X.tolist()]
            ys = y.tolist()
            predict_one, learn_one = model.predict_one, model.learn_one
            t0 = time.perf_counter()
            for x, target in zip(xs, ys, strict=True):
                predict_one(x)
                learn_one(x, target)
            seconds += time.perf_counter() - t0
        elif mode == "mini_batch":
            t0 = time.perf_counter()
            model.predict_many(X)
            model.learn_many(X, y, None)
            seconds += time.perf_counter() - t0
        else:
            t0 = time.perf_counter()
            model.predict_many(X)
            seconds += time.perf_counter() - t0
    return StageRun(n, seconds, extra)


def bracketing(before: StageRun, after: StageRun) -> StageRun:
    """One stage measured right before and right after another, as one run over both.

    The rate is total records over total seconds; ``extra`` holds each run's rate and the
    mean of their other figures (``fit_s``, say)."""
    extra = {
        key: (before.extra[key] + after.extra[key]) / 2
        for key in before.extra.keys() & after.extra.keys()
    }
    extra["before_per_s"] = before.rate
    extra["after_per_s"] = after.rate
    return StageRun(before.records + after.records, before.seconds + after.seconds, extra)


def naive_script(
    bootstrap: str, topic: str, total: int, *, settings: Settings, timeout_s: float
) -> StageRun:
    """What a data scientist writes: subscribe, ``poll()`` one message, ``json.loads`` (for
    Avro confluent-kafka's ``AvroDeserializer``; for JSON Schema ``json.loads`` after the
    5-byte frame), learn, ``commit(asynchronous=False)`` every 1000. librdkafka defaults
    otherwise.

    per_record: ``predict_one`` + ``learn_one`` on the record's own dict (nulls of a typed
    record left out, as River expects missing values); mini_batch: rows
    collected (a typed record through the contract's ``encode_record``: the model's
    encoders expect its codes), then ``predict_many`` + ``learn_many`` (partial_fit) per
    1000; full_batch: ``predict_many`` per 1000 and a blocking ``fit`` on the window every
    ``retrain_every_records``.
    """
    from stream_trainer.training.learners import build_model  # noqa: PLC0415 - keeps the CLI fast

    model = build_model(settings)
    mode = settings.training.mode
    names = list(settings.record.feature_names)
    contract = FeatureContract.from_settings(settings.record)
    encode_record = None if contract.plain else contract.encode_record
    loads, close_loads = _naive_loads(settings, topic)
    label_field = settings.record.label_field
    features_field = settings.record.features_field or ""
    cfg = settings.training.full_batch
    window: deque[tuple[list[float], Any]] = deque(maxlen=cfg.window_records)
    retrain_every = cfg.retrain_every_records or 0
    rows: list[list[float]] = []
    labels: list[Any] = []
    consumer = _consumer(bootstrap, tuned=None)
    seen = 0
    started = 0.0
    deadline = time.monotonic() + timeout_s
    fitted = False
    try:
        consumer.subscribe([topic])
        while seen < total:
            if time.monotonic() > deadline:
                raise StageTimeout(f"naive script: {seen} of {total} records")
            message = consumer.poll(1.0)
            value = None if message is None or message.error() is not None else message.value()
            if value is None:
                continue
            record = loads(value)
            x = record[features_field] if features_field else record
            y = record[label_field]
            if mode == "per_record":
                if encode_record is not None:
                    # River's missing value is an absent key; Avro hands a null instead.
                    x = {k: v for k, v in x.items() if v is not None}
                model.predict_one(x)
                model.learn_one(x, y)
            else:
                row = [x[name] for name in names] if encode_record is None else encode_record(x)
                rows.append(row)
                labels.append(y)
                if mode == "full_batch":
                    window.append((row, y))
            seen += 1
            if seen == 1:
                started = time.perf_counter()
            if seen % UNIT == 0 or seen == total:
                if mode == "mini_batch":
                    X = np.asarray(rows, dtype=np.float64)
                    target = np.asarray(labels, dtype=object)
                    model.predict_many(X)
                    model.learn_many(X, target, None)
                    rows, labels = [], []
                elif mode == "full_batch":
                    if fitted:
                        model.predict_many(np.asarray(rows, dtype=np.float64))
                    rows, labels = [], []
                    if not fitted or (retrain_every and seen % retrain_every == 0):
                        wx = np.asarray([r for r, _ in window], dtype=np.float64)
                        wy = np.asarray([t for _, t in window], dtype=object)
                        model.fit(wx, wy, None)
                        fitted = True
                consumer.commit(asynchronous=False)
        elapsed = time.perf_counter() - started
    finally:
        consumer.close()
        close_loads()
    return StageRun(seen - 1, elapsed)


def _naive_loads(
    settings: Settings, topic: str
) -> tuple[Callable[[bytes], Any], Callable[[], None]]:
    """The naive script's value parser for ``settings.record.format``, and what closes it
    (the registry client of the Avro deserializer)."""
    if settings.record.format == "json":
        return json.loads, lambda: None
    if settings.record.format == "json_schema":
        return lambda value: json.loads(value[5:]), lambda: None  # unvalidated: the naive way
    from confluent_kafka.schema_registry import SchemaRegistryClient  # noqa: PLC0415
    from confluent_kafka.schema_registry.avro import AvroDeserializer  # noqa: PLC0415
    from confluent_kafka.serialization import MessageField, SerializationContext  # noqa: PLC0415

    client = SchemaRegistryClient(settings.schema_registry.client_config())
    deserializer = AvroDeserializer(client)
    context = SerializationContext(topic, MessageField.VALUE)
    return lambda value: deserializer(value, context), client.close
