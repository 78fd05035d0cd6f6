"""Training state per input partition (``model.scope: partition``): the state manager.

One :class:`PartitionSlot` per partition this member owns. :meth:`PartitionSlots.restore`
claims the partition's slot in the shared checkpoint store (``slot_store.SlotStore``: a
MANIFEST compare-and-swap that fences the previous owner), restores its newest checkpoint
that verifies (or starts a fresh state) and builds the slot's checkpointer and publisher;
:meth:`PartitionSlots.hold` makes it held, :meth:`PartitionSlots.close` releases one. The
poll loop (:mod:`partition_service`) decides when: on assign, revoke, lost and stop. Slots
never share a state, a checkpointer or a registry folder, so a partition that moves takes
nothing of the others with it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stream_trainer.config import Settings
from stream_trainer.ingest.source import Record, Source
from stream_trainer.operations.cadence import Cadence
from stream_trainer.operations.faults import NO_CRASHES, CrashPoints
from stream_trainer.operations.metrics import Metrics
from stream_trainer.publishing.publisher import ModelPublisher
from stream_trainer.publishing.scoped_publish import ScopedPublishing
from stream_trainer.state.checkpoint import CheckpointManifest
from stream_trainer.state.checkpointer import Checkpointer, Snapshot
from stream_trainer.state.ledger import TopicPartitionKey, partition_key
from stream_trainer.state.slot_fence import SlotFence
from stream_trainer.state.slot_store import SlotStore
from stream_trainer.state.training_state import TrainingState

log = logging.getLogger(__name__)

SCOPE = "partition"


@dataclass
class PartitionSlot:
    """One owned partition's model and everything that writes it."""

    key: TopicPartitionKey
    scope_id: str  # "topic:partition": the slot's name in the store, registry and events
    store: SlotStore
    state: TrainingState
    checkpointer: Checkpointer
    publisher: ModelPublisher
    restored: bool  # False: a fresh state (the slot had no checkpoint that verified)
    pending: list[Record] = field(default_factory=list)  # consumed, not yet learnt
    pending_since: float = 0.0
    publish_wanted: str | None = None
    publish_retry_at: float = 0.0

    @property
    def checkpoint_offset(self) -> int | None:
        """The restored (then the newest durable) checkpoint's next offset."""
        return self.checkpointer.durable.get(self.key)


class PartitionSlots:
    """The slots of the partitions this member owns, keyed by partition.

    ``open_store(scope_id)`` builds a slot's :class:`SlotStore`; ``fenced_registry``: the
    registry is an object store, so each slot's publisher is fenced by its claim (a folder
    registry has no conditional writes to fence with). ``snapshot(slot, reason)`` is the
    poll loop's serialization of a slot (dead letters flushed first); ``source`` is read
    at each commit.
    """

    def __init__(
        self,
        settings: Settings,
        open_store: Callable[[str], SlotStore],
        new_state: Callable[[], TrainingState],
        validate: Callable[[Any, CheckpointManifest], None],
        publishing: ScopedPublishing,
        snapshot: Callable[[PartitionSlot, str], Snapshot],
        source: Callable[[], Source],
        metrics: Metrics,
        *,
        fenced_registry: bool,
        clock: Callable[[], float] = time.monotonic,
        crash: CrashPoints = NO_CRASHES,
    ) -> None:
        self._settings = settings
        self._open_store = open_store
        self._new_state = new_state
        self._validate = validate
        self._publishing = publishing
        self._snapshot = snapshot
        self._source = source
        self._metrics = metrics
        self._fenced_registry = fenced_registry
        self._clock = clock
        self._crash = crash
        self.slots: dict[TopicPartitionKey, PartitionSlot] = {}

    def __contains__(self, key: object) -> bool:
        return key in self.slots

    def get(self, key: TopicPartitionKey) -> PartitionSlot | None:
        return self.slots.get(key)

    def restore(self, key: TopicPartitionKey) -> PartitionSlot:
        """Claim ``key``'s slot and restore it, not held yet (:meth:`hold`): the store's I/O
        runs without the caller's lock. Raises SlotFenced (another member keeps claiming
        it) or CheckpointError (the store failed)."""
        started = time.perf_counter()
        scope_id = partition_key(key)
        store = self._open_store(scope_id)
        store.claim()
        self._crash.reached("after_claim")
        loaded = store.restore(self._validate)
        if loaded is not None:
            state: TrainingState = loaded.state
            # Only this partition's offset is the slot's (a partition slot holds one).
            state.offsets = {key: int(loaded.manifest.offsets[scope_id])}
            # A halted partition is released by its owner's restart: partition scope has no
            # control channel to resume it (docs/scale-out.md).
            for halted in list(state.halted):
                state.breaker.reset(halted)
            state.halted.clear()
        else:
            state = self._new_state()
        now = self._clock()
        cfg = self._settings.checkpoint
        slot_ref: list[PartitionSlot] = []
        checkpointer = Checkpointer(
            store,
            lambda reason: self._snapshot(slot_ref[0], reason),
            self._source,
            Cadence(cfg.every_records, cfg.every_seconds, since=now),
            self._metrics,
            durable=dict(state.offsets),
            clock=self._clock,
            crash=self._crash,
        )
        publisher = self._publisher(scope_id, store)
        slot = PartitionSlot(
            key, scope_id, store, state, checkpointer, publisher, loaded is not None
        )
        slot_ref.append(slot)
        publisher.reconcile(state)  # events a crash left unsent go out before new ones
        publisher.install(state, now)
        elapsed = time.perf_counter() - started
        self._metrics.slot_restore_duration.observe(elapsed)
        log.info(
            "partition slot restored" if loaded is not None else "partition slot started fresh",
            extra={
                "partition": scope_id,
                "offset": slot.checkpoint_offset,
                "records_learnt": state.records_learnt,
                "claim": store.manifest.token if store.manifest else None,
                "seconds": round(elapsed, 3),
            },
        )
        return slot

    def _publisher(self, scope_id: str, store: SlotStore) -> ModelPublisher:
        """The publisher of slot ``scope_id``, fenced by its claim on an object-store
        registry (key scope overrides it: there each key publishes, not the slot)."""
        fence = SlotFence(store) if self._fenced_registry else None
        return self._publishing.slot(scope_id, fence).publisher

    def hold(self, slot: PartitionSlot) -> None:
        """Hold a restored slot: the loop trains it from now on."""
        self.slots[slot.key] = slot

    def detach(self, key: TopicPartitionKey) -> PartitionSlot | None:
        """Stop holding ``key``'s slot, which stays open: the caller checkpoints or forgets
        it, then :meth:`release` s it, without the loop's lock."""
        return self.slots.pop(key, None)

    def release(self, slot: PartitionSlot) -> None:
        """Stop a detached slot's writer thread."""
        slot.checkpointer.close(self._settings.shutdown.timeout_s)

    def close(self, key: TopicPartitionKey) -> PartitionSlot | None:
        """Stop holding ``key``'s slot (its writer thread stopped); the caller has
        checkpointed or forgotten it first."""
        slot = self.detach(key)
        if slot is not None:
            self.release(slot)
        return slot
