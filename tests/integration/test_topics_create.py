"""``stream-trainer topics create`` against Apache Kafka: partitions and topic configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._config import ConfigResource

from stream_trainer.operations.topics import DEAD_LETTER_RETENTION_MS
from tests.conftest import BrokerHandle, new_topic

pytestmark = pytest.mark.integration


def write_config(tmp_path: Path, bootstrap: str, **topics: Any) -> Path:
    prefix = f"tc-{uuid.uuid4().hex[:10]}"
    data: dict[str, Any] = {
        "kafka": {"bootstrap_servers": bootstrap, "group_id": f"{prefix}.group"},
        "topics": {
            "input": [f"{prefix}.in-a", f"{prefix}.in-b"],
            "dead_letter": f"{prefix}.dlq",
            "versions": f"{prefix}.versions",
            "control": f"{prefix}.control",
            **topics,
        },
        "record": {"features": ["a"], "labels": [0, 1]},
        "model": {
            "name": "m",
            "task": "binary_classification",
            "learner": {"path": "river.linear_model.LogisticRegression"},
        },
        "training": {"mode": "per_record"},
        "checkpoint": {"dir": str(tmp_path / "checkpoints"), "allow_unsigned": True},
        "registry": {"root": str(tmp_path / "registry")},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def topics_create(config: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stream_trainer",
            "topics",
            "create",
            "--config",
            str(config),
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
        check=False,
    )
    print(f"exit {result.returncode}\n{result.stdout}{result.stderr}")
    assert "Traceback" not in result.stderr
    return result


def topic_configs(admin: AdminClient, name: str) -> dict[str, str]:
    resource = ConfigResource(ConfigResource.Type.TOPIC, name)
    described = admin.describe_configs([resource])[resource].result(timeout=30)
    return {key: entry.value for key, entry in described.items()}


def test_creates_every_topic_with_its_shape_then_reports_them(
    kafka_broker: BrokerHandle, tmp_path: Path
) -> None:
    config = write_config(tmp_path, kafka_broker.bootstrap_servers)
    topics = yaml.safe_load(config.read_text())["topics"]
    lease = yaml.safe_load(config.read_text())["kafka"]["group_id"] + ".lease"

    first = topics_create(config, "--partitions", "4")
    assert first.returncode == 0
    assert first.stdout.count("created") == 6

    admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap_servers})
    metadata = admin.list_topics(timeout=30).topics
    expected = {
        topics["input"][0]: 4,
        topics["input"][1]: 4,
        topics["dead_letter"]: 1,
        topics["versions"]: 1,
        topics["control"]: 1,
        lease: 1,
    }
    assert {name: len(metadata[name].partitions) for name in expected} == expected
    assert topic_configs(admin, topics["versions"])["cleanup.policy"] == "compact"
    assert topic_configs(admin, topics["dead_letter"])["retention.ms"] == str(
        DEAD_LETTER_RETENTION_MS
    )
    assert topic_configs(admin, topics["input"][0])["cleanup.policy"] == "delete"

    again = topics_create(config, "--partitions", "8")  # existing topics are left alone
    assert again.returncode == 0
    assert again.stdout.count("exists") == 6 and "created" not in again.stdout
    metadata = admin.list_topics(timeout=30).topics
    assert len(metadata[topics["input"][0]].partitions) == 4


def test_a_lease_topic_with_two_partitions_is_an_error(
    kafka_broker: BrokerHandle, tmp_path: Path
) -> None:
    lease = new_topic(kafka_broker, 2, prefix="lease")
    config = write_config(tmp_path, kafka_broker.bootstrap_servers, lease=lease)
    result = topics_create(config)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert lease in result.stdout and "exactly 1 partition" in result.stderr


def test_an_existing_versions_topic_without_compaction_is_a_warning(
    kafka_broker: BrokerHandle, tmp_path: Path
) -> None:
    versions = new_topic(kafka_broker, 1, prefix="versions")  # cleanup.policy=delete
    config = write_config(tmp_path, kafka_broker.bootstrap_servers, versions=versions)
    result = topics_create(config)
    assert result.returncode == 0  # usable, but the operator is told
    assert result.stderr.count("\n") == 1
    assert f"{versions} has cleanup.policy=delete, expected compact" in result.stderr


def test_a_refused_creation_fails_in_one_line(kafka_broker: BrokerHandle, tmp_path: Path) -> None:
    config = write_config(tmp_path, kafka_broker.bootstrap_servers)
    result = topics_create(config, "--replication-factor", "3")  # one broker only
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "cannot create topic" in result.stderr


def test_an_unreachable_broker_fails_in_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, "127.0.0.1:9")  # discard port: nothing listens
    result = topics_create(config, "--timeout", "2")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "127.0.0.1:9" in result.stderr


def test_produce_creates_its_topic_and_delivers_every_record(kafka_broker: BrokerHandle) -> None:
    topic = f"tc-produce-{uuid.uuid4().hex[:10]}"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stream_trainer",
            "produce",
            "--bootstrap-servers",
            kafka_broker.bootstrap_servers,
            "--topic",
            topic,
            "--partitions",
            "2",
            "--records",
            "50",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # librdkafka's log stays out of the user's terminal
    assert json.loads(result.stdout)["valid"] == 50
    admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap_servers})
    assert len(admin.list_topics(timeout=30).topics[topic].partitions) == 2
