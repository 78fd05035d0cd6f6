"""Publishing the versions of a partition- or key-scoped model (docs/design/scale-out.md,
6.1 and 6.2), as library pieces the partition-scoped service wires in.

Each slot is published exactly like a global model, by the same parts:

- its registry is a :class:`stream_trainer.publishing.registry.ModelRegistry` (folder) or
  :class:`stream_trainer.publishing.store_registry.StoreRegistry` (object store) rooted at the
  slot's
  folder, ``<root>/<model>/partition/<topic>/<p>/`` or ``<root>/<model>/key/<hash>/``
  (:func:`stream_trainer.publishing.scoped_versions.scope_prefix`): its own numbering, champion,
  decisions and sent-markers, while metadata names the model itself (``model_name``)
  with ``scope``, ``scope_id`` and, under a fence, the slot's ``token`` beside it;
- its gate, cadence and metadata are a :class:`stream_trainer.publishing.publisher.ModelPublisher`
  (so the one promotion rule, :func:`stream_trainer.publishing.events.judge`);
- its events go through :class:`ScopedEventPublisher`, a
  :class:`stream_trainer.publishing.events.VersionEventPublisher` sending ``scoped_version`` /
  ``scoped_champion`` events keyed ``<model>/<scope>/<scope_id>``: canonical JSON,
  at least once, the sent-marker written after the broker's acknowledgement, so a crash
  in between resends the byte-identical event (``ModelPublisher.reconcile``);
- a fence (:class:`stream_trainer.state.slot_fence.SlotFence` over the slot's claim) makes the
  store registry refuse a member that no longer owns the slot (RegistryFenced).

:class:`ScopedPublishing` writes the model's ``ROUTING.json`` once
(:mod:`stream_trainer.publishing.routing_file`) and hands out one :class:`SlotPublishing` per slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stream_trainer.config import Settings
from stream_trainer.operations.faults import NO_CRASHES, CrashPoints
from stream_trainer.operations.metrics import Metrics
from stream_trainer.publishing.events import VersionEventPublisher
from stream_trainer.publishing.publisher import ModelPublisher
from stream_trainer.publishing.registry import ModelRegistry, Registry, VersionInfo
from stream_trainer.publishing.routing_file import write_routing
from stream_trainer.publishing.scoped_versions import (
    Routing,
    check_scope,
    scope_prefix,
    scoped_champion_event,
    scoped_event_key,
    scoped_version_event,
)
from stream_trainer.publishing.store_registry import Fence, StoreRegistry
from stream_trainer.state.objectstore import ObjectStore, is_store_url, open_store


class ScopedEventPublisher(VersionEventPublisher):
    """The version events of one slot: ``scoped_version`` on publish, ``scoped_champion``
    on a manual promote / rollback, Kafka key ``<model>/<scope>/<scope_id>``. Delivery,
    sent-markers (in the slot's registry) and :meth:`republish_pending` are the base
    class's."""

    def __init__(
        self,
        producer: Any,
        topic: str,
        model_name: str,
        scope: str,
        scope_id: str,
        routing: Routing,
        timeout_s: float = 30.0,
    ) -> None:
        check_scope(model_name, scope, scope_id)
        super().__init__(producer, topic, model_name, timeout_s)
        self.scope = scope
        self.scope_id = scope_id
        self.routing = routing

    def event_key(self) -> bytes:
        return scoped_event_key(self._model_name, self.scope, self.scope_id)

    def version_value(self, info: VersionInfo) -> bytes:
        return scoped_version_event(
            self._model_name,
            self.scope,
            self.scope_id,
            info.metadata,
            info.artifact_uri,
            self.routing,
        )

    def champion_value(self, info: VersionInfo, reason: str) -> bytes:
        return scoped_champion_event(
            self._model_name, self.scope, self.scope_id, info, reason, self.routing
        )


@dataclass(frozen=True)
class SlotPublishing:
    """One slot's publishing parts: ``publisher`` is what the trainer calls
    (``reconcile`` after a restore, ``observe`` / ``due`` / ``publish``), ``registry`` and
    ``events`` are the slot's (for a CLI's promote / rollback, and tests)."""

    scope_id: str
    registry: Registry
    events: ScopedEventPublisher | None
    publisher: ModelPublisher


class ScopedPublishing:
    """The versions of one scoped model (``settings.model.name``) under
    ``settings.registry.root``, in ``scope`` (``partition`` | ``key``), routed by
    ``routing``.

    Construction writes ``<root>/<model>/ROUTING.json`` or accepts an identical one
    (RoutingConflict for another routing: nothing is published under a routing its
    readers would not follow). An object-store root is opened once (or ``store`` is used)
    and shared by every slot's registry. ``producer`` None: no events (tests, dry runs).
    """

    def __init__(
        self,
        settings: Settings,
        scope: str,
        routing: Routing,
        producer: Any | None,
        metrics: Metrics,
        *,
        crash: CrashPoints = NO_CRASHES,
        store: ObjectStore | None = None,
    ) -> None:
        self.settings = settings
        self.model_name = settings.model.name
        self.scope = scope
        self.routing = routing
        self._producer = producer
        self._metrics = metrics
        self._crash = crash
        root = settings.registry.root
        self.store: ObjectStore | None = None
        self._root: Path | None = None
        if isinstance(root, str) and is_store_url(root):
            self.store = store or open_store(
                root, settings.object_store, metrics.observe_object_store
            )
            where: Path | ObjectStore = self.store
        else:
            self._root = Path(root)
            where = self._root
        self.routing_document = write_routing(where, self.model_name, scope, routing)

    def registry(self, scope_id: str, fence: Fence | None = None) -> Registry:
        """The registry of slot ``scope_id`` (6.1 layout), fenced by ``fence`` (object
        stores only: a folder has no conditional writes to fence with, ValueError)."""
        folder = scope_prefix(self.model_name, self.scope, scope_id)
        key = self.settings.checkpoint.key()
        keep_last = self.settings.registry.keep_last
        if self.store is None:
            if fence is not None:
                raise ValueError(
                    f"registry {self._root}: a slot fence needs an object-store registry "
                    "(a folder has no conditional writes to fence with)"
                )
            assert self._root is not None
            return ModelRegistry(
                self._root, self.model_name, key, keep_last, self._crash.reached, folder=folder
            )
        return StoreRegistry(
            self.store, self.model_name, key, keep_last, fence, self._crash.reached, folder=folder
        )

    def events(self, scope_id: str) -> ScopedEventPublisher | None:
        """The event publisher of slot ``scope_id`` (None without a producer)."""
        if self._producer is None:
            return None
        return ScopedEventPublisher(
            self._producer,
            self.settings.topics.versions,
            self.model_name,
            self.scope,
            scope_id,
            self.routing,
        )

    def slot(self, scope_id: str, fence: Fence | None = None) -> SlotPublishing:
        """Everything publishing slot ``scope_id`` needs, fenced by ``fence`` (the slot's
        :class:`stream_trainer.state.slot_fence.SlotFence`) when given."""
        registry = self.registry(scope_id, fence)
        events = self.events(scope_id)
        scope = self.scope

        def stamp() -> dict[str, Any]:
            fields: dict[str, Any] = {"scope": scope, "scope_id": scope_id}
            token = fence.token if fence is not None else None
            if token is not None:
                fields["token"] = token
            return fields

        publisher = ModelPublisher(
            self.settings, registry, events, self._metrics, crash=self._crash, stamp=stamp
        )
        return SlotPublishing(scope_id, registry, events, publisher)
