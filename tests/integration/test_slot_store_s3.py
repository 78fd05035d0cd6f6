"""A slot's MANIFEST on a real S3 server (SeaweedFS): two members claiming the same slot
at the same moment, each through its own client, as two pods handed the same partition by
successive rebalances would. The store's conditional writes are the only arbiter."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from stream_trainer.state.objectstore import open_store
from stream_trainer.state.slot_store import (
    ManifestRead,
    SlotFenced,
    SlotManifest,
    SlotStore,
    object_name,
)
from stream_trainer.testing.seaweedfs import SeaweedFS
from tests.harness import settings_for

pytestmark = pytest.mark.integration

KEY = b"slot-store-s3-key"
SLOT = "orders:0"


def member(
    server: SeaweedFS, url: str, tmp_path: Path, name: str, swaps: list[str] | None = None
) -> SlotStore:
    """A member with its own client; ``swaps`` collects its conditional MANIFEST writes."""

    def observe(operation: str, _seconds: float, _failed: bool) -> None:
        if swaps is not None and operation == "put_if_match":
            swaps.append(name)

    store = open_store(url, settings_for(server, tmp_path, server.admin), observe)
    return SlotStore(store, "partition", SLOT, name, KEY, allow_unsigned=False, keep_last=3)


def write(owner: SlotStore, n: int) -> str:
    manifest = {
        "offsets": {SLOT: n},
        "model_version": None,
        "config_hash": "c" * 64,
        "records_learnt": n,
        "metrics": {},
        "extra": {},
    }
    return owner.write(owner.serialize({"n": n}), manifest).path.rsplit("/", 1)[-1]


def race(racers: list[SlotStore]) -> dict[str, SlotManifest | Exception]:
    """Each racer reads the MANIFEST, then all claim at once on the ETag they read, as the
    assign callbacks of two members would; what each got (a MANIFEST or an error)."""
    claims: dict[str, SlotManifest | Exception] = {}
    seen = [racer.read() for racer in racers]
    start = threading.Barrier(len(racers))

    def claim(racer: SlotStore, read: ManifestRead) -> None:
        start.wait(timeout=30)
        try:
            claims[racer.member_id] = racer.claim(read)
        except Exception as error:  # recorded: the test says which errors are allowed
            claims[racer.member_id] = error

    threads = [threading.Thread(target=claim, args=pair) for pair in zip(racers, seen, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return claims


def test_two_claimants_racing_one_owner_left_the_other_fenced(
    s3_server: SeaweedFS, s3_url: str, tmp_path: Path
) -> None:
    first = member(s3_server, s3_url, tmp_path, "member-a")
    first.claim()
    head = write(first, 1)
    for round_ in range(5):
        swaps: list[str] = []
        racers = [
            member(s3_server, s3_url, tmp_path, f"member-{round_}-{i}", swaps) for i in range(2)
        ]
        before = racers[0].read().manifest
        assert before is not None
        claims = race(racers)
        # Both CAS on the same ETag: the server refused one, whose claimant read again and
        # claimed over the winner. So each got its own token, the later one owns the slot.
        assert all(isinstance(c, SlotManifest) for c in claims.values()), claims
        assert len(swaps) == 3, swaps
        won = {name: c for name, c in claims.items() if isinstance(c, SlotManifest)}
        tokens = sorted(c.token for c in won.values())
        assert tokens == [before.token + 1, before.token + 2]
        stored = racers[0].read().manifest
        assert stored is not None and stored.token == tokens[-1]
        assert stored.head == head  # a claim never moves the head
        owner = next(r for r in racers if r.member_id == stored.owner)
        loser = next(r for r in racers if r is not owner)

        with pytest.raises(SlotFenced):  # claimed first, then claimed over: a zombie now
            write(loser, 100 + round_)
        with pytest.raises(SlotFenced):
            write(first, 200 + round_)  # every earlier owner is fenced too
        loaded = owner.restore()
        assert loaded is not None and loaded.state == {"n": round_ + 1}
        head = write(owner, round_ + 2)
        assert head == object_name(loaded.manifest.sequence + 1, stored.token)
        first = owner
    final = first.read().manifest
    assert final is not None and final.head == head and len(final.previous) == 2
    # Retention left the named objects and nothing a fenced owner uploaded.
    listed = {
        info.key.rsplit("/", 1)[-1]
        for info in first.store.list(f"{first.path}/")
        if not info.key.endswith("MANIFEST")
    }
    assert listed == set(final.named)
