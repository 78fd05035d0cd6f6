"""Smoke tests of the real brokers the suite runs on (Apache Kafka and Tansu).

Produce -> consume with a group and manual commit -> a new member of the group resumes
exactly at the committed offsets. Plus process hygiene of the embedded broker.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from stream_trainer.laptop.embedded import BrokerStartError, EmbeddedBroker

pytestmark = pytest.mark.integration

PARTITIONS = 3


def consumer_conf(bootstrap: str, group: str) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        # Tansu makes a join wait ~half the session timeout: keep it short in tests.
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 1000,
        "topic.metadata.refresh.interval.ms": 5000,
    }


@contextmanager
def consumer(bootstrap: str, group: str, topic: str) -> Iterator[Consumer]:
    c = Consumer(consumer_conf(bootstrap, group))
    c.subscribe([topic])
    try:
        yield c
    finally:
        c.close()


def produce(bootstrap: str, topic: str, values: list[str]) -> None:
    """Produce ``values`` round-robin over the partitions; all acknowledged or fail."""
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            errors.append(err)

    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5})
    for i, value in enumerate(values):
        producer.produce(
            topic,
            key=value.encode(),
            value=value.encode(),
            partition=i % PARTITIONS,
            on_delivery=on_delivery,
        )
    assert producer.flush(30.0) == 0, "records still in flight after 30 s"
    assert errors == []


def text(m: Message) -> str:
    value = m.value()
    assert isinstance(value, bytes)
    return value.decode()


def consume_n(c: Consumer, n: int, timeout: float) -> list[Message]:
    """Poll until ``n`` records arrived or ``timeout`` s passed (bounded)."""
    got: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        for msg in c.consume(num_messages=n - len(got), timeout=0.5):
            err = msg.error()
            if err is not None:
                assert err.code() == KafkaError._PARTITION_EOF, err
                continue
            got.append(msg)
    return got


def drain(c: Consumer, window: float) -> list[Message]:
    """Whatever arrives within ``window`` s (to show that nothing more comes)."""
    got: list[Message] = []
    deadline = time.monotonic() + window
    while time.monotonic() < deadline:
        got.extend(m for m in c.consume(num_messages=100, timeout=0.2) if m.error() is None)
    return got


def wait_assigned(c: Consumer, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(c.assignment()) < n:
        assert time.monotonic() < deadline, f"no assignment of {n} partitions in {timeout} s"
        c.poll(0.2)  # serves the rebalance callback; no records expected yet


def test_produce_consume_commit_resume(broker: Any, make_topic: Callable[..., str]) -> None:
    bootstrap = broker.bootstrap_servers
    topic = make_topic(PARTITIONS, prefix="smoke")
    group = f"g-{uuid.uuid4().hex[:8]}"
    first = [f"r{i:03d}" for i in range(100)]
    produce(bootstrap, topic, first)

    began = time.monotonic()
    with consumer(bootstrap, group, topic) as c:
        got = consume_n(c, len(first), timeout=60.0)
        assert sorted(text(m) for m in got) == first
        per_partition: dict[int, list[int]] = {}
        for m in got:
            partition, offset = m.partition(), m.offset()
            assert partition is not None and offset is not None
            per_partition.setdefault(partition, []).append(offset)
        assert sorted(per_partition) == list(range(PARTITIONS))
        for offsets in per_partition.values():
            assert offsets == list(range(len(offsets))), "gap or reorder within a partition"
        c.commit(asynchronous=False)
        committed = c.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], 10.0)
        assert {tp.partition: tp.offset for tp in committed} == {
            p: len(per_partition[p]) for p in range(PARTITIONS)
        }
    print(f"[{broker.name}] first member consumed 100 in {time.monotonic() - began:.1f} s")

    began = time.monotonic()
    with consumer(bootstrap, group, topic) as c:
        wait_assigned(c, PARTITIONS, timeout=60.0)
        print(f"[{broker.name}] second member assigned in {time.monotonic() - began:.1f} s")
        second = [f"s{i:03d}" for i in range(10)]
        produce(bootstrap, topic, second)
        got = consume_n(c, len(second), timeout=30.0)
        got += drain(c, window=1.0)
        assert sorted(text(m) for m in got) == second, "did not resume at commit"


def test_kafka_restart_keeps_data(kafka_broker: Any) -> None:
    from stream_trainer.laptop.embedded import create_topics

    topic = f"restart-{uuid.uuid4().hex[:8]}"
    create_topics(kafka_broker.bootstrap_servers, {topic: PARTITIONS})
    values = [f"v{i}" for i in range(9)]
    produce(kafka_broker.bootstrap_servers, topic, values)
    address = kafka_broker.bootstrap_servers
    began = time.monotonic()
    kafka_broker.restart()
    print(f"[kafka] restart took {time.monotonic() - began:.1f} s")
    assert kafka_broker.bootstrap_servers == address
    with consumer(address, f"g-{uuid.uuid4().hex[:8]}", topic) as c:
        got = consume_n(c, len(values), timeout=60.0)
    assert sorted(text(m) for m in got) == values


def _process_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A zombie (killed but not yet reaped by its parent) counts as gone.
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def test_embedded_broker_starts_and_stops_without_leftovers() -> None:
    broker = EmbeddedBroker()
    try:
        broker.start()
    except BrokerStartError as exc:
        _unavailable(f"tansu unavailable: {exc}")
    pid = broker.pid
    assert pid is not None
    assert broker.is_running()
    produce(broker.bootstrap_servers, "auto-created", ["a", "b", "c"])
    broker.stop()
    assert _process_gone(pid, timeout=5.0)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # nothing left in its process group either
    broker.stop()  # idempotent
    with pytest.raises(RuntimeError):
        _ = broker.bootstrap_servers
    with EmbeddedBroker() as again:  # the context manager form
        pid = again.pid
        assert pid is not None and again.is_running()
    assert _process_gone(pid, timeout=5.0)


def _set_child_subreaper(on: bool) -> bool:
    """Become (or stop being) the reaper of orphaned descendants (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0)


def _reap(pid: int, timeout: float) -> bool:
    """Wait (bounded) for an orphan reparented to us to exit, and reap it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not our child: fall back to observing it
            return _process_gone(pid, max(deadline - time.monotonic(), 0.1))
        if done == pid:
            return True
        time.sleep(0.05)
    return False


_PR_SET_CHILD_SUBREAPER = 36


def test_embedded_broker_dies_with_its_parent() -> None:
    """PDEATHSIG backstop: SIGKILL the Python parent, the broker goes too."""
    script = textwrap.dedent(
        """
        import os, signal, sys
        from stream_trainer.laptop.embedded import EmbeddedBroker
        b = EmbeddedBroker().start()
        print(b.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    # The orphaned broker is reparented to this process, so it can be reaped, not left
    # as a zombie of whatever PID 1 is.
    subreaper = _set_child_subreaper(True)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=root,
            env=env,
        )
        if proc.returncode != -signal.SIGKILL:
            _unavailable(f"tansu unavailable: {proc.stderr[-2000:]}")
        pid = int(proc.stdout.split()[0])
        assert _reap(pid, timeout=5.0), f"tansu pid {pid} survived its parent"
    finally:
        if subreaper:
            _set_child_subreaper(False)
