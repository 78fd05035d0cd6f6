"""The training consumer's assignor: forced to cooperative-sticky (incremental callbacks)."""

from __future__ import annotations

import logging

import pytest

from stream_trainer.config import KafkaSettings
from stream_trainer.ingest.kafka_source import COOPERATIVE, cooperative_config


def test_the_service_consumer_gets_the_cooperative_assignor() -> None:
    conf = cooperative_config(
        KafkaSettings(bootstrap_servers="b:9092", group_id="g").consumer_config()
    )
    assert conf["partition.assignment.strategy"] == COOPERATIVE == "cooperative-sticky"


def test_an_eager_assignor_in_extra_is_overridden_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = KafkaSettings(
        bootstrap_servers="b:9092", group_id="g", extra={"partition.assignment.strategy": "range"}
    )
    assert settings.consumer_config()["partition.assignment.strategy"] == "range"
    with caplog.at_level(logging.WARNING, logger="stream_trainer.ingest.kafka_source"):
        conf = cooperative_config(settings.consumer_config())
    assert conf["partition.assignment.strategy"] == COOPERATIVE
    [record] = [r for r in caplog.records if "overridden" in r.getMessage()]
    assert record.__dict__["configured"] == "range"


def test_the_consumer_group_protocol_gets_no_client_assignor() -> None:
    # KIP-848: librdkafka refuses partition.assignment.strategy there.
    conf = cooperative_config(
        {"group.protocol": "consumer", "partition.assignment.strategy": "range"}
    )
    assert "partition.assignment.strategy" not in conf


def test_the_callers_config_is_not_changed() -> None:
    given = {"bootstrap.servers": "b:9092"}
    cooperative_config(given)
    assert given == {"bootstrap.servers": "b:9092"}
