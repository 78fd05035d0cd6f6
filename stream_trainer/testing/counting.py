"""The counting learner: an exactly-once oracle that does not read the service's bookkeeping.

Its model state is the multiset of what it learnt. Learners only see features, so the test
producer (:class:`CountingProducer`) writes each record's partition, offset and a key id
into the numeric features :data:`FEATURES` (in that order), and the learner counts the
tuples. After a run, :func:`learnt_counts` reads the newest checkpoint through the
checkpoint store's own verified read path (folder or object store; never the offset
ledger), :func:`learnt_counts_by_slot` every partition slot's head (``model.scope:
partition``; in key scope the sum of its key models, :func:`keyed_counts`), and
:func:`judge_counts` compares against what the topic holds:
**lost** = produced - learnt, **twice** = tuples counted more than once. Both must be 0.

Two learners, one per adapter family, so both training paths are covered:

- :class:`CountingLearner`, River-style (``learn_one`` / ``predict_one``): ``per_record``,
  and ``mini_batch`` through the River adapter's learn_one loop;
- :class:`CountingBatchLearner`, scikit-learn-style (``partial_fit`` / ``predict``):
  ``mini_batch`` through the scikit-learn adapter.

Config paths are :data:`RIVER_PATH` / :data:`SKLEARN_PATH` with ``model.task: regression``
and no preprocessing. :func:`stream_trainer.training.learners.build_model` admits them only when the
process runs with ``STREAM_TRAINER_TESTING_LEARNERS=1`` (``learners.TESTING_ENV``); without
it a config naming one fails at start, naming ``model.learner.path``.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from river import base as river_base
from sklearn.base import BaseEstimator, RegressorMixin

from stream_trainer.config import ObjectStoreSettings
from stream_trainer.errors import StreamTrainerError
from stream_trainer.publishing.partitioner import murmur2_partition, scope_id_for_key
from stream_trainer.state.checkpoint import CheckpointError, CheckpointStore
from stream_trainer.state.keyed_state import KeyedState, KeyStateError, KeyStateObjects
from stream_trainer.state.objectstore import ObjectStore, ObjectStoreError, is_store_url, open_store
from stream_trainer.state.slot_store import MANIFEST, SlotStore
from stream_trainer.state.store_checkpoint import ObjectCheckpointStore

FEATURES = ("partition", "offset", "key")
RIVER_PATH = "stream_trainer.testing.counting.CountingLearner"
SKLEARN_PATH = "stream_trainer.testing.counting.CountingBatchLearner"

# (partition, offset, key id) of one record.
Sample = tuple[int, int, int]


class CountingError(StreamTrainerError):
    """A checkpoint holds no counting learner, or a record does not follow the layout."""


def _sample(partition: float, offset: float, key: float) -> Sample:
    return int(partition), int(offset), int(key)


class CountingLearner(river_base.Regressor):
    """River regressor whose state is the Counter of the (partition, offset, key) it learnt.

    Predicts 0.0 (the evaluator needs a number); learning is the count, nothing else."""

    def __init__(self) -> None:
        self.learnt: Counter[Sample] = Counter()

    def learn_one(self, x: dict[Hashable, Any], y: float, w: float = 1.0) -> None:
        """Count ``x``'s tuple once (``y`` and ``w`` are ignored)."""
        self.learnt[_sample(x[FEATURES[0]], x[FEATURES[1]], x[FEATURES[2]])] += 1

    def predict_one(self, x: dict[Hashable, Any]) -> float:
        """Always 0.0."""
        return 0.0


