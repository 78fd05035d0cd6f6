"""Manual requests (retrain, publish, pause, resume) through a control topic.

The CLI produces a small JSON command keyed by model name; the service reads the topic
without a consumer group (assigned at its end when the service starts), so a command is
acted on by the running service only, once.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from confluent_kafka import OFFSET_END, Consumer, KafkaException, Producer, TopicPartition

from stream_trainer.errors import StreamTrainerError

log = logging.getLogger(__name__)

COMMANDS = ("retrain", "publish", "pause", "resume")


class ControlError(StreamTrainerError):
    """A command could not be delivered."""


def encode_command(model: str, command: str) -> bytes:
    """The wire form of a command."""
    if command not in COMMANDS:
        raise ControlError(f"unknown command {command!r}; expected one of {', '.join(COMMANDS)}")
    return json.dumps({"model": model, "command": command}, sort_keys=True).encode()


def send_command(
    producer_config: dict[str, Any], topic: str, model: str, command: str, timeout_s: float = 10.0
) -> None:
    """Produce one command and wait for its delivery; raises ControlError on failure."""
    errors: list[str] = []

    def _delivered(error: Any, _message: Any) -> None:
        if error is not None:
            errors.append(str(error))

    producer = Producer(producer_config)
    producer.produce(
        topic, key=model.encode(), value=encode_command(model, command), on_delivery=_delivered
    )
    if producer.flush(timeout_s) > 0:
        raise ControlError(f"command not delivered to {topic} within {timeout_s} s")
    if errors:
        raise ControlError(f"command not delivered to {topic}: {errors[0]}")


class ControlChannel:
    """Reads commands addressed to ``model`` from every partition of ``topic``.

    Construction does no I/O; :meth:`connect` finds the topic's partitions and assigns them.
    """

    def __init__(self, consumer_config: dict[str, Any], topic: str, model: str) -> None:
        conf = {k: v for k, v in consumer_config.items() if not k.endswith("_cb")}
        conf["group.id"] = f"{consumer_config.get('group.id', 'stream-trainer')}.control"
        conf["enable.auto.commit"] = False
        conf.pop("statistics.interval.ms", None)
        self._model = model
        self._topic = topic
        self._consumer = Consumer(conf)
        self.connected = False

    def connect(self, timeout_s: float) -> str | None:
        """One metadata request for the topic: None once its partitions are assigned (at
        their end), else why not (the cluster did not answer, or the topic does not exist).
        """
        if self.connected:
            return None
        try:
            metadata = self._consumer.list_topics(self._topic, timeout=timeout_s)
        except KafkaException as error:
            return f"the cluster did not answer: {error.args[0].str() if error.args else error}"
        found = metadata.topics.get(self._topic)
        if found is None or not found.partitions:
            return (
                f"control topic {self._topic} does not exist (create it, or unset topics.control)"
            )
        self._consumer.assign(
            [TopicPartition(self._topic, p, OFFSET_END) for p in found.partitions]
        )
        self.connected = True
        return None

    def poll(self) -> list[str]:
        """Commands received since the last call (non-blocking)."""
        commands: list[str] = []
        if not self.connected:
            return commands
        for message in self._consumer.consume(num_messages=100, timeout=0):
            if message.error() is not None:
                continue
            try:
                body = json.loads(message.value() or b"")
            except ValueError:
                log.warning(
                    "ignoring malformed control message", extra={"offset": message.offset()}
                )
                continue
            if isinstance(body, dict) and body.get("model") == self._model:
                command = body.get("command")
                if command in COMMANDS:
                    commands.append(str(command))
        return commands

    def close(self) -> None:
        """Close the consumer."""
        self._consumer.close()
