"""The counting oracle over partition slots (model.scope: partition): every slot's head is
read from a shared folder store, verified and never claimed, and a bad head or MANIFEST
is reported, not skipped."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from stream_trainer.operations.app import new_state
from stream_trainer.state.objectstore import LocalStore
from stream_trainer.state.slot_store import MANIFEST, SlotStore
from stream_trainer.state.training_state import TrainingState
from stream_trainer.testing.counting import (
    RIVER_PATH,
    CountingError,
    SlotCounts,
    combined_counts,
    learnt_counts_by_slot,
    read_slots,
    slot_ids,
)
from stream_trainer.training.learners import TESTING_ENV
from tests.unit.test_counting import KEY, settings


def slot(store: LocalStore, scope_id: str, member: str = "a", keep_last: int = 3) -> SlotStore:
    return SlotStore(
        store, "partition", scope_id, member, KEY, allow_unsigned=False, keep_last=keep_last
    )


def learn(state: TrainingState, partition: int, offsets: range, key: int = 7) -> None:
    for offset in offsets:
        state.model.learn_one(
            {"partition": float(partition), "offset": float(offset), "key": float(key)}, 0.7
        )


def write(owner: SlotStore, state: TrainingState, offset: int) -> None:
    fields: dict[str, Any] = {
        "offsets": {owner.scope_id: offset},
        "model_version": None,
        "config_hash": "c" * 64,
        "records_learnt": offset,
        "metrics": {},
        "extra": {},
    }
    owner.write(owner.serialize(state), fields)


def samples(partition: int, offsets: range, key: int = 7) -> Counter[tuple[int, int, int]]:
    return Counter((partition, offset, key) for offset in offsets)


@pytest.fixture
def switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TESTING_ENV, "1")


@pytest.fixture
def state(tmp_path: Path, switch: None) -> TrainingState:
    return new_state(settings(RIVER_PATH, "per_record", tmp_path))


def test_no_slots_reads_empty(tmp_path: Path) -> None:
    assert learnt_counts_by_slot(tmp_path / "none", KEY) == {}
    assert combined_counts([]) == Counter()


def test_every_slot_head_is_read_without_claiming(tmp_path: Path, switch: None) -> None:
    store = LocalStore(tmp_path)
    config = settings(RIVER_PATH, "per_record", tmp_path)
    zero, one = new_state(config), new_state(config)
    owner0 = slot(store, "in:0")
    owner0.claim()
    learn(zero, 0, range(3))
    write(owner0, zero, 3)
    learn(zero, 0, range(3, 5))
    write(owner0, zero, 5)
    owner1 = slot(store, "in:1", member="b")
    owner1.claim()
    learn(one, 1, range(2))
    write(owner1, one, 2)
    slot(store, "in:10", member="c").claim()  # claimed, nothing written yet
    manifests = {p: store.get(f"partition/in/{p}/{MANIFEST}").data for p in (0, 1, 10)}

    by_slot = learnt_counts_by_slot(tmp_path, KEY)

    assert list(by_slot) == ["in:0", "in:1", "in:10"]  # numeric order
    assert by_slot == {
        "in:0": samples(0, range(5)),
        "in:1": samples(1, range(2)),
        "in:10": Counter(),
    }
    assert combined_counts(by_slot.values()) == samples(0, range(5)) + samples(1, range(2))
    slots = read_slots(str(tmp_path), KEY)
    assert slots["in:0"] == SlotCounts("in:0", 1, "a", {"in:0": 5}, samples(0, range(5)))
    assert (slots["in:10"].token, slots["in:10"].owner, slots["in:10"].offsets) == (1, "c", {})
    # Read-only: the owners' MANIFESTs are byte for byte as they left them, and a write
    # by the owner still succeeds (it was not fenced).
    assert {p: store.get(f"partition/in/{p}/{MANIFEST}").data for p in (0, 1, 10)} == manifests
    write(owner0, zero, 5)


def test_a_second_claim_shows_the_new_owner_and_keeps_the_head(
    tmp_path: Path, state: TrainingState
) -> None:
    store = LocalStore(tmp_path)
    first = slot(store, "in:2")
    first.claim()
    learn(state, 2, range(4))
    write(first, state, 4)
    slot(store, "in:2", member="b").claim()
    found = read_slots(tmp_path, KEY)["in:2"]
    assert (found.token, found.owner, found.learnt) == (2, "b", samples(2, range(4)))


def test_sums_count_a_tuple_in_two_slots_twice(tmp_path: Path, state: TrainingState) -> None:
    """Negative control: partition 0's record learnt into slot in:1 as well shows up as
    twice in the sum and as misplaced in that slot."""
    store = LocalStore(tmp_path)
    learn(state, 0, range(1))
    for scope_id in ("in:0", "in:1"):
        owner = slot(store, scope_id)
        owner.claim()
        write(owner, state, 1)
    slots = read_slots(tmp_path, KEY)
    assert combined_counts(s.learnt for s in slots.values()) == Counter({(0, 0, 7): 2})
    assert (slots["in:0"].misplaced(), slots["in:1"].misplaced()) == (0, 1)


@pytest.mark.parametrize("what", ["head", "manifest"])
def test_a_tampered_head_or_manifest_is_reported_and_left_in_place(
    tmp_path: Path, state: TrainingState, what: str
) -> None:
    store = LocalStore(tmp_path)
    owner = slot(store, "in:0")
    owner.claim()
    learn(state, 0, range(2))
    write(owner, state, 2)
    manifest = owner.manifest
    assert manifest is not None and manifest.head is not None
    target = tmp_path / "partition" / "in" / "0" / (manifest.head if what == "head" else MANIFEST)
    data = target.read_bytes()
    if what == "head":
        target.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # the payload: sha256 fails
    else:
        target.write_bytes(data.replace(b'"owner":"a"', b'"owner":"x"'))  # the HMAC fails
    reason = "payload_checksum" if what == "head" else "does not verify"
    with pytest.raises(CountingError, match=rf"slot in:0: .*{reason}"):
        learnt_counts_by_slot(tmp_path, KEY)
    assert target.exists()
    assert not (tmp_path / "quarantine").exists()


def test_another_key_is_refused(tmp_path: Path, state: TrainingState) -> None:
    store = LocalStore(tmp_path)
    owner = slot(store, "in:0")
    owner.claim()
    write(owner, state, 0)
    with pytest.raises(CountingError, match="does not verify"):
        learnt_counts_by_slot(tmp_path, b"another-key-0123456789")


def test_slot_ids_ignore_other_objects(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("partition/in/3/MANIFEST", b"{}")
    store.put("partition/in/3/ckpt-000000000001-t1.ckpt", b"x")
    store.put("partition/in/x/MANIFEST", b"{}")
    store.put("partition/MANIFEST", b"{}")
    store.put("global/MANIFEST", b"{}")
    store.put("quarantine/partition/in/4/MANIFEST", b"{}")
    assert slot_ids(store) == ["in:3"]


def test_an_unreadable_manifest_is_an_error(tmp_path: Path) -> None:
    LocalStore(tmp_path).put("partition/in/3/MANIFEST", b"{}")
    with pytest.raises(CountingError, match=r"slot in:3: .*does not verify"):
        read_slots(tmp_path, KEY)
