"""A hot-reloading model reader for serving systems.

Follows the versions topic (see :mod:`stream_trainer.publishing.events` for the event format),
loads the newest champion after verifying its sha256 and HMAC, and swaps it in for
concurrent ``predict_*`` calls. A transient object-store error while loading is retried
with bounded exponential backoff (each retry counted in ``store_retries``); a version that
still fails to load is counted in ``failures`` and the previous model keeps serving.

With ``scope="partition"`` or ``"key"`` it serves a scoped model instead (one champion per
slot, :mod:`stream_trainer.publishing.scoped_versions`): ``predict_record(features, key=...)``
routes
the key to its slot and loads that slot's champion on first use (LRU-bounded).
"""

from __future__ import annotations

import json
import logging
import pickle
import threading
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)

from stream_trainer.config import ObjectStoreSettings
from stream_trainer.errors import StreamTrainerError
from stream_trainer.publishing.partitioner import partition_for, scope_id_for_key
from stream_trainer.publishing.registry import ARTIFACT_FILE, RegistryError, verify_artifact
from stream_trainer.publishing.scoped_versions import (
    GLOBAL,
    KEY,
    PARTITION,
    SCOPED_CHAMPION,
    SCOPED_VERSION,
    SCOPES,
    Routing,
    ScopedEventError,
    check_scope,
    parse_partition_scope_id,
    scope_prefix,
)
from stream_trainer.state.objectstore import (
    URL_SCHEMES,
    ObjectStore,
    ObjectStoreError,
    RetryingStore,
    is_store_url,
    open_store,
    split_object_url,
)

log = logging.getLogger(__name__)


class NoModelForKey(StreamTrainerError, KeyError):
    """No servable model for this key: a null key, a key (or partition) whose slot has no
    champion yet, or whose champion could not be loaded. The caller decides what to do."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else "no model for this key"


class RoutingError(StreamTrainerError, ValueError):
    """A partition-scope key that cannot be routed: no topic known or more than one."""


def artifact_path_from_uri(uri: str) -> Path:
    """The local path of a ``file://`` URI (or a plain path)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme:
        raise RegistryError(f"unsupported artifact URI scheme {parsed.scheme!r}: {uri}")
    return Path(uri)


