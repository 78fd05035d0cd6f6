"""Manual requests (retrain, publish, pause, resume) through a control topic.

Wire format: JSON values keyed by the model name.

- command: ``{"type": "command", "id", "model", "command", "sent_at"}`` (``sent_at``: Unix
  seconds on the sender's clock). Commands of the old format ``{"model", "command"}`` are
  still read: their age is the Kafka record's timestamp, and their ack's id is null.
- ack: ``{"type": "ack", "id", "model", "command", "outcome", "reason", "acked_at",
  "partition", "offset"}``; ``outcome`` is ``done`` or ``refused``.

Acks go to the control topic itself, with the command's key: they land in the command's
partition, after it, so a sender that reads that partition from its command's offset cannot
miss its ack (whenever it starts reading), and no second topic has to be created, secured
and probed. The service skips acks, and commands addressed to other models.

The service reads without a consumer group, from the control offsets its checkpoint holds
(see :class:`ControlChannel`), so a command sent while it is down is acted on when it starts,
once; a command older than ``control.max_age_s`` when read is refused, never acted on.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaException,
    Producer,
    TopicPartition,
)

from stream_trainer.errors import StreamTrainerError
from stream_trainer.operations.delivery import NotDelivered, deliver_one

log = logging.getLogger(__name__)

COMMANDS = ("retrain", "publish", "pause", "resume")
Outcome = Literal["done", "refused"]
ACK_FLUSH_TIMEOUT_S = 5.0


class ControlError(StreamTrainerError):
    """A command could not be delivered, or its ack could not be read."""


@dataclass(frozen=True)
class Command:
    """One request. ``partition``/``offset`` are where it was read (-1 before it is sent)."""

    model: str
    command: str
    id: str | None
    sent_at: float | None
    partition: int = -1
    offset: int = -1


@dataclass(frozen=True)
class Ack:
    """The service's answer to a command (``id`` None for an old-format command)."""

    id: str | None
    model: str
    command: str
    outcome: Outcome
    reason: str
    acked_at: float
    partition: int
    offset: int


@dataclass(frozen=True)
class SentCommand:
    """A delivered command and where it landed (where its ack will follow it)."""

    id: str
    partition: int
    offset: int


def new_command(model: str, command: str, clock: Callable[[], float] = time.time) -> Command:
    """A command with a fresh unique id, stamped now; ControlError if unknown."""
    if command not in COMMANDS:
        raise ControlError(f"unknown command {command!r}; expected one of {', '.join(COMMANDS)}")
    return Command(model, command, uuid.uuid4().hex, clock())


def encode_command(command: Command) -> bytes:
    """The wire form of a command (where it was read from is not part of it)."""
    body = {"type": "command", **asdict(command)}
    del body["partition"], body["offset"]
    return json.dumps(body, sort_keys=True).encode()


def encode_ack(ack: Ack) -> bytes:
    """The wire form of an ack."""
    return json.dumps({"type": "ack", **asdict(ack)}, sort_keys=True).encode()


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _integer(value: Any) -> int:
    number = _number(value)
    return -1 if number is None else int(number)


def decode(
    value: bytes | None, partition: int = -1, offset: int = -1, timestamp_s: float | None = None
) -> Command | Ack | None:
    """A control record, or None when it is neither a valid command nor a valid ack.

    ``timestamp_s`` (the Kafka record's) stands in for a command's missing ``sent_at``.
    """
    try:
        body = json.loads(value or b"")
    except ValueError:
        return None
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return None
    kind = body.get("type", "command")  # the old format has no type
    command = body.get("command")
    if command not in COMMANDS:
        return None
    raw_id = body.get("id")
    command_id = raw_id if isinstance(raw_id, str) else None
    if kind == "ack":
        outcome = body.get("outcome")
        if outcome not in ("done", "refused"):
            return None
        return Ack(
            command_id,
            body["model"],
            str(command),
            outcome,
            str(body.get("reason", "")),
            _number(body.get("acked_at")) or 0.0,
            _integer(body.get("partition")),
            _integer(body.get("offset")),
        )
    if kind != "command":
        return None
    sent_at = _number(body.get("sent_at"))
    return Command(
        body["model"],
        str(command),
        command_id,
        sent_at if sent_at is not None else timestamp_s,
        partition,
        offset,
    )


