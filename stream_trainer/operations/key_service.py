"""The poll loop of ``model.scope: key``: one model per record key, many keys per partition.

Built on partition scope, unchanged: the partition slot (its MANIFEST claim, checkpoints,
offset commits, hand-over on revoke, drop on lost) is the unit of ownership; its state is
a :class:`stream_trainer.state.keyed_state.KeyedState`, whose module docstring says why each
record's effect on its key's model is exactly once. This module adds, per unit:

- **split by key**: each valid record's key (the Kafka message key, or
  ``model.key.field``) is hashed (:func:`partitioner.scope_id_for_key`); a record without
  one is dead-lettered (``no_model_key``, the message saying why: null, missing, of
  another type, not valid Unicode); each key's rows learn in the key's own
  :class:`TrainingState` through the configured trainer (per_record / mini_batch);
- **load before learn**: every key of the unit that was evicted is read back (fetched
  side by side, verified and unpickled in turn) before any key learns, so a store
  failure halts the partition with nothing of the unit learnt (its owner's restart reads
  it again from the checkpoint);
- **evict**: while the member holds more than ``model.key.max_live_models`` key models,
  the least recently used ones are written create-only and dropped from memory;
- **collect**: every ``model.key.collect_interval_s`` per held partition, the key objects
  no checkpoint can name again are deleted on a thread of their own
  (:mod:`stream_trainer.state.key_collector`);
- **publish per key**: each key has its own publisher (registry folder ``key/<hash>/``,
  cadence counted per key, fenced by its partition slot's claim); a key due to publish
  has its partition checkpointed first, as partition scope does. A key due on its record
  count is published in the same poll iteration, before it may be evicted.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, cast

import msgspec
import numpy as np

from stream_trainer.config import Settings
from stream_trainer.errors import StreamTrainerError
from stream_trainer.ingest.deadletter import BadRecordBreaker
from stream_trainer.ingest.features import json_type
from stream_trainer.ingest.records import DecodedBatch, invalid_from_message
from stream_trainer.ingest.source import Record
from stream_trainer.operations.partition_service import PUBLISH_RETRY_S, PartitionService
from stream_trainer.publishing.partitioner import (
    KeyFieldError,
    key_bytes_from_field,
    scope_id_for_key,
)
from stream_trainer.publishing.publisher import ModelPublisher
from stream_trainer.publishing.registry import RegistryFenced, RegistryUnavailable
from stream_trainer.publishing.scoped_publish import ScopedPublishing
from stream_trainer.state.checkpoint import CheckpointFenced
from stream_trainer.state.key_collector import KeyObjectCollector
from stream_trainer.state.keyed_state import KeyedState, KeyStateError, KeyStateObjects
from stream_trainer.state.ledger import TopicPartitionKey
from stream_trainer.state.manager import PartitionSlot, PartitionSlots
from stream_trainer.state.slot_fence import SlotFence
from stream_trainer.state.slot_store import SlotStore
from stream_trainer.state.training_state import TrainingState
from stream_trainer.training.trainers import Refusal, UnitResult

log = logging.getLogger(__name__)

NO_MODEL_KEY = "no_model_key"
KEY_HALTED = "key_state_unreadable"
# Evicted key states fetched at once when a unit brings many back (store round trips).
LOAD_THREADS = 8
# Least seconds between two scans of one slot's keys for a due publish.
PUBLISH_SCAN_S = 0.25

# (partition, key hash): one key model of this member.
LiveKey = tuple[TopicPartitionKey, str]


def keyed(slot: PartitionSlot) -> KeyedState:
    """``slot``'s state in key scope."""
    state: Any = slot.state
    assert isinstance(state, KeyedState)
    return state


class NoModelKey(StreamTrainerError):
    """A record has no usable model key; the message says why, never the key's value."""


