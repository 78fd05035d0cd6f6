"""The object-store lease and the registry's fencing, on a folder (the same code runs
against S3 in tests/integration/test_object_store.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream_trainer.publishing.registry import RegistryError
from stream_trainer.publishing.store_registry import StoreRegistry
from stream_trainer.state.objectstore import LocalStore, ObjectStoreError
from stream_trainer.state.store_lease import (
    LeaseHeld,
    LeaseKeeper,
    LeaseLost,
    StoreLease,
    StoreLeaseError,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_second_holder_is_refused_while_the_lease_is_valid(tmp_path: Path) -> None:
    store, clock = LocalStore(tmp_path), Clock()
    first = StoreLease(store, "m/LEASE", "node-a", ttl_s=30, clock=clock)
    assert first.acquire() == 1
    second = StoreLease(store, "m/LEASE", "node-b", ttl_s=30, clock=clock)
    with pytest.raises(LeaseHeld, match="node-a"):
        second.acquire()
    clock.now += 20
    first.renew()
    clock.now += 20  # 40 s after the first write, 20 s after the renewal: still held
    with pytest.raises(LeaseHeld):
        second.acquire()


def test_an_expired_lease_is_taken_over_with_a_higher_token(tmp_path: Path) -> None:
    store, clock = LocalStore(tmp_path), Clock()
    first = StoreLease(store, "LEASE", "node-a", ttl_s=30, clock=clock)
    first.acquire()
    clock.now += 31
    second = StoreLease(store, "LEASE", "node-b", ttl_s=30, clock=clock)
    assert second.acquire() == 2
    with pytest.raises(LeaseLost):
        first.renew()
    with pytest.raises(LeaseLost):
        first.check()
    assert second.check() == 2


def test_release_frees_the_lease_and_the_token_keeps_growing(tmp_path: Path) -> None:
    store, clock = LocalStore(tmp_path), Clock()
    first = StoreLease(store, "LEASE", "node-a", ttl_s=30, clock=clock)
    first.acquire()
    first.release()
    assert StoreLease(store, "LEASE", "node-b", ttl_s=30, clock=clock).acquire() == 2


def test_a_stale_writer_whose_lease_was_taken_over_cannot_publish_or_promote(
    tmp_path: Path,
) -> None:
    store, clock = LocalStore(tmp_path), Clock()
    old_lease = StoreLease(store, "m/LEASE", "node-a", ttl_s=30, clock=clock)
    old_lease.acquire()
    old = StoreRegistry(store, "m", None, keep_last=5, lease=old_lease)
    assert old.publish(b"one", {}, promote=True).metadata["writer_token"] == 1

    clock.now += 31  # node-a paused past its lease (GC, network partition)
    new_lease = StoreLease(store, "m/LEASE", "node-b", ttl_s=30, clock=clock)
    new_lease.acquire()
    new = StoreRegistry(store, "m", None, keep_last=5, lease=new_lease)
    assert new.publish(b"two", {}, promote=True).metadata["writer_token"] == 2

    with pytest.raises(RegistryError, match="fenced"):
        old.publish(b"stale", {}, promote=True)
    with pytest.raises(RegistryError, match="fenced"):
        old._set_champion(1, "stale", "promote")
    assert [info.version for info in new.list()] == [1, 2]
    assert new.champion().version == 2  # type: ignore[union-attr]


def test_the_token_in_the_store_fences_even_a_writer_that_believes_it_holds_the_lease(
    tmp_path: Path,
) -> None:
    """The lease check and the write are two requests: between them a takeover can
    happen. The high-water mark's token still refuses the stale writer."""
    store, clock = LocalStore(tmp_path), Clock()
    old_lease = StoreLease(store, "LEASE", "node-a", ttl_s=30, clock=clock)
    old_lease.acquire()
    old = StoreRegistry(store, "m", None, keep_last=5, lease=old_lease)
    old.publish(b"one", {}, promote=True)
    clock.now += 31
    new_lease = StoreLease(store, "LEASE", "node-b", ttl_s=30, clock=clock)
    new_lease.acquire()
    StoreRegistry(store, "m", None, keep_last=5, lease=new_lease).publish(b"2", {}, True)
    # A renewal and a check that passed just before the takeover.
    old_lease.renew = lambda: None  # type: ignore[method-assign]
    old_lease.check = lambda: 1  # type: ignore[method-assign]
    with pytest.raises(RegistryError, match="token 2, newer than this writer's 1"):
        old.publish(b"stale", {}, promote=True)


