"""Version events of partition- and key-scoped models, and where their versions live.

A scoped model has one slot per source partition (``scope="partition"``, scope id
``<topic>:<p>``) or per key (``scope="key"``, scope id :func:`scope_id_for_key`), each with
its own numbering and champion. Event value (canonical JSON, like
:func:`stream_trainer.publishing.events.version_event`)::

    {"type": "scoped_version", "model_name": "fraud", "scope": "partition",
     "scope_id": "orders:3", "version": 12, "champion": true, "artifact_uri": "s3://...",
     "routing": {"key_source": "kafka_key", "partitioner": "murmur2", "partitions": 6,
                 "topic": "orders"},
     "metadata": {...}}

A manual promote / rollback is ``"type": "scoped_champion"`` with ``reason`` added. The
types are new on purpose: a reader that only knows ``version`` / ``champion`` skips them
instead of serving one slot's model as the model. Kafka message key:
``<model>/<scope>/<scope_id>``, so a compacted versions topic keeps one head per slot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from stream_trainer.errors import StreamTrainerError
from stream_trainer.publishing.events import canonical_event
from stream_trainer.publishing.partitioner import PARTITIONERS
from stream_trainer.publishing.registry import VersionInfo

GLOBAL = "global"
PARTITION = "partition"
KEY = "key"
SCOPES = (PARTITION, KEY)

SCOPED_VERSION = "scoped_version"
SCOPED_CHAMPION = "scoped_champion"

KAFKA_KEY = "kafka_key"
FIELD_PREFIX = "field:"

_KEY_SCOPE_ID = re.compile(r"[0-9a-f]{32}")
# Kafka's own rule for topic names (no ':' and no '/', so both separators stay unambiguous).
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")


class ScopedEventError(StreamTrainerError, ValueError):
    """A scoped event (or its parts) that does not follow the format."""


@dataclass(frozen=True)
class Routing:
    """How a key finds its slot: ``key_source`` (``kafka_key`` or ``field:<name>``, whose
    value's bytes are :func:`stream_trainer.publishing.partitioner.key_bytes_from_field`),
    ``partitioner`` (``murmur2`` | ``crc32``: the producers'), ``partitions`` (the source
    topic's count the version was trained under) and the source ``topic`` (partition
    scope)."""

    key_source: str
    partitioner: str
    partitions: int
    topic: str | None = None

    def __post_init__(self) -> None:
        if self.key_source != KAFKA_KEY and not (
            self.key_source.startswith(FIELD_PREFIX) and len(self.key_source) > len(FIELD_PREFIX)
        ):
            raise ScopedEventError(
                f"routing.key_source must be {KAFKA_KEY!r} or 'field:<name>', "
                f"got {self.key_source!r}"
            )
        if self.partitioner not in PARTITIONERS:
            raise ScopedEventError(
                f"routing.partitioner must be one of {', '.join(PARTITIONERS)}, "
                f"got {self.partitioner!r}"
            )
        if (
            isinstance(self.partitions, bool)
            or not isinstance(self.partitions, int)
            or self.partitions < 1
        ):
            raise ScopedEventError(
                f"routing.partitions must be an int >= 1, got {self.partitions!r}"
            )
        if self.topic is not None and not _TOPIC.fullmatch(self.topic):
            raise ScopedEventError(f"routing.topic is not a topic name: {self.topic!r}")

    def to_json(self) -> dict[str, Any]:
        """The event's ``routing`` object (``topic`` only when set)."""
        out: dict[str, Any] = {
            "key_source": self.key_source,
            "partitioner": self.partitioner,
            "partitions": self.partitions,
        }
        if self.topic is not None:
            out["topic"] = self.topic
        return out

    @classmethod
    def from_json(cls, value: Any) -> Routing:
        """Parse an event's ``routing``; ScopedEventError when malformed."""
        if not isinstance(value, dict):
            raise ScopedEventError(f"routing must be an object, got {value!r}")
        try:
            return cls(
                key_source=value["key_source"],
                partitioner=value["partitioner"],
                partitions=value["partitions"],
                topic=value.get("topic"),
            )
        except (KeyError, TypeError, AttributeError) as error:
            raise ScopedEventError(f"routing {value!r}: {error!r}") from error


def partition_scope_id(topic: str, partition: int) -> str:
    """The scope id of partition ``partition`` of ``topic``: ``<topic>:<p>``."""
    if not _TOPIC.fullmatch(topic) or isinstance(partition, bool) or partition < 0:
        raise ScopedEventError(f"not a topic partition: {topic!r} {partition!r}")
    return f"{topic}:{partition}"


def parse_partition_scope_id(scope_id: str) -> tuple[str, int]:
    """``(topic, partition)`` of a partition scope id; ScopedEventError when malformed."""
    topic, sep, number = scope_id.rpartition(":")
    if not sep or not _TOPIC.fullmatch(topic) or not number.isdigit() or not number.isascii():
        raise ScopedEventError(f"partition scope id must be '<topic>:<p>', got {scope_id!r}")
    return topic, int(number)


def check_scope(model_name: str, scope: str, scope_id: str) -> None:
    """Refuse a model name with ``/``, an unknown scope, or a scope id not of its scope
    (a key scope id must be a 32-hex hash: a raw key must never reach an event)."""
    if not model_name or "/" in model_name:
        raise ScopedEventError(f"model name must be non-empty without '/': {model_name!r}")
    if scope == PARTITION:
        parse_partition_scope_id(scope_id)
    elif scope == KEY:
        if not isinstance(scope_id, str) or not _KEY_SCOPE_ID.fullmatch(scope_id):
            raise ScopedEventError(
                f"key scope id must be 32 lowercase hex digits (scope_id_for_key), got {scope_id!r}"
            )
    else:
        raise ScopedEventError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")


def scope_prefix(model_name: str, scope: str, scope_id: str) -> str:
    """The slot's folder under the registry root (design 6.1):
    ``<model>/partition/<topic>/<p>`` or ``<model>/key/<hash>``. A registry opened with
    this as its model name (``open_registry(root, scope_prefix(...), ...)``) keeps the
    slot's ``versions/<n:08d>/``, ``CHAMPION``, ``HIGH_WATER_MARK`` and decisions there."""
    check_scope(model_name, scope, scope_id)
    if scope == PARTITION:
        topic, partition = parse_partition_scope_id(scope_id)
        return f"{model_name}/{PARTITION}/{topic}/{partition}"
    return f"{model_name}/{KEY}/{scope_id}"


def scoped_event_key(model_name: str, scope: str, scope_id: str) -> bytes:
    """The Kafka message key of a slot's events: ``<model>/<scope>/<scope_id>``."""
    check_scope(model_name, scope, scope_id)
    return f"{model_name}/{scope}/{scope_id}".encode()


def _check_routing(scope: str, scope_id: str, routing: Routing) -> None:
    if scope == PARTITION and routing.topic is not None:
        topic, _ = parse_partition_scope_id(scope_id)
        if topic != routing.topic:
            raise ScopedEventError(f"routing.topic {routing.topic!r} but scope id {scope_id!r}")


def scoped_version_event(
    model_name: str,
    scope: str,
    scope_id: str,
    metadata: dict[str, Any],
    artifact_uri: str,
    routing: Routing,
) -> bytes:
    """The event value of a slot's version (``metadata`` as stored by the slot's registry:
    ``version`` and ``champion`` come from it), canonical JSON."""
    check_scope(model_name, scope, scope_id)
    _check_routing(scope, scope_id, routing)
    return canonical_event(
        {
            "type": SCOPED_VERSION,
            "model_name": model_name,
            "scope": scope,
            "scope_id": scope_id,
            "version": metadata["version"],
            "champion": bool(metadata.get("champion", False)),
            "artifact_uri": artifact_uri,
            "routing": routing.to_json(),
            "metadata": metadata,
        }
    )


def scoped_champion_event(
    model_name: str,
    scope: str,
    scope_id: str,
    info: VersionInfo,
    reason: str,
    routing: Routing,
) -> bytes:
    """The event value of a manual promote / rollback of a slot to ``info``."""
    check_scope(model_name, scope, scope_id)
    _check_routing(scope, scope_id, routing)
    return canonical_event(
        {
            "type": SCOPED_CHAMPION,
            "model_name": model_name,
            "scope": scope,
            "scope_id": scope_id,
            "version": info.version,
            "champion": True,
            "reason": reason,
            "artifact_uri": info.artifact_uri,
            "routing": routing.to_json(),
            "metadata": info.metadata,
        }
    )