class CountingBatchLearner(RegressorMixin, BaseEstimator):  # type: ignore[misc]
    """scikit-learn regressor with the same state, ``learnt_``: X's first three columns are
    :data:`FEATURES` (``record.features`` in that order)."""

    # No constructor parameters to validate (learners._construct calls _validate_params).
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {}

    def partial_fit(
        self, X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None
    ) -> CountingBatchLearner:
        """Count every row's tuple once."""
        learnt: Counter[Sample] = self.__dict__.get("learnt_") or Counter()
        for partition, offset, key in np.asarray(X)[:, :3].tolist():
            learnt[_sample(partition, offset, key)] += 1
        self.learnt_ = learnt
        return self

    def fit(
        self, X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None
    ) -> CountingBatchLearner:
        """Forget, then count ``X`` (a full retrain replaces what was learnt)."""
        self.learnt_ = Counter()
        return self.partial_fit(X, y, sample_weight)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Zeros."""
        return np.zeros(len(X))


def counts_of(model: Any) -> Counter[Sample]:
    """The tuples a counting model learnt, from a model adapter (as a checkpoint's
    ``TrainingState.model`` holds it), a pipeline, or the learner itself."""
    inner = getattr(model, "model", model)
    steps = getattr(inner, "steps", None)
    if isinstance(steps, Mapping):  # a River pipeline
        inner = list(steps.values())[-1]
    elif isinstance(steps, list):  # a scikit-learn pipeline
        inner = steps[-1][1]
    if isinstance(inner, CountingLearner):
        return Counter(inner.learnt)
    if isinstance(inner, CountingBatchLearner):
        return Counter(getattr(inner, "learnt_", Counter()))
    raise CountingError(f"the model is not a counting learner: {type(inner).__name__}")


def learnt_counts(
    location: str | Path, key: bytes, object_store: ObjectStoreSettings | None = None
) -> Counter[Sample]:
    """What the newest checkpoint at ``location`` (a folder, or an object-store URL whose
    credentials this process has) learnt; an empty Counter when there is none.

    Reads through the store's ``read_latest``: HMAC and checksum verified before anything
    is unpickled, nothing quarantined or deleted, so it is safe beside a running service."""
    where = str(location)
    store: CheckpointStore | ObjectCheckpointStore
    if is_store_url(where):
        raw = open_store(where, object_store or ObjectStoreSettings())
        store = ObjectCheckpointStore(raw, key, allow_unsigned=False, keep_last=1_000_000)
    else:
        store = CheckpointStore(Path(where), key=key, allow_unsigned=False, keep_last=1_000_000)
    loaded = store.read_latest()
    return Counter() if loaded is None else counts_of(loaded.state.model)


# Who reads the slots: never an owner (read-only, nothing claimed).
ORACLE_MEMBER = "counting-oracle"


@dataclass(frozen=True)
class SlotCounts:
    """One partition slot as its MANIFEST and head checkpoint show it: ``token`` and
    ``owner`` of the last claim, ``offsets`` ({"topic:p": next offset}) of the head, and
    ``learnt``, the head's multiset (empty when the slot has no head yet)."""

    scope_id: str
    token: int
    owner: str
    offsets: dict[str, int]
    learnt: Counter[Sample]
    # Key scope: key models in the head (live or named evicted objects), and learnt tuples
    # whose key id is not their model's key (must be 0).
    keys: int = 0
    mixed_keys: int = 0

    def misplaced(self) -> int:
        """Learnt tuples of another partition than the slot's own (must be 0: a slot
        learns only its own partition's records)."""
        own = int(self.scope_id.rpartition(":")[2])
        return sum(n for sample, n in self.learnt.items() if sample[0] != own)


def slot_ids(store: ObjectStore) -> list[str]:
    """Scope ids ("topic:p") of the partition slots with a MANIFEST under ``store``'s
    ``partition/`` folder (one LIST), sorted by topic then partition number."""
    found: list[tuple[str, int]] = []
    for info in store.list("partition/"):
        parts = info.key.split("/")
        if len(parts) == 4 and parts[3] == MANIFEST and parts[2].isdigit():
            found.append((parts[1], int(parts[2])))
    return [f"{topic}:{partition}" for topic, partition in sorted(found)]


