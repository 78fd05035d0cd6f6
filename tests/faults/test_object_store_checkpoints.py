"""Both stores on S3 (SeaweedFS): kill -9 at each named point, a second writer refused by the
checkpoints' lease, a stale writer fenced, a hot standby taking over after kill -9.

The oracle is the offset ledger inside the checkpointed state (tests/faults/support.py),
read from the bucket; the committed offsets are read from the broker.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from stream_trainer.config import ObjectStoreSettings
from stream_trainer.laptop.embedded import free_port
from stream_trainer.operations.faults import CRASH_ENV
from stream_trainer.publishing.registry import open_registry
from stream_trainer.state.objectstore import open_store
from stream_trainer.state.store_checkpoint import POINTER
from stream_trainer.testing.seaweedfs import SeaweedFS
from tests.conftest import BrokerHandle
from tests.faults.support import (
    ASSIGNED,
    LEARNT,
    committed_offsets,
    covers,
    end_offsets,
    fault_config,
    judge,
    load_final,
    manifest_offsets,
    produce_records,
    store_of,
    topic_of,
    wait_checkpointed,
    wait_exit,
)
from tests.harness import HMAC_KEY, ServiceProcess, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.integration]

RECORDS = 6000
LEASE_S = 3.0


def _s3_config(
    tmp_path: Path,
    broker: BrokerHandle,
    server: SeaweedFS,
    url: str,
    *overrides: dict[str, Any] | None,
) -> dict[str, Any]:
    return fault_config(
        tmp_path,
        broker,
        1,
        {
            "checkpoint": {
                "dir": f"{url}/checkpoints",
                "every_seconds": 0.5,
                "every_records": 1000,
                "keep_last": 50,
            },
            "registry": {"root": f"{url}/models"},
            "object_store": {
                "endpoint_url": server.endpoint_url,
                "region": server.region,
                "path_style": True,
                "lease_seconds": LEASE_S,
            },
        },
        *overrides,
    )


@pytest.fixture
def s3_env(s3_server: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The bucket's credentials, in this process (the oracle reads the bucket) and for the
    services it starts."""
    env = s3_server.admin.env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def _finish(config: dict[str, Any], tmp_path: Path, env: dict[str, str], name: str) -> None:
    ends = end_offsets(config["kafka"]["bootstrap_servers"], topic_of(config))
    service = ServiceProcess(config, tmp_path, env=env, name=name).start()
    try:
        wait_checkpointed(config, ends, service)
        service.wait_metric(ASSIGNED, len(ends), 60)
        assert service.stop() == 0, service.tail()
    finally:
        service.__exit__()


NAMED_POINTS: dict[str, tuple[dict[str, Any], str]] = {
    "after_learn": ({}, "after_learn:6"),
    "mid_checkpoint_write": ({}, "mid_checkpoint_write:3"),
    "before_checkpoint_visible": ({}, "before_checkpoint_visible:3"),
    "after_rename": ({}, "after_rename:3"),
    "after_checkpoint": ({}, "after_checkpoint:3"),
    "before_version_visible": (
        {"registry": {"publish_every_records": 2000}},
        "before_version_visible:2",
    ),
    "after_version_files": (
        {"registry": {"publish_every_records": 2000}},
        "after_version_files:2",
    ),
}


