"""When to publish a version, whether it becomes champion, and its event on Kafka.

Version event (the value; the key is the model name), canonical JSON::

    {"artifact_uri": "file:///.../model.pkl", "champion": true, "metadata": {...},
     "model_name": "m", "type": "version", "version": 7}

A champion change made later by hand (``versions promote`` / ``rollback``) is a
``"type": "champion"`` event with the same fields plus ``reason``; readers follow the
``champion`` flag of version events only forward (a late repeat of an old version's event
never moves a reader back), and champion events always.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any

from stream_trainer.config import GateSettings
from stream_trainer.errors import StreamTrainerError
from stream_trainer.registry import Registry, VersionInfo, atomic_write, sent_marker


class VersionEventError(StreamTrainerError):
    """A version event was not delivered (the caller retries; the marker is not written)."""


class PublishPolicy:
    """Decides when a version is due: every N records, every T seconds, after a retrain,
    or on demand. The clock is injectable; the period starts at construction."""

    def __init__(
        self,
        every_records: int | None,
        every_seconds: float | None,
        after_retrain: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._every_records = every_records
        self._every_seconds = every_seconds
        self._after_retrain = after_retrain
        self._clock = clock
        self._last = clock()

    def due(self, records_since_last: int, retrained: bool, requested: bool) -> str | None:
        """The trigger that makes a version due now ("manual", "retrain", "records",
        "time", in that precedence), or None. "time" needs at least one new record: a
        version identical to the last one is not worth publishing."""
        if requested:
            return "manual"
        if retrained and self._after_retrain:
            return "retrain"
        if self._every_records is not None and records_since_last >= self._every_records:
            return "records"
        if (
            self._every_seconds is not None
            and records_since_last > 0
            and self._clock() - self._last >= self._every_seconds
        ):
            return "time"
        return None

    def mark_published(self) -> None:
        """Restart the period (call after a version was published or rejected)."""
        self._last = self._clock()


class PromotionGate:
    """Champion / challenger: scores are higher-is-better (negate losses before calling)."""

    def __init__(self, settings: GateSettings) -> None:
        self._settings = settings

    def decide(self, champion_score: float | None, candidate_score: float) -> tuple[bool, str]:
        """(accept, reason). Accept when the gate is disabled, there is no champion (or it
        has no finite score), or ``candidate >= champion - margin``. A non-finite candidate
        score is rejected."""
        if not self._settings.enabled:
            return True, "gate disabled"
        if not math.isfinite(candidate_score):
            return False, f"candidate score {candidate_score} is not finite"
        if champion_score is None or not math.isfinite(champion_score):
            return True, "no champion score to compare with"
        floor = champion_score - self._settings.margin
        if candidate_score >= floor:
            return True, (
                f"candidate {candidate_score:.6g} >= champion {champion_score:.6g} "
                f"- margin {self._settings.margin:g}"
            )
        return False, (
            f"candidate {candidate_score:.6g} < champion {champion_score:.6g} "
            f"- margin {self._settings.margin:g}"
        )


def _canonical(event: dict[str, Any]) -> bytes:
    return json.dumps(event, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def version_event(metadata: dict[str, Any], artifact_uri: str) -> bytes:
    """The event value for a version: canonical JSON, so the same inputs always give the
    same bytes (repeats after a crash are byte-identical)."""
    return _canonical(
        {
            "type": "version",
            "model_name": metadata["model_name"],
            "version": metadata["version"],
            "champion": bool(metadata.get("champion", False)),
            "artifact_uri": artifact_uri,
            "metadata": metadata,
        }
    )


def champion_event(info: VersionInfo, reason: str) -> bytes:
    """The event value for a manual promote / rollback to ``info``."""
    return _canonical(
        {
            "type": "champion",
            "model_name": info.metadata["model_name"],
            "version": info.version,
            "champion": True,
            "reason": reason,
            "artifact_uri": info.artifact_uri,
            "metadata": info.metadata,
        }
    )


class VersionEventPublisher:
    """Sends version events keyed by model name and remembers which were delivered.

    ``producer`` must be idempotent (``KafkaSettings.producer_config()`` sets
    ``enable.idempotence`` and ``acks=all``). Delivery is at least once: the sent-marker is
    written only after the broker acknowledged, so a crash in between re-sends the same
    bytes on the next :meth:`republish_pending`.
    """

    def __init__(self, producer: Any, topic: str, model_name: str, timeout_s: float = 30.0) -> None:
        self._producer = producer
        self._topic = topic
        self._model_name = model_name
        self._timeout_s = timeout_s

    def _send(self, value: bytes) -> None:
        outcome: dict[str, Any] = {}

        def on_delivery(error: Any, _message: Any) -> None:
            outcome["error"] = error

        self._producer.produce(
            self._topic, key=self._model_name.encode(), value=value, on_delivery=on_delivery
        )
        remaining = self._producer.flush(self._timeout_s)
        if "error" not in outcome:
            raise VersionEventError(
                f"version event to {self._topic} not delivered within {self._timeout_s}s "
                f"({remaining} message(s) still queued)"
            )
        if outcome["error"] is not None:
            raise VersionEventError(f"version event to {self._topic}: {outcome['error']}")

    def publish(self, info: VersionInfo, registry: Registry | None = None) -> None:
        """Send the event of ``info``, wait for delivery, then mark it sent in ``registry``
        (without one: the marker beside a local registry's version folder).

        Raises VersionEventError when not delivered (nothing is marked)."""
        self._send(version_event(info.metadata, info.artifact_uri))
        if registry is not None:
            registry.mark_event_sent(info)
            return
        marker = sent_marker(info)
        marker.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(marker, b"")

    def publish_champion(self, info: VersionInfo, reason: str) -> None:
        """Announce a manual promote / rollback to ``info`` (after the registry changed)."""
        self._send(champion_event(info, reason))

    def republish_pending(self, registry: Registry) -> list[int]:
        """On start: finish an interrupted promotion (:meth:`ModelRegistry.recover`), then
        send the event of every existing version without a sent-marker, oldest first;
        returns their numbers. Only versions on disk get events."""
        registry.recover()
        sent = []
        for info in registry.list():
            if not registry.event_sent(info):
                self.publish(info, registry)
                sent.append(info.version)
        return sent