def _client_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` without callbacks and statistics (a side client reports nothing)."""
    conf = {k: v for k, v in config.items() if not k.endswith("_cb")}
    conf.pop("statistics.interval.ms", None)
    return conf


def send_command(
    producer_config: dict[str, Any],
    topic: str,
    model: str,
    command: str,
    timeout_s: float = 10.0,
    clock: Callable[[], float] = time.time,
) -> SentCommand:
    """Produce one new command and wait for its delivery; raises ControlError on failure.

    Delivery means queued on the topic, not acted on: see :func:`wait_for_ack`.
    """
    sent = new_command(model, command, clock)
    assert sent.id is not None
    try:
        partition, offset = deliver_one(
            producer_config, topic, encode_command(sent), key=model.encode(), timeout_s=timeout_s
        )
    except NotDelivered as error:
        raise ControlError(f"command {error}") from error
    return SentCommand(sent.id, partition, offset)


def wait_for_ack(
    consumer_config: Mapping[str, Any],
    topic: str,
    sent: SentCommand,
    timeout_s: float,
    clock: Callable[[], float] = time.monotonic,
) -> Ack | None:
    """The ack of ``sent``, read from its partition after it; None if none came in time."""
    conf = _client_config(consumer_config)
    conf.update(
        {
            "group.id": f"stream-trainer.control-wait.{sent.id}",  # never joined nor committed
            "enable.auto.commit": False,
            "enable.partition.eof": False,
        }
    )
    consumer = Consumer(conf)
    try:
        consumer.assign([TopicPartition(topic, sent.partition, sent.offset + 1)])
        deadline = clock() + timeout_s
        while (left := deadline - clock()) > 0:
            for message in consumer.consume(num_messages=100, timeout=min(left, 0.5)):
                if message.error() is not None:
                    continue
                record = decode(message.value())
                if isinstance(record, Ack) and record.id == sent.id:
                    return record
        return None
    except KafkaException as error:
        raise ControlError(f"cannot read acks from {topic}: {error}") from None
    finally:
        consumer.close()


def _record_time(message: Any) -> float | None:
    kind, millis = message.timestamp()
    return None if kind == TIMESTAMP_NOT_AVAILABLE else millis / 1000.0


@dataclass(frozen=True)
class Incoming:
    """A command for this model; ``stale`` says why it must be refused (too old), or None."""

    command: Command
    stale: str | None


class ControlChannel:
    """Reads commands addressed to ``model`` from every partition of ``topic``; sends acks.

    Where reading starts, per partition (fixed at the first successful :meth:`connect`):
    ``resume_from``'s offset (the checkpoint's control offsets) when it has the partition;
    else the partition's end when ``from_end`` (a checkpoint written before control offsets
    existed: its service had read everything before it started); else the partition's start
    (a new model: commands queued before its first start count, subject to the age rule).
    An offset below the log start (retention) starts at the log start; one beyond the end (the
    topic was recreated) at the start. Every command older than ``max_age_s`` when read is
    returned as stale. :attr:`positions` are the next offsets to read: the service persists
    them in its checkpoint. Construction does no I/O.
    """

    def __init__(
        self,
        consumer_config: dict[str, Any],
        topic: str,
        model: str,
        producer: Producer | None = None,
        *,
        max_age_s: float = 3600.0,
        resume_from: Mapping[int, int] | None = None,
        from_end: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        conf = _client_config(consumer_config)
        conf["group.id"] = f"{consumer_config.get('group.id', 'stream-trainer')}.control"
        conf["enable.auto.commit"] = False
        conf["auto.offset.reset"] = "earliest"  # see _start
        self._model = model
        self._topic = topic
        self._consumer = Consumer(conf)
        self._producer = producer
        self._max_age_s = max_age_s
        self._resume_from = dict(resume_from or {})
        self._from_end = from_end
        self._clock = clock
        self.positions: dict[int, int] = {}
        self.started_at: dict[int, int] = {}
        self._ends: dict[int, int] = {}  # the partitions' ends when connected
        self.connected = False

    def connect(self, timeout_s: float) -> str | None:
        """Find the topic's partitions and assign them where reading starts: None once done,
        else why not (the cluster did not answer, or the topic does not exist)."""
        if self.connected:
            return None
        try:
            metadata = self._consumer.list_topics(self._topic, timeout=timeout_s)
            found = metadata.topics.get(self._topic)
            if found is None or not found.partitions:
                return (
                    f"control topic {self._topic} does not exist (create it, or unset "
                    "topics.control)"
                )
            marks = {
                p: self._consumer.get_watermark_offsets(
                    TopicPartition(self._topic, p), timeout=timeout_s
                )
                for p in sorted(found.partitions)
            }
        except KafkaException as error:
            return f"the cluster did not answer: {error.args[0].str() if error.args else error}"
        if any(mark is None for mark in marks.values()):  # the client's timeout
            return f"the cluster did not give the offsets of {self._topic} in time"
        starts = {p: self._start(p, low, high) for p, (low, high) in marks.items()}
        self._ends = {p: high for p, (_low, high) in marks.items()}
        self._consumer.assign([TopicPartition(self._topic, p, o) for p, o in starts.items()])
        self.positions = dict(starts)
        self.started_at = dict(starts)
        self.connected = True
        return None

    def _start(self, partition: int, low: int, high: int) -> int:
        stored = self._resume_from.get(partition)
        if stored is None:
            return high if self._from_end else low
        if stored < low:
            log.warning(
                "control commands deleted by retention before they were read",
                extra={"partition": partition, "unread_from": stored, "log_start": low},
            )
            return low
        # Not compared with ``high``: some brokers under-report it. An offset beyond the end
        # (the topic was recreated) is out of range: auto.offset.reset=earliest reads the
        # partition from its start, under the age rule.
        return stored

    def seek(self, positions: Mapping[int, int]) -> None:
        """Read again from ``positions`` (a reloaded checkpoint's); other partitions stay."""
        if not self.connected:
            return
        for partition, offset in positions.items():
            if partition in self.positions:
                self._consumer.seek(TopicPartition(self._topic, partition, offset))
                self.positions[partition] = offset

    def catch_up(self, timeout_s: float) -> list[Incoming]:
        """Commands for this model up to the partitions' ends as they were at connect
        (queued while no service ran), waiting at most ``timeout_s`` for them: the service
        acts on them before it trains on anything."""
        commands: list[Incoming] = []
        if not self.connected:
            return commands
        deadline = time.monotonic() + timeout_s
        while any(self.positions.get(p, 0) < end for p, end in self._ends.items()):
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning(
                    "control topic not read to its end at start; later commands act later",
                    extra={"positions": self.positions, "ends": self._ends},
                )
                break
            commands.extend(self._read(min(left, 0.5)))
        return commands

    def poll(self) -> list[Incoming]:
        """Commands for this model received since the last call (non-blocking); every record
        read, skipped or not, moves :attr:`positions` past it."""
        return self._read(0.0) if self.connected else []

    def _read(self, timeout_s: float) -> list[Incoming]:
        commands: list[Incoming] = []
        for message in self._consumer.consume(num_messages=100, timeout=timeout_s):
            if message.error() is not None:
                continue
            partition, offset = message.partition(), message.offset()
            if partition is None or offset is None:
                continue
            self.positions[partition] = offset + 1
            record = decode(message.value(), partition, offset, _record_time(message))
            if record is None:
                log.warning("ignoring malformed control message", extra={"offset": offset})
            elif isinstance(record, Command) and record.model == self._model:
                commands.append(Incoming(record, self._stale(record)))
        return commands

    def _stale(self, command: Command) -> str | None:
        if command.sent_at is None:
            return None  # no time at all: only an old-format record on a broker without one
        age = self._clock() - command.sent_at
        if age <= self._max_age_s:
            return None
        return (
            f"expired: sent {age:.0f} s ago, more than control.max_age_s "
            f"({self._max_age_s:g} s) before a service read it"
        )

    def acknowledge(self, acks: list[Ack]) -> bool:
        """Produce ``acks`` with their commands' keys and wait (bounded) for delivery; True
        once delivered. A failure is logged, never raised (the effect stands either way)."""
        if self._producer is None or not acks:
            return True
        for ack in acks:
            # The command's partition (-1: the key's), after the command: where its sender
            # reads.
            self._producer.produce(
                self._topic, key=ack.model.encode(), value=encode_ack(ack), partition=ack.partition
            )
        left = self._producer.flush(ACK_FLUSH_TIMEOUT_S)
        if left:
            log.warning(
                "control acks not delivered in time; sent again with the next command or start",
                extra={"undelivered": left, "acks": len(acks)},
            )
        return left == 0

    def close(self) -> None:
        """Close the consumer."""
        self._consumer.close()
