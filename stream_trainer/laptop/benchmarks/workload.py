"""The benchmark's workload and its configs.

The workload is Gaussian features with a noisy linear binary label (the numeric default), or
a bundled dataset (``--dataset``: ``transactions`` has category, boolean and missing
values), as JSON or in the Confluent wire format (``--format avro`` / ``json_schema``). The
service config is built from a production-like template per mode (or the user's file) with
the connection, topics, record contract and paths replaced by the benchmark's own; the
record contract is the dataset's (:func:`record_section`).
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from stream_trainer.config import Settings, settings_from_mapping
from stream_trainer.ingest.records import RecordDecoder
from stream_trainer.ingest.wire import RegistryWaitInterrupted, WireDecoder
from stream_trainer.laptop.datasets import Dataset, Row

MODES = ("per_record", "mini_batch", "full_batch")
HMAC_ENV = "STREAM_TRAINER_CHECKPOINT__HMAC_KEY"

# Production-like learners per mode (issue 9): what the targets are stated for.
_MODELS: dict[str, dict[str, Any]] = {
    "per_record": {
        "preprocessing": [{"path": "river.preprocessing.StandardScaler"}],
        "learner": {"path": "river.linear_model.LogisticRegression"},
    },
    "mini_batch": {
        "preprocessing": [{"path": "sklearn.preprocessing.StandardScaler"}],
        "learner": {
            "path": "sklearn.linear_model.SGDClassifier",
            "params": {"loss": "log_loss", "alpha": 0.0001},
        },
    },
    "full_batch": {
        "preprocessing": [],
        "learner": {
            "path": "sklearn.ensemble.RandomForestClassifier",
            "params": {"n_estimators": 20, "max_depth": 8, "n_jobs": 1},
        },
    },
}


def unique(prefix: str) -> str:
    """A topic / group name no earlier run used."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def feature_names(n_features: int) -> list[str]:
    """``f0 .. f{n-1}``: the workload's feature names."""
    return [f"f{i}" for i in range(n_features)]


def workload_dataset(n_features: int, seed: int = 42) -> Dataset:
    """``n_features`` standard normal features; label = sign of a fixed linear score + noise.

    Same concept as :data:`stream_trainer.laptop.datasets` ``linear20`` (which it equals for 20
    features in distribution), generated with numpy in chunks because producing 1M records
    row by row in Python would dominate the benchmark's set-up time.
    """
    names = tuple(feature_names(n_features))

    def rows(row_seed: int) -> Iterator[Row]:
        rng = np.random.default_rng(row_seed)
        weights = rng.uniform(-1, 1, n_features)
        while True:
            X = rng.standard_normal((10_000, n_features))
            y = (X @ weights + rng.normal(0, 0.5, len(X))) > 0
            for row, label in zip(X.tolist(), y.tolist(), strict=True):
                yield dict(zip(names, row, strict=True)), bool(label)

    return Dataset(
        f"linear{n_features}",
        "binary_classification",
        names,
        (False, True),
        None,
        "bench workload: Gaussian features, noisy linear label",
        rows,
    )


def default_config(mode: str) -> dict[str, Any]:
    """The built-in production-like config of ``mode`` (connection parts filled in later)."""
    return {
        "model": {"name": "bench", "task": "binary_classification", **copy.deepcopy(_MODELS[mode])},
        "training": {
            "mode": mode,
            "mini_batch": {"size": 1000, "max_wait_s": 5.0},
            # Retrains far enough apart that ingestion between them can be measured: the niced
            # fit takes ~2 s on 2 vCPUs, during which ~130k records arrive.
            "full_batch": {
                "window_records": 20_000,
                "retrain_every_records": 200_000,
                "min_records": 1000,
            },
        },
        # Time-based only, as in the target ("checkpoints every 10 s").
        "checkpoint": {"every_seconds": 10.0, "every_records": None},
        # Publishing on: a gated version every 250k records.
        "registry": {"publish_every_records": 250_000, "publish_every_seconds": 300.0},
        "logging": {"format": "json", "level": "INFO"},
    }


@dataclass(frozen=True)
class Paths:
    """Per-run names and places the benchmark owns."""

    bootstrap: str
    input_topic: str
    dead_letter: str
    versions: str
    control: str
    group_id: str
    checkpoint_dir: Path
    registry_root: Path
    http_port: int


def record_section(dataset: Dataset, value_format: str = "json") -> dict[str, Any]:
    """The ``record`` config section that reads ``dataset`` as produced in ``value_format``
    (its typed features, or the plain names of an all-numeric dataset)."""
    section: dict[str, Any] = {
        "features": dataset.record_features,
        "features_field": "x",
        "label_field": "y",
        "labels": list(dataset.labels) if dataset.labels else None,
    }
    if value_format != "json":
        section["format"] = value_format
    return section