class ModelReader:
    """Follows ``topic`` for ``model_name`` and serves its current champion.

    The topic is read from the beginning with ``assign()`` (no group join, nothing
    committed). Events up to the end of the topic at start are scanned first and only the
    newest champion is loaded; later events are applied as they arrive. The artifact is
    located by the event's ``artifact_uri`` (``file://``, ``s3://``, ``gs://`` or
    ``az://``; a store reached with ``store_settings``, and only GET is needed) or, with
    ``registry_root`` (the registry volume mounted at another path, or another URL of the
    same bucket), under
    ``registry_root/<model>/versions/<v>/``.
    Nothing is unpickled before sha256 and, with ``key``, the HMAC verify; with a key an
    unsigned artifact is refused.

    A transient store error (unreachable, timeout, 5xx) is retried, waiting
    ``store_retry_first_s`` and doubling up to 10 s, for at most ``store_retry_s`` in all;
    each retry adds one to ``store_retries`` and logs a warning. A missing artifact or a
    refusal (bad credentials, no such bucket) fails the load at once.

    ``scope="partition"`` / ``"key"``: follows the ``scoped_version`` /
    ``scoped_champion`` events of ``model_name`` in that scope (others are skipped, as a
    global reader skips scoped events), keeps every slot's newest champion event, and
    loads a slot's model on its first use by a ``predict_*(..., key=...)`` call, in the
    caller's thread (store retries included), keeping at most ``max_models`` in memory
    (least recently used evicted). With ``registry_root`` the artifact is read under the
    slot's folder (:func:`stream_trainer.publishing.scoped_versions.scope_prefix`). A refused
    champion leaves the slot's older model serving if it is still loaded, else the key
    gets NoModelForKey.
    """

    def __init__(
        self,
        consumer_config: dict[str, Any],
        topic: str,
        model_name: str,
        key: bytes | None,
        registry_root: Path | str | None = None,
        *,
        poll_timeout_s: float = 0.2,
        store_settings: ObjectStoreSettings | None = None,
        store_retry_s: float = 120.0,
        store_retry_first_s: float = 0.5,
        scope: str = GLOBAL,
        max_models: int = 1000,
    ) -> None:
        if scope != GLOBAL and scope not in SCOPES:
            raise ValueError(f"scope must be {GLOBAL!r}, {PARTITION!r} or {KEY!r}, got {scope!r}")
        if max_models < 1:
            raise ValueError("max_models must be >= 1")
        if scope != GLOBAL and (not model_name or "/" in model_name):
            # Scoped event keys and slot folders are "<model>/<scope>/...".
            raise ValueError(f"a scoped model's name must be non-empty without '/': {model_name!r}")
        conf = dict(consumer_config)
        conf.setdefault("group.id", f"stream-trainer-reader-{uuid.uuid4().hex}")
        conf.update({"enable.auto.commit": False, "enable.partition.eof": False})
        self._conf = conf
        self._topic = topic
        self._model_name = model_name
        self._key = key
        self._registry_root = registry_root
        self._store_settings = store_settings
        self._stores: dict[str, ObjectStore] = {}
        self._store_retry_s = store_retry_s
        self._store_retry_first_s = store_retry_first_s
        self._loading: str | None = None  # the version being loaded, for retry logs
        self._poll_timeout_s = poll_timeout_s
        # (version, model) replaced by one assignment: predict calls read it once, so
        # they see the old or the new model, never a mix.
        self._current: tuple[int, Any] | None = None
        self._highest_seen = 0
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failures = 0
        self.store_retries = 0
        self.error: BaseException | None = None
        self._caught_up = threading.Event()
        # Scoped serving. The follower thread replaces entries of ``_slots`` (scope id ->
        # the slot's newest champion event) and ``_routes`` (source topic -> its routing);
        # predict calls load and evict models in ``_models`` (scope id -> (version, model),
        # least recently used first) under ``_models_lock``, one load at a time.
        self.scope = scope
        self._max_models = max_models
        self._slots: dict[str, dict[str, Any]] = {}
        self._slot_highest: dict[str, int] = {}
        self._routes: dict[str, Routing] = {}
        self._models: OrderedDict[str, tuple[int, Any]] = OrderedDict()
        self._refused: dict[str, int] = {}  # scope id -> its champion version that failed
        self._models_lock = threading.Lock()
        self._load_lock = threading.Lock()
        self.loads = 0  # scoped artifacts loaded (first use, eviction or a new champion)

    # -- serving -----------------------------------------------------------------------

    @property
    def version(self) -> int | None:
        """The version being served (global scope), or None before the first load and
        always in a scoped reader (see :meth:`slots`)."""
        current = self._current
        return current[0] if current else None

    def _model(self, key: bytes | None = None, topic: str | None = None) -> Any:
        if self.scope != GLOBAL:
            return self._slot_model(key, topic)
        current = self._current
        if current is None:
            raise RuntimeError(f"no version of {self._model_name} loaded yet")
        return current[1]

    def predict_one(
        self, x: dict[str, float], *, key: bytes | None = None, topic: str | None = None
    ) -> Any:
        """What the current model's ``predict_one`` returns; for a
        :class:`stream_trainer.training.learners.ModelAdapter`, ``(prediction, probability)``.
        Raises RuntimeError before the first version is loaded. A scoped reader uses the
        model of ``key``'s slot (see :meth:`slot_for_key`; ``key`` is ignored in global
        scope) and raises NoModelForKey when there is none."""
        return self._model(key, topic).predict_one(x)

    def predict_record(
        self,
        features: Mapping[str, Any],
        *,
        key: bytes | None = None,
        topic: str | None = None,
    ) -> Any:
        """``(prediction, probability)`` for a raw ``{feature: value}`` mapping as records
        carry it (strings for categories, missing keys or nulls where the contract allows):
        the model's own feature contract encodes it. Raises RuntimeError before the first
        version is loaded, FeatureValueError for a value the contract refuses. Scoped
        readers: the model of ``key``'s slot, as :meth:`predict_one`."""
        model = self._model(key, topic)
        if hasattr(model, "predict_record"):
            return model.predict_record(features)
        return model.predict_one(dict(features))  # a model published before typed features

    def predict_many(self, X: Any, *, key: bytes | None = None, topic: str | None = None) -> Any:
        """The current model's ``predict_many(X)`` (a ModelAdapter takes an array in the
        configured feature order), or ``predict(X)`` for a bare scikit-learn estimator.
        Scoped readers: every row with the model of ``key``'s slot."""
        model = self._model(key, topic)
        if hasattr(model, "predict_many"):
            return model.predict_many(X)
        return model.predict(X)

    # -- scoped serving ----------------------------------------------------------------

    def slot_for_key(self, key: bytes | None, topic: str | None = None) -> str:
        """The scope id ``key`` routes to. Key scope: ``sha256(key)[:32]``. Partition
        scope: ``<topic>:<p>`` with ``p`` from the partitioner and partition count of the
        newest champion event of that source topic; ``topic`` may be left out when the
        model's slots are all of one topic. A null key (spread at random by producers, so
        no slot holds it) raises NoModelForKey; so does an unknown topic."""
        if self.scope == GLOBAL:
            raise RoutingError("a global-scope reader has no slots")
        if key is None:
            raise NoModelForKey(f"model {self._model_name}: a null key has no slot")
        if self.scope == KEY:
            return scope_id_for_key(key)
        routes = dict(self._routes)
        if topic is None:
            if len(routes) > 1:
                raise RoutingError(
                    f"model {self._model_name} has slots of topics {sorted(routes)}: "
                    "pass topic= to say which"
                )
            if not routes:
                raise NoModelForKey(f"model {self._model_name}: no partition slot known yet")
            topic = next(iter(routes))
        route = routes.get(topic)
        if route is None:
            raise NoModelForKey(f"model {self._model_name}: no slot of topic {topic!r}")
        return f"{topic}:{partition_for(route.partitioner, key, route.partitions)}"

    def slots(self) -> dict[str, int]:
        """Each known slot's champion version (scope id -> version), a snapshot."""
        return {scope_id: event["version"] for scope_id, event in list(self._slots.items())}

    def loaded(self) -> dict[str, int]:
        """The slots whose model is in memory now (scope id -> version), a snapshot."""
        with self._models_lock:
            return {scope_id: version for scope_id, (version, _) in self._models.items()}

    def wait_for_slot(self, scope_id: str, version: int, timeout: float) -> bool:
        """Block until the champion of slot ``scope_id`` is ``version`` (True) or
        ``timeout`` passed (False). The model itself loads on first use."""

        def there() -> bool:
            event = self._slots.get(scope_id)
            return event is not None and event["version"] == version

        with self._changed:
            return self._changed.wait_for(there, timeout)

    def wait_until_caught_up(self, timeout: float) -> bool:
        """Block until the events on the topic at start have been read (True) or
        ``timeout`` passed (False). Before that, NoModelForKey may only mean "not read yet"."""
        return self._caught_up.wait(timeout)

    def _slot_model(self, key: bytes | None, topic: str | None) -> Any:
        scope_id = self.slot_for_key(key, topic)
        event = self._slots.get(scope_id)
        if event is None:
            raise NoModelForKey(f"model {self._model_name}: no champion for slot {scope_id}")
        version: int = event["version"]
        with self._models_lock:
            cached = self._models.get(scope_id)
            if cached is not None:
                self._models.move_to_end(scope_id)
                # A refused newer champion leaves the older model serving, as in global scope.
                if cached[0] == version or self._refused.get(scope_id) == version:
                    return cached[1]
            elif self._refused.get(scope_id) == version:
                raise NoModelForKey(
                    f"model {self._model_name}: slot {scope_id} version {version} was refused"
                )
        with self._load_lock:  # one load at a time: a burst for one new slot loads it once
            with self._models_lock:
                again = self._models.get(scope_id)
                if again is not None and again[0] == version:
                    return again[1]
            model = self._fetch(
                event, scope_prefix(self._model_name, self.scope, scope_id), f"slot {scope_id}"
            )
            with self._models_lock:
                if model is None:
                    self._refused[scope_id] = version
                    kept = self._models.get(scope_id)
                    if kept is not None:
                        return kept[1]
                    raise NoModelForKey(
                        f"model {self._model_name}: slot {scope_id} version {version} was refused"
                    )
                self._refused.pop(scope_id, None)
                self._models[scope_id] = (version, model)
                self._models.move_to_end(scope_id)
                while len(self._models) > self._max_models:
                    self._models.popitem(last=False)
                self.loads += 1
        log.info("model %s slot %s: loaded version %s", self._model_name, scope_id, version)
        return model

    def _note_scoped(self, value: bytes | None) -> None:
        """Remember a scoped event of this model and scope as its slot's champion, if it
        names one that should be served (forward only, like version events)."""
        try:
            event = json.loads(value or b"")
        except ValueError:
            log.warning("versions topic: undecodable event skipped")
            return
        if not isinstance(event, dict) or event.get("model_name") != self._model_name:
            return
        kind = event.get("type")
        if kind not in (SCOPED_VERSION, SCOPED_CHAMPION) or event.get("scope") != self.scope:
            return
        version, scope_id = event.get("version"), event.get("scope_id")
        if not isinstance(version, int) or isinstance(version, bool):
            return
        try:
            check_scope(self._model_name, self.scope, str(scope_id))
            routing = Routing.from_json(event.get("routing"))
            topic = parse_partition_scope_id(str(scope_id))[0] if self.scope == PARTITION else None
            if topic is not None and routing.topic not in (None, topic):
                raise ScopedEventError(f"routing.topic {routing.topic!r} vs slot {scope_id!r}")
        except ScopedEventError as error:
            log.warning("versions topic: malformed %s event skipped: %s", kind, error)
            return
        slot = str(scope_id)
        if kind == SCOPED_VERSION:
            # A repeat of an older version's event must not move the slot back; only
            # explicit scoped_champion events (promote / rollback) do.
            if version <= self._slot_highest.get(slot, 0):
                return
            self._slot_highest[slot] = version
            if event.get("champion") is not True:
                return
        with self._changed:
            self._slots[slot] = event
            if topic is not None:
                # Routing follows the partition count of the newest champion of the topic.
                self._routes[topic] = routing
            self._changed.notify_all()

    def wait_for_version(self, version: int, timeout: float) -> bool:
        """Block until ``version`` is being served (True) or ``timeout`` passed (False)."""
        with self._changed:
            return self._changed.wait_for(lambda: self.version == version, timeout)

    def wait_until_serving(self, timeout: float) -> bool:
        """Block until some version is being served (True) or ``timeout`` passed (False);
        in a scoped reader, until some slot has a champion."""
        with self._changed:
            return self._changed.wait_for(
                lambda: self._current is not None or bool(self._slots), timeout
            )

    def wait_for_failures(self, count: int, timeout: float) -> bool:
        """Block until at least ``count`` loads were refused (True) or ``timeout`` passed."""
        with self._changed:
            return self._changed.wait_for(lambda: self.failures >= count, timeout)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start following the topic in a daemon thread."""
        if self._thread is not None:
            raise RuntimeError("reader already started")
        self._thread = threading.Thread(target=self._run, name="model-reader", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop following (bounded by ``timeout``); the current model keeps serving."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        consumer = Consumer(self._conf)
        try:
            ends = self._assign(consumer)
            if ends is not None:
                self._follow(consumer, ends)
        except BaseException as error:  # surfaced to the owner through .error
            self.error = error
            log.exception("model reader stopped")
        finally:
            consumer.close()

    def _assign(self, consumer: Any) -> dict[int, int] | None:
        """Assign every partition from the beginning; the end offsets at start, or None
        when stopped before the topic existed."""
        while not self._stop.is_set():
            try:
                metadata = consumer.list_topics(self._topic, timeout=5.0)
            except KafkaException as error:  # broker not reachable yet: keep trying
                log.warning("versions topic %s: %s", self._topic, error)
                self._stop.wait(1.0)
                continue
            topic = metadata.topics.get(self._topic)
            if topic is not None and topic.error is None and topic.partitions:
                partitions = sorted(topic.partitions)
                consumer.assign(
                    [TopicPartition(self._topic, p, OFFSET_BEGINNING) for p in partitions]
                )
                ends = {}
                for p in partitions:
                    low, high = consumer.get_watermark_offsets(
                        TopicPartition(self._topic, p), timeout=10.0
                    )
                    if high > low:
                        ends[p] = high
                return ends
            self._stop.wait(1.0)
        return None

    def _follow(self, consumer: Any, ends: dict[int, int]) -> None:
        pending: list[dict[str, Any]] = []
        while not self._stop.is_set():
            for message in consumer.consume(100, timeout=self._poll_timeout_s):
                error = message.error()
                if error is not None:
                    if error.code() != KafkaError._PARTITION_EOF:
                        log.warning("versions topic error: %s", error)
                    continue
                partition = message.partition()
                if partition in ends and message.offset() + 1 >= ends[partition]:
                    del ends[partition]
                if self.scope != GLOBAL:
                    self._note_scoped(message.value())  # models load lazily, on first use
                    continue
                event = self._relevant(message.value())
                if event is not None:
                    pending.append(event)
            # Until the backlog at start is read, only remember: the newest champion wins.
            if pending and not ends:
                self._apply(pending)
                pending = []
            if not ends and not self._caught_up.is_set():
                self._caught_up.set()

    def _relevant(self, value: bytes | None) -> dict[str, Any] | None:
        """The event if it names a champion of this model that should be served."""
        try:
            event = json.loads(value or b"")
        except ValueError:
            log.warning("versions topic: undecodable event skipped")
            return None
        if not isinstance(event, dict) or event.get("model_name") != self._model_name:
            return None
        version = event.get("version")
        if not isinstance(version, int):
            return None
        if event.get("type") == "champion":
            return event
        if event.get("type") != "version":
            return None
        # A repeat of an older version's event (at-least-once delivery) must not move the
        # reader back; only explicit champion events (promote / rollback) do.
        if version <= self._highest_seen:
            return None
        self._highest_seen = version
        return event if event.get("champion") is True else None

    def _apply(self, candidates: list[dict[str, Any]]) -> None:
        """Load the newest candidate; before anything is served, fall back to older ones."""
        for event in reversed(candidates):
            if self._current is not None and event["version"] == self._current[0]:
                return
            if self._load(event) or self._current is not None:
                return

    def _store(self, url: str) -> ObjectStore:
        if url not in self._stores:
            self._stores[url] = RetryingStore(
                open_store(url, self._store_settings),
                retry_for_s=self._store_retry_s,
                first_delay_s=self._store_retry_first_s,
                on_retry=self._on_store_retry,
                stop=self._stop,
            )
        return self._stores[url]

    def _on_store_retry(self, error: ObjectStoreError, delay: float) -> None:
        with self._changed:
            self.store_retries += 1
            self._changed.notify_all()
        log.warning(
            "model %s %s: object store unavailable, retry %d in %.1f s: %s",
            self._model_name,
            self._loading,
            self.store_retries,
            delay,
            error,
        )

    def wait_for_store_retries(self, count: int, timeout: float) -> bool:
        """Block until at least ``count`` store retries happened (True) or ``timeout`` passed."""
        with self._changed:
            return self._changed.wait_for(lambda: self.store_retries >= count, timeout)

    def _read_artifact(
        self, event: dict[str, Any], version: int, metadata: Any, prefix: str
    ) -> bytes:
        """The artifact's bytes, from ``registry_root`` (under ``prefix``, the model's or
        the slot's folder) when given, else the event's URI."""
        name = str(metadata.get("artifact_file") or ARTIFACT_FILE)
        root = self._registry_root
        if root is not None:
            key = f"{prefix}/versions/{version:08d}/{name}"
            if is_store_url(root):
                return self._store(str(root)).get(key).data
            return Path(root).joinpath(*key.split("/")).read_bytes()
        uri = str(event.get("artifact_uri", ""))
        if uri.partition("://")[0].lower() in URL_SCHEMES:
            store_url, key = split_object_url(uri)
            return self._store(store_url).get(key).data
        return artifact_path_from_uri(uri).read_bytes()

    def _load(self, event: dict[str, Any]) -> bool:
        model = self._fetch(event, self._model_name, "")
        if model is None:
            return False
        version: int = event["version"]
        with self._changed:
            self._current = (version, model)
            self._changed.notify_all()
        log.info("model %s now serving version %s", self._model_name, version)
        return True

    def _fetch(self, event: dict[str, Any], prefix: str, slot: str) -> Any | None:
        """The verified model of ``event`` (its files under ``prefix`` with a registry
        root), or None when refused (counted in ``failures`` and logged)."""
        version: int = event["version"]
        what = f"{slot} version {version}".lstrip()
        self._loading = what
        try:
            metadata = event.get("metadata") or {}
            artifact = self._read_artifact(event, version, metadata, prefix)
            verify_artifact(
                artifact, metadata.get("artifact_sha256"), metadata.get("artifact_hmac"), self._key
            )
            # Verified above (sha256, and HMAC under a key) before anything is unpickled.
            model = pickle.loads(artifact)  # noqa: S301
            if not (hasattr(model, "predict_one") or hasattr(model, "predict")):
                raise RegistryError(f"artifact is a {type(model).__name__}, not a model")
        # A bad artifact is bad data, not a bug here: refuse it and keep serving.
        except Exception as error:
            with self._changed:
                self.failures += 1
                self._changed.notify_all()
            log.warning("model %s %s refused: %s", self._model_name, what, error)
            return None
        return model