def test_a_publish_renews_the_lease_and_a_lost_one_is_fenced(tmp_path: Path) -> None:
    store, clock = LocalStore(tmp_path), Clock()
    lease = StoreLease(store, "LEASE", "node-a", ttl_s=30, clock=clock)
    lease.acquire()
    writer = StoreRegistry(store, "m", None, keep_last=5, lease=lease)
    clock.now += 25
    writer.publish(b"one", {}, promote=True)  # renews: valid until 1055
    clock.now += 25
    with pytest.raises(LeaseHeld):
        StoreLease(store, "LEASE", "node-b", ttl_s=30, clock=clock).acquire()
    clock.now += 10
    StoreLease(store, "LEASE", "node-b", ttl_s=30, clock=clock).acquire()
    with pytest.raises(RegistryError, match="fenced"):
        writer.publish(b"two", {}, promote=True)


def test_manual_promote_without_a_lease_keeps_the_stored_token(tmp_path: Path) -> None:
    store, clock = LocalStore(tmp_path), Clock()
    lease = StoreLease(store, "LEASE", "node-a", ttl_s=30, clock=clock)
    lease.acquire()
    writer = StoreRegistry(store, "m", None, keep_last=5, lease=lease)
    writer.publish(b"one", {}, promote=True)
    writer.publish(b"two", {}, promote=False)
    StoreRegistry(store, "m", None, keep_last=5).promote(2, "by hand")
    assert b'"token": 1' in store.get("m/CHAMPION").data
    writer.publish(b"three", {}, promote=True)  # the writer is not fenced by the CLI


def test_a_renewal_applied_but_unanswered_does_not_lose_the_lease(tmp_path: Path) -> None:
    store, clock = LocalStore(tmp_path), Clock()
    lease = StoreLease(store, "LEASE", "node-a", ttl_s=30, clock=clock)
    lease.acquire()
    real = store.put_if_match

    def applied_then_timed_out(key: str, data: bytes, etag: str) -> str:
        real(key, data, etag)
        raise ObjectStoreError("timed out")

    store.put_if_match = applied_then_timed_out  # type: ignore[method-assign]
    with pytest.raises(StoreLeaseError):
        lease.renew()
    store.put_if_match = real  # type: ignore[method-assign]
    clock.now += 10
    lease.renew()  # the ETag it knew is stale, but the lease is still its own
    assert lease.check() == 1


def test_the_keeper_renews_an_idle_writers_lease_every_third_of_its_ttl(tmp_path: Path) -> None:
    """A writer with nothing to checkpoint or publish keeps its lease: without the keeper
    a standby would take it over after one TTL and the writer's next write be fenced."""
    store, clock = LocalStore(tmp_path), Clock()
    writer = StoreLease(store, "LEASE", "node-a", ttl_s=30, clock=clock)
    writer.acquire()
    keeper = LeaseKeeper({"checkpoints": writer}, clock=clock)
    standby = StoreLease(store, "LEASE", "node-b", ttl_s=30, clock=clock)
    for _ in range(12):  # two minutes of an idle loop, ticking every 10 s
        clock.now += 10
        keeper.tick()
        with pytest.raises(LeaseHeld):
            standby.acquire()
    assert writer.check() == 1


def test_the_keeper_renews_only_when_due(tmp_path: Path) -> None:
    store, clock = LocalStore(tmp_path), Clock()
    writer = StoreLease(store, "LEASE", "node-a", ttl_s=30, clock=clock)
    writer.acquire()
    etag_after_acquire = store.get("LEASE").etag
    keeper = LeaseKeeper({"checkpoints": writer}, clock=clock)
    clock.now += 9.9
    keeper.tick()
    assert store.get("LEASE").etag == etag_after_acquire  # no PUT before ttl/3
    clock.now += 0.1
    keeper.tick()
    assert store.get("LEASE").etag != etag_after_acquire


def test_the_keeper_names_a_lease_taken_over(tmp_path: Path) -> None:
    store, clock = LocalStore(tmp_path), Clock()
    writer = StoreLease(store, "LEASE", "node-a", ttl_s=30, clock=clock)
    writer.acquire()
    keeper = LeaseKeeper({"registry": writer}, clock=clock)
    clock.now += 31  # the loop stalled past the TTL: a standby takes over
    StoreLease(store, "LEASE", "node-b", ttl_s=30, clock=clock).acquire()
    with pytest.raises(LeaseLost, match="registry lease"):
        keeper.tick()


def test_the_keeper_rides_out_a_store_error_and_retries_sooner(tmp_path: Path) -> None:
    store, clock = LocalStore(tmp_path), Clock()
    writer = StoreLease(store, "LEASE", "node-a", ttl_s=30, clock=clock)
    writer.acquire()
    keeper = LeaseKeeper({"checkpoints": writer}, clock=clock)
    real = store.put_if_match

    def unreachable(key: str, data: bytes, etag: str) -> str:
        raise ObjectStoreError("connection refused")

    store.put_if_match = unreachable  # type: ignore[method-assign]
    clock.now += 10
    keeper.tick()  # logged, not raised
    store.put_if_match = real  # type: ignore[method-assign]
    before = store.get("LEASE").etag
    clock.now += 3  # ttl/10 later, not ttl/3
    keeper.tick()
    assert store.get("LEASE").etag != before
    assert writer.check() == 1
