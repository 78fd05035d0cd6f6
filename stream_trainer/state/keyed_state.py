"""The state of one partition slot in ``model.scope: key``: one model per key.

The partition slot (:mod:`partition_slots`) stays the unit of ownership, claim, checkpoint,
offset commit and hand-over, exactly as in partition scope. Its state is a
:class:`KeyedState`: the partition-level bookkeeping the poll loop and the checkpointer
read (offsets, ledger, breaker, halted, counters) plus, per key of the partition,

- ``live[hash]``: the key's full :class:`TrainingState` (model, evaluator, publish
  cadence...), held in memory; or
- ``evicted[hash]``: the name of a create-only object holding that state, written when the
  member held more than ``model.key.max_live_models`` key models
  (:class:`KeyStateObjects`, ``key/<hash>/state-p<partition>-t<token>-<seq>.ckpt`` under
  ``checkpoint.dir``, signed and verified like a checkpoint).

A key is ``hash = partitioner.scope_id_for_key(key bytes)``: the raw key is never in a
name, log line, metric or event.

**Why exactly once holds.** The partition checkpoint is the only source of truth. A key
object is read only because the partition checkpoint being resumed names it in
``evicted``; objects are never overwritten (create-only, a fresh name per eviction, the
claim token in it), so a named object always holds the bytes the checkpoint meant. After a
crash, objects written after the last durable partition checkpoint are orphans nobody
names: the restored checkpoint's view of each key (its ``live`` state, or the object it
named) is what resumes, and every record after the checkpoint's offset is learnt again by
that state — the same records on the same state, so each record's effect on its key's
model is once. A zombie member's evictions carry its old token, so they never take a name
the new owner uses. Orphans and superseded objects are deleted by
:mod:`stream_trainer.state.key_collector`, which says why it never deletes one a
checkpoint can still name.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from stream_trainer.errors import StreamTrainerError
from stream_trainer.ingest.deadletter import BadRecordBreaker
from stream_trainer.state.checkpoint import (
    CheckpointError,
    CheckpointManifest,
    _PolicyRefusal,
    _Rejected,
)
from stream_trainer.state.ledger import OffsetLedger, TopicPartitionKey
from stream_trainer.state.objectstore import ObjectExists, ObjectStore, ObjectStoreError
from stream_trainer.state.store_checkpoint import CheckpointMissing, ObjectCodec
from stream_trainer.state.training_state import TrainingState

KEY_PREFIX = "key"
_NAME = re.compile(r"^key/([0-9a-f]{32})/state-p(\d+)-t(\d+)-(\d{12})\.ckpt$")


class KeyStateError(StreamTrainerError):
    """An evicted key state could not be written or read back (store error, missing, or
    it failed verification): the partition must not learn on without it."""


@dataclass
class KeyedState:
    """One partition's key models and the partition's bookkeeping; picklable, mutated
    only on the poll thread. ``model_version`` stays None: versions are per key."""

    breaker: BadRecordBreaker
    offsets: dict[TopicPartitionKey, int] = field(default_factory=dict)
    ledger: OffsetLedger = field(default_factory=OffsetLedger)
    halted: dict[TopicPartitionKey, str] = field(default_factory=dict)
    records_learnt: int = 0
    records_dead_lettered: int = 0
    model_version: int | None = None
    live: dict[str, TrainingState] = field(default_factory=dict)
    evicted: dict[str, str] = field(default_factory=dict)
    # The sequence of the last evicted object this slot named (names never repeat).
    evictions: int = 0

    def metrics_snapshot(self) -> dict[str, Any]:
        """The checkpoint manifest's metrics: counts only (each key has its own metrics)."""
        return {
            "keys_live": len(self.live),
            "keys_evicted": len(self.evicted),
            "records": self.records_learnt,
        }

    def keys(self) -> set[str]:
        """Every key hash this partition has a model for."""
        return set(self.live) | set(self.evicted)


def object_name(key_hash: str, partition: int, token: int, sequence: int) -> str:
    """The create-only object of an evicted key state."""
    return f"{KEY_PREFIX}/{key_hash}/state-p{partition}-t{token}-{sequence:012d}.ckpt"


@dataclass(frozen=True)
class KeyObjectName:
    """What an evicted key state's object name says: whose key, which partition's slot
    wrote it, under which claim token, and the slot's eviction sequence at the time."""

    key_hash: str
    partition: int
    token: int
    sequence: int

    @classmethod
    def parse(cls, name: str) -> KeyObjectName | None:
        """The parts of ``name`` (a key relative to the checkpoint root), or None when it
        is not an evicted key state's object."""
        match = _NAME.match(name)
        if match is None:
            return None
        key_hash, partition, token, sequence = match.groups()
        return cls(key_hash, int(partition), int(token), int(sequence))