def service_config(
    base: dict[str, Any],
    record: dict[str, Any],
    paths: Paths,
    mode: str | None = None,
    *,
    schema_registry_url: str | None = None,
) -> dict[str, Any]:
    """``base`` with the benchmark's connection, topics, ``record`` section (see
    :func:`record_section`), paths and, for a wire format, ``schema_registry_url``."""
    config = copy.deepcopy(base)
    kafka = dict(config.get("kafka") or {})
    kafka.update({"bootstrap_servers": paths.bootstrap, "group_id": paths.group_id})
    for secret in (
        "security_protocol",
        "sasl_mechanism",
        "sasl_username",
        "sasl_password",
        "sasl_password_file",
        "ssl_ca_location",
        "ssl_certificate_location",
        "ssl_key_location",
    ):
        kafka.pop(secret, None)  # the benchmark's broker is local and plain
    config["kafka"] = kafka
    config["topics"] = {
        "input": [paths.input_topic],
        "dead_letter": paths.dead_letter,
        "versions": paths.versions,
        "control": paths.control,
    }
    config["record"] = copy.deepcopy(record)
    if schema_registry_url is not None:
        config["schema_registry"] = {
            **(config.get("schema_registry") or {}),
            "url": schema_registry_url,
        }
    model = dict(config.get("model") or {})
    model["task"] = "binary_classification"
    config["model"] = model
    if mode is not None:
        training = dict(config.get("training") or {})
        training["mode"] = mode
        config["training"] = training
    evaluation = dict(config.get("evaluation") or {})
    metrics = evaluation.get("metrics")
    if metrics and any(m in ("mae", "rmse", "r2") for m in metrics):
        evaluation.pop("metrics")  # the workload is a classification task
    config["evaluation"] = evaluation
    checkpoint = dict(config.get("checkpoint") or {})
    checkpoint.update({"dir": str(paths.checkpoint_dir)})
    checkpoint.pop("hmac_key_file", None)
    config["checkpoint"] = checkpoint
    registry = dict(config.get("registry") or {})
    registry["root"] = str(paths.registry_root)
    config["registry"] = registry
    config["http"] = {"enabled": True, "host": "127.0.0.1", "port": paths.http_port}
    return config


def settings_of(config: dict[str, Any], hmac_key: str) -> Settings:
    """Validated settings of ``config`` (the environment is not read: the run is self-contained)."""
    return settings_from_mapping(config, env={HMAC_ENV: hmac_key})


@dataclass
class InMemory:
    """Every workload record decoded once: the learner ceiling's input (the decoder's rows:
    a typed contract's codes, NaN for a missing value)."""

    X: npt.NDArray[np.float64]
    y: npt.NDArray[Any]


def record_decoder(settings: Settings) -> tuple[RecordDecoder, WireDecoder | None]:
    """The service's decoder for ``settings.record``, with a registry-backed wire decoder
    for avro / json_schema (the caller closes it and calls :func:`ensure_schemas`)."""
    wire = None if settings.record.format == "json" else WireDecoder(settings.schema_registry)
    return RecordDecoder(settings.record, settings.model.task, wire), wire


def ensure_schemas(wire: WireDecoder | None, values: list[bytes | None], deadline: float) -> None:
    """Fetch the schemas of ``values`` (no-op for JSON or known ids), as the service does
    before decoding a unit. Raises TimeoutError when the registry has not answered by
    ``deadline`` (``time.monotonic``)."""
    if wire is None:
        return
    import time  # noqa: PLC0415 - keep module import light

    try:
        wire.ensure(wire.schema_ids(values), should_stop=lambda: time.monotonic() > deadline)
    except RegistryWaitInterrupted as error:
        raise TimeoutError(str(error)) from None


def load_decoded(
    bootstrap: str, topic: str, partitions: int, total: int, *, settings: Settings, timeout_s: float
) -> InMemory:
    """Read the whole topic once and decode it with the service's decoder.

    Raises TimeoutError if fewer than ``total`` records arrive within ``timeout_s``.
    """
    import time  # noqa: PLC0415 - keep module import light

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": unique("bench-load"),
            "enable.auto.commit": False,
            "fetch.queue.backoff.ms": 10,
            "enable.partition.eof": False,
        }
    )
    decoder, wire = record_decoder(settings)
    xs: list[npt.NDArray[np.float64]] = []
    ys: list[npt.NDArray[Any]] = []
    seen = 0
    deadline = time.monotonic() + timeout_s
    try:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        while seen < total:
            if time.monotonic() > deadline:
                raise TimeoutError(f"read {seen} of {total} records in {timeout_s:.0f} s")
            messages: list[Any] = [m for m in consumer.consume(1000, 1.0) if m.error() is None]
            if not messages:
                continue
            if wire is not None:
                ensure_schemas(wire, [m.value() for m in messages], deadline)
            batch = decoder.decode(messages)
            xs.append(batch.X)
            ys.append(batch.y)
            seen += len(messages)
    finally:
        consumer.close()
        if wire is not None:
            wire.close()
    return InMemory(np.concatenate(xs)[:total], np.concatenate(ys)[:total])
