"""A slot's checkpoints on an object store (stream_trainer.state.slot_store), on a folder:
LocalStore honours the same conditional writes as S3; the race on a real server is in
tests/integration/test_slot_store_s3.py. And the start rule of design 4.4."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from stream_trainer.errors import StreamTrainerError
from stream_trainer.state.checkpoint import CheckpointError, CheckpointFenced
from stream_trainer.state.objectstore import LocalStore, ObjectStoreError, PreconditionFailed
from stream_trainer.state.slot_start import OFFSET_BEGINNING, Start, start_offset
from stream_trainer.state.slot_store import (
    CLAIM_RETRIES,
    MANIFEST,
    SlotFenced,
    SlotStore,
    object_name,
    scope_path,
)

KEY = b"test-key-0123456789abcdef"
SLOT = "orders:3"
PATH = "partition/orders/3"


def fields(offset: int) -> dict[str, Any]:
    return {
        "offsets": {SLOT: offset},
        "model_version": None,
        "config_hash": "c" * 64,
        "records_learnt": offset,
        "metrics": {},
        "extra": {},
    }


def slot(
    store: LocalStore,
    member: str,
    keep_last: int = 3,
    quarantined: list[tuple[str, str]] | None = None,
) -> SlotStore:
    return SlotStore(
        store,
        "partition",
        SLOT,
        member,
        KEY,
        allow_unsigned=False,
        keep_last=keep_last,
        on_quarantine=(lambda where, reason: quarantined.append((where, reason)))
        if quarantined is not None
        else None,
    )


def claimed(store: LocalStore, member: str, keep_last: int = 3) -> SlotStore:
    owner = slot(store, member, keep_last)
    owner.claim()
    return owner


def put(owner: SlotStore, n: int) -> str:
    """Write state {"n": n} at offset 100 n; the object's name."""
    result = owner.write(owner.serialize({"n": n}), fields(100 * n))
    return result.path.rsplit("/", 1)[-1]


def manifest_json(store: LocalStore) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(store.get(f"{PATH}/{MANIFEST}").data)
    return data


def objects(store: LocalStore, prefix: str = PATH) -> list[str]:
    return [info.key.rsplit("/", 1)[-1] for info in store.list(f"{prefix}/")]


def test_a_claim_creates_the_manifest_then_raises_the_token_keeping_the_head(
    tmp_path: Path,
) -> None:
    store = LocalStore(tmp_path)
    a = slot(store, "member-a")
    assert a.read().manifest is None
    claimed = a.claim()
    assert (claimed.token, claimed.owner, claimed.head) == (1, "member-a", None)
    first = put(a, 1)
    assert first == object_name(1, 1)
    stored = manifest_json(store)
    assert stored["head"] == first and stored["offsets"] == {SLOT: 100}
    assert stored["signed"] is True and len(stored["hmac"]) == 64

    b = slot(store, "member-b")
    seen = b.read()
    assert seen.manifest is not None and seen.etag
    again = b.claim(seen)
    assert (again.token, again.owner, again.head) == (2, "member-b", first)
    assert again.offsets == {SLOT: 100} and again.sha256 == seen.manifest.sha256
    inspected = b.inspect(f"{PATH}/{first}")
    assert inspected["verification"] == "ok"
    assert {k: inspected["manifest"][k] for k in ("scope", "scope_id", "token", "sequence")} == {
        "scope": "partition",
        "scope_id": SLOT,
        "token": 1,
        "sequence": 1,
    }


def test_unsigned_mode_writes_an_unsigned_manifest_that_a_keyed_member_refuses(
    tmp_path: Path,
) -> None:
    store = LocalStore(tmp_path)
    unsigned = SlotStore(store, "partition", SLOT, "member-a", None, True, 3)
    unsigned.claim()
    put(unsigned, 1)
    assert (manifest_json(store)["signed"], manifest_json(store)["hmac"]) == (False, None)
    again = SlotStore(store, "partition", SLOT, "member-b", None, True, 3)
    again.claim()
    loaded = again.restore()
    assert loaded is not None and loaded.state == {"n": 1}
    with pytest.raises(CheckpointError, match="unsigned"):
        slot(store, "member-c").claim()


def test_a_claim_fences_the_previous_owner_and_its_upload_is_never_named(
    tmp_path: Path,
) -> None:
    store = LocalStore(tmp_path)
    a = claimed(store, "member-a")
    put(a, 1)
    b = claimed(store, "member-b")
    with pytest.raises(SlotFenced) as fenced:
        put(a, 2)  # a zombie: paused past the hand-over
    assert isinstance(fenced.value, CheckpointFenced)
    assert isinstance(fenced.value, StreamTrainerError)
    assert "token 2" in str(fenced.value) and a.manifest is None
    zombie = object_name(2, 1)
    assert zombie in objects(store)  # uploaded, create-only ...
    assert manifest_json(store)["head"] == object_name(1, 1)  # ... but never named
    with pytest.raises(SlotFenced):
        put(a, 3)  # and it stays fenced

    loaded = b.restore()
    assert loaded is not None and loaded.state == {"n": 1}
    assert (loaded.manifest.scope, loaded.manifest.scope_id, loaded.manifest.token) == (
        "partition",
        SLOT,
        1,
    )
    mine = put(b, 4)
    assert mine == object_name(2, 2)  # the new token: no collision with the zombie's
    assert zombie not in objects(store)  # retention: unnamed, below the MANIFEST's token
    assert manifest_json(store)["previous"] == [object_name(1, 1)]


