"""kill -9 at the named crash points with the counting learner as the oracle (design 13.1).

The other fault tests judge by the offset ledger inside the checkpoint: the service's own
bookkeeping. Here the model is the judge: the counting learner's state is the multiset of
(partition, offset, key) it learnt, read from the newest checkpoint through the store's
verified read path, and the produced tuples are read back from the topic with the broker's
offsets. lost = produced - learnt, twice = tuples learnt more than once; both must be 0.
The ledger's verdict is printed beside it: the two oracles must agree.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from stream_trainer.config import ObjectStoreSettings
from stream_trainer.laptop.embedded import free_port
from stream_trainer.operations.faults import CRASH_ENV, POINTS
from stream_trainer.testing.counting import (
    FEATURES,
    RIVER_PATH,
    SKLEARN_PATH,
    CountingProducer,
    CountVerdict,
    judge_counts,
    learnt_counts,
    produced_samples,
)
from stream_trainer.testing.seaweedfs import SeaweedFS
from stream_trainer.training.learners import TESTING_ENV
from tests.conftest import BrokerHandle
from tests.faults.support import (
    ASSIGNED,
    LEARNT,
    end_offsets,
    fault_config,
    judge,
    load_final,
    manifest_offsets,
    topic_of,
    trickle,
    wait_checkpointed,
    wait_exit,
)
from tests.harness import HMAC_KEY, ServiceProcess, deep_merge, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.integration]

ENV = {TESTING_ENV: "1"}
PARTITIONS = 3
STANDBY = 'stream_trainer_state{stream_trainer_state="standby"}'

# Checkpoints every 1000 records or 0.5 s and a version every 2000 records, so every
# point below is reached within a few seconds of each restart.
BASE: dict[str, Any] = {
    "checkpoint": {"every_seconds": 0.5, "every_records": 1000, "keep_last": 50},
    "registry": {"publish_every_records": 2000},
    "training": {"mini_batch": {"size": 200, "max_wait_s": 0.5}},
}

# Kills in order, each followed by a restart that learns on from the last checkpoint. Not
# here: mid_retrain (full_batch replaces the model by a fit on a window, so the multiset
# is the window's by design) and the control points (need commands, see
# tests/faults/test_control_crash.py). in_revoke is reached by a SIGTERM: the member's
# revoke runs as it leaves the group.
KILLS = (
    "after_learn:5",
    "mid_checkpoint_write:2",
    "after_rename:2",
    "after_checkpoint:2",
    "before_version_visible:1",
    "after_version_files:1",
    "in_revoke:1",
)
# Tansu, short form: the checkpoint points only (the broker's part is the same).
TANSU_KILLS = ("after_learn:3", "after_checkpoint:2")


def counting_config(
    tmp_path: Path,
    broker: BrokerHandle,
    learner: str,
    mode: str,
    *overrides: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The fault suite's service training the counting learner on a fresh topic."""
    counting = {
        "record": {"features": list(FEATURES), "labels": None},
        "model": {"task": "regression", "preprocessing": [], "learner": {"path": learner}},
        "training": {"mode": mode},
    }
    return fault_config(tmp_path, broker, PARTITIONS, BASE, counting, *overrides)


def oracle(config: Mapping[str, Any], *more: Mapping[str, Any]) -> CountVerdict:
    """The counting verdict over the newest checkpoints of ``config`` and ``more`` (other
    members' stores), against every record of the topic."""
    bootstrap = config["kafka"]["bootstrap_servers"]
    learnt: Counter[tuple[int, int, int]] = Counter()
    for member in (config, *more):
        learnt += learnt_counts(
            member["checkpoint"]["dir"],
            HMAC_KEY.encode(),
            ObjectStoreSettings(**member.get("object_store", {})),
        )
    return judge_counts(produced_samples(bootstrap, topic_of(config)), learnt)


def finish(config: dict[str, Any], tmp_path: Path, name: str, env: Mapping[str, str]) -> None:
    """Run a service until a checkpoint covers the whole topic, then stop it gracefully."""
    ends = end_offsets(config["kafka"]["bootstrap_servers"], topic_of(config))
    service = ServiceProcess(config, tmp_path, env=dict(env), name=name).start()
    try:
        wait_checkpointed(config, ends, service)
        service.wait_metric(ASSIGNED, len(ends), 60)
        assert service.stop() == 0, service.tail()
    finally:
        service.__exit__()