@pytest.mark.parametrize("point", sorted(NAMED_POINTS))
def test_kill_at_named_point_with_both_stores_on_s3(
    point: str,
    kafka_broker: BrokerHandle,
    s3_server: SeaweedFS,
    s3_url: str,
    s3_env: dict[str, str],
    tmp_path: Path,
) -> None:
    overrides, spec = NAMED_POINTS[point]
    config = _s3_config(tmp_path, kafka_broker, s3_server, s3_url, overrides)
    produce_records(config, RECORDS, 1)
    bootstrap = kafka_broker.bootstrap_servers
    ends = end_offsets(bootstrap, topic_of(config))
    crashing = ServiceProcess(
        config, tmp_path, env={**s3_env, CRASH_ENV: spec}, name="crashing"
    ).start()
    code = wait_exit(crashing, 90, f"crash at {spec}")
    assert code == -9, f"expected SIGKILL at {spec}, got exit {code}:\n{crashing.tail()}"
    at_crash = manifest_offsets(config)
    committed = committed_offsets(bootstrap, config["kafka"]["group_id"], list(ends))
    assert all(committed[k] <= at_crash.get(k, 0) for k in ends), (committed, at_crash)

    _finish(config, tmp_path, s3_env, "recovered")
    loaded = load_final(config)
    verdict = judge([loaded.state], ends)
    print(f"\n[s3 {point}] crash at {spec}: checkpoint at crash {at_crash}; {verdict.line()}")
    assert (verdict.lost, verdict.twice) == (0, 0), verdict.holes
    assert loaded.state.records_learnt == RECORDS
    assert committed_offsets(bootstrap, config["kafka"]["group_id"], list(ends)) == ends
    # No version half visible: every listed version's artifact verifies.
    registry = open_registry(
        config["registry"]["root"],
        config["model"]["name"],
        HMAC_KEY.encode(),
        100,
        ObjectStoreSettings(**config["object_store"]),
    )
    for info in registry.list():
        registry.load_artifact(info.version)


def _tokens(config: dict[str, Any]) -> set[int]:
    """The writer tokens of every visible checkpoint, read from the bucket."""
    store = store_of(config)
    found = set()
    for url in store.list():
        name = str(url).rsplit("/", 1)[-1]
        manifest = store.inspect(name)["manifest"]  # type: ignore[arg-type]
        found.add(int(manifest["extra"]["writer_token"]))
    return found


def _member(config: dict[str, Any], **kafka: str) -> dict[str, Any]:
    """Another member's config: its own HTTP port, ``kafka`` settings changed."""
    other: dict[str, Any] = json.loads(json.dumps(config))
    other["http"]["port"] = free_port()
    other["kafka"].update(kafka)
    return other


def _pointer(config: dict[str, Any]) -> dict[str, Any]:
    raw = open_store(config["checkpoint"]["dir"], ObjectStoreSettings(**config["object_store"]))
    data: dict[str, Any] = json.loads(raw.get(POINTER).data)
    return data


def test_a_second_writer_on_another_node_is_refused_by_the_lease(
    kafka_broker: BrokerHandle,
    s3_server: SeaweedFS,
    s3_url: str,
    s3_env: dict[str, str],
    tmp_path: Path,
) -> None:
    """Another member with its own disk and its own consumer group (so the Kafka lease does
    not stop it) pointed at the same checkpoints: it waits on their lease and writes
    nothing while the first runs; it takes over once the first stops."""
    first_dir, second_dir = tmp_path / "node-a", tmp_path / "node-b"
    first_dir.mkdir()
    second_dir.mkdir()
    config = _s3_config(
        first_dir, kafka_broker, s3_server, s3_url, {"kafka": {"group_instance_id": "node-a"}}
    )
    produce_records(config, RECORDS, 1)
    ends = end_offsets(kafka_broker.bootstrap_servers, topic_of(config))
    other = _member(
        config, group_id=config["kafka"]["group_id"] + "-other", group_instance_id="node-b"
    )
    first = ServiceProcess(config, first_dir, env=s3_env, name="node-a").start()
    second: ServiceProcess | None = None
    try:
        first.wait_metric(LEARNT, 1000, 60)
        first.wait_metric("stream_trainer_checkpoint_duration_seconds_count", 1, 60)
        second = ServiceProcess(other, second_dir, env=s3_env, name="node-b").start()
        wait_for(
            lambda: "checkpoint lease" in second.http("/readyz")[1],  # type: ignore[union-attr]
            60,
            "the second writer waiting on the checkpoints' lease",
            interval=0.2,
        )
        status, reason = second.http("/readyz")
        print(f"\n[second writer] /readyz {status}: {reason}")
        assert status == 503 and "held by" in reason
        wait_checkpointed(config, ends, first)
        assert _tokens(config) == {1} and _pointer(config)["token"] == 1
        assert second.metric(LEARNT, -1.0) <= 0
        assert first.stop() == 0, first.tail()
        # Released at the graceful stop: the second takes the checkpoints over at once and
        # resumes where they stop (its group has no commits: the checkpoint is the truth).
        wait_for(lambda: _pointer(config)["token"] == 2, 60, "the takeover", interval=0.2)
        assert second.metric(LEARNT, -1.0) <= 0  # nothing left to learn
        assert second.stop() == 0, second.tail()
    finally:
        first.__exit__()
        if second is not None:
            second.__exit__()
    verdict = judge([load_final(config).state], ends)
    print(f"[second writer] {verdict.line()}")
    assert (verdict.lost, verdict.twice) == (0, 0)


