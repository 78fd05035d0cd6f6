"""Kafka-side faults: a retention gap, members joining and leaving, a broker restart."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient

from stream_trainer.embedded import free_port
from tests.conftest import BrokerHandle
from tests.faults.support import (
    LEARNT,
    Service,
    committed_offsets,
    end_offsets,
    fault_config,
    judge,
    load_final,
    manifest_offsets,
    produce_records,
    topic_of,
    wait_checkpointed,
    wait_exit,
)
from tests.harness import deep_merge, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.integration]

BASE: dict[str, Any] = {"checkpoint": {"every_seconds": 0.5, "keep_last": 20}}


def _config(
    tmp_path: Path, broker: BrokerHandle, partitions: int, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    return fault_config(tmp_path, broker, partitions, BASE, extra)


def test_retention_gap_refuses_to_start(kafka_broker: BrokerHandle, tmp_path: Path) -> None:
    bootstrap = kafka_broker.bootstrap_servers
    config = _config(tmp_path, kafka_broker, 3)
    topic = topic_of(config)
    produce_records(config, 3000, 3)
    first = Service(config, tmp_path, name="first").start()
    try:
        wait_checkpointed(config, end_offsets(bootstrap, topic), first)
        assert first.stop() == 0
    finally:
        first.__exit__()
    saved = manifest_offsets(config)
    produce_records(config, 3000, 3, seed=11)
    ends = end_offsets(bootstrap, topic)
    # Retention removes records the checkpoint still needs on partitions 0 and 2.
    cut = {(topic, 0): saved[(topic, 0)] + 500, (topic, 2): saved[(topic, 2)] + 500}
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.delete_records([TopicPartition(t, p, o) for (t, p), o in cut.items()])
    for future in futures.values():
        future.result(timeout=30)

    refused = Service(config, tmp_path, name="refused").start()
    started = time.monotonic()
    code = wait_exit(refused, 60, "start with a retention gap")
    took = time.monotonic() - started
    log = refused.log_path.read_text()
    assert code == 1, refused.tail()
    assert f"{topic}[0]" in log and f"{topic}[2]" in log
    assert f"{topic}[1]" not in log
    assert manifest_offsets(config) == saved, "the refused start must not checkpoint"

    accepting_config = deep_merge(config, {"checkpoint": {"accept_retention_gap": True}})
    accepting = Service(accepting_config, tmp_path, name="accepting").start()
    try:
        accepted = accepting.wait_metric("stream_trainer_retention_gap_accepted_total", 1, 60)
        wait_checkpointed(config, ends, accepting)
        assert accepting.stop() == 0
    finally:
        accepting.__exit__()
    state = load_final(config).state
    verdict = judge([state], ends)
    print(
        f"\n[retention gap] refused with exit {code} after {took:.1f} s naming "
        f"{sorted(k[1] for k in cut)}; accepted {accepted:.0f}x; ledger {state.ledger.as_json()}"
        f"; {verdict.line()} (the 1000 deleted records are the expected loss)"
    )
    # The deleted records are honestly missing from the ledger: exactly the cut ranges.
    assert verdict.holes == {f"{t}:{p}": [[saved[(t, p)], o]] for (t, p), o in cut.items()}
    assert verdict.twice == 0
    assert state.records_learnt == sum(ends.values()) - 1000


def test_member_joins_and_leaves_repeatedly(kafka_broker: BrokerHandle, tmp_path: Path) -> None:
    bootstrap = kafka_broker.bootstrap_servers
    config = _config(tmp_path / "a", kafka_broker, 3)
    group = config["kafka"]["group_id"]
    other = {
        **config,
        "checkpoint": {**config["checkpoint"], "dir": str(tmp_path / "b" / "checkpoints")},
        "http": {**config["http"], "port": free_port()},
    }
    produce_records(config, 6000, 3)
    stop_producing = threading.Event()
    produced = [6000]

    def keep_producing() -> None:
        batch = 0
        while not stop_producing.wait(0.3):  # a steady trickle of new records
            batch += 1
            produce_records(config, 600, 3, seed=100 + batch)
            produced[0] += 600

    violations: list[str] = []

    def check_commits() -> None:
        # Read commits first: a commit never precedes its checkpoint, so this order
        # can only see committed <= checkpoint when the guarantee holds.
        keys = list(end_offsets(bootstrap, topic_of(config)))
        committed = committed_offsets(bootstrap, group, keys)
        a, b = manifest_offsets(config), manifest_offsets(other)
        for key in keys:
            if committed[key] > max(a.get(key, -1), b.get(key, -1)):
                violations.append(
                    f"{key}: committed {committed[key]} a={a.get(key)} b={b.get(key)}"
                )

    producer = threading.Thread(target=keep_producing, name="producer")
    first = Service(config, tmp_path, name="a").start()
    producer.start()
    cycles = 3
    try:
        first.wait_metric(LEARNT, 1000, 60)
        for cycle in range(cycles):
            joiner = Service(other, tmp_path, name="b").start()
            try:
                joiner.wait_metric(LEARNT, 1, 60)
                check_commits()
                assert joiner.stop() == 0, joiner.tail()
            finally:
                joiner.__exit__()
            check_commits()
            learnt = first.metric(LEARNT)
            first.wait_metric("stream_trainer_assigned_partitions", 3, 60)
            first.wait_metric(LEARNT, learnt + 1, 60)
            print(f"cycle {cycle + 1}: joined, learnt, left")
        stop_producing.set()
        producer.join(60)
        ends = end_offsets(bootstrap, topic_of(config))
        wait_checkpointed(config, ends, first)
        assert first.stop() == 0
    finally:
        stop_producing.set()
        first.__exit__()
    states = [load_final(config).state, load_final(other).state]
    verdict = judge(states, ends)
    committed = committed_offsets(bootstrap, group, list(ends))
    print(
        f"\n[join/leave x{cycles}] records {produced[0]}; a learnt {states[0].records_learnt}, "
        f"b learnt {states[1].records_learnt}; {verdict.line()}; holes {verdict.holes}; "
        f"commit violations {violations}"
    )
    assert verdict.lost == 0, verdict.holes
    assert verdict.twice == 0
    assert verdict.records_learnt == produced[0]
    assert violations == []
    assert committed == ends


def test_broker_restart_is_ridden_out(kafka_broker: BrokerHandle, tmp_path: Path) -> None:
    bootstrap = kafka_broker.bootstrap_servers
    max_age = 3.0
    config = _config(tmp_path, kafka_broker, 3, {"http": {"healthz_max_age_s": max_age}})
    produce_records(config, 40_000, 3)
    service = Service(config, tmp_path, name="service").start()
    try:
        service.wait_metric(LEARNT, 2000, 60)
        pid = service.pid
        down = time.monotonic()
        kafka_broker.stop()
        try:
            statuses: list[int] = []

            def broker_noticed() -> bool:
                statuses.append(service.http("/healthz")[0])
                errors = sum(
                    v
                    for k, v in service.metrics().items()
                    if k.startswith("stream_trainer_kafka_errors_total")
                )
                return errors > 0

            wait_for(broker_noticed, 60, "the service to see the broker gone")
            # Observe /healthz for twice its staleness bound while the broker stays down.
            cadence = threading.Event()  # never set: its wait() is the sampling interval
            until = time.monotonic() + 2 * max_age
            while time.monotonic() < until:
                statuses.append(service.http("/healthz")[0])
                cadence.wait(0.2)
        finally:
            kafka_broker.start()
        downtime = time.monotonic() - down
        produce_records(config, 3000, 3, seed=21)
        ends = end_offsets(bootstrap, topic_of(config))
        wait_checkpointed(config, ends, service, timeout=180)
        assert service.pid == pid and service.alive()
        assert service.stop() == 0, service.tail()
    finally:
        service.__exit__()
    verdict = judge([load_final(config).state], ends)
    print(
        f"\n[broker restart] down {downtime:.1f} s; /healthz samples {len(statuses)}, "
        f"non-200 {[s for s in statuses if s != 200]}; same pid; {verdict.line()}"
    )
    assert set(statuses) == {200}
    assert verdict.lost == 0 and verdict.twice == 0
    assert verdict.records_learnt == 43_000