class KeyReader:
    """A record's key hash, from the Kafka key or the top-level JSON field ``field``."""

    def __init__(self, source: str, field: str | None) -> None:
        self._field = field if source == "field" else None
        # Per record, on the hot path: msgspec skips every other field and hands over the
        # key's JSON text, which json.loads then reads as it reads any value (big integers,
        # escapes); ~4x cheaper than json.loads of the whole record.
        only_key = msgspec.defstruct(
            "KeyField", [("key", msgspec.Raw, msgspec.Raw())], rename={"key": field or "key"}
        )
        self._only_key: msgspec.json.Decoder[Any] = msgspec.json.Decoder(only_key)

    def __call__(self, record: Record) -> str | None:
        """The key hash, or None when the record has none (:meth:`read` says why)."""
        try:
            return self.read(record)
        except NoModelKey:
            return None

    def _field_value(self, value: bytes, where: str) -> object:
        """The key field's value in the JSON object ``value``; NoModelKey if it is absent
        or unreadable."""
        try:
            text = bytes(self._only_key.decode(value).key)
        except msgspec.ValidationError:  # not a JSON object
            raise NoModelKey(f"{where} is missing") from None
        except msgspec.DecodeError:
            # msgspec is stricter than json (an unpaired surrogate escape): read the whole
            # record as before, so what a record says of its key does not depend on it.
            whole = self._loads(value, where)
            if not isinstance(whole, dict) or self._field not in whole:
                raise NoModelKey(f"{where} is missing") from None
            return whole[self._field]
        if not text:
            raise NoModelKey(f"{where} is missing")
        return self._loads(text, where)

    @staticmethod
    def _loads(text: bytes, where: str) -> object:
        try:
            return json.loads(text)
        except ValueError as error:  # the decoder accepted it: e.g. an int too long for str
            raise NoModelKey(f"{where}: the value could not be read: {error}") from None

    def read(self, record: Record) -> str:
        """The key hash of ``record``. Raises NoModelKey naming why it has none: Kafka key
        null; field missing, null, not a string or an integer, or a string that is not
        valid Unicode. The field is one top-level name: a dot in it is no path."""
        if self._field is None:
            raw = record.key()
            if raw is None:
                raise NoModelKey("the record's Kafka key is null (model.key.source: kafka_key)")
            return scope_id_for_key(raw)
        where = f"model.key.field {self._field!r}"
        found = self._field_value(record.value() or b"", where)
        if found is None:
            raise NoModelKey(f"{where} is null")
        try:
            return scope_id_for_key(key_bytes_from_field(found))
        except KeyFieldError:
            if isinstance(found, str):
                raise NoModelKey(
                    f"{where} is a string with an unpaired surrogate escape (not valid Unicode)"
                ) from None
            kind = (
                "a non-integer number (decimal point or exponent)"
                if isinstance(found, float)
                else json_type(found)
            )
            raise NoModelKey(f"{where} is {kind}, not a string or an integer") from None


class NoSlotPublisher(ModelPublisher):
    """A key-scope partition slot publishes nothing itself (its keys do)."""

    def __init__(self) -> None:  # no registry, no cadence: nothing is ever due
        pass

    def reconcile(self, state: TrainingState) -> None:
        return None

    def install(self, state: TrainingState, now: float) -> None:
        return None

    def observe(self, state: TrainingState, learnt: int) -> None:
        return None

    def due(self, state: TrainingState, wanted: str | None, now: float) -> str | None:
        return None


@dataclass
class KeyPublisher:
    """One live key's publisher and the publish it still owes after a registry outage."""

    publisher: ModelPublisher
    wanted: str | None = None
    retry_at: float = 0.0


