"""One active member per model: a lease held through Kafka's own group protocol.

The model is global (one model, one writer) and each member keeps its state in its own
checkpoint directory, so two members splitting the input partitions would train two
models, and a member taking partitions over from the group's committed offsets would learn
again what the other had checkpointed but not yet committed. So only the member holding
the lease subscribes to the input; every other member stands by.

The lease is partition 0 of a one-partition topic, owned through a consumer group of its
own (``<group_id>.lease``) with the cooperative-sticky assignor: a member that joins never
takes the partition from its holder (the group is balanced already), and Kafka hands it to
a standby only when the holder leaves or its session expires. Static membership
(``group.instance.id``) lets a restarted holder take it back at once. Nothing is written
to the topic but claims: the lineage (the id of a model history, kept in its checkpoints)
of the model that trains on the group. A member whose restored model is another lineage
must not train, even holding the lease: the group's offsets were committed by that other
model, and the records between its last commit and its last checkpoint are in it already.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from stream_trainer.errors import StreamTrainerError
from stream_trainer.operations.delivery import deliver_one

log = logging.getLogger(__name__)

LEASE_GROUP_SUFFIX = ".lease"


class LeaseError(StreamTrainerError):
    """The lease topic cannot be used (wrong partition count, creation refused)."""


def ensure_lease_topic(admin_config: dict[str, Any], topic: str, timeout_s: float = 10.0) -> bool:
    """Create ``topic`` with one partition unless it exists; True when it is usable.

    False when the cluster could not be reached within ``timeout_s`` (the caller retries).
    Raises LeaseError when the topic has more than one partition or creation was refused.
    """
    admin = AdminClient(admin_config)
    try:
        # All topics: a metadata request naming the topic may auto-create it with the
        # broker's default partition count.
        metadata = admin.list_topics(timeout=timeout_s)
    except KafkaException as error:
        log.warning("cannot read the lease topic's metadata", extra={"reason": str(error)})
        return False
    found = metadata.topics.get(topic)
    if found is not None and found.error is None:
        if len(found.partitions) != 1:
            raise LeaseError(
                f"lease topic {topic!r} has {len(found.partitions)} partitions; it must have "
                "exactly 1 (delete it, or name another with topics.lease)"
            )
        return True
    futures = admin.create_topics([NewTopic(topic, num_partitions=1)], request_timeout=timeout_s)
    try:
        futures[topic].result(timeout=timeout_s)
    except KafkaException as error:
        code = error.args[0].code() if error.args else None
        if code == KafkaError.TOPIC_ALREADY_EXISTS:
            return True
        if code in (KafkaError._TIMED_OUT, KafkaError._TRANSPORT):
            return False
        raise LeaseError(
            f"cannot create the lease topic {topic!r}: {error}; create it with 1 partition "
            "(or name an existing one-partition topic with topics.lease)"
        ) from None
    log.info("created the lease topic", extra={"topic": topic})
    return True


def read_claim(client_config: dict[str, Any], topic: str, timeout_s: float = 10.0) -> str | None:
    """The lineage named by the newest claim on the lease topic; None when never claimed.

    Raises KafkaException when the topic cannot be read within ``timeout_s``.
    """
    conf = dict(client_config)
    conf.update({"group.id": "stream-trainer-claim-reader", "enable.auto.commit": False})
    consumer = Consumer(conf)
    try:
        low, high = consumer.get_watermark_offsets(
            TopicPartition(topic, 0), timeout=timeout_s, cached=False
        )
        if high <= low:
            return None
        consumer.assign([TopicPartition(topic, 0, high - 1)])
        message = consumer.poll(timeout_s)
        if message is None or message.error() is not None:
            raise KafkaException(message.error() if message is not None else "no claim read")
        value = message.value() or b"{}"
        lineage = json.loads(value).get("lineage")
        return str(lineage) if lineage else None
    finally:
        consumer.close()


def write_claim(
    producer_config: dict[str, Any], topic: str, lineage: str, member: str, timeout_s: float = 10.0
) -> None:
    """Record on the lease topic that ``lineage`` trains on the group from now on.

    Raises NotDelivered when the claim is not acknowledged within ``timeout_s``.
    """
    value = json.dumps({"lineage": lineage, "member": member}).encode()
    deliver_one(producer_config, topic, value, partition=0, timeout_s=timeout_s)


class KafkaLease:
    """Membership of the lease group; :attr:`held` is True while this member is active.

    ``poll`` must be called regularly (it is the group heartbeat's poll, bounded by
    ``max.poll.interval.ms``); it never blocks longer than its timeout.
    """

    def __init__(
        self,
        consumer_config: dict[str, Any],
        topic: str,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        conf = dict(consumer_config)
        conf["group.id"] = f"{conf['group.id']}{LEASE_GROUP_SUFFIX}"
        if conf.get("group.instance.id"):
            conf["group.instance.id"] = f"{conf['group.instance.id']}{LEASE_GROUP_SUFFIX}"
        conf["partition.assignment.strategy"] = "cooperative-sticky"
        conf.pop("stats_cb", None)
        conf["statistics.interval.ms"] = 0
        self._topic = topic
        self._on_change = on_change
        self._held = threading.Event()
        self._consumer = Consumer(conf)
        self._consumer.subscribe(
            [topic], on_assign=self._assign, on_revoke=self._revoke, on_lost=self._revoke
        )

    @property
    def held(self) -> bool:
        """True while this member owns the lease partition."""
        return self._held.is_set()

    def _set(self, held: bool) -> None:
        if held == self.held:
            return
        if held:
            self._held.set()
        else:
            self._held.clear()
        log.info("lease acquired" if held else "lease released", extra={"topic": self._topic})
        if self._on_change is not None:
            self._on_change(held)

    def _assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Incremental (cooperative): only what is added. Never fetch: the topic is a name.
        consumer.incremental_assign(partitions)
        if partitions:
            consumer.pause(partitions)
            self._set(True)

    def _revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if partitions:
            self._set(False)
        consumer.incremental_unassign(partitions)

    def poll(self, timeout_s: float = 0.0) -> bool:
        """Serve the group protocol for up to ``timeout_s``; returns :attr:`held`."""
        message = self._consumer.poll(timeout_s)
        error = message.error() if message is not None else None
        if error is not None and error.fatal():
            raise KafkaException(error)
        return self.held

    def close(self) -> None:
        """Leave the lease group (a static member keeps its slot until its session ends)."""
        try:
            self._consumer.close()
        except (KafkaException, RuntimeError) as error:
            log.warning("lease consumer close failed", extra={"reason": str(error)})


class StandbyWait:
    """Stands by until the lease is held or a stop is requested (signal-safe)."""

    def __init__(self, stop: threading.Event | None = None) -> None:
        self._stop = stop if stop is not None else threading.Event()

    def request_stop(self) -> None:
        """Give up waiting (called from a signal handler)."""
        self._stop.set()

    @property
    def stopped(self) -> bool:
        """True once a stop was requested."""
        return self._stop.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds`` unless stopped; True if stopped."""
        return self._stop.wait(seconds)

    def until_held(
        self,
        lease: KafkaLease,
        beat: Callable[[], None],
        on_standby: Callable[[], None] | None = None,
        poll_s: float = 0.05,
        joining_s: float = 15.0,
    ) -> bool:
        """Poll the lease group until this member holds the lease (True) or is stopped.

        ``on_standby`` is called once the lease was not had within ``joining_s`` (a group
        join takes a few seconds even when no other member exists)."""
        deadline = time.monotonic() + joining_s
        while not self._stop.is_set():
            beat()  # standing by is healthy: /healthz must not restart a standby
            if lease.poll(poll_s):
                return True
            if on_standby is not None and time.monotonic() > deadline:
                on_standby()
                on_standby = None
        return False
