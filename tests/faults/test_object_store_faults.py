"""kill -9 between a version's artifact upload and its visibility write, registry on S3.

The fault suite's oracle (the offset ledger, tests/faults/support.py) with the registry in
a real S3 bucket (SeaweedFS): nothing lost, nothing learnt twice, and no version half
visible: every listed version verifies, the killed publish's number is never reused.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from stream_trainer.config import ObjectStoreSettings
from stream_trainer.operations.faults import CRASH_ENV
from stream_trainer.publishing.registry import open_registry
from stream_trainer.state.objectstore import open_store
from stream_trainer.testing.seaweedfs import SeaweedFS
from tests.conftest import BrokerHandle
from tests.faults.support import (
    LEARNT,
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
from tests.harness import HMAC_KEY, ServiceProcess

pytestmark = [pytest.mark.faults, pytest.mark.integration]

RECORDS = 6000
CHECKPOINTS = "stream_trainer_checkpoint_duration_seconds_count"


def test_kill_between_artifact_upload_and_visibility_write(
    kafka_broker: BrokerHandle,
    s3_server: SeaweedFS,
    s3_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store_settings = {
        "endpoint_url": s3_server.endpoint_url,
        "region": s3_server.region,
        "path_style": True,
    }
    config = fault_config(
        tmp_path,
        kafka_broker,
        1,
        {"checkpoint": {"every_seconds": 0.5, "every_records": 1000, "keep_last": 50}},
        {"registry": {"root": s3_url, "publish_every_records": 2000}},
        {"object_store": store_settings},
    )
    produce_records(config, RECORDS, 1)
    bootstrap = kafka_broker.bootstrap_servers
    ends = end_offsets(bootstrap, topic_of(config))
    env = s3_server.admin.env()
    spec = "before_version_visible:2"
    crashing = ServiceProcess(
        config, tmp_path, env={**env, CRASH_ENV: spec}, name="crashing"
    ).start()
    code = wait_exit(crashing, 90, f"crash at {spec}")
    assert code == -9, f"expected SIGKILL at {spec}, got exit {code}:\n{crashing.tail()}"
    at_crash = manifest_offsets(config)
    committed = committed_offsets(bootstrap, config["kafka"]["group_id"], list(ends))
    assert all(committed[k] <= at_crash.get(k, 0) for k in ends), (committed, at_crash)

    model = config["model"]["name"]
    for name, value in env.items():  # this process reads the keys as the service does
        monkeypatch.setenv(name, value)
    registry = open_registry(
        s3_url, model, HMAC_KEY.encode(), 100, ObjectStoreSettings(**store_settings)
    )
    visible_at_crash = [info.version for info in registry.list()]
    assert visible_at_crash == [1]  # version 2's artifact is uploaded, it is not visible
    raw = open_store(s3_url, ObjectStoreSettings(**store_settings))
    assert raw.get(f"{model}/versions/00000002/model.pkl").data  # the orphaned upload

    recovered = ServiceProcess(config, tmp_path, env=env, name="recovered").start()
    try:
        wait_checkpointed(config, ends, recovered)
        assert recovered.stop() == 0, recovered.tail()
    finally:
        recovered.__exit__()
    verdict = judge([load_final(config).state], ends)
    print(f"\n[before_version_visible] {verdict.line()}")
    assert (verdict.lost, verdict.twice) == (0, 0)

    versions = registry.list()
    numbers = [info.version for info in versions]
    assert 2 not in numbers and numbers[0] == 1 and len(numbers) >= 2, numbers
    for info in versions:  # nothing half visible: every listed version verifies
        registry.load_artifact(info.version)
    champion = registry.champion()
    assert champion is not None and champion.version == numbers[-1]
    lease = json.loads(raw.get(f"{model}/LEASE").data)
    assert lease["expires_at"] == 0.0  # released at the graceful stop


OUTAGE_S = 15.0


def test_the_s3_server_stopped_mid_run_training_continues_and_publishing_resumes(
    kafka_broker: BrokerHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its own server: stopping the session's would take it from other tests.
    with SeaweedFS(bucket="outage") as server:
        url = f"s3://{server.bucket}/run"
        store_settings = {
            "endpoint_url": server.endpoint_url,
            "region": server.region,
            "path_style": True,
            "timeout_seconds": 5.0,
        }
        config = fault_config(
            tmp_path,
            kafka_broker,
            1,
            {"checkpoint": {"every_seconds": 0.5, "every_records": 1000, "keep_last": 50}},
            {"registry": {"root": url, "publish_every_records": 1000}},
            {"object_store": store_settings},
        )
        produce_records(config, 2000, 1)
        env = server.admin.env()
        service = ServiceProcess(config, tmp_path, env=env).start()
        try:
            service.wait_metric("stream_trainer_versions_published_total", 1)
            server.stop()
            down_since = time.monotonic()
            produce_records(config, 3000, 1, seed=7)
            # Training and checkpoints go on while the registry's store is down.
            checkpoints = service.wait_metric(CHECKPOINTS, 1)
            service.wait_metric(LEARNT, 5000, 60)
            service.wait_metric(CHECKPOINTS, checkpoints + 1, 30)
            assert service.alive(), service.tail()
            published_while_down = service.metrics()["stream_trainer_versions_published_total"]
            threading.Event().wait(max(0.0, OUTAGE_S - (time.monotonic() - down_since)))
            assert service.alive(), service.tail()
            assert "registry unavailable, publish retried later" in service.tail(200)
            server.start()
            service.wait_metric(
                "stream_trainer_versions_published_total", published_while_down + 1, 120
            )
            assert service.stop() == 0, service.tail()
        finally:
            service.__exit__()

        verdict = judge(
            [load_final(config).state],
            end_offsets(kafka_broker.bootstrap_servers, topic_of(config)),
        )
        print(f"\n[s3 outage {OUTAGE_S:.0f} s] {verdict.line()}")
        assert (verdict.lost, verdict.twice) == (0, 0)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        registry = open_registry(
            url,
            config["model"]["name"],
            HMAC_KEY.encode(),
            100,
            ObjectStoreSettings(**store_settings),
        )
        versions = registry.list()
        assert len(versions) >= 2
        for info in versions:
            registry.load_artifact(info.version)
        assert versions[-1].metadata["records_learnt"] == 5000
