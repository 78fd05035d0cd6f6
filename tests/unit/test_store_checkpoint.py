"""Checkpoints on an object store, on a folder (LocalStore honours the same conditional
writes; the same code runs against S3 in tests/integration/test_object_store_checkpoints.py
and the fault suite)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from stream_trainer.state.checkpoint import CheckpointError, CheckpointFenced, checkpoint_name
from stream_trainer.state.objectstore import LocalStore, ObjectNotFound, ObjectStoreError
from stream_trainer.state.store_checkpoint import POINTER, ObjectCheckpointStore
from stream_trainer.state.store_lease import StoreLease

KEY = b"test-key-0123456789abcdef"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fields(n: int = 0) -> dict[str, Any]:
    return {
        "offsets": {"in:0": 100 + n},
        "model_version": None,
        "config_hash": "c" * 64,
        "records_learnt": 1000 + n,
        "metrics": {},
        "extra": {"mode": "per_record"},
    }


def writer(
    store: LocalStore,
    holder: str = "node-a",
    clock: Clock | None = None,
    keep_last: int = 10,
    quarantined: list[tuple[str, str]] | None = None,
) -> ObjectCheckpointStore:
    lease = StoreLease(store, "LEASE", holder, ttl_s=30, clock=clock or Clock())
    lease.acquire()
    return ObjectCheckpointStore(
        store,
        KEY,
        allow_unsigned=False,
        keep_last=keep_last,
        lease=lease,
        on_quarantine=(lambda where, reason: quarantined.append((where, reason)))
        if quarantined is not None
        else None,
    )


def pointer(store: LocalStore) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(store.get(POINTER).data)
    return data


def test_a_write_is_made_newest_by_the_pointer_and_carries_the_token(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    ckpts = writer(store)
    assert ckpts.load_latest() is None
    first = ckpts.write(ckpts.serialize({"n": 1}), fields(1))
    second = ckpts.write(ckpts.serialize({"n": 2}), fields(2))
    assert (first.sequence, second.sequence) == (1, 2)
    assert str(second.path).endswith(checkpoint_name(2))
    assert pointer(store) == {"sequence": 2, "object": checkpoint_name(2), "token": 1}
    loaded = ObjectCheckpointStore(store, KEY, False, 10).read_latest()
    assert loaded is not None and loaded.state == {"n": 2}
    assert loaded.manifest.extra["writer_token"] == 1
    assert loaded.manifest.offsets == {"in:0": 102}


def test_an_upload_the_pointer_never_reached_is_invisible_and_deleted_by_the_writer(
    tmp_path: Path,
) -> None:
    store = LocalStore(tmp_path)
    ckpts = writer(store)
    ckpts.load_latest()
    ckpts.write(ckpts.serialize({"n": 1}), fields(1))
    # A writer killed between its upload and the pointer's move left sequence 2 behind.
    crashed: list[str] = []

    def crash(point: str) -> None:
        if point == "before_checkpoint_visible":
            crashed.append(point)
            raise SystemExit("killed")

    dying = ObjectCheckpointStore(store, KEY, False, 10, crash=crash)
    with pytest.raises(SystemExit):
        dying.write(dying.serialize({"n": 2}), fields(2))
    assert crashed and store.get(checkpoint_name(2)).data
    reader = ObjectCheckpointStore(store, KEY, False, 10)
    assert [url.rsplit("/", 1)[-1] for url in reader.list()] == [checkpoint_name(1)]
    loaded = reader.read_latest()
    assert loaded is not None and loaded.state == {"n": 1}

    restarted = writer(store)
    loaded = restarted.load_latest()
    assert loaded is not None and loaded.state == {"n": 1}
    assert [info.key for info in store.list("") if info.key.startswith("ckpt-")] == [
        checkpoint_name(1)
    ]
    # The next sequence skips the deleted one: sequences are never reused.
    assert restarted.write(restarted.serialize({"n": 3}), fields(3)).sequence == 2


def test_a_stale_writer_is_fenced_by_the_lease_and_by_the_pointer(tmp_path: Path) -> None:
    store, clock = LocalStore(tmp_path), Clock()
    old = writer(store, "node-a", clock)
    old.load_latest()
    old.write(old.serialize({"n": 1}), fields(1))
    clock.now += 31  # node-a paused past its lease
    new = writer(store, "node-b", clock)
    assert new.lease is not None and new.lease.token == 2
    loaded = new.load_latest()  # takes the pointer over at once
    assert loaded is not None and loaded.state == {"n": 1}
    assert pointer(store)["token"] == 2
    with pytest.raises(CheckpointFenced, match="lease lost"):
        old.write(old.serialize({"n": 99}), fields(99))
    # Even without its lease check (a renewal that raced), the pointer refuses it.
    old.lease = None
    with pytest.raises(CheckpointFenced, match="moved by another writer"):
        old.write(old.serialize({"n": 98}), fields(98))
    new.write(new.serialize({"n": 2}), fields(2))
    latest = ObjectCheckpointStore(store, KEY, False, 10).read_latest()
    assert latest is not None and latest.state == {"n": 2}
    assert latest.manifest.extra["writer_token"] == 2


def test_a_bad_newest_checkpoint_is_quarantined_and_the_previous_one_restored(
    tmp_path: Path,
) -> None:
    store = LocalStore(tmp_path)
    quarantined: list[tuple[str, str]] = []
    ckpts = writer(store, quarantined=quarantined)
    ckpts.load_latest()
    ckpts.write(ckpts.serialize({"n": 1}), fields(1))
    ckpts.write(ckpts.serialize({"n": 2}), fields(2))
    damaged = bytearray(store.get(checkpoint_name(2)).data)
    damaged[-1] ^= 0xFF
    store.put(checkpoint_name(2), bytes(damaged))

    restarted = writer(store, quarantined=quarantined)
    loaded = restarted.load_latest()
    assert loaded is not None and loaded.state == {"n": 1}
    assert [reason for _, reason in quarantined] == ["payload_checksum"]
    where = quarantined[0][0]
    assert where.endswith(f"quarantine/{checkpoint_name(2)}.payload_checksum")
    reason = store.get(f"quarantine/{checkpoint_name(2)}.payload_checksum.reason").data
    assert reason.startswith(b"payload_checksum:")
    with pytest.raises(ObjectNotFound):
        store.get(checkpoint_name(2))  # moved, not copied
    assert pointer(store)["sequence"] == 1  # the pointer follows the restored checkpoint
    # The quarantined sequence is never reused.
    assert restarted.write(restarted.serialize({"n": 3}), fields(3)).sequence == 3


def test_retention_keeps_the_newest_and_a_reader_needs_no_lease(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    ckpts = writer(store, keep_last=2)
    ckpts.load_latest()
    for n in range(1, 6):
        ckpts.write(ckpts.serialize({"n": n}), fields(n))
    reader = ObjectCheckpointStore(store, KEY, False, 1)
    assert [url.rsplit("/", 1)[-1] for url in reader.list()] == [
        checkpoint_name(4),
        checkpoint_name(5),
    ]
    manifest = reader.latest_manifest()
    assert manifest is not None and manifest.sequence == 5
    report = reader.inspect(checkpoint_name(5))
    assert report["verification"] == "ok" and report["manifest"]["sequence"] == 5
    wrong_key = ObjectCheckpointStore(store, b"another-key-fedcba987654", False, 1)
    assert wrong_key.inspect(checkpoint_name(5))["verification"] == "bad_signature"


def test_unsigned_checkpoints_are_refused_without_allow_unsigned(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    unsigned = ObjectCheckpointStore(store, None, allow_unsigned=True, keep_last=3)
    unsigned.load_latest()
    unsigned.write(unsigned.serialize({"n": 1}), fields(1))
    with pytest.raises(CheckpointError, match="unsigned"):
        ObjectCheckpointStore(store, KEY, False, 3).read_latest()


class LostAnswers(LocalStore):
    """A folder store whose next conditional write of the pointer is applied but answered
    with a timeout, as a store under an outage may do."""

    lose_next = False

    def put_if_match(self, key: str, data: bytes, etag: str) -> str:
        applied = super().put_if_match(key, data, etag)
        if key == POINTER and self.lose_next:
            self.lose_next = False
            raise ObjectStoreError(f"{key}: timed out (the write was applied)")
        return applied


def test_a_pointer_write_whose_answer_was_lost_does_not_fence_its_own_writer(
    tmp_path: Path,
) -> None:
    store = LostAnswers(tmp_path)
    ckpts = writer(store)
    ckpts.load_latest()
    ckpts.write(ckpts.serialize({"n": 1}), fields(1))
    store.lose_next = True
    with pytest.raises(CheckpointError) as failed:
        ckpts.write(ckpts.serialize({"n": 2}), fields(2))
    assert not isinstance(failed.value, CheckpointFenced)
    assert pointer(store)["sequence"] == 2  # applied, though the writer was not told
    # The next write reads the pointer again, sees its own token, and goes on.
    assert ckpts.write(ckpts.serialize({"n": 3}), fields(3)).sequence == 3
    latest = ObjectCheckpointStore(store, KEY, False, 10).read_latest()
    assert latest is not None and latest.state == {"n": 3}