def test_a_corrupted_head_is_quarantined_and_the_previous_one_restored(
    tmp_path: Path,
) -> None:
    store = LocalStore(tmp_path)
    a = claimed(store, "member-a")
    names = [put(a, n) for n in (1, 2, 3)]
    head = f"{PATH}/{names[-1]}"
    data = bytearray(store.get(head).data)
    data[-1] ^= 0xFF
    store.put(head, bytes(data))

    quarantined: list[tuple[str, str]] = []
    b = slot(store, "member-b", quarantined=quarantined)
    manifest = b.claim()
    assert start_offset(manifest, 300) == Start(300)  # at assign: the head's offset
    loaded = b.restore()
    assert loaded is not None and loaded.state == {"n": 2}
    reason = "payload_checksum"
    assert quarantined == [(store.url_of(f"quarantine/{PATH}/{names[-1]}.{reason}"), reason)]
    assert store.get(f"quarantine/{PATH}/{names[-1]}.{reason}.reason").data.startswith(
        reason.encode()
    )
    assert names[-1] not in objects(store)
    # The group had committed the lost head's offset: learn again from the older one.
    start = start_offset(loaded.manifest, 300)
    assert (start.offset, start.commit, start.refuse) == (200, False, False)
    assert start.warning is not None and "newer checkpoint lost" in start.warning
    # The next write leaves the quarantined head out of previous.
    newest = put(b, 4)
    assert manifest_json(store)["head"] == newest
    assert manifest_json(store)["previous"] == [names[1], names[0]]


