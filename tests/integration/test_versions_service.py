"""Model versions published by the running service, against real brokers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stream_trainer.laptop.datasets import get_dataset
from stream_trainer.laptop.produce import produce
from stream_trainer.publishing.registry import ModelRegistry
from tests.conftest import KAFKA_ONLY
from tests.harness import HMAC_KEY, ServiceProcess, read_topic, service_config, wait_for

# What these tests assert is the service's versioning (numbers, lineage, gate, registry,
# events); the versions topic's produce and read are broker-neutral (test_brokers.py,
# test_reader.py run on both). Apache Kafka only: ~20 s a test saved on Tansu.
pytestmark = [pytest.mark.integration, KAFKA_ONLY]

PHISHING = get_dataset("phishing")


def _registry(config: dict[str, Any]) -> ModelRegistry:
    return ModelRegistry(
        Path(config["registry"]["root"]), config["model"]["name"], HMAC_KEY.encode(), keep_last=100
    )


def _produce(config: dict[str, Any], count: int, seed: int = 1, **kw: Any) -> None:
    produce(
        {"bootstrap.servers": config["kafka"]["bootstrap_servers"]},
        config["topics"]["input"][0],
        kw.pop("dataset", PHISHING),
        count,
        seed=seed,
        **kw,
    )


def _control(config_path: Path, command: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stream_trainer", "control", command, "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**__import__("os").environ, "STREAM_TRAINER_CHECKPOINT__HMAC_KEY": HMAC_KEY},
    )
    assert result.returncode == 0, result.stderr


def test_versions_by_record_count_increase_across_restart_with_full_lineage(
    broker: Any, tmp_path: Path
) -> None:
    config = service_config(
        tmp_path,
        broker.bootstrap_servers,
        "phishing",
        partitions=2,
        overrides={
            "registry": {"publish_every_records": 400},
            "kafka": {"consume_batch_size": 200},
        },
    )
    _produce(config, 1250, partitions=2)
    with ServiceProcess(config, tmp_path) as service:
        service.wait_metric("stream_trainer_records_learnt_total", 1250)
        service.wait_metric("stream_trainer_versions_published_total", 2)
        assert service.stop() == 0
    first_run = [v.version for v in _registry(config).list()]
    assert first_run == list(range(1, len(first_run) + 1))

    _produce(config, 1250, partitions=2, seed=2)
    with ServiceProcess(config, tmp_path, name="second") as service:
        service.wait_metric("stream_trainer_records_learnt_total", 1250)
        wait_for(
            lambda: len(_registry(config).list()) > len(first_run),
            60,
            "a version after the restart",
        )
        assert service.stop() == 0
    versions = _registry(config).list()
    numbers = [v.version for v in versions]
    print(f"versions: first run {first_run}, after restart {numbers}")
    assert numbers == sorted(set(numbers)) and numbers[: len(first_run)] == first_run
    assert numbers[-1] > first_run[-1]

    # Lineage: the newest version's offsets_total covers every offset of both partitions,
    # and each version's offsets_since_parent starts where its parent's total ended.
    topic = config["topics"]["input"][0]
    latest = versions[-1].metadata
    total = latest["offsets_total"]
    processed = latest["records_learnt"] + latest["records_dead_lettered"]
    assert sum(end - start for spans in total.values() for start, end in spans) == processed
    assert processed > 1250
    for partition in (0, 1):
        spans = total[f"{topic}:{partition}"]
        assert len(spans) == 1 and spans[0][0] == 0, spans  # contiguous from the start
    by_number = {v.version: v.metadata for v in versions}
    for number, meta in by_number.items():
        parent = meta["parent_version"]
        assert parent is None or parent < number
        since = meta["offsets_since_parent"]
        assert since, f"version {number} learnt nothing since its parent"
        assert meta["config_hash"] and meta["library_versions"]["river"]
        assert meta["artifact_sha256"] and meta["artifact_hmac"]

    # Events: one per version on the versions topic, keyed by model name.
    events = read_topic(
        broker.bootstrap_servers, config["topics"]["versions"], expected=len(numbers)
    )
    seen = sorted({json.loads(m.value())["version"] for m in events})
    assert seen == numbers
    assert all(m.key() == b"model" for m in events)


def test_versions_after_time_and_manual_publish_of_nothing_new_is_skipped(
    broker: Any, tmp_path: Path
) -> None:
    config = service_config(
        tmp_path,
        broker.bootstrap_servers,
        "phishing",
        overrides={"registry": {"publish_every_seconds": 1.0}},
    )
    _produce(config, 600)
    with ServiceProcess(config, tmp_path) as service:
        service.wait_metric("stream_trainer_records_learnt_total", 600)
        wait_for(
            lambda: [v.metadata["records_learnt"] for v in _registry(config).list()][-1:] == [600],
            60,
            "a version of all 600 records",
        )
        # Time alone publishes nothing new, and neither does a manual request: nothing was
        # learnt since, so the version would be a byte-identical copy.
        _control(service.config_path, "publish")
        wait_for(lambda: _skipped(service), 60, "the skipped manual publish in the log")
        # The request was handled: what is learnt next publishes on the timer again.
        _produce(config, 100, seed=2)
        service.wait_metric("stream_trainer_records_learnt_total", 700)
        service.wait_metric("stream_trainer_versions_published_total", 2)
        published = service.metric("stream_trainer_versions_published_total")
        assert service.stop() == 0
    versions = _registry(config).list()
    triggers = [v.metadata["trigger"] for v in versions]
    print(f"triggers: {triggers}; skipped: {_skipped(service)}")
    assert triggers == ["time"] * len(versions) and len(versions) == published
    learnt = [v.metadata["records_learnt"] for v in versions]
    assert learnt == sorted(set(learnt)), learnt  # no two versions of the same state


def _skipped(service: ServiceProcess) -> list[dict[str, Any]]:
    lines = service.log_path.read_text(errors="replace").splitlines()
    entries = [json.loads(line) for line in lines if line.startswith("{")]
    return [e for e in entries if "publish skipped" in e.get("event", "")]


def test_after_each_full_retrain(broker: Any, tmp_path: Path) -> None:
    config = service_config(
        tmp_path,
        broker.bootstrap_servers,
        "bananas",
        mode="full_batch",
        overrides={
            "model": {
                "preprocessing": [],
                "learner": {
                    "path": "sklearn.tree.DecisionTreeClassifier",
                    "params": {"max_depth": 8},
                },
            },
            "training": {
                "full_batch": {
                    "window_records": 1000,
                    "retrain_every_records": 800,
                    "min_records": 200,
                }
            },
            "registry": {"gate": {"holdout_records": 100}},
        },
    )
    _produce(config, 2500, dataset=get_dataset("bananas"))
    with ServiceProcess(config, tmp_path) as service:
        service.wait_metric("stream_trainer_records_learnt_total", 2500)
        service.wait_metric('stream_trainer_retrains_total{trigger="count"}', 2)
        service.wait_metric("stream_trainer_versions_published_total", 1)
        assert service.stop() == 0
    versions = _registry(config).list()
    assert versions and all(v.metadata["trigger"] == "retrain" for v in versions)
    assert versions[-1].metadata["learner"]["path"] == "sklearn.tree.DecisionTreeClassifier"


def test_gate_rejects_a_degraded_candidate_and_accepts_a_recovered_one(
    broker: Any, tmp_path: Path
) -> None:
    config = service_config(
        tmp_path,
        broker.bootstrap_servers,
        "phishing",
        overrides={"registry": {"gate": {"holdout_records": 300, "margin": 0.1}}},
    )
    topic = config["topics"]["input"][0]
    bootstrap = config["kafka"]["bootstrap_servers"]
    with ServiceProcess(config, tmp_path) as service:
        _produce(config, 1250)
        service.wait_metric("stream_trainer_records_learnt_total", 1250)
        _control(service.config_path, "publish")
        service.wait_metric("stream_trainer_versions_published_total", 1)

        # Degrade the model: labels inverted for 1250 records, then 300 good ones: the
        # candidate predicted those 300 with a corrupted model, the champion did not.
        inverted = _inverted_phishing()
        produce({"bootstrap.servers": bootstrap}, topic, inverted, 1250, seed=3)
        _produce(config, 300, seed=4)
        service.wait_metric("stream_trainer_records_learnt_total", 2800)
        _control(service.config_path, "publish")
        service.wait_metric("stream_trainer_versions_rejected_total", 1)

        # Recovery: plenty of good data, then the candidate is accepted again.
        _produce(config, 2500, seed=5)
        service.wait_metric("stream_trainer_records_learnt_total", 5300)
        _control(service.config_path, "publish")
        service.wait_metric("stream_trainer_versions_published_total", 2)
        assert service.stop() == 0
    registry = _registry(config)
    decisions = registry.decisions()
    rejected = [d for d in decisions if d["action"] == "reject"]
    print(
        "decisions:",
        [(d["action"], d.get("champion_score"), d.get("candidate_score")) for d in decisions],
    )
    assert len(rejected) == 1
    assert rejected[0]["candidate_score"] < rejected[0]["champion_score"] - 0.1
    assert [v.version for v in registry.list()] == [1, 2]
    champion = registry.champion()
    assert champion is not None and champion.version == 2


def _inverted_phishing() -> Any:
    from dataclasses import replace

    def rows(seed: int) -> Any:
        for x, y in PHISHING.rows(1250, seed):
            yield x, not y

    return replace(PHISHING, name="phishing-inverted", size=None, _rows=rows)


def test_crash_between_files_and_event_republishes_the_identical_event(
    broker: Any, tmp_path: Path
) -> None:
    config = service_config(
        tmp_path,
        broker.bootstrap_servers,
        "phishing",
        overrides={"registry": {"publish_every_records": 1000}},
    )
    _produce(config, 1250)
    crashing = ServiceProcess(
        config, tmp_path, name="crashing", env={"STREAM_TRAINER_CRASH_AT": "after_version_files:1"}
    )
    with crashing:
        wait_for(lambda: not crashing.alive(), 60, "the crash after the version files")
    assert crashing.proc is not None and crashing.proc.returncode == -9
    assert [v.version for v in _registry(config).list()] == [1]
    assert read_topic(broker.bootstrap_servers, config["topics"]["versions"], timeout=3) == []

    with ServiceProcess(config, tmp_path, name="restarted") as service:
        events = read_topic(broker.bootstrap_servers, config["topics"]["versions"], expected=1)
        assert service.stop() == 0
    events = read_topic(broker.bootstrap_servers, config["topics"]["versions"])
    first = [m.value() for m in events if json.loads(m.value())["version"] == 1]
    print(
        f"events for version 1: {len(first)}; versions:",
        [v.version for v in _registry(config).list()],
    )
    assert len(first) >= 1 and len(set(first)) == 1
    assert (
        len(
            [
                p
                for p in (Path(config["registry"]["root"]) / "model" / "versions").iterdir()
                if p.name == "00000001"
            ]
        )
        == 1
    )


def _flip_byte(registry: ModelRegistry, version: int) -> None:
    path = registry.get(version).artifact_path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_damaged_champion_is_counted_and_replaced_by_the_newest_version_that_verifies(
    broker: Any, tmp_path: Path
) -> None:
    config = service_config(
        tmp_path,
        broker.bootstrap_servers,
        "phishing",
        overrides={
            "registry": {"publish_every_records": 300, "gate": {"margin": 1.0}},
            "kafka": {"consume_batch_size": 100},
        },
    )
    registry = _registry(config)
    unavailable = "stream_trainer_registry_champion_unavailable_total"
    with ServiceProcess(config, tmp_path) as service:
        _produce(config, 600)
        service.wait_metric("stream_trainer_versions_published_total", 2)
        assert registry.champion().version == 2  # type: ignore[union-attr]

        # One byte of the champion's artifact flipped: version 1 stands in for it.
        _flip_byte(registry, 2)
        _produce(config, 300, seed=2)
        service.wait_metric("stream_trainer_versions_published_total", 3)
        assert service.metric(unavailable) == 1
        third = registry.get(3).metadata["gate"]
        assert third["champion_version"] == 1 and third["champion_score"] is not None

        # Every version damaged: the candidate is judged without a champion.
        _flip_byte(registry, 3)
        _flip_byte(registry, 1)
        _produce(config, 300, seed=3)
        service.wait_metric("stream_trainer_versions_published_total", 4)
        assert service.metric(unavailable) == 2
        fourth = registry.get(4).metadata["gate"]
        assert fourth["champion_version"] is None and fourth["champion_score"] is None
        assert service.alive()
        assert service.stop() == 0
    lines = service.log_path.read_text(errors="replace").splitlines()
    errors = [json.loads(line) for line in lines if "registry champion unavailable" in line]
    print(f"champion unavailable: {[(e['event'], e['champion']) for e in errors]}")
    assert [e["champion"] for e in errors] == [2, 3] and all(
        "sha256" in e["reason"] for e in errors
    )
