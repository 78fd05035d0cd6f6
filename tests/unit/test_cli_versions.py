"""``stream-trainer versions``: show, promote and rollback against a registry on disk."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from stream_trainer.cli import EXIT_FAILURE, EXIT_OK, main
from stream_trainer.publishing.registry import ModelRegistry
from stream_trainer.publishing.routing_file import write_routing
from stream_trainer.publishing.scoped_versions import Routing, scope_prefix

KEY = "cli-versions-test-key"


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("STREAM_TRAINER_CHECKPOINT__HMAC_KEY", KEY)
    path = tmp_path / "config.yaml"
    data: dict[str, Any] = {
        "kafka": {"bootstrap_servers": "127.0.0.1:9", "group_id": "g"},
        "topics": {"input": ["in"], "dead_letter": "dlq", "versions": "v"},
        "record": {"features": ["a"], "labels": [0, 1]},
        "model": {
            "name": "m",
            "task": "binary_classification",
            "learner": {"path": "river.linear_model.LogisticRegression"},
        },
        "training": {"mode": "per_record"},
        "checkpoint": {"dir": str(tmp_path / "checkpoints")},  # key from the environment
        "registry": {"root": str(tmp_path / "registry")},
    }
    path.write_text(yaml.safe_dump(data))
    return path


def registry(config: Path) -> ModelRegistry:
    return ModelRegistry(config.parent / "registry", "m", KEY.encode(), keep_last=10)


def publish(config: Path, count: int) -> ModelRegistry:
    reg = registry(config)
    for n in range(1, count + 1):
        reg.publish(f"artifact-{n}".encode(), {"parent_version": n - 1 or None}, promote=True)
    return reg


def flip_byte(reg: ModelRegistry, version: int) -> None:
    path = reg.get(version).artifact_path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def versions(config: Path, *words: str) -> int:
    return main(["versions", *words, "--config", str(config)])


def test_show_says_which_version_is_the_champion_now(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    publish(config, 3)  # each was champion when published; 3 is the champion now
    shown = {}
    for n in (1, 2, 3):
        capsys.readouterr()
        assert versions(config, "show", str(n)) == EXIT_OK
        shown[n] = json.loads(capsys.readouterr().out)
    print({n: (s["champion"], s["champion_when_published"]) for n, s in shown.items()})
    assert [shown[n]["champion"] for n in (1, 2, 3)] == [False, False, True]
    assert all(shown[n]["champion_when_published"] is True for n in (1, 2, 3))


def rewrite_sha(reg: ModelRegistry, version: int) -> None:
    """Make the metadata's sha256 match the damaged artifact: only the HMAC catches it."""
    info = reg.get(version)
    metadata = dict(info.metadata)
    metadata["artifact_sha256"] = hashlib.sha256(info.artifact_path.read_bytes()).hexdigest()
    (info.path / "metadata.json").write_text(json.dumps(metadata))


@pytest.mark.parametrize("caught_by", ["sha256", "HMAC"])
def test_promote_refuses_a_damaged_version(
    config: Path, capsys: pytest.CaptureFixture[str], caught_by: str
) -> None:
    reg = publish(config, 2)
    flip_byte(reg, 1)
    if caught_by == "HMAC":
        rewrite_sha(reg, 1)
    capsys.readouterr()
    code = versions(config, "promote", "1")
    captured = capsys.readouterr()
    print(captured.err)
    assert code == EXIT_FAILURE
    assert "refusing to promote to version 1" in captured.err and caught_by in captured.err
    assert "now the champion" not in captured.out
    assert reg.champion().version == 2  # type: ignore[union-attr]
    assert [d["action"] for d in reg.decisions()] == ["promote", "promote"]


def test_rollback_refuses_a_damaged_previous_champion(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reg = publish(config, 2)
    flip_byte(reg, 1)
    capsys.readouterr()
    code = versions(config, "rollback")
    captured = capsys.readouterr()
    print(captured.err)
    assert code == EXIT_FAILURE
    assert "refusing to roll back to version 1" in captured.err and "sha256" in captured.err
    assert reg.champion().version == 2  # type: ignore[union-attr]
    assert [d["action"] for d in reg.decisions()] == ["promote", "promote"]


# -- a slot of a scoped model (--slot) ------------------------------------------------------


def scoped_slot(config: Path, scope_id: str, count: int) -> ModelRegistry:
    """``count`` versions of slot ``scope_id`` of model m (partition scope), and m's
    ROUTING.json, as the trainer's ScopedPublishing leaves them."""
    root = config.parent / "registry"
    write_routing(root, "m", "partition", Routing("kafka_key", "murmur2", 4, "orders"))
    folder = scope_prefix("m", "partition", scope_id)
    reg = ModelRegistry(root, "m", KEY.encode(), keep_last=10, folder=folder)
    for n in range(1, count + 1):
        reg.publish(f"slot-{n}".encode(), {"scope_id": scope_id}, promote=True)
    return reg


def test_slot_commands_act_on_the_slots_own_registry(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    publish(config, 1)  # the model's global registry: not what --slot reads
    scoped_slot(config, "orders:2", 3)
    assert versions(config, "list", "--slot", "orders:2") == EXIT_OK
    rows = json.loads(capsys.readouterr().out)
    assert [(r["version"], r["champion"]) for r in rows] == [(1, False), (2, False), (3, True)]
    assert versions(config, "show", "2", "--slot", "orders:2") == EXIT_OK
    shown = json.loads(capsys.readouterr().out)
    assert (shown["model_name"], shown["scope_id"]) == ("m", "orders:2")
    assert shown["path"].endswith("/m/partition/orders/2/versions/00000002")


def test_a_damaged_slot_version_is_refused_before_anything_is_announced(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reg = scoped_slot(config, "orders:1", 2)
    flip_byte(reg, 1)
    # Refused by the registry before the event: no broker is reached (there is none).
    assert versions(config, "rollback", "--slot", "orders:1") == EXIT_FAILURE
    assert "refusing to roll back to version 1" in capsys.readouterr().err
    assert reg.champion() is not None and reg.champion().version == 2  # type: ignore[union-attr]


def test_slot_needs_a_scoped_model_and_a_scope_id_of_its_scope(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    publish(config, 1)
    assert versions(config, "list", "--slot", "orders:0") == EXIT_FAILURE
    assert "no m/ROUTING.json" in capsys.readouterr().err
    scoped_slot(config, "orders:0", 1)
    assert versions(config, "list", "--slot", "not-a-partition") == EXIT_FAILURE
    assert "partition scope id must be '<topic>:<p>'" in capsys.readouterr().err
