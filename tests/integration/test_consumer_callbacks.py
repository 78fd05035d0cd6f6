"""Rebalance callbacks never abort the process (confluent_kafka's per-thread call state).

A call on the polled consumer from inside one of its callbacks that sets up its own call
state (``list_topics``, ``poll``, ``consume``, ``close``) clears the state of the poll that
runs the callback; the next callback that poll serves (every librdkafka log line when
``logger`` is configured) then hits ``CallState_get: Assertion `cs != NULL'`` and the
process aborts. The sole-member consumer once read metadata in ``on_assign`` and so died
whenever librdkafka debug logging was on. The consumer runs in a child process: an abort
would take pytest down with it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable

import pytest
from confluent_kafka import Producer

from tests.conftest import BrokerHandle

pytestmark = pytest.mark.integration

CHILD = textwrap.dedent(
    """
    import logging, sys
    from stream_trainer.ingest.kafka_source import KafkaSource
    from stream_trainer.operations.logs import librdkafka_logger

    logging.basicConfig(level=logging.DEBUG, handlers=[logging.NullHandler()])
    bootstrap, topic, group = sys.argv[1:4]

    class Listener:
        def start_offsets(self, keys):
            return {}

        def on_assigned(self, keys):
            print("assigned", len(keys), flush=True)

        def on_revoked(self, keys):
            pass

        def on_lost(self, keys):
            pass

    conf = {
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "session.timeout.ms": 6000,
        "logger": librdkafka_logger(),
        "debug": "conf,cgrp,protocol",
    }
    source = KafkaSource(conf, [topic], Listener(), sole_member=True)
    got = 0
    for _ in range(120):
        got += len(source.consume(100, 0.5))
        if got >= 20:
            break
    print("consumed", got, flush=True)
    source.close(10.0)
    """
)


def test_sole_member_assignment_with_librdkafka_debug_logging(
    broker: BrokerHandle, make_topic: Callable[..., str]
) -> None:
    topic = make_topic(4)
    producer = Producer({"bootstrap.servers": broker.bootstrap_servers})
    for i in range(20):
        producer.produce(topic, value=b"{}", partition=i % 4)
    assert producer.flush(30.0) == 0
    child = subprocess.run(
        [sys.executable, "-c", CHILD, broker.bootstrap_servers, topic, f"g-{topic}"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    print(f"{broker.name}: exit {child.returncode}; {child.stdout.strip()!r}")
    assert child.returncode == 0, child.stderr[-2000:]
    assert "assigned 4" in child.stdout
    assert "consumed 20" in child.stdout
