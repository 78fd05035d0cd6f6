"""Creates the topics a config names (``stream-trainer topics create``) and checks that a
broker answers, so the CLI fails in bounded time with one line instead of librdkafka's
retry log.

Idempotent: a topic that exists is reported with its partition count, never altered;
the one exception is the lease topic, which must have exactly one partition (the lease
is the owner of that partition, see :mod:`stream_trainer.state.kafka_lease`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._config import ConfigResource
from confluent_kafka.cimpl import NewTopic

from stream_trainer.errors import StreamTrainerError

if TYPE_CHECKING:
    from stream_trainer.config import Settings

DEAD_LETTER_RETENTION_MS = 14 * 24 * 3600 * 1000
_QUIET_LOGGER = "stream_trainer.cli.librdkafka"


class TopicError(StreamTrainerError):
    """A topic could not be created or has the wrong shape; the message says which."""


class BrokerUnreachable(TopicError):
    """No broker answered at the bootstrap address within the timeout."""


@dataclass(frozen=True)
class TopicSpec:
    """One topic the service needs: its role, partitions and topic-level configs."""

    name: str
    role: str
    partitions: int
    config: Mapping[str, str] = field(default_factory=dict)
    exact_partitions: bool = False  # an existing topic with another count is an error


@dataclass(frozen=True)
class TopicResult:
    """What ``ensure_topics`` found or did for one topic."""

    name: str
    role: str
    status: str  # "created" or "exists"
    partitions: int
    problem: str | None = None  # the service cannot use the topic as it is
    warnings: tuple[str, ...] = ()  # usable, but not configured as this command would


def planned_topics(settings: Settings, input_partitions: int) -> list[TopicSpec]:
    """The topics ``settings`` reads and writes, with the shape each one needs."""
    topics = settings.topics
    specs = [TopicSpec(name, "input", input_partitions) for name in topics.input]
    specs += [
        TopicSpec(
            topics.dead_letter,
            "dead-letter",
            1,
            # Bad records wait here for a person: two weeks, not the broker's default.
            {"retention.ms": str(DEAD_LETTER_RETENTION_MS)},
        ),
        # Readers rebuild the latest version per model from it: keep the last per key.
        TopicSpec(topics.versions, "versions", 1, {"cleanup.policy": "compact"}),
    ]
    if topics.control:
        specs.append(TopicSpec(topics.control, "control", 1))
    specs.append(TopicSpec(settings.lease_topic(), "lease", 1, exact_partitions=True))
    return specs


def quiet_logger() -> logging.Logger:
    """A logger that drops librdkafka's lines: the CLI reports failures in one line."""
    logger = logging.getLogger(_QUIET_LOGGER)
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
    logger.propagate = False
    return logger


def admin_client(client_config: Mapping[str, Any]) -> AdminClient:
    """An AdminClient on ``client_config`` whose librdkafka log is silenced."""
    conf: dict[str, Any] = {**client_config, "logger": quiet_logger()}
    return AdminClient(conf)


def wait_for_broker(admin: AdminClient, bootstrap: str, timeout: float) -> Any:
    """The cluster's metadata; BrokerUnreachable naming ``bootstrap`` after ``timeout`` s."""
    try:
        return admin.list_topics(timeout=timeout)
    except KafkaException as error:
        raise BrokerUnreachable(
            f"no Kafka broker answered at {bootstrap} within {timeout:g} s "
            f"({error.args[0].str() if error.args else error})"
        ) from None


def ensure_topics(
    admin: AdminClient,
    specs: Sequence[TopicSpec],
    *,
    replication_factor: int,
    timeout: float,
) -> list[TopicResult]:
    """Create the missing topics of ``specs`` and wait until each one has leaders.

    Raises TopicError when the broker refuses a creation (e.g. a replication factor
    above its broker count) or the topics have no leaders within ``timeout`` s.
    """
    deadline = time.monotonic() + timeout
    existing = _list(admin, timeout).topics
    missing = [spec for spec in specs if spec.name not in existing]
    results = {
        spec.name: _existing_result(
            spec, len(existing[spec.name].partitions), _config_warnings(admin, spec, timeout)
        )
        for spec in specs
        if spec.name in existing
    }
    if missing:
        _create(admin, missing, replication_factor, max(deadline - time.monotonic(), 1.0))
        _wait_for_leaders(admin, [spec.name for spec in missing], deadline)
        for spec in missing:
            results[spec.name] = TopicResult(spec.name, spec.role, "created", spec.partitions)
    return [results[spec.name] for spec in specs]


def _list(admin: AdminClient, timeout: float) -> Any:
    """Every topic's metadata (never naming one: that may auto-create it)."""
    try:
        return admin.list_topics(timeout=timeout)
    except KafkaException as error:
        raise TopicError(f"cannot list the topics: {error.args[0].str()}") from None


def _config_warnings(admin: AdminClient, spec: TopicSpec, timeout: float) -> tuple[str, ...]:
    """How an existing topic's configs differ from ``spec.config`` (e.g. a versions topic
    that is not compacted loses the latest version to retention)."""
    if not spec.config:
        return ()
    resource = ConfigResource(ConfigResource.Type.TOPIC, spec.name)
    try:
        found = admin.describe_configs([resource])[resource].result(timeout=timeout)
    except KafkaException as error:
        return (f"cannot read the configs of {spec.name}: {error.args[0].str()}",)
    return tuple(
        f"the {spec.role} topic {spec.name} has {key}={entry.value if entry else None}, "
        f"expected {value}"
        for key, value in spec.config.items()
        if (entry := found.get(key)) is None or entry.value != value
    )


def _existing_result(
    spec: TopicSpec, partitions: int, warnings: tuple[str, ...] = ()
) -> TopicResult:
    problem = None
    if spec.exact_partitions and partitions != spec.partitions:
        problem = (
            f"the {spec.role} topic {spec.name} must have exactly {spec.partitions} "
            f"partition{'s' if spec.partitions != 1 else ''}, it has {partitions}: "
            "delete it, or name another in the config"
        )
    return TopicResult(spec.name, spec.role, "exists", partitions, problem, warnings)


def _create(
    admin: AdminClient, specs: Sequence[TopicSpec], replication_factor: int, timeout: float
) -> None:
    new = [
        NewTopic(
            spec.name,
            num_partitions=spec.partitions,
            replication_factor=replication_factor,
            config=dict(spec.config),
        )
        for spec in specs
    ]
    futures = admin.create_topics(new, request_timeout=timeout, operation_timeout=timeout)
    for name, future in futures.items():
        try:
            future.result(timeout=timeout)
        except KafkaException as error:
            # Another client created it between our listing and now: that is fine.
            if error.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise TopicError(f"cannot create topic {name}: {error.args[0].str()}") from None


def _wait_for_leaders(admin: AdminClient, names: Sequence[str], deadline: float) -> None:
    """Bounded poll on metadata until every partition of ``names`` has a leader."""
    pending = set(names)
    while True:
        left = deadline - time.monotonic()
        metadata = _list(admin, max(min(left, 5.0), 0.1))
        pending = {
            name
            for name in pending
            if (topic := metadata.topics.get(name)) is None
            or topic.error is not None
            or not topic.partitions
            or any(p.leader < 0 for p in topic.partitions.values())
        }
        if not pending:
            return
        if left <= 0:
            raise TopicError(f"topics without a leader after the timeout: {sorted(pending)}")
        time.sleep(0.1)  # metadata poll interval, not synchronisation