class KeyStateObjects(ObjectCodec):
    """Evicted key states in the checkpoint store: the checkpoint format (manifest signed
    with the checkpoint key, payload sha256), scope ``key``, scope id the key hash, the
    object name's partition, token and sequence in the manifest. Written create-only,
    never overwritten, never deleted here (:mod:`key_collector` deletes)."""

    def __init__(
        self, store: ObjectStore, key: bytes | None, allow_unsigned: bool, config_hash: str
    ) -> None:
        super().__init__(store.url, key, allow_unsigned, keep_last=1)
        self.store = store
        self._config_hash = config_hash

    def write(
        self, key_hash: str, partition: int, token: int, sequence: int, state: TrainingState
    ) -> str:
        """Upload ``state`` as ``key_hash``'s object ``sequence`` (the next free one if taken);
        returns its name. Raises KeyStateError on a store error."""
        payload = self.serialize(state)
        for attempt in range(3):
            seq = sequence + attempt
            name = object_name(key_hash, partition, token, seq)
            fields = self._manifest_fields(
                payload,
                {
                    "offsets": {},
                    "model_version": state.model_version,
                    "config_hash": self._config_hash,
                    "records_learnt": state.records_learnt,
                    "metrics": state.metrics_snapshot(),
                    "extra": {"partition": partition},
                },
            )
            fields.update(scope="key", scope_id=key_hash, token=token, sequence=seq)
            try:
                self.store.put_if_absent(name, self._encode_header(fields) + payload)
            except ObjectExists:
                continue  # an upload whose answer was lost: never overwrite, take the next
            except ObjectStoreError as error:
                raise KeyStateError(f"key state {name} could not be written: {error}") from None
            return name
        raise KeyStateError(f"key state names under key/{key_hash}/ keep being taken")

    def read(self, key_hash: str, name: str) -> TrainingState:
        """The state object ``name`` of ``key_hash``, verified before it is unpickled.
        Raises KeyStateError (nothing is quarantined: a named object is the truth)."""
        return self.decode(key_hash, name, self.fetch(name))

    def read_many(
        self, named: Mapping[str, str], pool: Executor | None
    ) -> dict[str, TrainingState]:
        """Each state ``named`` (key hash -> object name): the objects fetched side by side
        on ``pool`` (store requests are I/O), then verified and unpickled on this thread
        (pickle holds the GIL). All or nothing: raises KeyStateError for the first that
        fails, in ``named``'s order."""
        items = list(named.items())
        if pool is None or len(items) < 2:
            return {key_hash: self.read(key_hash, name) for key_hash, name in items}
        fetched = [pool.submit(self.fetch, name) for _key_hash, name in items]
        try:
            return {
                key_hash: self.decode(key_hash, name, future.result())
                for (key_hash, name), future in zip(items, fetched, strict=True)
            }
        finally:
            for future in fetched:
                future.cancel()  # after a failure: nothing more is fetched for nothing

    def fetch(self, name: str) -> bytes:
        """The bytes of object ``name``; KeyStateError when the store cannot give them."""
        try:
            return self.store.get(name).data
        except ObjectStoreError as error:
            raise KeyStateError(f"key state {name}: {error}") from None

    def decode(self, key_hash: str, name: str, data: bytes) -> TrainingState:
        """``data``, the object ``name`` of ``key_hash``, verified then unpickled; raises
        KeyStateError when it fails verification or is not that key's state."""
        try:
            manifest, state = self._load_stream(io.BytesIO(data), name, None)
        except (_Rejected, _PolicyRefusal) as refused:
            raise KeyStateError(f"key state {name}: {refused}") from None
        except (CheckpointMissing, CheckpointError) as error:
            raise KeyStateError(f"key state {name}: {error}") from None
        if manifest.scope_id != key_hash or not isinstance(state, TrainingState):
            raise KeyStateError(f"key state {name} is not {key_hash}'s TrainingState")
        if manifest.config_hash != self._config_hash:
            raise KeyStateError(f"key state {name} was written for another config")
        return state

    def _check_identity(self, manifest: CheckpointManifest, name: str) -> None:
        parsed = KeyObjectName.parse(name)
        if parsed is None or (parsed.key_hash, parsed.token, parsed.sequence) != (
            manifest.scope_id,
            manifest.token,
            manifest.sequence,
        ):
            raise _Rejected("sequence_mismatch", f"manifest does not match the name {name}")
        if manifest.scope != "key":
            raise _Rejected("scope_mismatch", f"written for scope {manifest.scope}")