def test_a_stale_writer_whose_lease_was_taken_over_is_fenced(
    kafka_broker: BrokerHandle,
    s3_server: SeaweedFS,
    s3_url: str,
    s3_env: dict[str, str],
    tmp_path: Path,
) -> None:
    """The writer freezes (SIGSTOP) past its Kafka session and its lease; a standby of the
    same group takes both over. Thawed, the old writer's next checkpoint is refused and it
    exits, committing nothing; nothing is lost or learnt twice in the model that goes on."""
    config = _s3_config(
        tmp_path,
        kafka_broker,
        s3_server,
        s3_url,
        {"kafka": {"group_instance_id": "node-a"}},
    )
    produce_records(config, RECORDS // 2, 1)
    bootstrap = kafka_broker.bootstrap_servers
    standby_config = _member(config, group_instance_id="node-b")
    stale = ServiceProcess(config, tmp_path, env=s3_env, name="stale").start()
    standby = ServiceProcess(standby_config, tmp_path, env=s3_env, name="standby")
    try:
        stale.wait_metric(LEARNT, RECORDS // 2, 60)
        stale.wait_metric("stream_trainer_checkpoint_duration_seconds_count", 1, 60)
        standby.start()
        standby.wait_metric('stream_trainer_state{stream_trainer_state="standby"}', 1, 60)
        stale.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
        frozen_at = time.monotonic()
        # Records the frozen writer never sees: the standby learns them after the takeover.
        produce_records(config, RECORDS - RECORDS // 2, 1, seed=7)
        ends = end_offsets(bootstrap, topic_of(config))
        wait_for(lambda: _pointer(config)["token"] == 2, 90, "the standby's takeover")
        print(f"\n[stale writer] takeover {time.monotonic() - frozen_at:.1f} s after the freeze")
        standby.wait_metric(LEARNT, 1, 60)
        committed_at_takeover = committed_offsets(
            bootstrap, config["kafka"]["group_id"], list(ends)
        )
        stale.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        code = wait_exit(stale, 60, "the fenced writer's exit")
        tail = stale.tail(80)
        print(f"[stale writer] exit {code}")
        assert code == 1, tail
        assert "fenced" in tail
        wait_checkpointed(config, ends, standby)
        assert _tokens(config) <= {1, 2}
        assert standby.stop() == 0, standby.tail()
    finally:
        stale.__exit__()
        standby.__exit__()
    final = load_final(config)
    verdict = judge([final.state], ends)
    print(f"[stale writer] committed at takeover {committed_at_takeover}; {verdict.line()}")
    assert (verdict.lost, verdict.twice) == (0, 0)
    assert final.manifest.extra["writer_token"] == 2


def test_a_hot_standby_takes_over_after_kill_9(
    kafka_broker: BrokerHandle,
    s3_server: SeaweedFS,
    s3_url: str,
    s3_env: dict[str, str],
    tmp_path: Path,
) -> None:
    """Two members of one group on shared stores: kill -9 of the writer, the standby holds
    the Kafka lease after the session timeout and the checkpoints' lease after it lapses,
    restores the writer's newest checkpoint and finishes: lost 0, twice 0."""
    config = _s3_config(
        tmp_path, kafka_broker, s3_server, s3_url, {"kafka": {"group_instance_id": "node-a"}}
    )
    produce_records(config, RECORDS // 2, 1)
    standby_config = _member(config, group_instance_id="node-b")
    writer = ServiceProcess(config, tmp_path, env=s3_env, name="writer").start()
    standby = ServiceProcess(standby_config, tmp_path, env=s3_env, name="standby")
    try:
        writer.wait_metric("stream_trainer_checkpoint_duration_seconds_count", 1, 60)
        standby.start()
        standby.wait_metric('stream_trainer_state{stream_trainer_state="standby"}', 1, 60)
        writer.kill()
        killed_at = time.monotonic()
        produce_records(config, RECORDS - RECORDS // 2, 1, seed=7)
        ends = end_offsets(kafka_broker.bootstrap_servers, topic_of(config))
        assert not covers(manifest_offsets(config), ends)
        standby.wait_metric(LEARNT, 1, 90)
        takeover = time.monotonic() - killed_at
        wait_checkpointed(config, ends, standby)
        assert standby.stop() == 0, standby.tail()
    finally:
        writer.__exit__()
        standby.__exit__()
    verdict = judge([load_final(config).state], ends)
    session = config["kafka"]["session_timeout_ms"] / 1000
    print(
        f"\n[hot standby] first record learnt {takeover:.1f} s after kill -9 (session "
        f"{session:.0f} s, lease {LEASE_S:.0f} s); {verdict.line()}"
    )
    assert (verdict.lost, verdict.twice) == (0, 0)


OUTAGE_S = 15.0
PUBLISHED = "stream_trainer_versions_published_total"
FAILED_CHECKPOINTS = "stream_trainer_checkpoint_failures_total"


def test_the_s3_server_stopped_15_s_with_both_stores_on_it(
    kafka_broker: BrokerHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training goes on through a 15 s outage of the one store holding checkpoints and
    versions; failed checkpoints are counted and commit nothing; once the server is back
    checkpoints resume (the lease, unrenewed meanwhile, is still this writer's) and
    publishing resumes: lost 0, twice 0."""
    # Its own server: stopping the session's would take it from other tests.
    with SeaweedFS(bucket="outage-both") as server:
        env = server.admin.env()
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        config = _s3_config(
            tmp_path,
            kafka_broker,
            server,
            f"s3://{server.bucket}/run",
            {"object_store": {"timeout_seconds": 5.0}, "registry": {"publish_every_records": 1000}},
        )
        produce_records(config, 2000, 1)
        bootstrap = kafka_broker.bootstrap_servers
        service = ServiceProcess(config, tmp_path, env=env).start()
        try:
            service.wait_metric(PUBLISHED, 1, 60)
            service.wait_metric(LEARNT, 2000, 60)
            server.stop()
            down_since = time.monotonic()
            produce_records(config, 3000, 1, seed=7)
            ends = end_offsets(bootstrap, topic_of(config))
            service.wait_metric(LEARNT, 5000, 60)  # training goes on
            service.wait_metric(FAILED_CHECKPOINTS, 1, 60)
            committed_down = committed_offsets(bootstrap, config["kafka"]["group_id"], list(ends))
            wait_for(lambda: time.monotonic() - down_since >= OUTAGE_S, OUTAGE_S + 1, "the outage")
            assert service.alive(), service.tail()
            failed = service.metric(FAILED_CHECKPOINTS)
            published_while_down = service.metric(PUBLISHED)
            server.start()
            wait_checkpointed(config, ends, service, 120)  # checkpoints resume
            service.wait_metric(PUBLISHED, published_while_down + 1, 120)
            assert service.stop() == 0, service.tail()
        finally:
            service.__exit__()
        final = load_final(config)
        verdict = judge([final.state], ends)
        print(
            f"\n[s3 outage, both stores, {OUTAGE_S:.0f} s] failed checkpoints {failed:.0f}, "
            f"committed during the outage {committed_down}; {verdict.line()}"
        )
        assert (verdict.lost, verdict.twice) == (0, 0)
        assert final.state.records_learnt == 5000
        assert final.manifest.extra["writer_token"] == 1  # the same writer all along
        assert committed_offsets(bootstrap, config["kafka"]["group_id"], list(ends)) == ends
