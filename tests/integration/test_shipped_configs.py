"""``stream-trainer run`` with every shipped config, against real brokers.

Each config file is copied byte for byte into a folder of its own and run from another
working directory, so relative paths must resolve against the config's folder. The
environment overrides only what a test broker needs:

- the connection: bootstrap servers, a fresh consumer group, fresh topics, a free HTTP port,
  and PLAINTEXT instead of SASL_SSL for per-record.yaml (its secrets still come from the
  environment, as in production);
- the production configs' absolute /data paths, which a test cannot write;
- publish / retrain intervals too long for a test: per-record.yaml publishes every 600 s
  (here 2 s), mini-batch.yaml every 100 000 records (here 1000), full-batch.yaml retrains
  (and so publishes) every 10 000 records (here 200).

Each case walks the README's "Run against your Kafka" path as a user types it:
``validate-config``, ``topics create --config`` (the topics come from the CLI, not from the
test), ``run``, then ``examples/serve_reader.py`` reads the published version from the
versions topic and predicts with it. The run must learn every record, write a checkpoint
and publish a version without exiting, then start again on the same files and stop cleanly.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import Producer

from stream_trainer.config import Settings, load_settings
from stream_trainer.laptop import service_process
from stream_trainer.laptop.embedded import free_port
from stream_trainer.objectstore import is_store_url, open_store
from stream_trainer.registry import open_registry
from stream_trainer.store_checkpoint import ObjectCheckpointStore
from stream_trainer.testing.seaweedfs import SeaweedFS
from tests.conftest import BrokerHandle
from tests.harness import HMAC_KEY, ServiceProcess, unique, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SERVE_READER = ROOT / "examples" / "serve_reader.py"
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SECRETS = {
    "STREAM_TRAINER_CHECKPOINT__HMAC_KEY": HMAC_KEY,
    "STREAM_TRAINER_KAFKA__SASL_PASSWORD": "test-sasl-password",
}
# (records to produce, env overrides beyond the connection) per config.
PLAN: dict[str, tuple[int, dict[str, str]]] = {
    "local": (600, {}),
    "demo-mini-batch": (600, {}),
    "demo-full-batch": (600, {}),
    "per-record": (
        600,
        {
            "STREAM_TRAINER_KAFKA__SECURITY_PROTOCOL": "PLAINTEXT",
            "STREAM_TRAINER_REGISTRY__PUBLISH_EVERY_SECONDS": "2",
        },
    ),
    # Four candidates learning side by side; the leader is published.
    "per-record-selection": (
        600,
        {
            "STREAM_TRAINER_KAFKA__SECURITY_PROTOCOL": "PLAINTEXT",
            "STREAM_TRAINER_REGISTRY__PUBLISH_EVERY_SECONDS": "2",
        },
    ),
    "mini-batch": (1200, {"STREAM_TRAINER_REGISTRY__PUBLISH_EVERY_RECORDS": "1000"}),
    "full-batch": (600, {"STREAM_TRAINER_TRAINING__FULL_BATCH__RETRAIN_EVERY_RECORDS": "200"}),
    # Checkpoints and versions in a bucket: the test's SeaweedFS stands in for it.
    "object-storage": (600, {"STREAM_TRAINER_REGISTRY__PUBLISH_EVERY_SECONDS": "2"}),
}
# Each config once (a case costs ~15-25 s on Apache Kafka, ~40 s on Tansu): what a case
# proves is the config file (paths, record contract, learner, publish, restart). Apache
# Kafka for all but demo-mini-batch.yaml, which runs on Tansu, the embedded broker `demo`
# uses, so the README path is still walked on both brokers.
TANSU_CONFIGS = {"demo-mini-batch"}
CASES = [(p.stem, "tansu" if p.stem in TANSU_CONFIGS else "kafka") for p in CONFIGS]


class ConfigFileProcess(ServiceProcess):
    """``stream-trainer run --config <file>`` on a config file as it is (no rewrite)."""

    def __init__(self, config_path: Path, cwd: Path, env: dict[str, str], port: int) -> None:
        self.config = {}
        service_process.ServiceProcess.__init__(
            self,
            config_path,
            port=port,
            log_path=cwd / f"{config_path.stem}.log",
            workdir=cwd,
            env=env,
        )


def _records(settings: Settings, count: int, seed: int) -> list[bytes]:
    """Valid records for the config's record contract (learnable: the label follows f0)."""
    record = settings.record
    rng = random.Random(seed)
    out = []
    for i in range(count):
        features = {name: rng.random() for name in record.feature_names}
        first = features[record.feature_names[0]]
        label: Any = first * 10.0 + rng.random()
        if record.labels:
            label = record.labels[int(first > 0.5)]
        value: dict[str, Any] = (
            dict(features) if record.features_field is None else {record.features_field: features}
        )
        value[record.label_field] = label
        if record.id_field:
            value[record.id_field] = f"r{seed}-{i}"
        if record.event_time_field:
            value[record.event_time_field] = 1_700_000_000_000 + i
        out.append(json.dumps(value).encode())
    return out