def test_a_head_that_is_gone_is_skipped_and_none_left_restores_nothing(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    a = claimed(store, "member-a")
    first, second = put(a, 1), put(a, 2)
    store.delete(f"{PATH}/{second}")
    b = claimed(store, "member-b")
    loaded = b.restore()
    assert loaded is not None and loaded.state == {"n": 1}
    store.delete(f"{PATH}/{first}")
    c = claimed(store, "member-c")
    assert c.restore() is None


def test_an_object_copied_from_another_slot_does_not_pass_as_its_checkpoint(
    tmp_path: Path,
) -> None:
    store = LocalStore(tmp_path)
    other = SlotStore(store, "partition", "orders:4", "member-a", KEY, False, 3)
    other.claim()
    for n in (1, 2):
        other.write(other.serialize({"n": -n}), {**fields(n), "offsets": {"orders:4": n}})
    a = claimed(store, "member-a")
    put(a, 1)
    head = put(a, 2)
    # Same name (sequence 2, token 1), signed with the same key: only the scope differs.
    store.put(f"{PATH}/{head}", store.get(f"partition/orders/4/{head}").data)
    quarantined: list[tuple[str, str]] = []
    b = slot(store, "member-b", quarantined=quarantined)
    b.claim()
    loaded = b.restore()
    assert loaded is not None and loaded.state == {"n": 1}
    assert [reason for _, reason in quarantined] == ["scope_mismatch"]


def test_retention_keeps_what_the_manifest_names_and_newer_tokens(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    a = claimed(store, "member-a", keep_last=2)
    put(a, 1)
    b = claimed(store, "member-b", keep_last=2)
    newer = object_name(1, 9)  # another owner's, claimed after b: never b's to delete
    store.put(f"{PATH}/{newer}", b"x")
    names = [put(b, n) for n in (2, 3, 4)]
    assert sorted(objects(store)) == sorted([MANIFEST, names[-1], names[-2], newer])
    assert manifest_json(store)["previous"] == [names[-2]]
    assert b.retain() == 0


def test_partition_slots_hold_their_own_offset_only(tmp_path: Path) -> None:
    a = slot(LocalStore(tmp_path), "member-a")
    a.claim()
    with pytest.raises(ValueError, match="orders:3"):
        a.write(a.serialize(1), {**fields(1), "offsets": {"orders:4": 1}})
    with pytest.raises(CheckpointError, match="not claimed"):
        slot(LocalStore(tmp_path), "member-b").write(b"x", fields(1))


def test_a_tampered_or_unsigned_manifest_is_refused(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    a = claimed(store, "member-a")
    put(a, 1)
    raw = manifest_json(store)
    store.put(f"{PATH}/{MANIFEST}", json.dumps({**raw, "token": 99}).encode())
    with pytest.raises(CheckpointError, match="does not verify"):
        slot(store, "member-b").claim()
    store.put(f"{PATH}/{MANIFEST}", json.dumps({**raw, "hmac": None, "signed": False}).encode())
    with pytest.raises(CheckpointError, match="unsigned"):
        slot(store, "member-b").read()


class LostAnswers(LocalStore):
    """A folder store whose next conditional MANIFEST writes are applied but answered with
    a timeout, and whose next reads fail, as a store under an outage may do."""

    lose_writes = 0
    fail_reads = 0
    refuse_writes = 0
    swaps = 0

    def get(self, key: str) -> Any:
        if key.endswith(MANIFEST) and self.fail_reads:
            self.fail_reads -= 1
            raise ObjectStoreError(f"{key}: timed out")
        return super().get(key)

    def _lost(self, key: str, applied: str) -> str:
        if key.endswith(MANIFEST) and self.lose_writes:
            self.lose_writes -= 1
            raise ObjectStoreError(f"{key}: timed out (the write was applied)")
        return applied

    def put_if_absent(self, key: str, data: bytes) -> str:
        return self._lost(key, super().put_if_absent(key, data))

    def put_if_match(self, key: str, data: bytes, etag: str) -> str:
        if key.endswith(MANIFEST):
            self.swaps += 1
            if self.refuse_writes:
                self.refuse_writes -= 1
                raise PreconditionFailed(f"{key}: changed since it was read")
        failing, self.fail_reads = self.fail_reads, 0  # LocalStore reads inside its CAS
        try:
            applied = super().put_if_match(key, data, etag)
        finally:
            self.fail_reads = failing
        return self._lost(key, applied)


def test_a_manifest_write_whose_answer_was_lost_is_adopted(tmp_path: Path) -> None:
    store = LostAnswers(tmp_path)
    a = slot(store, "member-a")
    store.lose_writes = 1
    assert a.claim().token == 1  # created, answer lost, re-read shows it: adopted
    put(a, 1)
    store.lose_writes = 1
    second = put(a, 2)  # applied, answer lost, the re-read shows our own head
    assert manifest_json(store)["head"] == second

    # Lost, and the re-read fails too: not durable as far as a knows, but not fenced.
    store.lose_writes, store.fail_reads = 1, 1
    with pytest.raises(CheckpointError) as failed:
        put(a, 3)
    assert not isinstance(failed.value, CheckpointFenced)
    applied = manifest_json(store)["head"]
    assert applied == object_name(3, 1)
    # The next write reads again, sees its own token and head, and goes on from there.
    fourth = put(a, 4)
    assert manifest_json(store)["head"] == fourth
    assert manifest_json(store)["previous"] == [applied, second]

    claimed(store, "member-b")
    with pytest.raises(SlotFenced):  # a's CAS is refused; the re-read shows b's token
        put(a, 5)
    assert manifest_json(store)["owner"] == "member-b"


def test_a_refused_claim_is_retried_then_the_slot_is_lost(tmp_path: Path) -> None:
    store = LostAnswers(tmp_path)
    slot(store, "member-a").claim()
    b = slot(store, "member-b")
    store.refuse_writes = CLAIM_RETRIES
    assert b.claim().token == 2  # refused three times, the fourth CAS wins
    store.refuse_writes, store.swaps = CLAIM_RETRIES + 1, 0
    with pytest.raises(SlotFenced, match="slot lost"):
        slot(store, "member-c").claim()
    assert store.swaps == 1 + CLAIM_RETRIES
    assert manifest_json(store)["owner"] == "member-b"


def test_scope_paths() -> None:
    assert scope_path("partition", "orders.v2:11") == "partition/orders.v2/11"
    assert scope_path("key", "0" * 32) == f"key/{'0' * 32}"
    assert scope_path("global", "global") == "global"
    for scope, scope_id in (("partition", "a/b:1"), ("partition", "t"), ("key", "xyz")):
        with pytest.raises(ValueError):
            scope_path(scope, scope_id)


class Offsets:
    def __init__(self, offsets: dict[str, int]) -> None:
        self.offsets = offsets


@pytest.mark.parametrize(
    ("checkpoint", "group", "expected"),
    [
        # exists, g = c: start at c, nothing to do
        (10, 10, Start(10)),
        # g < c: the old owner died between its CAS and its commit
        (10, 7, Start(10, commit=True)),
        (10, None, Start(10, commit=True)),
        (10, -1001, Start(10, commit=True)),  # OFFSET_INVALID: nothing committed
        # none: the log start, or the group's offset of another model (refused)
        (None, None, Start(OFFSET_BEGINNING)),
    ],
)
def test_start_rule_table(checkpoint: int | None, group: int | None, expected: Start) -> None:
    manifest = Offsets({SLOT: checkpoint} if checkpoint is not None else {})
    assert start_offset(manifest, group) == expected
    assert start_offset(None if checkpoint is None else manifest, group) == expected


def test_start_rule_warns_and_refuses() -> None:
    lost = start_offset(Offsets({SLOT: 10}), 15)
    assert (lost.offset, lost.commit, lost.refuse) == (10, False, False)
    assert lost.warning is not None and "from 10" in lost.warning
    foreign = start_offset(Offsets({}), 15)
    assert (foreign.offset, foreign.commit, foreign.refuse) == (15, False, True)
    with pytest.raises(ValueError):
        start_offset(Offsets({SLOT: 1, "orders:4": 2}), 1)
    import confluent_kafka

    assert OFFSET_BEGINNING == confluent_kafka.OFFSET_BEGINNING