def read_slots(
    location: str | Path, key: bytes, object_store: ObjectStoreSettings | None = None
) -> dict[str, SlotCounts]:
    """Every partition slot under ``location`` (``checkpoint.dir``: a folder shared by
    members, or an object-store URL whose credentials this process has), by scope id.

    Each MANIFEST is read with :meth:`SlotStore.read` (token, owner) and its head
    decoded with :meth:`SlotStore.read_head` (offsets, counts): signatures and checksums
    verified before anything is unpickled, nothing claimed, quarantined or deleted, so it
    is safe beside running members. Raises CountingError when the store cannot be
    listed, a MANIFEST or head does not verify, or a head holds no counting learner."""
    store = open_store(str(location), object_store or ObjectStoreSettings())
    try:
        ids = slot_ids(store)
    except ObjectStoreError as error:
        raise CountingError(f"{store.url}: the slots could not be listed: {error}") from error
    slots: dict[str, SlotCounts] = {}
    for scope_id in ids:
        slot = SlotStore(
            store, "partition", scope_id, ORACLE_MEMBER, key, allow_unsigned=False, keep_last=1
        )
        try:
            manifest = slot.read().manifest
            loaded = slot.read_head()
        except CheckpointError as error:
            raise CountingError(f"slot {scope_id}: {error}") from error
        if manifest is None:  # removed since the LIST: nothing to count
            continue
        # Offsets from the head itself, so they pair with its counts even if the owner
        # moved the MANIFEST between the two reads.
        offsets = {} if loaded is None else dict(loaded.manifest.offsets)
        keys = mixed = 0
        if loaded is None:
            learnt = Counter[Sample]()
        elif isinstance(loaded.state, KeyedState):
            objects = KeyStateObjects(store, key, False, loaded.manifest.config_hash)
            learnt, keys, mixed = keyed_counts(loaded.state, objects, scope_id)
        else:
            learnt = counts_of(loaded.state.model)
        slots[scope_id] = SlotCounts(
            scope_id, manifest.token, manifest.owner, offsets, learnt, keys, mixed
        )
    return slots


def keyed_counts(
    state: KeyedState, objects: KeyStateObjects, scope_id: str
) -> tuple[Counter[Sample], int, int]:
    """A key-scope slot's head: the sum of its key models' multisets (live ones, and the
    evicted objects it names, verified), how many key models, and how many learnt tuples
    carry another key id than their model's key (the key id's decimal text is the Kafka
    key). Raises CountingError when a named object does not verify."""
    total: Counter[Sample] = Counter()
    mixed = 0
    for key_hash in sorted(state.keys()):
        if key_hash in state.live:
            model = state.live[key_hash].model
        else:
            try:
                model = objects.read(key_hash, state.evicted[key_hash]).model
            except KeyStateError as error:
                raise CountingError(f"slot {scope_id}: {error}") from error
        learnt = counts_of(model)
        mixed += sum(
            n for s, n in learnt.items() if scope_id_for_key(str(s[2]).encode()) != key_hash
        )
        total.update(learnt)
    return total, len(state.keys()), mixed


def learnt_counts_by_slot(
    location: str | Path, key: bytes, object_store: ObjectStoreSettings | None = None
) -> dict[str, Counter[Sample]]:
    """What each partition slot's head learnt, by scope id ("topic:p"); see
    :func:`read_slots`. Sum them with :func:`combined_counts` for :func:`judge_counts`."""
    return {
        scope_id: slot.learnt for scope_id, slot in read_slots(location, key, object_store).items()
    }


def combined_counts(counts: Iterable[Counter[Sample]]) -> Counter[Sample]:
    """The sum of several multisets (slots, members): a tuple in two of them counts twice."""
    total: Counter[Sample] = Counter()
    for one in counts:
        total.update(one)
    return total


@dataclass(frozen=True)
class CountVerdict:
    """The oracle's figures. ``lost``: produced tuples never learnt; ``twice``: tuples
    learnt more than once (``extra``: the surplus learns); ``unexpected``: learnt tuples
    never produced. By partition: ``lost_by_partition`` / ``twice_by_partition``."""

    produced: int
    learnt: int
    lost: int
    twice: int
    extra: int
    unexpected: int
    lost_by_partition: dict[int, int] = field(default_factory=dict)
    twice_by_partition: dict[int, int] = field(default_factory=dict)
    examples: dict[str, list[Sample]] = field(default_factory=dict)

    def line(self) -> str:
        """One line for a test's output."""
        return (
            f"counting oracle: produced {self.produced}, learnt {self.learnt}, "
            f"lost {self.lost}, twice {self.twice} (extra learns {self.extra}), "
            f"unexpected {self.unexpected}"
        )


def judge_counts(produced: Iterable[Sample], learnt: Counter[Sample]) -> CountVerdict:
    """Compare the produced tuples (each once) with the learnt multiset."""
    wanted = set(produced)
    lost = sorted(s for s in wanted if learnt[s] == 0)
    twice = sorted(s for s, n in learnt.items() if n > 1)
    unexpected = sorted(s for s in learnt if s not in wanted)
    return CountVerdict(
        produced=len(wanted),
        learnt=sum(learnt.values()),
        lost=len(lost),
        twice=len(twice),
        extra=sum(learnt[s] - 1 for s in twice),
        unexpected=len(unexpected),
        lost_by_partition=dict(Counter(s[0] for s in lost)),
        twice_by_partition=dict(Counter(s[0] for s in twice)),
        examples={"lost": lost[:5], "twice": twice[:5], "unexpected": unexpected[:5]},
    )


