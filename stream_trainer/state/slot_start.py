"""Where a partition starts when its slot changes owner: the table of
docs/design/scale-out.md section 4.4, as one pure function.

Invariant it relies on: offsets are committed only after the checkpoint covering them is
durable (its MANIFEST moved), and only by the owner, so the group's offset *g* is at most
the newest checkpoint's offset *c* unless that checkpoint was lost (quarantined).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

# confluent_kafka.OFFSET_BEGINNING, without importing the client into a pure function.
OFFSET_BEGINNING = -2


class HasOffsets(Protocol):
    """A slot MANIFEST (``slot_store.SlotManifest``) or a checkpoint's manifest
    (``checkpoint.CheckpointManifest``): next offsets by ``"topic:partition"``."""

    @property
    def offsets(self) -> Mapping[str, int]: ...


@dataclass(frozen=True)
class Start:
    """Where to start and what to do at once.

    ``commit``: commit ``offset`` now (the old owner died between its MANIFEST CAS and its
    commit). ``warning``: log it. ``refuse``: the group has an offset but the partition no
    checkpoint, so another model (e.g. a ``global`` one) trained this group: the caller
    must refuse to start unless the group was migrated."""

    offset: int
    commit: bool = False
    warning: str | None = None
    refuse: bool = False


def start_offset(manifest: HasOffsets | None, group_offset: int | None) -> Start:
    """The start of one partition from the ``manifest`` its new owner resumes from (the
    claimed MANIFEST at assign, or the manifest of the checkpoint that verified when the
    head did not) and the group's committed offset (None or negative: none committed).

    A partition slot's manifest holds exactly one offset (ValueError otherwise); one
    with none is a slot claimed but never written."""
    checkpoint: int | None = None
    if manifest is not None and manifest.offsets:
        if len(manifest.offsets) != 1:
            raise ValueError(
                f"a partition slot holds exactly one offset, not {sorted(manifest.offsets)}"
            )
        (checkpoint,) = manifest.offsets.values()
    group = group_offset if group_offset is not None and group_offset >= 0 else None
    if checkpoint is None:
        if group is None:
            return Start(OFFSET_BEGINNING)
        return Start(
            group,
            warning=f"the group committed offset {group} but the partition has no "
            "checkpoint: another model trained this group (migrate it first)",
            refuse=True,
        )
    if group is None or group < checkpoint:
        return Start(checkpoint, commit=True)
    if group == checkpoint:
        return Start(checkpoint)
    return Start(
        checkpoint,
        warning=f"newer checkpoint lost; learning again from {checkpoint} (the group had "
        f"committed {group})",
    )