def _cli(args: list[str], env: dict[str, str], cwd: Path, stdin: str = "") -> str:
    """``stream-trainer ARGS`` as a user runs it; returns stdout, fails the test on exit != 0."""
    done = subprocess.run(
        [sys.executable, "-m", "stream_trainer", *args],
        env={**os.environ, **env},
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"stream-trainer {' '.join(args)}: {done.stderr[-2000:]}"
    return done.stdout


def _read_with_example_reader(
    settings: Settings,
    bootstrap: str,
    features: list[dict[str, float]],
    cwd: Path,
    env: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Predictions of ``examples/serve_reader.py`` for ``features`` (one JSON line each);
    ``env`` adds to its environment (a bucket's keys)."""
    store = settings.object_store
    s3 = (
        ["--s3-endpoint", store.endpoint_url or "", "--s3-region", store.region or ""]
        + (["--s3-path-style"] if store.path_style else [])
        if is_store_url(str(settings.registry.root))
        else []
    )
    done = subprocess.run(
        [
            sys.executable,
            str(SERVE_READER),
            "--bootstrap-servers",
            bootstrap,
            "--topic",
            settings.topics.versions,
            "--model",
            settings.model.name,
            "--wait-s",
            "60",
            *s3,
        ],
        env={**os.environ, **(env or {}), "STREAM_TRAINER_REGISTRY_KEY": HMAC_KEY},
        cwd=cwd,
        input="".join(json.dumps(f) + "\n" for f in features),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for value in values:
        producer.produce(topic, value)
    assert producer.flush(30) == 0


@pytest.mark.parametrize(("config", "broker_name"), CASES, ids=[f"{c}-{b}" for c, b in CASES])
def test_run_with_shipped_config_learns_checkpoints_and_publishes(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    config: str,
    broker_name: str,
) -> None:
    broker: BrokerHandle = request.getfixturevalue(f"{broker_name}_broker")
    bootstrap = broker.bootstrap_servers
    shipped = ROOT / "configs" / f"{config}.yaml"
    folder, cwd = tmp_path / "configs", tmp_path / "cwd"
    folder.mkdir()
    cwd.mkdir()
    config_path = folder / shipped.name
    shutil.copyfile(shipped, config_path)
    count, overrides = PLAN[config]

    name = unique(config)
    topics = {"input": name, "dead_letter": f"{name}.dlq", "versions": f"{name}.versions"}
    topics["control"] = f"{name}.control"
    port = free_port()
    env = {
        **SECRETS,
        **overrides,
        "STREAM_TRAINER_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "STREAM_TRAINER_KAFKA__GROUP_ID": unique("group"),
        "STREAM_TRAINER_TOPICS__INPUT": json.dumps([topics["input"]]),
        "STREAM_TRAINER_TOPICS__DEAD_LETTER": topics["dead_letter"],
        "STREAM_TRAINER_TOPICS__VERSIONS": topics["versions"],
        "STREAM_TRAINER_TOPICS__CONTROL": topics["control"],
        "STREAM_TRAINER_HTTP__HOST": "127.0.0.1",
        "STREAM_TRAINER_HTTP__PORT": str(port),
    }
    raw = yaml.safe_load(shipped.read_text())
    bucket_keys: dict[str, str] = {}
    remote = is_store_url(str(raw["registry"]["root"]))
    if remote:
        # The shipped bucket and endpoint stand for the user's; the test's server replaces them.
        server: SeaweedFS = request.getfixturevalue("s3_server")
        prefix = f"s3://{server.bucket}/{unique(config)}"
        bucket_keys = server.admin.env()
        env.update(
            {
                **bucket_keys,
                "STREAM_TRAINER_CHECKPOINT__DIR": f"{prefix}/checkpoints",
                "STREAM_TRAINER_REGISTRY__ROOT": f"{prefix}/models",
                "STREAM_TRAINER_OBJECT_STORE__ENDPOINT_URL": server.endpoint_url,
                "STREAM_TRAINER_OBJECT_STORE__REGION": server.region,
            }
        )
        for name, value in bucket_keys.items():  # this process reads the bucket too
            monkeypatch.setenv(name, value)
    elif Path(raw["registry"]["root"]).is_absolute():
        # A production path (/data/...): the only place a test cannot write.
        env["STREAM_TRAINER_CHECKPOINT__DIR"] = str(tmp_path / "data" / "checkpoints")
        env["STREAM_TRAINER_REGISTRY__ROOT"] = str(tmp_path / "data" / "registry")
    settings = load_settings(config_path, env=env)
    # README step 1: check the config (secrets masked in what it prints).
    effective = _cli(["validate-config", "--config", str(config_path)], env, cwd)
    assert json.loads(effective)["model"]["name"] == settings.model.name
    assert HMAC_KEY not in effective and SECRETS["STREAM_TRAINER_KAFKA__SASL_PASSWORD"] not in (
        effective
    )
    # README step 2: the topics come from the CLI, with its defaults.
    created = _cli(["topics", "create", "--config", str(config_path)], env, cwd)
    print(created.strip())
    _produce(bootstrap, topics["input"], _records(settings, count, seed=1))

    with ConfigFileProcess(config_path, cwd, env, port) as service:
        service.wait_metric("stream_trainer_records_learnt_total", count, timeout=90)
        service.wait_metric("stream_trainer_versions_published_total", 1, timeout=90)
        service.wait_metric("stream_trainer_checkpoint_last_success_timestamp_seconds", 1)
        assert service.alive()
        assert service.stop() == 0, service.tail()
    registry = open_registry(
        settings.registry.root,
        settings.model.name,
        HMAC_KEY.encode(),
        100,
        settings.object_store,
    )
    versions = registry.list()
    checkpoints = (
        ObjectCheckpointStore(
            open_store(str(settings.checkpoint.dir), settings.object_store), None, True, 100
        ).list()
        if remote
        else sorted(Path(settings.checkpoint.dir).glob("*.ckpt"))
    )
    print(
        f"{config} on {broker_name}: {count} records learnt, {len(versions)} version(s), "
        f"{len(checkpoints)} checkpoint(s) under {settings.checkpoint.dir}"
    )
    assert versions and checkpoints
    if not remote and not Path(raw["checkpoint"]["dir"]).is_absolute():
        assert settings.checkpoint.dir == folder / raw["checkpoint"]["dir"]
        assert settings.registry.root == folder / raw["registry"]["root"]
    assert not list(cwd.glob("var")), "relative paths resolved against the working directory"

    # A serving system: the example reader loads the published champion and predicts.
    features = [dict.fromkeys(settings.record.feature_names, 0.25 * (i + 1)) for i in range(3)]
    predictions = _read_with_example_reader(settings, bootstrap, features, cwd, bucket_keys)
    print(f"serve_reader: {predictions}")
    assert len(predictions) == len(features)
    assert all(p["version"] in {v.version for v in versions} for p in predictions)
    assert all(p["prediction"] is not None for p in predictions)

    # A restart on the same files: ready again, exits cleanly.
    with ConfigFileProcess(config_path, cwd, env, port) as again:
        again.wait_metric("stream_trainer_ready", 1, timeout=90)
        wait_for(lambda: again.metric("stream_trainer_assigned_partitions") >= 1, 60, "assign")
        assert again.stop() == 0, again.tail()