class KeyedSlots(PartitionSlots):
    """Partition slots whose state is a KeyedState; detaching one forgets its keys."""

    def __init__(
        self, *args: Any, on_close: Callable[[PartitionSlot], None], **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._on_close = on_close

    def _publisher(self, scope_id: str, store: SlotStore) -> ModelPublisher:
        return NoSlotPublisher()

    def detach(self, key: TopicPartitionKey) -> PartitionSlot | None:
        slot = super().detach(key)
        if slot is not None:
            self._on_close(slot)
        return slot


class KeyService(PartitionService):
    """Partition scope's poll loop with a model per key; see the module docstring.

    ``objects`` stores evicted key states; ``publishing`` is the key scope's
    (``ScopedPublishing(scope="key")``); ``new_state`` builds a key's fresh state."""

    def __init__(
        self,
        *args: Any,
        objects: KeyStateObjects,
        publishing: ScopedPublishing,
        new_state: Callable[[], TrainingState],
        fenced_registry: bool,
        **kwargs: Any,
    ) -> None:
        settings: Settings = args[0]
        self._objects = objects
        self._key_publishing = publishing
        self._new_key_state = new_state
        self._fenced_registry = fenced_registry
        self._max_live = settings.model.key.max_live_models
        self._key_of = KeyReader(settings.model.key.source, settings.model.key.field)
        # Member-wide recency of the live key models, least recent first.
        self._lru: OrderedDict[LiveKey, None] = OrderedDict()
        self._publishers: dict[LiveKey, KeyPublisher] = {}
        self._tracked: set[TopicPartitionKey] = set()  # slots whose live keys are in _lru
        self._next_scan: dict[TopicPartitionKey, float] = {}
        # Live keys whose record count made a version due: published this step, not evicted.
        self._due: set[LiveKey] = set()
        self._collector = KeyObjectCollector(objects.store)
        self._collect_every = settings.model.key.collect_interval_s
        self._next_collect: dict[TopicPartitionKey, float] = {}
        self._collecting: Future[None] | None = None
        # One collection at a time, off the learner: it lists key/ and reads checkpoints.
        self._collect_pool = ThreadPoolExecutor(1, "key-collector")
        # Evicted keys of a unit are fetched side by side (threads start when first used).
        self._load_pool = ThreadPoolExecutor(LOAD_THREADS, "key-load")
        super().__init__(*args, **kwargs)

    # -- slots -----------------------------------------------------------------------------

    def forget_slot(self, slot: PartitionSlot) -> None:
        """``slot`` is no longer held: its keys leave memory with it (revoke, lost, fence)."""
        self._tracked.discard(slot.key)
        self._next_scan.pop(slot.key, None)
        self._next_collect.pop(slot.key, None)
        self._due = {live for live in self._due if live[0] != slot.key}
        for live in [live for live in self._lru if live[0] == slot.key]:
            del self._lru[live]
            self._publishers.pop(live, None)
        self._metrics.key_models_live.set(len(self._lru))

    def _ensure_tracked(self, slot: PartitionSlot, state: KeyedState) -> None:
        """A restored slot's live keys join the recency order (oldest: not used yet)."""
        if slot.key in self._tracked:
            return
        self._tracked.add(slot.key)
        for key_hash in state.live:
            live = (slot.key, key_hash)
            if live not in self._lru:
                self._lru[live] = None
                self._lru.move_to_end(live, last=False)

    # -- learning --------------------------------------------------------------------------

    def _train(
        self, slot: PartitionSlot, records: list[Record], batch: DecodedBatch
    ) -> UnitResult | None:
        # Under the lock, unlike partition scope's: the recency order and the eviction it
        # drives span every held slot, and a callback takes slots out under the lock.
        with self._lock:
            return self._train_keys(slot, records, batch)

    def _train_keys(
        self, slot: PartitionSlot, records: list[Record], batch: DecodedBatch
    ) -> UnitResult | None:
        state = keyed(slot)
        if slot.key in state.halted:
            return None  # not learnt, offsets not moved: read again after a restart
        self._ensure_tracked(slot, state)
        rows_of: dict[str, list[int]] = {}
        for row, index in enumerate(batch.valid_index.tolist()):
            try:
                key_hash = self._key_of.read(records[index])
            except NoModelKey as missing:
                batch.invalid.append(
                    invalid_from_message(
                        records[index], "learn", NO_MODEL_KEY, "NoModelKey", str(missing)
                    )
                )
                continue
            rows_of.setdefault(key_hash, []).append(row)
        try:
            self._load_missing(slot, state, list(rows_of))
        except KeyStateError as error:
            state.halted[slot.key] = KEY_HALTED
            self._pause(slot.key)  # by the poll thread, the one that drives the consumer
            self._report_slots()
            log.error(
                "partition halted: an evicted key state could not be read",
                extra={"partition": slot.scope_id, "reason": str(error)},
            )
            return None
        now = self._clock()
        learnt = unscored = 0
        refused: list[Refusal] = []
        seconds = 0.0
        for key_hash, rows in rows_of.items():
            key_state = state.live[key_hash]
            result = self._trainer.learn(key_state, _rows(batch, rows))
            learnt += result.learnt
            unscored += result.unscored
            refused.extend(result.refused)
            seconds += result.learn_seconds
            publisher = self._key_publisher(slot, key_hash, key_state).publisher
            publisher.observe(key_state, result.learnt)
            live = (slot.key, key_hash)
            if publisher.due(key_state, None, now) is not None:
                self._due.add(live)
            self._lru[live] = None
            self._lru.move_to_end(live)
        state.records_learnt += learnt
        self._evict_over_bound()
        return UnitResult(learnt, refused, 0.0, seconds, unscored)

    def _load_missing(self, slot: PartitionSlot, state: KeyedState, hashes: list[str]) -> None:
        """Every key of ``hashes`` live: evicted ones read back (fetched side by side), new
        ones fresh. All or nothing: on KeyStateError no key changed."""
        missing = [key_hash for key_hash in hashes if key_hash not in state.live]
        named = {h: state.evicted[h] for h in missing if h in state.evicted}
        self._heartbeat.beat()  # a unit of many evicted keys is many reads: progress
        loaded = self._objects.read_many(named, self._load_pool)
        self._heartbeat.beat()
        for key_hash in missing:
            found = loaded.get(key_hash)
            if found is None:
                state.live[key_hash] = self._new_key_state()
            else:
                state.live[key_hash] = found
                # Live again: the next checkpoint holds it, so it no longer names the object.
                del state.evicted[key_hash]
                self._metrics.key_models_loaded.inc()
            self._lru[(slot.key, key_hash)] = None

    def learn_step(self) -> bool:
        """Partition scope's learner iteration, then the bound restored: keys kept over it
        while due to publish were published in it (the live gauge is set here, once per
        iteration)."""
        learnt = super().learn_step()
        with self._lock:
            self._evict_over_bound(report=True)
        self._collect_due(self._clock())
        return learnt

    # -- collecting superseded key objects ----------------------------------------------------

    def _collect_due(self, now: float) -> None:
        """Start collecting the key objects of one held slot that is due, first collected
        one interval after it is first seen; nothing while a collection runs."""
        if self._collect_every <= 0:
            return
        if self._collecting is not None and not self._collecting.done():
            return
        with self._lock:
            chosen = None
            for key, slot in self.slots.slots.items():
                if now >= self._next_collect.setdefault(key, now + self._collect_every):
                    chosen = slot
                    break
            if chosen is None:
                return
            self._next_collect[chosen.key] = now + self._collect_every
            manifest = chosen.store.manifest
            token = manifest.token if manifest is not None else None
        self._collecting = self._collect_pool.submit(self._collect, chosen, token)

    def _collect(self, slot: PartitionSlot, token: int | None) -> None:
        """One collection, on the collector's thread; never raises (housekeeping)."""
        try:
            done = self._collector.collect(slot.store, slot.key[1], token)
        except Exception:  # a bug here must not pass silently, nor stop training
            log.exception("key object collection failed", extra={"partition": slot.scope_id})
            return
        self._metrics.key_objects_deleted.inc(done.deleted)
        log.info(
            "key objects collected",
            extra={
                "partition": slot.scope_id,
                "listed": done.listed,
                "named": done.named,
                "deleted": done.deleted,
                "skipped": done.skipped,
            },
        )

    def _shutdown(self) -> None:
        super()._shutdown()
        self._collect_pool.shutdown(wait=True, cancel_futures=True)
        self._load_pool.shutdown(wait=False, cancel_futures=True)

    def _evict_over_bound(self, report: bool = False) -> None:
        """Write out and drop the least recently used key models beyond the bound. Keys
        due to publish stay until this step's publish pass (a version due on its record
        count is never put off by an eviction); the bound is exceeded by those meanwhile."""
        excess = len(self._lru) - self._max_live
        victims: list[LiveKey] = []
        for live in self._lru:
            if len(victims) >= excess:
                break
            if live not in self._due:
                victims.append(live)
        for partition, key_hash in victims:
            slot = self.slots.get(partition)
            if slot is None:  # not held any more
                del self._lru[(partition, key_hash)]
                continue
            state = keyed(slot)
            token = slot.store.manifest.token if slot.store.manifest is not None else 0
            state.evictions += 1
            try:
                name = self._objects.write(
                    key_hash, partition[1], token, state.evictions, state.live[key_hash]
                )
            except KeyStateError as error:
                # Kept in memory (over the bound) rather than lost; tried again next unit.
                log.warning("key state could not be evicted", extra={"reason": str(error)})
                break
            state.evicted[key_hash] = name
            del state.live[key_hash]
            del self._lru[(partition, key_hash)]
            self._publishers.pop((partition, key_hash), None)
            self._metrics.key_models_evicted.inc()
        if report:
            self._metrics.key_models_live.set(len(self._lru))

    # -- publishing ------------------------------------------------------------------------

    def _key_publisher(
        self, slot: PartitionSlot, key_hash: str, key_state: TrainingState
    ) -> KeyPublisher:
        live = (slot.key, key_hash)
        found = self._publishers.get(live)
        if found is None:
            fence = SlotFence(slot.store) if self._fenced_registry else None
            publisher = self._key_publishing.slot(key_hash, fence).publisher
            publisher.reconcile(key_state)
            publisher.install(key_state, self._clock())
            found = self._publishers[live] = KeyPublisher(publisher)
        return found

    def _publish_if_due(self, slot: PartitionSlot, now: float) -> None:
        """Publish each of ``slot``'s live keys that is due, its partition checkpointed
        first (a version never holds records its partition's checkpoint could lose)."""
        # Keys that learnt past their record count are known (_due); scanning every live
        # key (for the time trigger, retries) costs O(keys): at most every PUBLISH_SCAN_S.
        state = keyed(slot)
        hashes = [h for p, h in self._due if p == slot.key] if self._due else []
        if now >= self._next_scan.get(slot.key, 0.0):
            self._next_scan[slot.key] = now + PUBLISH_SCAN_S
            hashes = list(state.live)
        due: list[tuple[str, KeyPublisher, str]] = []
        for key_hash in hashes:
            self._due.discard((slot.key, key_hash))
            key_state = state.live.get(key_hash)
            found = self._publishers.get((slot.key, key_hash))
            if key_state is None or found is None or now < found.retry_at:
                continue
            trigger = found.publisher.due(key_state, found.wanted, now)
            if trigger is not None:
                due.append((key_hash, found, trigger))
        if not due:
            return
        try:
            self._checkpoint_now(slot, "publish")
            for key_hash, found, trigger in due:
                found.wanted = None
                try:
                    found.publisher.publish(state.live[key_hash], trigger, now)
                except RegistryUnavailable as error:
                    found.wanted = trigger
                    found.retry_at = now + PUBLISH_RETRY_S
                    log.warning(
                        "registry unavailable, key publish retried later",
                        extra={"partition": slot.scope_id, "key": key_hash, "reason": str(error)},
                    )
        except (CheckpointFenced, RegistryFenced) as error:
            self._fence(slot.key, str(error))


def _rows(batch: DecodedBatch, rows: list[int]) -> DecodedBatch:
    """The sub-batch of ``batch``'s valid rows ``rows`` (message indexes kept)."""
    index = np.asarray(rows, dtype=np.int64)
    return replace(
        batch,
        X=batch.X[index],
        y=batch.y[index],
        weights=None if batch.weights is None else batch.weights[index],
        valid_index=batch.valid_index[index],
        invalid=[],
        topics=[batch.topics[i] for i in rows],
        partitions=batch.partitions[index],
        offsets=batch.offsets[index],
    )


def new_keyed_state(settings: Settings) -> Callable[[], TrainingState]:
    """A fresh partition state of key scope (typed as the slot's state)."""
    return lambda: cast("TrainingState", KeyedState(BadRecordBreaker(settings.dead_letter)))


def validate_keyed(settings: Settings) -> Callable[[Any, Any], None]:
    """The check a key-scope partition checkpoint passes before it is used."""

    def _validate(state: Any, manifest: Any) -> None:
        if not isinstance(state, KeyedState):
            raise ValueError(f"payload is a {type(state).__name__}, not a KeyedState")
        if manifest.config_hash != settings.config_hash():
            raise ValueError("checkpoint was written for another model/record/training config")

    return _validate
