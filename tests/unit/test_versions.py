"""PromotionGate, version events and the event publisher (fake producer). When a version
is due: tests/unit/test_cadence.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from stream_trainer.config import GateSettings
from stream_trainer.publishing.events import (
    PromotionGate,
    VersionEventError,
    VersionEventPublisher,
    version_event,
)
from stream_trainer.publishing.registry import ModelRegistry, sent_marker


def test_gate_accepts_without_champion_and_within_margin() -> None:
    gate = PromotionGate(GateSettings(margin=0.05))
    assert gate.decide(None, 0.1)[0] is True
    assert gate.decide(0.80, 0.76)[0] is True
    assert gate.decide(0.80, 0.90)[0] is True


def test_gate_rejects_worse_than_margin_and_nan() -> None:
    gate = PromotionGate(GateSettings(margin=0.05))
    accepted, code, reason = gate.decide(0.80, 0.74)
    assert accepted is False and code == "worse_than_margin" and "0.74" in reason
    assert gate.decide(0.80, float("nan"))[0] is False
    disabled = PromotionGate(GateSettings(enabled=False)).decide(0.9, 0.1)
    assert disabled.accepted is True and disabled.reason.startswith("gate disabled")


def test_version_event_is_canonical_and_repeatable() -> None:
    metadata = {"version": 3, "model_name": "m", "champion": True, "z": 1.5, "a": {"b": [1, 2]}}
    reordered = dict(reversed(list(metadata.items())))
    first = version_event(metadata, "file:///r/m/versions/00000003/model.pkl")
    assert first == version_event(reordered, "file:///r/m/versions/00000003/model.pkl")
    assert b" " not in first
    event = json.loads(first)
    assert event["type"] == "version" and event["version"] == 3 and event["champion"] is True
    assert event["metadata"] == metadata


class FakeProducer:
    """Records produced values; delivery succeeds unless ``fail`` is set."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.sent: list[tuple[str, bytes, bytes]] = []
        self._callbacks: list[Any] = []

    def produce(self, topic: str, key: bytes, value: bytes, on_delivery: Any) -> None:
        self.sent.append((topic, key, value))
        self._callbacks.append(on_delivery)

    def flush(self, timeout: float) -> int:
        for callback in self._callbacks:
            callback("broker down" if self.fail else None, None)
        self._callbacks.clear()
        return 0


def test_publisher_marks_after_delivery_and_republishes_pending(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path, "m", None, keep_last=5)
    producer = FakeProducer()
    publisher = VersionEventPublisher(producer, "versions", "m")
    first = registry.publish(b"one", {}, promote=True)
    publisher.publish(first)
    assert sent_marker(first).exists()
    # Crash after the files, before the event: the next start sends it, once.
    second = registry.publish(b"two", {}, promote=True)
    assert publisher.republish_pending(registry) == [2]
    assert publisher.republish_pending(registry) == []
    assert [key for _, key, _ in producer.sent] == [b"m", b"m"]
    # Crash after delivery, before the marker: the repeat is byte-identical.
    sent_marker(second).unlink()
    assert publisher.republish_pending(registry) == [2]
    assert producer.sent[1][2] == producer.sent[2][2]
    assert json.loads(producer.sent[2][2])["version"] == 2


def test_publisher_failure_writes_no_marker(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path, "m", None, keep_last=5)
    publisher = VersionEventPublisher(FakeProducer(fail=True), "versions", "m")
    info = registry.publish(b"one", {}, promote=True)
    with pytest.raises(VersionEventError, match="broker down"):
        publisher.publish(info)
    assert not sent_marker(info).exists()
