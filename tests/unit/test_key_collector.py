"""The key-object collector's rule (stream_trainer.state.key_collector), on a real folder
store with real slot MANIFESTs and checkpoints: owners are driven by hand, an eviction at
a time, so each case of the rule's argument is a test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stream_trainer.config import DeadLetterSettings
from stream_trainer.ingest.deadletter import BadRecordBreaker
from stream_trainer.state.key_collector import KeyObjectCollector
from stream_trainer.state.keyed_state import KeyedState, object_name
from stream_trainer.state.objectstore import LocalStore
from stream_trainer.state.slot_store import SlotStore

KEY = b"test-key-0123456789abcdef"
SLOT = "orders:3"
PARTITION = 3
K1, K2 = "1" * 32, "2" * 32


class Owner:
    """A member holding the slot: evicts and loads keys back as key scope does, and
    checkpoints its KeyedState through the slot's MANIFEST."""

    def __init__(self, store: LocalStore, member: str, keep_last: int = 3) -> None:
        self.store = store
        self.slot = SlotStore(store, "partition", SLOT, member, KEY, False, keep_last)
        self.slot.claim()
        loaded = self.slot.restore()
        fresh = KeyedState(BadRecordBreaker(DeadLetterSettings()))
        self.state: KeyedState = loaded.state if loaded is not None else fresh
        self.offset = 0

    @property
    def token(self) -> int:
        manifest = self.slot.manifest
        assert manifest is not None
        return manifest.token

    def evict(self, key_hash: str) -> str:
        self.state.evictions += 1
        name = object_name(key_hash, PARTITION, self.token, self.state.evictions)
        self.store.put_if_absent(name, b"a key state")  # the collector never reads them
        self.state.evicted[key_hash] = name
        return name

    def load(self, key_hash: str) -> None:
        del self.state.evicted[key_hash]

    def checkpoint(self) -> None:
        self.offset += 1
        fields: dict[str, Any] = {
            "offsets": {SLOT: self.offset},
            "model_version": None,
            "config_hash": "c" * 64,
            "records_learnt": self.offset,
            "metrics": {},
            "extra": {},
        }
        self.slot.write(self.slot.serialize(self.state), fields)

    def collect(self) -> tuple[int, str | None]:
        done = KeyObjectCollector(self.store).collect(self.slot, PARTITION, self.token)
        return done.deleted, done.skipped


def supersede(owner: Owner) -> tuple[str, str]:
    """K1 evicted and checkpointed, loaded back and evicted again (not checkpointed):
    the first object and the one that superseded it."""
    first = owner.evict(K1)
    owner.checkpoint()
    owner.load(K1)
    return first, owner.evict(K1)


def key_objects(store: LocalStore) -> set[str]:
    return {info.key for info in store.list("key/")}


def test_superseded_objects_go_once_no_retained_checkpoint_names_them(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    owner = Owner(store, "a")
    first, second = supersede(owner)
    owner.checkpoint()
    assert owner.collect() == (0, None)  # the older checkpoint still names first
    owner.checkpoint()
    owner.checkpoint()  # keep_last 3: the one naming first is gone
    after_head = owner.evict(K2)  # not checkpointed yet: the next checkpoint names it
    assert owner.collect() == (1, None)
    assert key_objects(store) == {second, after_head}
    assert first not in key_objects(store)


def test_orphans_of_a_crash_go_after_the_next_owner_moved_past_them(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    crashed = Owner(store, "a")
    named = crashed.evict(K1)
    crashed.checkpoint()
    orphan = crashed.evict(K2)  # written, then kill -9 before any checkpoint names it
    successor = Owner(store, "b")
    assert successor.state.evicted == {K1: named}
    successor.checkpoint()
    assert successor.collect() == (0, None)  # the crashed owner's checkpoint is retained
    successor.checkpoint()
    successor.checkpoint()
    assert successor.collect() == (1, None)
    assert key_objects(store) == {named}
    assert orphan not in key_objects(store)


def test_an_object_a_fenced_owner_superseded_stays_while_the_new_owner_names_it(
    tmp_path: Path,
) -> None:
    """The case that makes a rule on names or times alone wrong: the newest object of a
    key is a fenced owner's that nothing names; the older one is what the slot holds."""
    store = LocalStore(tmp_path)
    fenced = Owner(store, "a")
    older, newer = supersede(fenced)  # newer: the fenced owner's, never checkpointed
    owner = Owner(store, "b")  # restores the checkpoint that names `older`
    for _ in range(4):
        owner.checkpoint()
    assert owner.collect() == (1, None)
    assert key_objects(store) == {older}
    assert newer not in key_objects(store)
    assert owner.state.evicted == {K1: older}


def test_nothing_is_deleted_when_a_retained_checkpoint_cannot_be_read(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    owner = Owner(store, "a")
    supersede(owner)
    for _ in range(3):
        owner.checkpoint()
    manifest = owner.slot.manifest
    assert manifest is not None and manifest.head is not None
    head = tmp_path / "partition" / "orders" / "3" / manifest.head
    head.write_bytes(head.read_bytes()[:-1] + b"!")  # tampered payload
    before = key_objects(store)
    deleted, skipped = owner.collect()
    assert (deleted, skipped) == (0, "unreadable checkpoint")
    assert key_objects(store) == before
    assert head.is_file()  # read, never quarantined: the owner's restore decides that


def test_a_member_whose_claim_was_taken_and_other_partitions_are_left_alone(
    tmp_path: Path,
) -> None:
    store = LocalStore(tmp_path)
    fenced = Owner(store, "a")
    supersede(fenced)
    other_partition = object_name(K2, PARTITION + 1, 1, 1)
    store.put_if_absent(other_partition, b"another partition's key state")
    owner = Owner(store, "b")
    for _ in range(3):
        owner.checkpoint()
    before = key_objects(store)
    assert fenced.collect() == (0, "claimed by another member")
    assert key_objects(store) == before
    assert owner.collect() == (1, None)
    assert other_partition in key_objects(store)


def test_a_slot_without_a_checkpoint_has_nothing_to_collect(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    owner = Owner(store, "a")
    owner.evict(K1)  # an eviction before the first checkpoint
    assert owner.collect() == (0, "no checkpoint")
    assert len(key_objects(store)) == 1
