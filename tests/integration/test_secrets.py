"""No configured secret reaches anything the service writes, against a real broker.

Checkpoints, published artifacts and their metadata, version events and dead letters are
scanned for the bytes of every secret the service was configured with, in every training
mode and for both learner families.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from stream_trainer.laptop.datasets import get_dataset
from stream_trainer.laptop.produce import produce
from stream_trainer.testing.schema_registry import SchemaRegistry
from tests.conftest import BrokerHandle
from tests.harness import ServiceProcess, read_topic, service_config

pytestmark = pytest.mark.integration

SECRETS = {
    "STREAM_TRAINER_CHECKPOINT__HMAC_KEY": "hmac-secret-9d41c0e7",
    "STREAM_TRAINER_KAFKA__SASL_PASSWORD": "sasl-secret-3b88f215",
    "STREAM_TRAINER_SCHEMA_REGISTRY__BASIC_AUTH_PASSWORD": "registry-secret-5e02a9c1",
}
RIVER_LR = {"path": "river.linear_model.LogisticRegression"}
RIVER_SCALER = [{"path": "river.preprocessing.StandardScaler"}]
SK_SCALER = [{"path": "sklearn.preprocessing.StandardScaler"}]
FULL_BATCH = {
    "full_batch": {"window_records": 400, "retrain_every_records": 300, "min_records": 100}
}

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "per_record-river": ("per_record", {"model": {"learner": RIVER_LR}}),
    "mini_batch-river": (
        "mini_batch",
        {"model": {"learner": RIVER_LR}, "training": {"mini_batch": {"size": 100}}},
    ),
    "mini_batch-sklearn": (
        "mini_batch",
        {
            "model": {
                "preprocessing": SK_SCALER,
                "learner": {
                    "path": "sklearn.linear_model.SGDClassifier",
                    "params": {"loss": "log_loss", "random_state": 0},
                },
            },
            "training": {"mini_batch": {"size": 100}},
        },
    ),
    "full_batch-river": (
        "full_batch",
        {"model": {"preprocessing": RIVER_SCALER, "learner": RIVER_LR}, "training": FULL_BATCH},
    ),
    "full_batch-sklearn": (
        "full_batch",
        {
            "model": {
                "preprocessing": [],
                "learner": {
                    "path": "sklearn.tree.DecisionTreeClassifier",
                    "params": {"max_depth": 4},
                },
            },
            "training": FULL_BATCH,
        },
    ),
}


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != ".lock")


@pytest.mark.parametrize("case", sorted(CASES))
def test_no_secret_in_checkpoints_artifacts_events_or_dead_letters(
    kafka_broker: BrokerHandle, tmp_path: Path, case: str
) -> None:
    mode, overrides = CASES[case]
    overrides = {
        **overrides,
        "registry": {"publish_every_records": 300, "gate": {"holdout_records": 50}},
    }
    config = service_config(
        tmp_path, kafka_broker.bootstrap_servers, "phishing", mode=mode, overrides=overrides
    )
    produce(
        {"bootstrap.servers": kafka_broker.bootstrap_servers},
        config["topics"]["input"][0],
        get_dataset("phishing"),
        700,
        bad_ratio=0.05,
        seed=7,
    )
    with ServiceProcess(config, tmp_path, env=SECRETS) as service:
        service.wait_metric("stream_trainer_versions_published_total", 1, timeout=90)
        service.wait_metric("stream_trainer_checkpoint_last_success_timestamp_seconds", 1)
        assert service.stop() == 0

    checkpoints = _files(Path(config["checkpoint"]["dir"]))
    published = _files(Path(config["registry"]["root"]))
    artifacts = [p for p in published if p.name == "model.pkl"]
    bootstrap = kafka_broker.bootstrap_servers
    events = read_topic(bootstrap, config["topics"]["versions"])
    dead = read_topic(bootstrap, config["topics"]["dead_letter"])
    blobs = [p.read_bytes() for p in checkpoints + published]
    blobs += [m.value() or b"" for m in events + dead]
    blobs += [value for m in dead for _key, value in (m.headers() or []) if value]
    print(
        f"{case}: scanned {len(checkpoints)} checkpoint files, {len(published)} registry files "
        f"({len(artifacts)} artifacts), {len(events)} version events, {len(dead)} dead letters"
    )
    assert [p for p in checkpoints if p.suffix == ".ckpt"] and artifacts and events and dead
    for secret in SECRETS.values():
        leaks = [i for i, blob in enumerate(blobs) if secret.encode() in blob]
        assert not leaks, f"{secret} found in {len(leaks)} of {len(blobs)} outputs"
    # No config object at all is pickled (a future secret field would leak through one).
    for path in [p for p in checkpoints if p.suffix == ".ckpt"] + artifacts:
        assert b"stream_trainer.config" not in path.read_bytes(), path


def test_no_registry_secret_in_outputs_or_log_with_avro_records(
    kafka_broker: BrokerHandle, schema_registry: SchemaRegistry, tmp_path: Path
) -> None:
    """The registry password in use (basic auth on every lookup, typed Avro records with
    bad ones mixed in): in no checkpoint, artifact, event, dead letter or log line."""
    overrides = {
        "record": {"format": "avro"},
        "schema_registry": {"url": schema_registry.url, "basic_auth_user": "trainer"},
        "registry": {"publish_every_records": 300, "gate": {"holdout_records": 50}},
    }
    bootstrap = kafka_broker.bootstrap_servers
    config = service_config(tmp_path, bootstrap, "transactions", overrides=overrides)
    produce(
        {"bootstrap.servers": bootstrap},
        config["topics"]["input"][0],
        get_dataset("transactions"),
        700,
        bad_ratio=0.05,
        seed=7,
        value_format="avro",
        registry_config={"url": schema_registry.url},
    )
    with ServiceProcess(config, tmp_path, env=SECRETS) as service:
        service.wait_metric("stream_trainer_versions_published_total", 1, timeout=90)
        service.wait_metric("stream_trainer_checkpoint_last_success_timestamp_seconds", 1)
        assert service.stop() == 0
        log = service.log_path.read_bytes()
    outputs = _files(Path(config["checkpoint"]["dir"])) + _files(Path(config["registry"]["root"]))
    blobs = [p.read_bytes() for p in outputs] + [log]
    events = read_topic(bootstrap, config["topics"]["versions"])
    dead = read_topic(bootstrap, config["topics"]["dead_letter"])
    blobs += [m.value() or b"" for m in events + dead]
    blobs += [value for m in dead for _key, value in (m.headers() or []) if value]
    print(f"avro: scanned {len(outputs)} files, the log, {len(events)} events, {len(dead)} dead")
    assert dead and events
    secret = SECRETS["STREAM_TRAINER_SCHEMA_REGISTRY__BASIC_AUTH_PASSWORD"].encode()
    assert not [i for i, blob in enumerate(blobs) if secret in blob]
