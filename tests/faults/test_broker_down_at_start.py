"""A broker that is down when the service starts: it waits (live, not ready), then trains.

The service is a real process; the broker is Tansu started later on the address the
service was given, with nothing listening there before.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from stream_trainer.config import ObjectStoreSettings
from stream_trainer.laptop.embedded import EmbeddedBroker, create_topics, free_port
from stream_trainer.state.checkpoint import sequence_of_name
from stream_trainer.state.objectstore import open_store
from stream_trainer.state.store_checkpoint import POINTER
from stream_trainer.testing.seaweedfs import SeaweedFS
from tests.conftest import _in_ci
from tests.faults.support import LEARNT, produce_records, wait_exit
from tests.harness import ServiceProcess, deep_merge, service_config, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.integration]

WAITING = "waiting for the Kafka cluster at"


def _config(tmp_path: Path, bootstrap: str) -> dict[str, Any]:
    """Every example config sets topics.control; so does this one. No topic exists yet."""
    return service_config(
        tmp_path,
        bootstrap,
        "linear20",
        "per_record",
        1,
        {"http": {"healthz_max_age_s": 3.0}, "shutdown": {"timeout_s": 20}},
        create=False,
    )


def _broker_on(port: int) -> EmbeddedBroker:
    try:
        return EmbeddedBroker(port=port, startup_timeout=30.0).start()
    except Exception as exc:  # same availability rule as the session brokers
        if _in_ci():
            pytest.fail(f"tansu broker unavailable: {exc}", pytrace=False)
        pytest.skip(f"tansu broker unavailable: {exc}")


def _readyz_says(service: ServiceProcess, text: str) -> bool:
    if not service.alive():
        raise AssertionError(
            f"service exited ({service.proc and service.proc.returncode}):\n" + service.tail()
        )
    status, reason = service.http("/readyz")
    return status == 503 and text in reason


def _log_events(service: ServiceProcess) -> list[dict[str, Any]]:
    events = []
    for line in service.log_path.read_text(errors="replace").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def test_waits_for_a_broker_down_at_start_then_trains(tmp_path: Path) -> None:
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    config = _config(tmp_path, bootstrap)
    topics = config["topics"]
    service = ServiceProcess(config, tmp_path).start()
    started = time.monotonic()
    try:
        wait_for(lambda: _readyz_says(service, f"{WAITING} {bootstrap}"), 60, "/readyz: waiting")
        # Observe past the old give-up point (a 10 s metadata request, exit 1 after ~13 s).
        healthz: list[int] = []
        cadence = threading.Event()  # never set: its wait() is the sampling interval
        while time.monotonic() - started < 16.0:
            assert service.alive(), service.tail()
            healthz.append(service.http("/healthz")[0])
            cadence.wait(0.25)
        broker = _broker_on(port)
        try:
            up = time.monotonic()
            # A reachable cluster without the control topic: still waiting, naming the topic.
            wait_for(
                lambda: _readyz_says(service, f"control topic {topics['control']} does not exist"),
                30,
                "/readyz: the control topic is missing",
            )
            create_topics(
                bootstrap,
                {
                    topics["input"][0]: 1,
                    topics["dead_letter"]: 1,
                    topics["versions"]: 1,
                    topics["control"]: 1,
                },
            )
            produce_records(config, 500, 1)
            service.wait_metric(LEARNT, 500, 60)
            trained_after = time.monotonic() - up
            service.wait_ready(30)
            assert service.stop() == 0, service.tail()
        finally:
            broker.stop()
    finally:
        service.__exit__()
    events = _log_events(service)
    waiting = [e for e in events if str(e.get("event", "")).startswith(WAITING)]
    print(
        f"\n[broker down at start] alive {16.0:.0f} s without a broker; /healthz samples "
        f"{len(healthz)}, non-200 {[s for s in healthz if s != 200]}; trained 500 records "
        f"{trained_after:.1f} s after the broker came up; waiting lines logged {len(waiting)}: "
        f"{[e['event'] for e in waiting]}"
    )
    assert set(healthz) == {200}
    assert waiting and bootstrap in waiting[0]["event"]
    assert any("does not exist" in e["event"] for e in waiting)
    assert len(waiting) <= 4  # one per distinct reason, not one per attempt


def test_sigterm_while_waiting_for_the_broker_exits_0(tmp_path: Path) -> None:
    bootstrap = f"127.0.0.1:{free_port()}"
    service = ServiceProcess(_config(tmp_path, bootstrap), tmp_path).start()
    try:
        wait_for(lambda: _readyz_says(service, WAITING), 60, "/readyz: waiting")
        assert service.proc is not None
        signalled = time.monotonic()
        service.proc.terminate()
        code = wait_exit(service, 15, "SIGTERM while waiting for the broker")
        took = time.monotonic() - signalled
    finally:
        service.__exit__()
    print(f"\n[SIGTERM while waiting for the broker] exit {code} after {took:.2f} s")
    assert code == 0, service.tail()
    assert took < 5.0


def test_broker_down_at_start_with_both_stores_on_s3(
    tmp_path: Path, s3_server: SeaweedFS, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pod's path with no volume: the stores answer, Kafka does not. The service waits
    for Kafka before it takes the stores' leases, then trains and checkpoints into the
    bucket."""
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    config = deep_merge(
        _config(tmp_path, bootstrap),
        {
            "checkpoint": {"dir": f"{s3_url}/checkpoints", "every_records": 100},
            "registry": {"root": f"{s3_url}/models"},
            "object_store": {
                "endpoint_url": s3_server.endpoint_url,
                "region": s3_server.region,
                "path_style": True,
            },
        },
    )
    env = s3_server.admin.env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)  # the oracle below reads the bucket too
    topics = config["topics"]
    service = ServiceProcess(config, tmp_path, env=env).start()
    try:
        wait_for(lambda: _readyz_says(service, f"{WAITING} {bootstrap}"), 60, "/readyz: waiting")
        broker = _broker_on(port)
        try:
            create_topics(
                bootstrap,
                {
                    topics["input"][0]: 1,
                    topics["dead_letter"]: 1,
                    topics["versions"]: 1,
                    topics["control"]: 1,
                },
            )
            produce_records(config, 500, 1)
            service.wait_metric(LEARNT, 500, 60)
            assert service.stop() == 0, service.tail()
        finally:
            broker.stop()
    finally:
        service.__exit__()
    store = open_store(config["checkpoint"]["dir"], ObjectStoreSettings(**config["object_store"]))
    pointer = json.loads(store.get(POINTER).data)
    print(f"\n[broker down at start, stores on S3] newest checkpoint {pointer}")
    assert pointer["token"] == 1  # one writer, the lease taken once
    assert pointer["sequence"] >= 1
    assert sequence_of_name(pointer["object"]) == pointer["sequence"]


def test_partition_scope_waits_for_the_broker_and_its_input_topic(tmp_path: Path) -> None:
    """A partition-scope member needs the input topic's partition count before it starts:
    with the broker down, then up without the topic, it waits (ready says why), never
    exits; once the topic exists it trains every partition."""
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    config = deep_merge(
        _config(tmp_path, bootstrap),
        {"model": {"scope": "partition"}, "topics": {"control": None}},
    )
    topics = config["topics"]
    service = ServiceProcess(config, tmp_path).start()
    try:
        wait_for(lambda: _readyz_says(service, f"{WAITING} {bootstrap}"), 60, "/readyz: waiting")
        broker = _broker_on(port)
        try:
            missing = f"input topic {topics['input'][0]} does not exist"
            wait_for(lambda: _readyz_says(service, missing), 30, "/readyz: input topic missing")
            create_topics(
                bootstrap, {topics["input"][0]: 2, topics["dead_letter"]: 1, topics["versions"]: 1}
            )
            produce_records(config, 400, 2)
            service.wait_metric(LEARNT, 400, 90)
            assert service.metric('stream_trainer_slots{state="training"}') == 2
            assert service.stop() == 0, service.tail()
        finally:
            broker.stop()
    finally:
        service.__exit__()