def kill_at(
    config: dict[str, Any], tmp_path: Path, kills: Sequence[str], env: Mapping[str, str]
) -> list[int]:
    """One run per crash spec, each killed there by the service itself; the records
    checkpointed after each kill."""
    checkpointed: list[int] = []
    for number, spec in enumerate(kills):
        assert spec.partition(":")[0] in POINTS, spec
        service = ServiceProcess(
            config, tmp_path, env={**env, CRASH_ENV: spec}, name=f"kill{number}"
        ).start()
        try:
            if spec.startswith("in_revoke"):
                # The revoke runs when the member leaves the group: ask it to stop.
                service.wait_metric(LEARNT, 500, 60)
                assert service.proc is not None
                service.proc.terminate()
            code = wait_exit(service, 90, f"crash at {spec}")
        finally:
            service.__exit__()
        assert code == -9, f"expected SIGKILL at {spec}, got exit {code}:\n{service.tail()}"
        checkpointed.append(sum(manifest_offsets(config).values()))
    return checkpointed


# case -> (broker, learner, mode, kills, records before the first run, records per 0.3 s)
CASES = {
    "kafka-per_record-river": ("kafka", RIVER_PATH, "per_record", KILLS, 6000, 300),
    "kafka-mini_batch-sklearn": ("kafka", SKLEARN_PATH, "mini_batch", KILLS, 6000, 300),
    "tansu-per_record-river": ("tansu", RIVER_PATH, "per_record", TANSU_KILLS, 3000, 100),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_kills_at_named_points_lose_nothing_and_learn_nothing_twice(
    case: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    name, learner, mode, kills, initial, batch = CASES[case]
    broker: BrokerHandle = request.getfixturevalue(f"{name}_broker")
    config = counting_config(tmp_path, broker, learner, mode)
    producer = CountingProducer(
        broker.bootstrap_servers, topic_of(config), PARTITIONS, seed=len(case)
    )
    producer.produce(initial)
    with trickle(producer, batch):
        checkpointed = kill_at(config, tmp_path, kills, ENV)
    finish(config, tmp_path, "final", ENV)
    verdict = oracle(config)
    ends = end_offsets(broker.bootstrap_servers, topic_of(config))
    ledger = judge([load_final(config).state], ends)
    print(
        f"\n[{case}] {len(kills)} kills at {list(kills)}; records checkpointed after each "
        f"{checkpointed}; {verdict.line()}; ledger: {ledger.line()}"
    )
    assert verdict.produced == producer.produced
    assert (verdict.lost, verdict.twice, verdict.unexpected) == (0, 0, 0), verdict.examples
    assert (ledger.lost, ledger.twice) == (0, 0), ledger.holes


def _member(config: dict[str, Any], name: str, port: int) -> dict[str, Any]:
    return deep_merge(config, {"kafka": {"group_instance_id": name}, "http": {"port": port}})


def test_active_member_killed_the_standby_takes_over_once(
    kafka_broker: BrokerHandle,
    s3_server: SeaweedFS,
    s3_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Global scope: two members of one group on one checkpoint store (SeaweedFS), one
    writer and one standby. kill -9 of the writer while records flow; the standby takes the
    Kafka and store leases, restores the writer's newest checkpoint and learns on. The
    counting learner's checkpointed multiset: lost 0, twice 0; takeover_s is kill -> first
    record learnt by the new writer."""
    s3_env = s3_server.admin.env()
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)  # the oracle reads the bucket from this process
    lease_s = 3.0
    config = counting_config(
        tmp_path,
        kafka_broker,
        RIVER_PATH,
        "per_record",
        {
            "checkpoint": {"dir": f"{s3_url}/checkpoints"},
            "registry": {"root": f"{s3_url}/models"},
            "object_store": {
                "endpoint_url": s3_server.endpoint_url,
                "region": s3_server.region,
                "path_style": True,
                "lease_seconds": lease_s,
            },
        },
    )
    writer_config = _member(config, "node-a", int(config["http"]["port"]))
    standby_config = _member(config, "node-b", free_port())
    env = {**ENV, **s3_env}
    producer = CountingProducer(kafka_broker.bootstrap_servers, topic_of(config), PARTITIONS)
    producer.produce(3000)
    writer = ServiceProcess(writer_config, tmp_path, env=env, name="writer").start()
    standby = ServiceProcess(standby_config, tmp_path, env=env, name="standby")
    try:
        with trickle(producer):
            writer.wait_metric("stream_trainer_checkpoint_duration_seconds_count", 2, 60)
            standby.start()
            standby.wait_metric(STANDBY, 1, 60)
            writer.wait_metric(LEARNT, 4000, 60)
            writer.kill()
            killed = time.monotonic()
            standby.wait_metric(LEARNT, 1, 90)
            takeover = time.monotonic() - killed
            standby.wait_metric(LEARNT, 2000, 60)  # learns on while records still flow
        ends = end_offsets(kafka_broker.bootstrap_servers, topic_of(config))
        wait_checkpointed(standby_config, ends, standby)
        assert standby.stop() == 0, standby.tail()
    finally:
        writer.__exit__()
        standby.__exit__()
    verdict = oracle(config)
    ledger = judge([load_final(config).state], ends)
    session = config["kafka"]["session_timeout_ms"] / 1000
    print(
        f"\n[global scope, writer killed] takeover_s {takeover:.1f} (session {session:.0f} s, "
        f"lease {lease_s:.0f} s); {verdict.line()}; ledger: {ledger.line()}"
    )
    assert verdict.produced == producer.produced
    assert (verdict.lost, verdict.twice, verdict.unexpected) == (0, 0, 0), verdict.examples
    assert (ledger.lost, ledger.twice) == (0, 0), ledger.holes


def test_active_member_killed_before_its_commit_the_other_member_learns_nothing_of_it(
    kafka_broker: BrokerHandle, tmp_path: Path
) -> None:
    """Two members of one group, each with its own checkpoint folder: A is killed right
    after a checkpoint, before that checkpoint's commit. B must not learn A's records from
    the group's older committed offsets (it stands by, then finds the group claimed by A's
    model); A restarts and learns on. The oracle sums both members' checkpointed
    multisets, so a record learnt by both counts twice."""
    config = counting_config(tmp_path / "a", kafka_broker, RIVER_PATH, "per_record")
    other = deep_merge(
        config,
        {"checkpoint": {"dir": str(tmp_path / "b" / "checkpoints")}, "http": {"port": free_port()}},
    )
    producer = CountingProducer(kafka_broker.bootstrap_servers, topic_of(config), PARTITIONS)
    producer.produce(6000)
    checkpointed = kill_at(config, tmp_path, ["after_checkpoint:1"], ENV)
    member_b = ServiceProcess(other, tmp_path, env=ENV, name="b").start()
    try:
        member_b.wait_metric(STANDBY, 1, 60)
        # A's session ends; B gets the group, reads A's claim and gives it back.
        wait_for(
            lambda: "is trained by another model" in member_b.log_path.read_text(),
            60,
            "member b to refuse the group claimed by a's model",
            interval=0.2,
        )
        producer.produce(3000)  # records for A to learn at once when it is back
        finish(config, tmp_path, "a-again", ENV)
        learnt_b = member_b.metric(LEARNT, -1)
        assert member_b.stop() == 0, member_b.tail()
    finally:
        member_b.__exit__()
    verdict = oracle(config, other)
    print(
        f"\n[two members, A killed before its commit] A checkpointed {checkpointed[0]} "
        f"records before the kill; B learnt {learnt_b:.0f}; {verdict.line()}"
    )
    assert learnt_b == 0
    assert verdict.produced == producer.produced
    assert (verdict.lost, verdict.twice, verdict.unexpected) == (0, 0, 0), verdict.examples


def test_the_oracle_sees_records_learnt_by_two_models(
    kafka_broker: BrokerHandle, tmp_path: Path
) -> None:
    """Negative control: two services in different groups each learn the whole topic into
    their own checkpoints; read together, every record is twice and none lost. So a
    duplicate across members' checkpoints cannot hide from the sum."""
    config = counting_config(tmp_path / "a", kafka_broker, RIVER_PATH, "per_record")
    other = deep_merge(
        config,
        {
            "kafka": {"group_id": f"{config['kafka']['group_id']}-b"},
            "checkpoint": {"dir": str(tmp_path / "b" / "checkpoints")},
            "http": {"port": free_port()},
        },
    )
    producer = CountingProducer(kafka_broker.bootstrap_servers, topic_of(config), PARTITIONS)
    producer.produce(3000)
    finish(config, tmp_path, "a", ENV)
    finish(other, tmp_path, "b", ENV)
    alone, both = oracle(config), oracle(config, other)
    print(f"\n[negative control] one model: {alone.line()}; two models: {both.line()}")
    assert (alone.lost, alone.twice) == (0, 0)
    assert (both.lost, both.twice, both.extra) == (0, 3000, 3000)
    assert both.twice_by_partition == dict.fromkeys(range(PARTITIONS), 1000)
