"""Object storage against a real S3 server (SeaweedFS, signed requests).

What the registry's guarantees rest on is checked on the wire first (create-only PUT,
compare-and-swap, a read-only identity), then the registry itself: publish / read / list,
a refused second publish of a version, and a serving process that shares nothing with
the trainer but the bucket and the versions topic.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import Producer

from stream_trainer.cli import main
from stream_trainer.config import ObjectStoreSettings
from stream_trainer.laptop.datasets import get_dataset
from stream_trainer.laptop.produce import produce
from stream_trainer.publishing.events import VersionEventPublisher
from stream_trainer.publishing.registry import METADATA_FILE, RegistryError, open_registry
from stream_trainer.publishing.store_registry import StoreRegistry
from stream_trainer.state.objectstore import (
    ObjectExists,
    ObjectNotFound,
    ObjectStoreError,
    PreconditionFailed,
    S3ObjectStore,
    open_store,
)
from stream_trainer.state.store_checkpoint import ObjectCheckpointStore
from stream_trainer.state.store_lease import LeaseLost, StoreLease
from stream_trainer.testing.seaweedfs import SeaweedFS
from tests.conftest import BrokerHandle, new_topic
from tests.harness import (
    HMAC_KEY,
    ServiceProcess,
    read_topic,
    service_config,
    settings_for,
    wait_for,
)
from tests.served_model import VersionModel

pytestmark = pytest.mark.integration

KEY = b"object-store-registry-key"
MODEL = "m"
ROOT = Path(__file__).resolve().parents[2]


def test_conditional_put_if_none_match_is_refused_for_an_existing_key(
    s3_server: SeaweedFS, s3_url: str, tmp_path: Path
) -> None:
    store = open_store(f"{s3_url}/p", settings_for(s3_server, tmp_path, s3_server.admin))
    store.put_if_absent("a", b"first")
    with pytest.raises(ObjectExists):
        store.put_if_absent("a", b"second")
    assert store.get("a").data == b"first"


def test_put_if_match_is_a_compare_and_swap(
    s3_server: SeaweedFS, s3_url: str, tmp_path: Path
) -> None:
    store = open_store(s3_url, settings_for(s3_server, tmp_path, s3_server.admin))
    store.put("lease", b"v1")
    seen = store.get("lease")
    store.put_if_match("lease", b"v2", seen.etag)
    with pytest.raises(PreconditionFailed):
        store.put_if_match("lease", b"v3", seen.etag)  # stale ETag: someone wrote since
    assert store.get("lease").data == b"v2"


def test_list_and_delete_under_a_prefix(s3_server: SeaweedFS, s3_url: str, tmp_path: Path) -> None:
    store = open_store(f"{s3_url}/pre", settings_for(s3_server, tmp_path, s3_server.admin))
    for key in ("d/1", "d/2", "e/1"):
        store.put(key, key.encode())
    assert [info.key for info in store.list("d/")] == ["d/1", "d/2"]
    store.delete("d/1")
    store.delete("d/missing")  # not an error
    assert [info.key for info in store.list("d/")] == ["d/2"]


def test_the_read_only_identity_reads_but_cannot_write(
    s3_server: SeaweedFS, s3_url: str, tmp_path: Path
) -> None:
    url = s3_url
    open_store(url, settings_for(s3_server, tmp_path, s3_server.admin)).put("k", b"v")
    reader = open_store(url, settings_for(s3_server, tmp_path, s3_server.reader))
    assert reader.get("k").data == b"v"
    with pytest.raises(ObjectStoreError):
        reader.put("k", b"overwritten")


def test_store_repr_and_errors_never_show_the_secret(
    s3_server: SeaweedFS, s3_url: str, tmp_path: Path
) -> None:
    store = open_store(s3_url, settings_for(s3_server, tmp_path, s3_server.admin))
    assert isinstance(store, S3ObjectStore)
    secret = s3_server.admin.secret_access_key
    assert secret not in repr(store)
    with pytest.raises(ObjectStoreError) as caught:
        store.get("../bad\x00key")
    assert secret not in str(caught.value)


def test_every_request_is_observed_and_only_store_failures_count_as_failed(
    s3_server: SeaweedFS, s3_url: str, tmp_path: Path
) -> None:
    seen: list[tuple[str, float, bool]] = []

    def observe(operation: str, seconds: float, failed: bool) -> None:
        seen.append((operation, seconds, failed))

    admin = settings_for(s3_server, tmp_path, s3_server.admin)
    store = open_store(s3_url, admin, observe)
    etag = store.put("k", b"v")
    with pytest.raises(ObjectExists):
        store.put_if_absent("k", b"again")
    store.put_if_match("k", b"v2", etag)
    with pytest.raises(ObjectNotFound):
        store.get("missing")
    store.list("")
    store.delete("k")
    reader = open_store(s3_url, settings_for(s3_server, tmp_path, s3_server.reader), observe)
    with pytest.raises(ObjectStoreError):
        reader.put("k", b"refused")
    assert [(op, failed) for op, _, failed in seen] == [
        ("put", False),
        ("put_if_absent", False),  # refused: an answer, not a failure
        ("put_if_match", False),
        ("get", False),  # missing: an answer too
        ("list", False),
        ("delete", False),
        ("put", True),  # the read-only identity: the store failed it
    ]
    assert all(0 < seconds < 30 for _, seconds, _ in seen)


# -- the registry on the store --------------------------------------------------------


def registry_on(url: str, settings: ObjectStoreSettings) -> Any:
    return open_registry(url, MODEL, KEY, keep_last=3, store_settings=settings)


def test_publish_read_and_list_through_an_s3_url(
    s3_server: SeaweedFS, s3_url: str, tmp_path: Path
) -> None:
    url = f"{s3_url}/models"
    registry = registry_on(url, settings_for(s3_server, tmp_path, s3_server.admin))
    assert isinstance(registry, StoreRegistry)
    first = registry.publish(pickle.dumps(VersionModel(1)), {"parent": None}, promote=True)
    second = registry.publish(pickle.dumps(VersionModel(2)), {"parent": 1}, promote=False)
    assert (first.version, second.version) == (1, 2)
    assert first.artifact_uri == f"{url}/{MODEL}/versions/00000001/model.pkl"

    # Another client with read access only sees the same versions and champion.
    reader = registry_on(url, settings_for(s3_server, tmp_path, s3_server.reader))
    assert [info.version for info in reader.list()] == [1, 2]
    assert reader.champion().version == 1
    assert pickle.loads(reader.load_artifact(2)).version == 2
    assert reader.get(2).metadata["artifact_sha256"] == second.metadata["artifact_sha256"]
    assert [entry["action"] for entry in reader.decisions()] == ["promote"]


def test_retention_keeps_the_champion_and_numbers_are_never_reused(
    s3_server: SeaweedFS, s3_url: str, tmp_path: Path
) -> None:
    registry = registry_on(s3_url, settings_for(s3_server, tmp_path, s3_server.admin))
    registry.publish(b"one", {}, promote=True)
    for _ in range(4):
        registry.publish(b"more", {}, promote=False)
    assert [info.version for info in registry.list()] == [1, 3, 4, 5]
    assert registry.next_version() == 6
    registry.promote(5, "manual")
    assert registry.rollback("back").version == 1


def test_a_second_publish_of_the_same_version_is_refused_and_changes_nothing(
    s3_server: SeaweedFS, s3_url: str, tmp_path: Path
) -> None:
    settings = settings_for(s3_server, tmp_path, s3_server.admin)
    url = s3_url
    registry = registry_on(url, settings)
    original = registry.publish(pickle.dumps(VersionModel(1)), {}, promote=True)

    # A writer that does not see the high-water mark (a stale view, a replay) and would
    # reuse number 1: the create-only visibility write refuses it.
    stale = registry_on(url, settings)
    stale._reserve = lambda: 1  # type: ignore[method-assign]
    with pytest.raises(RegistryError, match="refusing to overwrite"):
        stale.publish(pickle.dumps(VersionModel(666)), {}, promote=True)
    assert registry.get(1).metadata == original.metadata
    assert pickle.loads(registry.load_artifact(1)).version == 1
    assert registry.champion().version == 1


def test_a_version_is_invisible_until_its_metadata_is_written(
    s3_server: SeaweedFS, s3_url: str, tmp_path: Path
) -> None:
    """A publish killed between the artifact upload and the visibility write leaves
    nothing a reader lists, and the next publish takes a new number."""
    settings = settings_for(s3_server, tmp_path, s3_server.admin)
    url = s3_url
    store = open_store(url, settings)
    registry = registry_on(url, settings)
    registry.publish(b"v1", {}, promote=True)

    class Crash(Exception):
        pass

    real_put = store.put_if_absent

    def crash_on_metadata(key: str, data: bytes) -> str:
        if key.endswith(METADATA_FILE):
            raise Crash
        return real_put(key, data)

    crashing = StoreRegistry(store, MODEL, KEY, keep_last=3)
    store.put_if_absent = crash_on_metadata  # type: ignore[method-assign]
    with pytest.raises(Crash):
        crashing.publish(b"v2", {}, promote=True)
    assert store.get(f"{MODEL}/versions/00000002/model.pkl").data == b"v2"  # uploaded...
    assert [info.version for info in registry.list()] == [1]  # ...but not visible
    assert registry.champion().version == 1
    assert registry.publish(b"v3", {}, promote=True).version == 3


SERVE = textwrap.dedent(
    """
    import json, sys
    from stream_trainer.config import ObjectStoreSettings
    from stream_trainer.publishing.reader import ModelReader

    bootstrap, topic, endpoint, region, key = sys.argv[1:6]
    settings = ObjectStoreSettings(endpoint_url=endpoint, region=region, path_style=True)
    reader = ModelReader({"bootstrap.servers": bootstrap}, topic, "m", key.encode(),
                         store_settings=settings)
    reader.start()
    served = reader.wait_until_serving(60.0)
    print(json.dumps({"served": served, "version": reader.version,
                      "prediction": reader.predict_one({}) if served else None,
                      "failures": reader.failures}))
    reader.stop()
    """
)


def test_a_reader_sharing_only_the_bucket_and_topic_loads_the_champion(
    s3_server: SeaweedFS, s3_url: str, tmp_path: Path, tansu_broker: BrokerHandle
) -> None:
    url = f"{s3_url}/shared"
    registry = registry_on(url, settings_for(s3_server, tmp_path, s3_server.admin))
    topic = new_topic(tansu_broker, prefix="versions")
    producer = Producer({"bootstrap.servers": tansu_broker.bootstrap_servers, "acks": "all"})
    events = VersionEventPublisher(producer, topic, MODEL)
    for number, promote in ((1, True), (2, True), (3, False)):
        info = registry.publish(pickle.dumps(VersionModel(number)), {}, promote=promote)
        events.publish(info, registry)
        assert registry.event_sent(info)

    # Its own folder and environment: read-only keys from AWS_* variables, no registry
    # folder, no config file of the trainer's.
    serving_dir = tmp_path / "serving"
    serving_dir.mkdir()
    script = serving_dir / "serve.py"
    script.write_text(SERVE)
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(serving_dir),
        "PYTHONPATH": str(ROOT),
        **s3_server.reader.env(),
    }
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            tansu_broker.bootstrap_servers,
            topic,
            s3_server.endpoint_url,
            s3_server.region,
            KEY.decode(),
        ],
        cwd=serving_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome == {"served": True, "version": 2, "prediction": 2, "failures": 0}

    # The shipped example, the same way: a prediction line per input line.
    example = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "serve_reader.py"),
            "--bootstrap-servers",
            tansu_broker.bootstrap_servers,
            "--topic",
            topic,
            "--model",
            MODEL,
            "--s3-endpoint",
            s3_server.endpoint_url,
            "--s3-region",
            s3_server.region,
            "--s3-path-style",
            "--wait-s",
            "60",
        ],
        input="{}\n",
        cwd=serving_dir,
        env={**env, "STREAM_TRAINER_REGISTRY_KEY": KEY.decode()},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert example.returncode == 0, example.stderr[-2000:]
    assert json.loads(example.stdout.strip().splitlines()[-1]) == {"version": 2, "prediction": 2}


def cli_config(tmp_path: Path, server: SeaweedFS, registry_root: str, checkpoint_dir: str) -> Path:
    """A config file for the CLI against ``server`` (keys from the environment)."""
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "kafka": {"bootstrap_servers": "127.0.0.1:9", "group_id": "g"},
                "topics": {"input": ["in"], "dead_letter": "dlq", "versions": "v"},
                "record": {"features": ["a"], "labels": [0, 1]},
                "model": {
                    "name": MODEL,
                    "task": "binary_classification",
                    "learner": {"path": "river.linear_model.LogisticRegression"},
                },
                "training": {"mode": "per_record"},
                "checkpoint": {"dir": checkpoint_dir},
                "registry": {"root": registry_root},
                "object_store": {
                    "endpoint_url": server.endpoint_url,
                    "region": server.region,
                    "path_style": True,
                },
            }
        )
    )
    return config


def test_cli_versions_lists_and_shows_an_s3_registry_with_read_only_keys(
    s3_server: SeaweedFS,
    s3_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    registry = registry_on(s3_url, settings_for(s3_server, tmp_path, s3_server.admin))
    registry.publish(b"one", {"parent_version": None}, promote=True)
    registry.publish(b"two", {"parent_version": 1}, promote=False)

    config = cli_config(tmp_path, s3_server, s3_url, str(tmp_path / "checkpoints"))
    monkeypatch.setenv("STREAM_TRAINER_CHECKPOINT__HMAC_KEY", KEY.decode())
    for name, value in s3_server.reader.env().items():
        monkeypatch.setenv(name, value)

    assert main(["versions", "list", "--config", str(config)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(row["version"], row["champion"]) for row in rows] == [(1, True), (2, False)]
    assert main(["versions", "show", "2", "--config", str(config)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["path"] == f"{s3_url}/{MODEL}/versions/00000002"
    assert shown["artifact_sha256"] == registry.get(2).metadata["artifact_sha256"]
    # Promoting needs write access: the read-only keys are refused, nothing changes.
    assert main(["versions", "promote", "2", "--config", str(config)]) != 0
    assert "stream-trainer:" in capsys.readouterr().err
    assert registry.champion().version == 1


# -- the lease and fencing on the real server -------------------------------------------

SECOND_NODE = textwrap.dedent(
    """
    import sys
    from stream_trainer.config import ObjectStoreSettings
    from stream_trainer.state.objectstore import open_store
    from stream_trainer.state.store_lease import LeaseHeld, StoreLease

    url, endpoint, region = sys.argv[1:4]
    store = open_store(url, ObjectStoreSettings(endpoint_url=endpoint, region=region,
                                                path_style=True))
    try:
        StoreLease(store, "m/LEASE", "node-b", ttl_s=30).acquire()
    except LeaseHeld as error:
        print(error)
        sys.exit(3)
    print("acquired")
    """
)


def test_a_second_writer_on_another_node_is_refused_by_the_lease(
    s3_server: SeaweedFS, s3_url: str, tmp_path: Path
) -> None:
    store = open_store(s3_url, settings_for(s3_server, tmp_path, s3_server.admin))
    lease = StoreLease(store, "m/LEASE", "node-a", ttl_s=30)
    assert lease.acquire() == 1
    node_b = tmp_path / "node-b"
    node_b.mkdir()
    (node_b / "second.py").write_text(SECOND_NODE)
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(node_b), "PYTHONPATH": str(ROOT)}
    run = [sys.executable, "second.py", s3_url, s3_server.endpoint_url, s3_server.region]
    refused = subprocess.run(
        run,
        cwd=node_b,
        env={**env, **s3_server.admin.env()},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert "node-a" in refused.stdout
    lease.release()
    taken = subprocess.run(
        run,
        cwd=node_b,
        env={**env, **s3_server.admin.env()},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert taken.returncode == 0, taken.stdout + taken.stderr
    with pytest.raises(LeaseLost):
        lease.renew()


def test_a_stale_writer_is_fenced_on_the_real_server(
    s3_server: SeaweedFS, s3_url: str, tmp_path: Path
) -> None:
    settings = settings_for(s3_server, tmp_path, s3_server.admin)
    clock = [1000.0]
    store = open_store(s3_url, settings)
    old_lease = StoreLease(store, "m/LEASE", "node-a", ttl_s=30, clock=lambda: clock[0])
    old_lease.acquire()
    old = StoreRegistry(store, MODEL, KEY, keep_last=5, lease=old_lease)
    old.publish(b"one", {}, promote=True)
    clock[0] += 31
    new_lease = StoreLease(
        open_store(s3_url, settings), "m/LEASE", "node-b", ttl_s=30, clock=lambda: clock[0]
    )
    assert new_lease.acquire() == 2
    new = StoreRegistry(open_store(s3_url, settings), MODEL, KEY, keep_last=5, lease=new_lease)
    new.publish(b"two", {}, promote=True)
    with pytest.raises(RegistryError, match="fenced"):
        old.publish(b"stale", {}, promote=True)
    assert [info.version for info in new.list()] == [1, 2]
    assert new.champion().version == 2  # type: ignore[union-attr]


# -- the running service publishing to the bucket ---------------------------------------


def test_the_service_publishes_versions_to_s3_across_a_restart(
    s3_server: SeaweedFS, s3_url: str, tmp_path: Path, tansu_broker: BrokerHandle
) -> None:
    config = service_config(
        tmp_path,
        tansu_broker.bootstrap_servers,
        "phishing",
        overrides={
            "registry": {"root": s3_url, "publish_every_records": 400},
            "object_store": {
                "endpoint_url": s3_server.endpoint_url,
                "region": s3_server.region,
                "path_style": True,
            },
            "kafka": {"consume_batch_size": 200},
        },
    )
    bootstrap = {"bootstrap.servers": tansu_broker.bootstrap_servers}
    topic = config["topics"]["input"][0]
    produce(bootstrap, topic, get_dataset("phishing"), 900, seed=1)
    env = s3_server.admin.env()  # keys from the environment, as from a pod's Secret
    with ServiceProcess(config, tmp_path, env=env) as service:
        service.wait_metric("stream_trainer_records_learnt_total", 900)
        service.wait_metric("stream_trainer_versions_published_total", 2)
        assert service.stop() == 0
    registry = open_registry(
        s3_url,
        config["model"]["name"],
        HMAC_KEY.encode(),
        keep_last=100,
        store_settings=settings_for(s3_server, tmp_path, s3_server.reader),
    )
    first_run = [info.version for info in registry.list()]
    assert first_run == list(range(1, len(first_run) + 1)) and len(first_run) >= 2

    produce(bootstrap, topic, get_dataset("phishing"), 900, seed=2)
    with ServiceProcess(config, tmp_path, env=env, name="second") as service:
        service.wait_metric("stream_trainer_records_learnt_total", 900)
        wait_for(lambda: len(registry.list()) > len(first_run), 60, "a version after restart")
        assert service.stop() == 0
    versions = registry.list()
    numbers = [info.version for info in versions]
    assert numbers[: len(first_run)] == first_run and numbers == sorted(set(numbers))
    # Each run held the registry's lease (released at its stop) and stamped its token.
    lease = json.loads(
        open_store(s3_url, settings_for(s3_server, tmp_path, s3_server.reader))
        .get(f"{config['model']['name']}/LEASE")
        .data
    )
    assert (lease["token"], lease["expires_at"]) == (2, 0.0)
    tokens = {info.version: info.metadata["writer_token"] for info in versions}
    assert {tokens[n] for n in first_run} == {1} and tokens[numbers[-1]] == 2
    assert versions[-1].metadata["parent_version"] is not None
    registry.load_artifact(numbers[-1])  # sha256 + HMAC verify with read-only keys

    events = [
        json.loads(m.value())
        for m in read_topic(
            tansu_broker.bootstrap_servers, config["topics"]["versions"], expected=len(numbers)
        )
    ]
    assert sorted({e["version"] for e in events}) == numbers
    for event in events:
        assert event["artifact_uri"] == (
            f"{s3_url}/{config['model']['name']}/versions/{event['version']:08d}/model.pkl"
        )
        assert event["metadata"]["artifact_sha256"]


def test_cli_checkpoint_inspect_reads_an_s3_prefix_with_read_only_keys(
    s3_server: SeaweedFS,
    s3_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"{s3_url}/checkpoints"
    writer = ObjectCheckpointStore(
        open_store(url, settings_for(s3_server, tmp_path, s3_server.admin)), KEY, False, 10
    )
    writer.load_latest()
    for n in (1, 2):
        writer.write(
            writer.serialize({"n": n}),
            {
                "offsets": {"in:0": 100 * n},
                "model_version": None,
                "config_hash": "c" * 64,
                "records_learnt": 100 * n,
                "metrics": {},
                "extra": {},
            },
        )
    config = cli_config(tmp_path, s3_server, s3_url, url)
    monkeypatch.setenv("STREAM_TRAINER_CHECKPOINT__HMAC_KEY", KEY.decode())
    for name, value in s3_server.reader.env().items():
        monkeypatch.setenv(name, value)

    assert main(["checkpoint", "inspect", "--config", str(config), "--all"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(row["manifest"]["sequence"], row["verification"]) for row in rows] == [
        (1, "ok"),
        (2, "ok"),
    ]
    assert rows[1]["path"] == f"{url}/ckpt-000000000002.ckpt"
    assert rows[1]["manifest"]["offsets"] == {"in:0": 200}
    one = f"{url}/ckpt-000000000001.ckpt"
    assert main(["checkpoint", "inspect", "--config", str(config), one]) == 0
    assert [row["path"] for row in json.loads(capsys.readouterr().out)] == [one]
    # The read-only identity cannot have changed anything: both are still there.
    assert len(writer.list()) == 2
