"""The benchmark's workload (Gaussian features, noisy linear binary label) and its configs.

The service config is built from a production-like template per mode (or the user's file)
with the connection, topics, record contract and paths replaced by the benchmark's own.
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
from stream_trainer.laptop.datasets import Dataset, Row
from stream_trainer.records import RecordDecoder

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


def service_config(
    base: dict[str, Any], n_features: int, paths: Paths, mode: str | None = None
) -> dict[str, Any]:
    """``base`` with the benchmark's connection, topics, record contract and paths."""
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
    config["record"] = {
        "features": feature_names(n_features),
        "features_field": "x",
        "label_field": "y",
        "labels": [False, True],
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
    """Every workload record decoded once: the learner ceiling's input."""

    X: npt.NDArray[np.float64]
    y: npt.NDArray[Any]


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
    decoder = RecordDecoder(settings.record, settings.model.task)
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
            batch = decoder.decode(messages)
            xs.append(batch.X)
            ys.append(batch.y)
            seen += len(messages)
    finally:
        consumer.close()
    return InMemory(np.concatenate(xs)[:total], np.concatenate(ys)[:total])
