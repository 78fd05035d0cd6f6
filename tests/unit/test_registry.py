"""ModelRegistry: atomic publish, monotonic numbers, retention, decisions, verification."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stream_trainer.publishing.registry import ModelRegistry, RegistryError, VersionInfo

KEY = b"registry-test-key"


def make(root: Path, keep_last: int = 10, key: bytes | None = KEY) -> ModelRegistry:
    return ModelRegistry(root, "m", key, keep_last)


def publish(registry: ModelRegistry, n: int, promote: bool = True) -> VersionInfo:
    return registry.publish(f"artifact-{n}".encode(), {"parent_version": None, "n": n}, promote)


def test_publish_writes_artifact_and_metadata(tmp_path: Path) -> None:
    registry = make(tmp_path)
    info = registry.publish(b"abc", {"offsets": {"t:0": [0, 10]}, "score": float("nan")}, True)
    assert info.version == 1
    assert info.path == tmp_path / "m" / "versions" / "00000001"
    on_disk = json.loads((info.path / "metadata.json").read_bytes())
    assert on_disk == info.metadata
    assert on_disk["version"] == 1 and on_disk["model_name"] == "m"
    assert on_disk["champion"] is True
    assert on_disk["offsets"] == {"t:0": [0, 10]}
    assert on_disk["score"] is None  # JSON has no NaN
    assert len(on_disk["artifact_sha256"]) == 64 and len(on_disk["artifact_hmac"]) == 64
    assert registry.load_artifact(1) == b"abc"
    champion = registry.champion()
    assert champion is not None and champion.version == 1


def test_half_written_version_is_invisible_and_cleaned(tmp_path: Path) -> None:
    registry = make(tmp_path)
    publish(registry, 1)
    # A crash mid-publish leaves a temp dir with a partial artifact and no rename.
    leftover = registry.versions_dir / ".tmp-deadbeef"
    leftover.mkdir()
    (leftover / "model.pkl").write_bytes(b"partial")
    assert [v.version for v in registry.list()] == [1]
    assert registry.next_version() == 2
    publish(registry, 2)
    assert not leftover.exists()
    assert [v.version for v in registry.list()] == [1, 2]


def test_versions_strictly_increase_across_instances_and_deletions(tmp_path: Path) -> None:
    first = make(tmp_path, keep_last=1)
    numbers = [publish(first, n, promote=False).version for n in range(3)]
    assert numbers == [1, 2, 3]
    # Only version 3 is kept; a new process must still not reuse 1 or 2 — nor 3.
    assert [v.version for v in first.list()] == [3]
    second = make(tmp_path, keep_last=1)
    assert second.next_version() == 4
    (second.versions_dir / "00000003" / "metadata.json").unlink()  # even if 3 vanishes
    assert publish(second, 4).version == 4


def test_retention_keeps_last_n_and_never_the_champion(tmp_path: Path) -> None:
    registry = make(tmp_path, keep_last=2)
    publish(registry, 1, promote=True)
    for n in range(2, 6):
        publish(registry, n, promote=False)
    assert [v.version for v in registry.list()] == [1, 4, 5]
    champion = registry.champion()
    assert champion is not None and champion.version == 1
    assert registry.load_artifact(1) == b"artifact-1"
    with pytest.raises(RegistryError):
        registry.get(2)


def test_rejection_is_recorded_with_both_scores(tmp_path: Path) -> None:
    registry = make(tmp_path)
    publish(registry, 1)
    path = registry.record_rejection({"learner": "x"}, champion_score=0.9, candidate_score=0.5)
    record = json.loads(path.read_bytes())
    assert path.parent == tmp_path / "m" / "rejected"
    assert record["champion_score"] == 0.9 and record["candidate_score"] == 0.5
    assert record["champion_version"] == 1 and record["metadata"] == {"learner": "x"}
    last = registry.decisions()[-1]
    assert last["action"] == "reject" and last["candidate_id"] == record["candidate_id"]
    assert (last["champion_score"], last["candidate_score"]) == (0.9, 0.5)
    # A rejection reserves no version number.
    assert registry.next_version() == 2


def test_promote_and_rollback_are_recorded(tmp_path: Path) -> None:
    registry = make(tmp_path)
    for n in (1, 2, 3):
        publish(registry, n, promote=n != 2)
    assert registry.champion().version == 3  # type: ignore[union-attr]
    registry.promote(2, "manual")
    assert registry.champion().version == 2  # type: ignore[union-attr]
    # Rollback undoes promotions in order: 2 -> 3 -> 1.
    assert registry.rollback("bad model").version == 3
    assert registry.rollback("still bad").version == 1
    actions = [(d["action"], d["version"], d["previous"]) for d in registry.decisions()]
    assert actions == [
        ("promote", 1, None),
        ("promote", 3, 1),
        ("promote", 2, 3),
        ("rollback", 3, 2),
        ("rollback", 1, 3),
    ]
    assert registry.decisions()[3]["reason"] == "bad model"
    with pytest.raises(RegistryError, match="no version to roll back to"):
        registry.rollback("nothing left")
    with pytest.raises(RegistryError):
        registry.promote(99, "missing")


def test_rollback_skips_deleted_versions_and_falls_back_to_older(tmp_path: Path) -> None:
    registry = make(tmp_path, keep_last=10)
    publish(registry, 1, promote=False)
    publish(registry, 2, promote=False)
    publish(registry, 3, promote=True)
    # No earlier champion in the log: the newest existing version below the champion.
    assert registry.rollback("first rollback").version == 2


def test_torn_decision_line_is_skipped(tmp_path: Path) -> None:
    registry = make(tmp_path)
    publish(registry, 1)
    with open(registry.base / "decisions.jsonl", "ab") as handle:
        handle.write(b'{"action": "prom')
    assert [d["action"] for d in registry.decisions()] == ["promote"]


def test_tampered_artifact_is_refused(tmp_path: Path) -> None:
    registry = make(tmp_path)
    info = publish(registry, 1)
    info.artifact_path.write_bytes(b"evil")
    with pytest.raises(RegistryError, match="sha256"):
        registry.load_artifact(1)


def test_tampered_artifact_with_matching_sha_is_refused_by_hmac(tmp_path: Path) -> None:
    registry = make(tmp_path)
    info = publish(registry, 1)
    metadata = dict(info.metadata)
    evil = b"evil"
    import hashlib

    metadata["artifact_sha256"] = hashlib.sha256(evil).hexdigest()
    info.artifact_path.write_bytes(evil)
    (info.path / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(RegistryError, match="HMAC"):
        registry.load_artifact(1)


def test_wrong_key_and_unsigned_are_refused(tmp_path: Path) -> None:
    publish(make(tmp_path), 1)
    with pytest.raises(RegistryError, match="HMAC"):
        make(tmp_path, key=b"another-key").load_artifact(1)
    publish(make(tmp_path, key=None), 2)  # published without a key: no HMAC
    assert make(tmp_path, key=None).load_artifact(2) == b"artifact-2"
    with pytest.raises(RegistryError, match="unsigned"):
        make(tmp_path).load_artifact(2)


def test_unknown_version_raises(tmp_path: Path) -> None:
    registry = make(tmp_path)
    assert registry.list() == [] and registry.champion() is None
    with pytest.raises(RegistryError, match="no version 7"):
        registry.get(7)


def test_crash_between_rename_and_promotion_is_recovered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = make(tmp_path)
    publish(registry, 1)

    def crash(*args: object, **kwargs: object) -> None:
        raise SystemExit("killed")

    monkeypatch.setattr(registry, "_set_champion", crash)
    with pytest.raises(SystemExit):
        publish(registry, 2)
    monkeypatch.undo()
    restarted = make(tmp_path)
    assert restarted.champion().version == 1  # type: ignore[union-attr]
    assert restarted.recover() == 2
    assert restarted.champion().version == 2  # type: ignore[union-attr]
    assert restarted.recover() is None
    # A later manual rollback is not undone by recovery.
    restarted.rollback("operator")
    assert restarted.recover() is None
    assert restarted.champion().version == 1  # type: ignore[union-attr]
