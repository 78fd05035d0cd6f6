"""A slot's claim as the fence of the slot's registry (docs/design/scale-out.md, 6.1
"Fencing").

The registry of a scoped slot must refuse a member that no longer owns the slot, as
:class:`stream_trainer.publishing.store_registry.StoreRegistry` refuses a writer whose
:class:`stream_trainer.state.store_lease.StoreLease` was taken over. A slot has no lease: it is
owned by the member whose claim the slot's ``MANIFEST`` carries
(:class:`stream_trainer.state.slot_store.SlotStore`), until another member claims it. So the
fence's ``check`` re-reads that ``MANIFEST`` and compares token and owner, and its token
(stamped as ``writer_token`` and ``token`` by the registry) is the slot's.
"""

from __future__ import annotations

from stream_trainer.state.checkpoint import CheckpointError
from stream_trainer.state.slot_store import SlotStore
from stream_trainer.state.store_lease import LeaseLost, StoreLeaseError


class SlotClaimLost(LeaseLost):
    """The slot is not (or no longer) claimed by this member: it must publish nothing more
    for it (the registry turns this into RegistryFenced)."""


class SlotFence:
    """The :class:`stream_trainer.publishing.store_registry.Fence` of one slot, over the member's
    :class:`SlotStore` of that slot (the same object its checkpoints are written with, so
    a re-claim by this member is seen at once)."""

    def __init__(self, slot: SlotStore) -> None:
        self._slot = slot

    def __repr__(self) -> str:
        return f"SlotFence({self._slot!r})"

    @property
    def token(self) -> int | None:
        """The token of this member's claim; None before a claim or once fenced."""
        manifest = self._slot.manifest
        return manifest.token if manifest is not None else None

    def check(self) -> int:
        """This member's token, after one GET of the ``MANIFEST`` shows it still carries
        that token and this member as owner. Raises SlotClaimLost otherwise (claimed by
        another member, never claimed, or gone), StoreLeaseError when the ``MANIFEST``
        cannot be read or does not verify (the store cannot tell: try again later)."""
        mine = self._slot.manifest
        where = f"slot {self._slot.path}"
        if mine is None:
            raise SlotClaimLost(f"{where} is not claimed by {self._slot.member_id}")
        try:
            seen = self._slot.read().manifest
        except CheckpointError as error:
            raise StoreLeaseError(f"{where}: {error}") from None
        if seen is None or (seen.token, seen.owner) != (mine.token, self._slot.member_id):
            found = f"token {seen.token}, owner {seen.owner!r}" if seen else "no MANIFEST"
            raise SlotClaimLost(
                f"{where} was claimed over ({found}); {self._slot.member_id} held token "
                f"{mine.token}"
            )
        return mine.token

    def renew(self) -> None:
        """As :meth:`check`: a claim does not expire, it lasts until another member's."""
        self.check()
