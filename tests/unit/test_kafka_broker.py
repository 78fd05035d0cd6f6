"""The test Kafka broker's helpers that need no JVM."""

from __future__ import annotations

import base64
import uuid

import pytest

from stream_trainer.testing import kafka_broker


def test_cluster_ids_never_look_like_an_option(monkeypatch: pytest.MonkeyPatch) -> None:
    # The first draws encode to ids starting with "-" (kafka-storage took them for options).
    leading_dash = bytes([0xF8]) + bytes(15)
    draws = iter([leading_dash, leading_dash, bytes(range(16))])

    class FakeUuid:
        def __init__(self) -> None:
            self.bytes = next(draws)

    monkeypatch.setattr(uuid, "uuid4", FakeUuid)
    assert base64.urlsafe_b64encode(leading_dash).decode().startswith("-")
    cluster_id = kafka_broker._cluster_id()
    assert not cluster_id.startswith("-")
    assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16
