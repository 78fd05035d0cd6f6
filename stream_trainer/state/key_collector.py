"""Deleting the evicted key states of one partition that no checkpoint can name again.

Key scope writes a key's state to a create-only object each time the key is evicted
(:class:`stream_trainer.state.keyed_state.KeyStateObjects`) and never overwrites one, so
the store keeps every state a key ever had: a key evicted and loaded back a thousand times
leaves a thousand objects, of which at most the ones the slot's retained checkpoints name
are of any use. Crashes leave orphans too (objects written after the last durable
checkpoint). :class:`KeyObjectCollector` deletes the rest.

**The rule.** Read the slot's MANIFEST afresh and every checkpoint it retains (``head``
and ``previous``), each verified; let *oldest* be the least ``(claim token, eviction
count)`` among them. An object of the partition is deleted only if

1. no retained checkpoint names it (so neither a restore from ``previous`` nor any
   checkpoint written from a restored one needs it), and
2. its ``(token, sequence)`` is at most *oldest*'s: it was written by an earlier claim,
   or by *oldest*'s own owner before *oldest* was serialized (a slot's eviction sequence
   only grows under one claim, and eviction and serialization exclude each other).

Why that is enough: every name a future checkpoint can hold is either carried from the
checkpoint its owner restored — then named by a retained one, since each checkpoint names
all the evicted keys of its moment — or written by that owner after its restore, which is
newer than *oldest* by rule 2. Objects of an earlier claim that no retained checkpoint
names are a fenced owner's (superseded, or orphaned by a crash): no checkpoint will ever
name them. A rule on names or times alone is wrong: after a claim, the new owner's
checkpoints go on naming an object the fenced owner had already superseded with a newer
one that nothing names. A retained checkpoint that cannot be read stops the collection
(nothing is deleted): what it names is unknown.

The rule holds for any consistent MANIFEST, however stale, so a member collecting a slot
that is being claimed over deletes nothing the new owner needs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from stream_trainer.state.checkpoint import CheckpointError
from stream_trainer.state.keyed_state import KEY_PREFIX, KeyedState, KeyObjectName
from stream_trainer.state.objectstore import ObjectStore, ObjectStoreError
from stream_trainer.state.slot_store import SlotStore
from stream_trainer.state.store_checkpoint import CheckpointMissing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Collection:
    """What one collection of a partition's key objects found and did."""

    listed: int  # the partition's key objects before
    named: int  # named by a retained checkpoint
    deleted: int
    skipped: str | None = None  # why nothing was looked at (no checkpoint, not ours...)

    @classmethod
    def skip(cls, why: str, named: int = 0) -> Collection:
        """A collection that deleted nothing, and why."""
        return cls(0, named, 0, skipped=why)


class KeyObjectCollector:
    """Deletes a partition's key objects by the rule of the module docstring.

    ``store`` is the checkpoint root (where ``key/`` is). Read-only except for the
    deletions; safe on any thread beside the slot's owner."""

    def __init__(self, store: ObjectStore) -> None:
        self._store = store

    def collect(self, slot: SlotStore, partition: int, token: int | None) -> Collection:
        """Collect ``partition``'s key objects for its slot ``slot``, which this member
        holds under claim ``token`` (nothing is done if the MANIFEST shows another: a
        later owner collects its own). Store errors are logged and end the collection."""
        try:
            found = slot.read_named()
        except CheckpointMissing:
            # The owner wrote a newer checkpoint and retired this one meanwhile: next time.
            return Collection.skip("checkpoint retired meanwhile")
        except CheckpointError as error:
            log.warning(
                "key objects not collected: a retained checkpoint could not be read",
                extra={"partition": slot.scope_id, "reason": str(error)},
            )
            return Collection.skip("unreadable checkpoint")
        if found is None or not found[1]:
            return Collection.skip("no checkpoint")
        manifest, retained = found
        if manifest.token != token:
            return Collection.skip("claimed by another member")
        named: set[str] = set()
        oldest: tuple[int, int] | None = None
        for loaded in retained:
            state, written_by = loaded.state, loaded.manifest.token
            if not isinstance(state, KeyedState) or written_by is None:
                return Collection.skip("not a key-scope slot checkpoint")
            named.update(state.evicted.values())
            mark = (written_by, state.evictions)
            oldest = mark if oldest is None else min(oldest, mark)
        assert oldest is not None
        try:
            listed = self._store.list(f"{KEY_PREFIX}/")
        except ObjectStoreError as error:
            log.warning(
                "key objects not collected: the store could not be listed",
                extra={"partition": slot.scope_id, "reason": str(error)},
            )
            return Collection.skip("store unavailable", len(named))
        mine = [
            (info.key, parsed)
            for info in listed
            if (parsed := KeyObjectName.parse(info.key)) is not None
            and parsed.partition == partition
        ]
        deleted = 0
        for name, parsed in mine:
            if name in named or (parsed.token, parsed.sequence) > oldest:
                continue
            try:
                self._store.delete(name)
            except ObjectStoreError as error:
                log.warning(
                    "key object not deleted; tried again at the next collection",
                    extra={"partition": slot.scope_id, "reason": str(error)},
                )
                break
            deleted += 1
        return Collection(len(mine), sum(name in named for name, _ in mine), deleted)
