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

partition-scope.yaml (one model per partition) walks the same path with what that scope
needs: its input topic gets the 3 partitions ``topics create`` gives an input topic by
default, the records are keyed and produced with the murmur2 partitioner the config
declares, checkpoints and versions must be in the per-partition slots (not the global
layout), and ``serve_reader.py --scope partition`` answers each key with its slot's version.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import Producer

from stream_trainer.config import Settings, load_settings
from stream_trainer.laptop import service_process
from stream_trainer.laptop.embedded import free_port
from stream_trainer.publishing.partitioner import partition_for
from stream_trainer.publishing.registry import open_registry
from stream_trainer.publishing.scoped_versions import scope_prefix
from stream_trainer.state.objectstore import is_store_url, open_store
from stream_trainer.state.slot_store import SlotStore
from stream_trainer.state.store_checkpoint import ObjectCheckpointStore
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
    # One model per partition, both stores in the bucket as for object-storage.
    "partition-scope": (600, {"STREAM_TRAINER_REGISTRY__PUBLISH_EVERY_SECONDS": "2"}),
}
# Keys of the keyed (partition-scope) records: enough to reach every partition.
KEYS = [f"account-{i}" for i in range(40)]
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
    features: list[dict[str, Any]],
    cwd: Path,
    env: dict[str, str] | None = None,
    scope: str = "global",
) -> list[dict[str, Any]]:
    """Predictions of ``examples/serve_reader.py`` for ``features`` (one JSON line each:
    feature objects, or ``{"key", "features"}`` objects with ``scope`` partition);
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
            *(["--scope", scope] if scope != "global" else []),
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


def _produce(
    bootstrap: str, topic: str, values: list[bytes], partitioner: str | None = None
) -> None:
    """``values`` to ``topic``; with ``partitioner`` (librdkafka's name) keyed by ``KEYS``
    in turn, placed by that partitioner as a production producer would."""
    conf: dict[str, Any] = {"bootstrap.servers": bootstrap, "enable.idempotence": True}
    if partitioner is not None:
        conf["partitioner"] = partitioner
    producer = Producer(conf)
    for i, value in enumerate(values):
        if partitioner is None:
            producer.produce(topic, value)
        else:
            producer.produce(topic, value, key=KEYS[i % len(KEYS)].encode())
    assert producer.flush(30) == 0


def _slot_heads(settings: Settings, topic: str, partitions: int) -> dict[str, str]:
    """Each partition slot's head checkpoint (scope id -> its object name), read only:
    the MANIFEST under ``<checkpoint.dir>/partition/<topic>/<p>/``."""
    store = open_store(str(settings.checkpoint.dir), settings.object_store)
    heads = {}
    for p in range(partitions):
        scope_id = f"{topic}:{p}"
        slot = SlotStore(store, "partition", scope_id, "test", HMAC_KEY.encode(), False, 5)
        manifest = slot.read().manifest
        if manifest is not None and manifest.head is not None:
            heads[scope_id] = manifest.head
    return heads


def _slot_versions(settings: Settings, topic: str, partitions: int) -> dict[str, set[int]]:
    """Each partition slot's published versions (scope id -> numbers), slots with none
    left out: ``<registry.root>/<model>/partition/<topic>/<p>/versions/``."""
    found = {}
    for p in range(partitions):
        scope_id = f"{topic}:{p}"
        registry = open_registry(
            settings.registry.root,
            settings.model.name,
            HMAC_KEY.encode(),
            100,
            settings.object_store,
            folder=scope_prefix(settings.model.name, "partition", scope_id),
        )
        numbers = {v.version for v in registry.list()}
        if numbers:
            found[scope_id] = numbers
    return found


def _check_partition_scope(
    settings: Settings, bootstrap: str, topic: str, count: int, cwd: Path, env: dict[str, str]
) -> None:
    """After a partition-scope run of ``count`` records keyed by ``KEYS`` in turn:
    checkpoints and versions per slot, none in the global layout, each slot learnt exactly
    the records whose key murmur2 places in its partition, and the example reader answers
    each key with its slot's version."""
    partitions = 3

    def slot_of(key: str) -> str:
        return f"{topic}:{partition_for('murmur2', key.encode(), partitions)}"

    per_slot = Counter(slot_of(KEYS[i % len(KEYS)]) for i in range(count))
    heads = _slot_heads(settings, topic, partitions)
    slot_versions = _slot_versions(settings, topic, partitions)
    print(f"partition-scope: checkpoint heads {heads}, versions {slot_versions}")
    assert set(heads) == set(per_slot), "a partition that got records has no checkpoint slot"
    assert slot_versions and set(slot_versions) <= set(per_slot)
    # Each slot's head verifies and, after the stop's final checkpoints, holds what the
    # producer's murmur2 placed in its partition: the routing readers use is the producers'.
    store = open_store(str(settings.checkpoint.dir), settings.object_store)
    for scope_id, expected in per_slot.items():
        slot = SlotStore(store, "partition", scope_id, "test", HMAC_KEY.encode(), False, 5)
        loaded = slot.read_head()
        assert loaded is not None, scope_id
        assert loaded.state.records_learnt == expected, scope_id
    global_versions = open_registry(
        settings.registry.root, settings.model.name, HMAC_KEY.encode(), 100, settings.object_store
    ).list()
    assert not global_versions, "a partition-scope run published in the global layout"
    stored = [key.key for key in store.list("")]
    assert stored and all(key.startswith("partition/") for key in stored), stored

    # A key of every partition first (so every slot is asked), then a few more.
    one_per_slot: dict[str, str] = {}
    for key in KEYS:
        one_per_slot.setdefault(slot_of(key), key)
    keys = sorted(one_per_slot.values()) + KEYS[:3]
    names = settings.record.feature_names
    lines = [
        {"key": k, "features": dict.fromkeys(names, 0.2 * (i + 1))} for i, k in enumerate(keys)
    ]
    answers = _read_with_example_reader(settings, bootstrap, lines, cwd, env, "partition")
    print(f"serve_reader --scope partition: {answers}")
    assert [a["key"] for a in answers] == keys
    for answer in answers:
        scope_id = slot_of(answer["key"])
        assert answer["slot"] == scope_id, answer
        if scope_id in slot_versions:
            assert answer["version"] in slot_versions[scope_id], answer
            assert answer["prediction"] is not None, answer
        else:  # a slot that published nothing yet says so, and serving goes on
            assert answer["version"] is None and answer["error"], answer
    assert any(a["version"] is not None for a in answers)


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
    raw = yaml.safe_load(shipped.read_text())
    scoped = raw["model"].get("scope") == "partition"
    if raw["topics"].get("control"):  # partition scope runs without one
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
        "STREAM_TRAINER_HTTP__HOST": "127.0.0.1",
        "STREAM_TRAINER_HTTP__PORT": str(port),
    }
    if "control" in topics:
        env["STREAM_TRAINER_TOPICS__CONTROL"] = topics["control"]
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
    if scoped:
        # A model per partition needs several: the CLI's default for an input topic is 3.
        input_line = next(line.split() for line in created.splitlines() if " input " in line)
        assert input_line[2:] == [topics["input"], "3", "partitions"], created
        # Keyed, placed as the config's routing.partitioner says (librdkafka's murmur2).
        assert settings.routing.partitioner == "murmur2"
    _produce(
        bootstrap,
        topics["input"],
        _records(settings, count, seed=1),
        "murmur2_random" if scoped else None,
    )

    with ConfigFileProcess(config_path, cwd, env, port) as service:
        service.wait_metric("stream_trainer_records_learnt_total", count, timeout=90)
        service.wait_metric("stream_trainer_versions_published_total", 1, timeout=90)
        service.wait_metric("stream_trainer_checkpoint_last_success_timestamp_seconds", 1)
        if scoped:
            wait_for(lambda: _slot_heads(settings, topics["input"], 3), 60, "a slot MANIFEST")
        assert service.alive()
        assert service.stop() == 0, service.tail()
    assert not list(cwd.glob("var")), "relative paths resolved against the working directory"
    if scoped:
        _check_partition_scope(settings, bootstrap, topics["input"], count, cwd, bucket_keys)
    else:
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
