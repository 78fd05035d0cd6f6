"""A hot-reloading model reader for serving systems.

Follows the versions topic (see :mod:`stream_trainer.versions` for the event format),
loads the newest champion after verifying its sha256 and HMAC, and swaps it in for
concurrent ``predict_*`` calls. A transient object-store error while loading is retried
with bounded exponential backoff (each retry counted in ``store_retries``); a version that
still fails to load is counted in ``failures`` and the previous model keeps serving.
"""

from __future__ import annotations

import json
import logging
import pickle
import threading
import uuid
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
from stream_trainer.objectstore import (
    URL_SCHEMES,
    ObjectStore,
    ObjectStoreError,
    RetryingStore,
    is_store_url,
    open_store,
    split_object_url,
)
from stream_trainer.registry import ARTIFACT_FILE, RegistryError, verify_artifact

log = logging.getLogger(__name__)


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
    ) -> None:
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
        self._loading: int | None = None  # the version being loaded, for retry logs
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

    # -- serving -----------------------------------------------------------------------

    @property
    def version(self) -> int | None:
        """The version being served, or None before the first load."""
        current = self._current
        return current[0] if current else None

    def _model(self) -> Any:
        current = self._current
        if current is None:
            raise RuntimeError(f"no version of {self._model_name} loaded yet")
        return current[1]

    def predict_one(self, x: dict[str, float]) -> Any:
        """What the current model's ``predict_one`` returns; for a
        :class:`stream_trainer.learners.ModelAdapter`, ``(prediction, probability)``.
        Raises RuntimeError before the first version is loaded."""
        return self._model().predict_one(x)

    def predict_record(self, features: Mapping[str, Any]) -> Any:
        """``(prediction, probability)`` for a raw ``{feature: value}`` mapping as records
        carry it (strings for categories, missing keys or nulls where the contract allows):
        the model's own feature contract encodes it. Raises RuntimeError before the first
        version is loaded, FeatureValueError for a value the contract refuses."""
        model = self._model()
        if hasattr(model, "predict_record"):
            return model.predict_record(features)
        return model.predict_one(dict(features))  # a model published before typed features

    def predict_many(self, X: Any) -> Any:
        """The current model's ``predict_many(X)`` (a ModelAdapter takes an array in the
        configured feature order), or ``predict(X)`` for a bare scikit-learn estimator."""
        model = self._model()
        if hasattr(model, "predict_many"):
            return model.predict_many(X)
        return model.predict(X)

    def wait_for_version(self, version: int, timeout: float) -> bool:
        """Block until ``version`` is being served (True) or ``timeout`` passed (False)."""
        with self._changed:
            return self._changed.wait_for(lambda: self.version == version, timeout)

    def wait_until_serving(self, timeout: float) -> bool:
        """Block until some version is being served (True) or ``timeout`` passed (False)."""
        with self._changed:
            return self._changed.wait_for(lambda: self._current is not None, timeout)

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
                event = self._relevant(message.value())
                if event is not None:
                    pending.append(event)
            # Until the backlog at start is read, only remember: the newest champion wins.
            if pending and not ends:
                self._apply(pending)
                pending = []

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
            "model %s version %s: object store unavailable, retry %d in %.1f s: %s",
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

    def _read_artifact(self, event: dict[str, Any], version: int, metadata: Any) -> bytes:
        """The artifact's bytes, from ``registry_root`` when given, else the event's URI."""
        name = str(metadata.get("artifact_file") or ARTIFACT_FILE)
        root = self._registry_root
        if root is not None:
            key = f"{self._model_name}/versions/{version:08d}/{name}"
            if is_store_url(root):
                return self._store(str(root)).get(key).data
            return Path(root).joinpath(*key.split("/")).read_bytes()
        uri = str(event.get("artifact_uri", ""))
        if uri.partition("://")[0].lower() in URL_SCHEMES:
            store_url, key = split_object_url(uri)
            return self._store(store_url).get(key).data
        return artifact_path_from_uri(uri).read_bytes()

    def _load(self, event: dict[str, Any]) -> bool:
        version: int = event["version"]
        self._loading = version
        try:
            metadata = event.get("metadata") or {}
            artifact = self._read_artifact(event, version, metadata)
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
            log.warning("model %s version %s refused: %s", self._model_name, version, error)
            return False
        with self._changed:
            self._current = (version, model)
            self._changed.notify_all()
        log.info("model %s now serving version %s", self._model_name, version)
        return True