def _value(partition: int, offset: int, key: int) -> bytes:
    features = dict(zip(FEATURES, (partition, offset, key), strict=True))
    return json.dumps({"x": features, "y": float(key % 10)}).encode()


class CountingProducer:
    """Writes counting records to ``topic``: each carries its own partition, the offset it
    will get, and a key id (also the message key). Offsets are predicted from the high
    watermarks read at construction, so this must be the topic's only writer; the
    idempotent producer keeps them contiguous. :func:`produced_samples` reads the topic
    back with the broker's real offsets, so a wrong prediction shows up as lost."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        partitions: int,
        keys: int = 1000,
        seed: int = 0,
        *,
        by_key: bool = False,
    ) -> None:
        """``by_key``: each record goes to its key's partition (murmur2, as the Java
        client's default partitioner), as ``model.scope: key`` needs; else round-robin."""
        self._topic, self._partitions, self._keys = topic, partitions, keys
        self._by_key = by_key
        self._rng = random.Random(seed)
        self._next = _high_watermarks(bootstrap, topic)
        self._producer = Producer(
            {"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5}
        )
        self._turn = 0
        self.produced = 0

    def produce(self, count: int, timeout: float = 60.0) -> None:
        """``count`` records round-robin over the partitions (or each in its key's
        partition); returns once all are acked.
        Raises CountingError if any delivery failed or ``timeout`` passed."""
        failures: list[str] = []

        def delivered(error: Any, _message: Any) -> None:
            if error is not None:
                failures.append(str(error))

        for _ in range(count):
            key = self._rng.randrange(self._keys)
            if self._by_key:
                partition = murmur2_partition(str(key).encode(), self._partitions)
            else:
                partition = self._turn % self._partitions
            self._turn += 1
            offset = self._next.get(partition, 0)
            self._next[partition] = offset + 1
            while True:
                try:
                    self._producer.produce(
                        self._topic,
                        _value(partition, offset, key),
                        key=str(key).encode(),
                        partition=partition,
                        on_delivery=delivered,
                    )
                    break
                except BufferError:  # local queue full: let deliveries drain it
                    self._producer.poll(0.1)
            self._producer.poll(0)
        left = self._producer.flush(timeout)
        if left or failures:
            raise CountingError(f"{left} records undelivered, failures: {failures[:3]}")
        self.produced += count


# What a fresh topic answers until its partitions have leaders.
_ELECTING = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._TIMED_OUT,
    }
)


def _high_watermarks(bootstrap: str, topic: str, timeout: float = 30.0) -> dict[int, int]:
    """Every partition's high watermark; retried while a fresh topic's leaders are being
    elected (a retriable error), up to ``timeout``."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "counting-probe"})
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                meta = consumer.list_topics(topic, timeout=10)
                return {
                    p: int(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1])
                    for p in meta.topics[topic].partitions
                }
            except KafkaException as error:
                if error.args[0].code() not in _ELECTING or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)  # polling interval of a bounded wait for the leaders
    finally:
        consumer.close()


def produced_samples(
    bootstrap: str, topic: str, timeout: float = 60.0, at_least: int = 0
) -> list[Sample]:
    """(partition, offset, key id) of every record of ``topic``, offsets as the broker
    gave them; the key id from the record. Reads to the high watermarks, and on to
    ``at_least`` records (what the producer had acked: Tansu's high watermark is the
    base offset of a partition's last batch, short of its end). Raises CountingError if
    they cannot be read within ``timeout``."""
    ends = _high_watermarks(bootstrap, topic)
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "counting-reader",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
        }
    )
    out: list[Sample] = []
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in ends])
        want = max(sum(ends.values()), at_least)
        deadline = time.monotonic() + timeout
        while len(out) < want:
            if time.monotonic() > deadline:
                raise CountingError(f"read {len(out)} of {want} records of {topic}")
            for message in consumer.consume(1000, 0.5):
                if message.error() is not None:
                    continue
                key = int(json.loads(message.value() or b"{}")["x"][FEATURES[2]])
                out.append((int(message.partition() or 0), int(message.offset() or 0), key))
        return out
    finally:
        consumer.close()
