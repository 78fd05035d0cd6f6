"""Shared test helpers: run the real service as a process against a real broker.

Waiting is always a bounded poll on an observable fact (a metric, a file, a topic's
contents), never a sleep standing in for synchronisation.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import Consumer, TopicPartition

from stream_trainer.config import ObjectStoreSettings
from stream_trainer.ingest.kafka_source import KafkaSource
from stream_trainer.laptop import service_process
from stream_trainer.laptop.datasets import Dataset, get_dataset
from stream_trainer.laptop.embedded import create_topics, free_port
from stream_trainer.state.ledger import TopicPartitionKey
from stream_trainer.testing.seaweedfs import S3Identity, SeaweedFS

HMAC_KEY = "test-checkpoint-key-0123456789"
ROOT = Path(__file__).resolve().parents[1]


def unique(prefix: str) -> str:
    """A topic / group name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)  # polling interval of a bounded wait


def service_config(
    tmp_path: Path,
    bootstrap: str,
    dataset: Dataset | str = "phishing",
    mode: str = "per_record",
    partitions: int = 1,
    overrides: dict[str, Any] | None = None,
    create: bool = True,
) -> dict[str, Any]:
    """A config for ``dataset`` on fresh topics; creates the topics unless ``create`` is
    False (a broker that is not up yet). Deep-merges overrides."""
    ds = get_dataset(dataset) if isinstance(dataset, str) else dataset
    name = unique(ds.name)
    dead_letter, versions, control = f"{name}.dlq", f"{name}.versions", f"{name}.control"
    topics: dict[str, Any] = {
        "input": [name],
        "dead_letter": dead_letter,
        "versions": versions,
        "control": control,
    }
    if create:
        create_topics(
            bootstrap,
            {name: partitions, dead_letter: 1, versions: 1, control: 1},
            timeout=30.0,
        )
    if ds.task == "regression":
        model = {
            "name": "model",
            "task": "regression",
            "preprocessing": [{"path": "river.preprocessing.StandardScaler"}],
            "learner": {"path": "river.linear_model.LinearRegression"},
        }
    else:
        model = {
            "name": "model",
            "task": ds.task,
            "preprocessing": [{"path": "river.preprocessing.StandardScaler"}],
            "learner": {"path": "river.linear_model.LogisticRegression"},
        }
    config: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "group_id": unique("group"),
            "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 500,
            "consume_timeout_s": 0.1,
        },
        "topics": topics,
        "record": {
            "features": ds.record_features,
            "labels": list(ds.labels) if ds.labels else None,
        },
        "model": model,
        "training": {"mode": mode},
        "checkpoint": {"dir": str(tmp_path / "checkpoints"), "every_seconds": 1.0},
        "registry": {
            "root": str(tmp_path / "registry"),
            "publish_every_seconds": None,
            "publish_every_records": None,
        },
        "http": {"host": "127.0.0.1", "port": free_port()},
        "logging": {"format": "json", "level": "INFO"},
        "shutdown": {"timeout_s": 20},
    }
    return deep_merge(config, overrides or {})


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated recursively with ``extra``."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class ServiceProcess(service_process.ServiceProcess):
    """``stream-trainer run`` on ``config`` (written to ``workdir/NAME.yaml``) with the test
    checkpoint key, logging to ``workdir/NAME.log``; observed through /metrics and its log.

    The launch, probes, waits and stop are :class:`stream_trainer.laptop.service_process.
    ServiceProcess`'s, shared with the demo and the bench.
    """

    def __init__(
        self,
        config: dict[str, Any],
        workdir: Path,
        env: dict[str, str] | None = None,
        name: str = "service",
    ) -> None:
        self.config = config
        config_path = workdir / f"{name}.yaml"
        config_path.write_text(yaml.safe_dump(config))
        super().__init__(
            config_path,
            port=int(config["http"]["port"]),
            log_path=workdir / f"{name}.log",
            workdir=workdir,
            env={"STREAM_TRAINER_CHECKPOINT__HMAC_KEY": HMAC_KEY, **(env or {})},
        )

    def metrics(self) -> dict[str, float]:
        """Current samples as ``{'name{label="v",...}': value}`` (labels sorted); {} if down."""
        return self.scrape() or {}

    def stop(self, timeout: float = 40.0) -> int:
        """SIGTERM and wait; the exit code (a service still running at ``timeout`` is
        killed and fails the test)."""
        return super().stop(timeout)


def read_topic(
    bootstrap: str, topic: str, expected: int | None = None, timeout: float = 30.0
) -> list[Any]:
    """Every message of ``topic`` (all partitions, from the start), without a group.

    With ``expected``, waits until that many arrived; otherwise reads up to the high watermarks.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": unique("reader"),
            "enable.auto.commit": False,
            "enable.partition.eof": False,
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        partitions = list(metadata.topics[topic].partitions)
        ends = {}
        for p in partitions:
            _low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            ends[p] = high
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        want = expected if expected is not None else sum(ends.values())
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        while len(out) < want and time.monotonic() < deadline:
            for message in consumer.consume(1000, 0.5):
                if message.error() is None:
                    out.append(message)
        return out
    finally:
        consumer.close()


def settings_for(server: SeaweedFS, tmp_path: Path, who: S3Identity) -> ObjectStoreSettings:
    """Settings as a pod would have them: keys in mounted files, never in the config."""
    key_id = tmp_path / f"{who.name}-key-id"
    secret = tmp_path / f"{who.name}-secret"
    key_id.write_text(who.access_key_id + "\n")
    secret.write_text(who.secret_access_key + "\n")
    return ObjectStoreSettings(
        endpoint_url=server.endpoint_url,
        region=server.region,
        path_style=True,
        access_key_id_file=key_id,
        secret_access_key_file=secret,
    )


class NoCommits:
    """A RebalanceListener (e.g. :class:`ForeignMember`'s): starts at the group's offsets, commits
    nothing, so what it reads leaves no trace in the group."""

    def start_offsets(
        self, partitions: Sequence[TopicPartitionKey]
    ) -> dict[TopicPartitionKey, int]:
        return {}

    def on_assigned(self, partitions: Sequence[TopicPartitionKey]) -> None:
        pass

    def on_revoked(self, partitions: Sequence[TopicPartitionKey]) -> None:
        pass

    def on_lost(self, partitions: Sequence[TopicPartitionKey]) -> None:
        pass


class ForeignMember:
    """A cooperative consumer (not a stream-trainer) joining ``group`` to make it rebalance:
    the service gives up the partitions that move to it. Used as a context manager; it
    takes part in the group only while :meth:`pump` / :meth:`pump_until` poll it."""

    def __init__(self, bootstrap: str, group: str, topics: Sequence[str]) -> None:
        self.source = KafkaSource(
            {
                "bootstrap.servers": bootstrap,
                "group.id": group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": 6000,
                "heartbeat.interval.ms": 500,
            },
            topics,
            NoCommits(),
        )

    @property
    def owned(self) -> frozenset[TopicPartitionKey]:
        return self.source.owned

    def pump(self) -> None:
        """One bounded poll (serves the group protocol; records read are dropped)."""
        self.source.consume(100, 0.1)

    def pump_until(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        """Poll until ``predicate`` holds; fail naming ``what`` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while not (value := predicate()):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            self.pump()
        return value

    def __enter__(self) -> ForeignMember:
        return self

    def __exit__(self, *_exc: object) -> None:
        assert self.source.close(30.0), "the foreign member did not close"
