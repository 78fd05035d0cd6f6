"""The composition root: builds every part of the service from the config and runs it.

Nothing else wires collaborators together. ``run_service`` owns the process-level
concerns: the single-writer lock, signals, the shutdown bound, the HTTP server.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
from confluent_kafka import KafkaError, KafkaException, Producer
from prometheus_client import CollectorRegistry

from stream_trainer import __version__
from stream_trainer.config import Settings
from stream_trainer.errors import StreamTrainerError
from stream_trainer.ingest.deadletter import (
    DEFAULT_MESSAGE_MAX_BYTES,
    BadRecordBreaker,
    DeadLetterPublisher,
)
from stream_trainer.ingest.decode_worker import InlineDecoder, UnitDecoder, build_unit_decoder
from stream_trainer.ingest.kafka_source import KafkaSource, RetentionGap
from stream_trainer.ingest.records import RecordDecoder
from stream_trainer.ingest.source import RebalanceListener, Source
from stream_trainer.ingest.wire import WireDecoder
from stream_trainer.operations.control import ControlChannel
from stream_trainer.operations.delivery import NotDelivered
from stream_trainer.operations.faults import CRASH_ENV, CrashPoints
from stream_trainer.operations.http import HealthServer, Heartbeat
from stream_trainer.operations.key_service import (
    KeyedSlots,
    KeyService,
    new_keyed_state,
    validate_keyed,
)
from stream_trainer.operations.logs import configure_logging, register_secret
from stream_trainer.operations.metrics import LagTracker, Metrics, build_metrics
from stream_trainer.operations.partition_service import PartitionService
from stream_trainer.operations.service import Service
from stream_trainer.operations.signals import ShutdownSignals
from stream_trainer.publishing.events import VersionEventPublisher
from stream_trainer.publishing.mlflow_export import MlflowError, MlflowExporter
from stream_trainer.publishing.publisher import ModelPublisher
from stream_trainer.publishing.registry import open_registry
from stream_trainer.publishing.scoped_publish import ScopedPublishing
from stream_trainer.publishing.scoped_versions import KAFKA_KEY, Routing
from stream_trainer.publishing.store_registry import StoreRegistry
from stream_trainer.state.checkpoint import (
    CheckpointError,
    CheckpointLocked,
    CheckpointManifest,
    CheckpointStore,
    DirectoryLock,
)
from stream_trainer.state.kafka_lease import (
    KafkaLease,
    LeaseError,
    StandbyWait,
    ensure_lease_topic,
    read_claim,
    write_claim,
)
from stream_trainer.state.keyed_state import KeyStateObjects
from stream_trainer.state.ledger import TopicPartitionKey
from stream_trainer.state.manager import SCOPE as PARTITION_SCOPE
from stream_trainer.state.manager import PartitionSlots
from stream_trainer.state.objectstore import (
    ObjectStore,
    ObjectStoreError,
    RequestObserver,
    is_store_url,
    is_transient,
    open_store,
)
from stream_trainer.state.slot_store import SlotStore
from stream_trainer.state.store_checkpoint import LEASE as CHECKPOINT_LEASE
from stream_trainer.state.store_checkpoint import ObjectCheckpointStore
from stream_trainer.state.store_lease import LeaseHeld, LeaseKeeper, StoreLease, StoreLeaseError
from stream_trainer.state.training_state import RecordWindow, TrainingState
from stream_trainer.training.evaluation import DriftMonitor, PrequentialEvaluator
from stream_trainer.training.learners import build_model
from stream_trainer.training.selection import build_selection
from stream_trainer.training.trainers import FullBatchTrainer, Trainer, build_trainer

log = logging.getLogger(__name__)

# One metadata request per attempt: a stop signal is seen within about this long.
KAFKA_PROBE_TIMEOUT_S = 1.0
KAFKA_RETRY_MAX_S = 1.0
# While the reason stays the same, "still waiting" is logged this often.
KAFKA_WAIT_LOG_EVERY_S = 30.0
# Backoff between probes of an unreachable registry store at start.
STORE_RETRY_FIRST_S, STORE_RETRY_MAX_S = 0.5, 5.0


class StartupError(StreamTrainerError):
    """The service cannot start; the message says why and what to do."""


def label_dtype(settings: Settings) -> Any:
    """numpy dtype of labels for the task."""
    return np.float64 if settings.model.task == "regression" else object


def new_state(settings: Settings) -> TrainingState:
    """A fresh, untrained state for the configured model."""
    n_features = len(settings.record.features)
    window = None
    if settings.training.mode == "full_batch":
        window = RecordWindow(
            settings.training.full_batch.window_records, n_features, label_dtype(settings)
        )
    model = build_model(settings)
    selection = build_selection(settings, model)
    return TrainingState(
        model=model if selection is None else selection.leader_model,
        selection=selection,
        evaluator=PrequentialEvaluator(
            settings.model.task,
            settings.evaluation_metrics(),
            settings.evaluation.window,
            settings.record.labels,
        ),
        drift=DriftMonitor(settings.drift) if settings.drift.enabled else None,
        breaker=BadRecordBreaker(settings.dead_letter),
        recent=RecordWindow(
            settings.registry.gate.holdout_records, n_features, label_dtype(settings)
        ),
        window=window,
    )


def validate_restored(settings: Settings) -> Any:
    """The check a checkpoint must pass before it is used (else it is quarantined)."""

    def _validate(state: Any, manifest: CheckpointManifest) -> None:
        if not isinstance(state, TrainingState):
            raise ValueError(f"payload is a {type(state).__name__}, not a TrainingState")
        if manifest.config_hash != settings.config_hash():
            raise ValueError(
                "checkpoint was written for another model/record/training config "
                f"(hash {manifest.config_hash[:12]} != {settings.config_hash()[:12]})"
            )
        if not state.model.parameters_finite():
            raise ValueError("model parameters are not finite")
        if state.model.is_fitted():
            probe = np.zeros((1, len(settings.record.features)))
            state.model.predict_many(probe)

    return _validate


Checkpoints = CheckpointStore | ObjectCheckpointStore


def open_checkpoints(
    settings: Settings,
    on_quarantine: Callable[[Any, str], None] | None = None,
    crash: Callable[[str], None] | None = None,
    observe: RequestObserver | None = None,
) -> Checkpoints:
    """The checkpoint store of ``checkpoint.dir``: a folder, or an object-store URL (its
    writer must set ``lease`` before writing) whose requests are told to ``observe``. No
    I/O beyond reading credential files."""
    cfg = settings.checkpoint
    kwargs: dict[str, Any] = {
        "key": cfg.key(),
        "allow_unsigned": cfg.allow_unsigned,
        "keep_last": cfg.keep_last,
        "on_quarantine": on_quarantine,
        "crash": crash,
    }
    if isinstance(cfg.dir, str):
        return ObjectCheckpointStore(open_store(cfg.dir, settings.object_store, observe), **kwargs)
    return CheckpointStore(cfg.dir, **kwargs)


def restore_state(settings: Settings, store: Checkpoints) -> tuple[TrainingState, bool]:
    """The newest checkpoint that verifies, or a fresh state when there never was one.

    Raises StartupError when checkpoints exist but every one failed verification: starting
    fresh would silently skip every record the group has committed.
    """
    existed = bool(store.list())
    loaded = store.load_latest(validate_restored(settings))
    if loaded is None:
        if existed:
            raise StartupError(
                f"every checkpoint in {settings.checkpoint.dir} failed verification and was "
                "quarantined (see quarantine/ there and the logs); to start a fresh model "
                "on purpose, use a new checkpoint.dir and consumer group"
            )
        return new_state(settings), False
    state = loaded.state
    assert isinstance(state, TrainingState)
    log.info(
        "restored checkpoint",
        extra={
            "path": str(loaded.path),
            "records_learnt": state.records_learnt,
            "model_version": state.model_version,
        },
    )
    return state, True


class _StartupStop:
    """What a stop signal stops while the service is still being built."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def request_stop(self) -> None:
        self.event.set()


def cluster_probe(
    producer: Producer,
    control: ControlChannel | None,
    timeout_s: float = KAFKA_PROBE_TIMEOUT_S,
    input_topic: str | None = None,
) -> Callable[[], str | None]:
    """One attempt to reach the cluster (and the control topic, if any; and
    ``input_topic``, whose partition count a scoped model needs before it starts): None
    when all answer, else why not."""

    def probe() -> str | None:
        try:
            metadata = producer.list_topics(timeout=timeout_s)
        except KafkaException as error:
            detail = error.args[0].str() if error.args else str(error)
            return f"no broker answered ({detail})"
        if not metadata.brokers:
            return "the cluster's metadata lists no brokers"
        if input_topic is not None:
            found = metadata.topics.get(input_topic)
            if found is None or found.error is not None or not found.partitions:
                return (
                    f"input topic {input_topic} does not exist (create it: stream-trainer "
                    "topics create)"
                )
        return None if control is None else control.connect(timeout_s)

    return probe


def wait_for_kafka(
    probe: Callable[[], str | None],
    bootstrap: str,
    stop: threading.Event,
    on_waiting: Callable[[str], None],
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """Retry ``probe`` until it returns None (True) or ``stop`` is set (False).

    Never gives up: an unreachable cluster (or a missing control topic) keeps the service
    alive and not ready, so a Kafka outage at start is not a crash loop. ``on_waiting``
    gets the readiness reason after every failed attempt. Logs when the reason changes
    and every ``KAFKA_WAIT_LOG_EVERY_S`` while it stays the same.
    """
    started = clock()
    last_reason: str | None = None
    last_logged = -math.inf
    delay = 0.1
    while True:
        reason = probe()
        now = clock()
        if reason is None:
            if last_reason is not None:
                log.info(
                    "Kafka cluster reachable",
                    extra={"bootstrap": bootstrap, "waited_s": round(now - started, 1)},
                )
            return True
        on_waiting(f"waiting for the Kafka cluster at {bootstrap}: {reason}")
        if reason != last_reason or now - last_logged >= KAFKA_WAIT_LOG_EVERY_S:
            log.warning(
                "waiting for the Kafka cluster at %s: %s; retrying until it answers",
                bootstrap,
                reason,
                extra={"waited_s": round(now - started, 1)},
            )
            last_reason, last_logged = reason, now
        if stop.wait(delay):
            return False
        delay = min(delay * 2, KAFKA_RETRY_MAX_S)


def wait_for_stores(
    settings: Settings,
    stop: threading.Event,
    on_waiting: Callable[[str], None],
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """:func:`wait_for_store` for ``checkpoint.dir`` and ``registry.root`` in turn; True
    once every object store among them answers, False if ``stop`` was set meanwhile."""
    return all(
        wait_for_store(settings, field, str(where), probe, stop, on_waiting, clock)
        for field, where, probe in (
            ("checkpoint.dir", settings.checkpoint.dir, "LATEST"),
            ("registry.root", settings.registry.root, f"{settings.model.name}/HIGH_WATER_MARK"),
        )
        if is_store_url(str(where))
    )


def wait_for_store(
    settings: Settings,
    field: str,
    url: str,
    probe: str,
    stop: threading.Event,
    on_waiting: Callable[[str], None],
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """Check the object store at ``url`` (the value of setting ``field``) answers a LIST of
    ``probe``: the bucket, the credentials and LIST permission; True once it does, False
    if ``stop`` was set meanwhile.

    Raises StartupError naming ``field`` / the ``object_store`` field and the cause when
    the store refuses (no such bucket, bad credentials: at once) or stays unreachable
    (network error, timeout, 5xx) for ``object_store.startup_wait_seconds`` (plus at most
    one request's ``timeout_seconds``); ``on_waiting`` gets the readiness reason meanwhile.
    """
    cfg = settings.object_store
    try:
        store = open_store(url, cfg)
    except ObjectStoreError as error:
        raise StartupError(
            f"{field} {url}: the store cannot be opened: {error} (check {field} "
            "and object_store: endpoint_url, ca_file, the *_file credentials)"
        ) from None
    started = clock()
    delay = STORE_RETRY_FIRST_S
    last_reason: str | None = None
    while True:
        try:
            # LIST, not GET: a missing bucket must not look like a missing key, and the
            # read-only permission a serving identity has is enough.
            store.list(probe)
        except ObjectStoreError as error:
            waited = clock() - started
            if not is_transient(error):
                raise StartupError(
                    f"{field} {url}: {error} (check the bucket in {field} and "
                    "object_store: credentials, region, endpoint_url)"
                ) from None
            if waited >= cfg.startup_wait_seconds:
                raise StartupError(
                    f"{field} {url}: store unreachable for {waited:.0f} s "
                    f"(object_store.startup_wait_seconds {cfg.startup_wait_seconds:g}); "
                    f"object_store.endpoint_url {cfg.endpoint_url or '(default)'}: {error}"
                ) from None
            reason = f"waiting for the object store of {field} {url}: {error}"
            on_waiting(reason)
            if reason != last_reason:
                log.warning("%s; retrying for %.0f s", reason, cfg.startup_wait_seconds - waited)
                last_reason = reason
            if stop.wait(min(delay, cfg.startup_wait_seconds - waited)):
                return False
            delay = min(delay * 2, STORE_RETRY_MAX_S)
            continue
        if last_reason is not None:
            log.info(
                "object store reachable",
                extra={"field": field, "waited_s": round(clock() - started, 1)},
            )
        return True


def run_service(
    settings: Settings,
    install_signals: bool = True,
    lock: DirectoryLock | None = None,
    signals: ShutdownSignals | None = None,
) -> int:
    """Run the service until stopped; returns the exit code (0 after a graceful stop).

    ``lock``: the checkpoint directory's lock when the caller already holds it;
    ``signals``: handlers the caller installed already (else installed here if asked).
    """
    if signals is None and install_signals:
        signals = ShutdownSignals(settings.shutdown.timeout_s)
        signals.install()
    configure_logging(settings.logging.level, settings.logging.format)
    for secret in (settings.kafka.client_config().get("sasl.password"), settings.checkpoint.key()):
        register_secret(secret)
    registry = CollectorRegistry()
    metrics = build_metrics(registry, version=__version__)
    metrics.state.state("starting")
    # A folder has one writer by its lock; an object store's writer holds its lease,
    # taken once this member is the active one.
    # Partition scope: members share the folder's slots, each claimed by its MANIFEST.
    owns_lock = (
        lock is None and isinstance(settings.checkpoint.dir, Path) and not settings.model.scoped
    )
    if owns_lock:
        lock = DirectoryLock(Path(settings.checkpoint.dir))
        try:
            lock.acquire()
        except CheckpointLocked as error:
            log.error("%s", error)
            raise StartupError(str(error)) from None
    crash = CrashPoints(os.environ.get(CRASH_ENV))
    heartbeat = Heartbeat(metrics=metrics)
    service_ref: dict[str, Service | PartitionService] = {}
    starting = {"reason": "starting"}  # readiness reason until the service exists
    startup_stop = _StartupStop()
    if signals is not None:
        signals.attach(startup_stop)

    def _ready() -> tuple[bool, str]:
        service = service_ref.get("service")
        return (False, starting["reason"]) if service is None else service.ready()

    metrics.ready.set_function(lambda: float(_ready()[0]))

    http = None
    if settings.http.enabled:
        http = HealthServer(
            registry,
            settings.http.host,
            settings.http.port,
            health=lambda: heartbeat.healthy(settings.http.healthz_max_age_s),
            ready=_ready,
        )
        http.start()
    producer = None
    unit_decoder: UnitDecoder | None = None
    trainer: Trainer | None = None
    control: ControlChannel | None = None
    lease: KafkaLease | None = None
    store_lease: StoreLease | None = None
    checkpoint_lease: StoreLease | None = None
    wire: WireDecoder | None = None
    exporter: MlflowExporter | None = None
    consumer_config = settings.kafka.consumer_config()
    if not settings.model.scoped or settings.kafka.group_instance_id is not None:
        # Partition scope on a Deployment: dynamic members, whose LeaveGroup at a stop hands
        # their partitions over at once (a static one holds them a session timeout).
        consumer_config["group.instance.id"] = settings.group_instance_id(socket.gethostname())
    try:

        def _waiting_for_store(reason: str) -> None:
            starting["reason"] = reason
            heartbeat.beat()  # waiting for the store is progress, not a stall

        # Before anything heavy: a wrong bucket or key fails the start in seconds.
        if not wait_for_stores(settings, startup_stop.event, _waiting_for_store):
            log.info("stopped while waiting for the object stores")
            return 0
        metrics.state.state("restoring")
        # First, so the decode worker's interpreter starts while the checkpoint loads.
        if settings.record.format != "json":
            wire = WireDecoder(settings.schema_registry)
        key_field = settings.model.key_field
        decoder = RecordDecoder(
            settings.record, settings.model.task, wire, () if key_field is None else (key_field,)
        )
        if settings.model.scoped:
            producer = Producer(settings.kafka.producer_config())
            reachable = wait_for_kafka(
                # Waited for, not a start-up error: a pod must not crash-loop until it exists.
                cluster_probe(producer, None, input_topic=settings.topics.input[0]),
                settings.kafka.bootstrap_servers,
                startup_stop.event,
                _waiting_for_store,
            )
            if not reachable:
                log.info("stopped while waiting for the Kafka cluster")
                return 0
            partitioned = _partition_service(
                settings, producer, decoder, wire, metrics, heartbeat, crash, consumer_config
            )
            service_ref["service"] = partitioned
            if signals is not None:
                signals.attach(partitioned)
            gc.collect()
            gc.freeze()
            return partitioned.run()
        # A worker process could not share the schemas the poll loop fetches: wire formats
        # decode inline.
        unit_decoder = (
            InlineDecoder(decoder)
            if wire is not None
            else build_unit_decoder(
                settings.record, settings.model.task, settings.kafka.decode_worker
            )
        )
        trainer = build_trainer(settings, crash)  # a full-batch fit worker starts here too
        store = open_checkpoints(
            settings,
            on_quarantine=lambda _where, reason: metrics.checkpoints_quarantined.labels(
                reason=reason
            ).inc(),
            crash=crash.reached,
            observe=metrics.observe_object_store,
        )
        if settings.checkpoint.key() is None:
            log.warning("running without a checkpoint key: checkpoints are unsigned")
        if isinstance(store, ObjectCheckpointStore):
            # Shared with the other members: read only, for the lineage and the control
            # offsets; restored for writing once this member holds the leases.
            state, restored = _peek_state(settings, store)
        else:
            state, restored = restore_state(settings, store)
        if not restored or not getattr(state, "lineage", None):
            # A new model's history is this member's: the same after a crash before its
            # first checkpoint, different for any other member (or a pre-lineage checkpoint).
            state.lineage = str(consumer_config["group.instance.id"])
        producer = Producer(settings.kafka.producer_config())
        if settings.topics.control:
            control = ControlChannel(
                settings.kafka.consumer_config(),
                settings.topics.control,
                settings.model.name,
                producer,
                max_age_s=settings.control.max_age_s,
                resume_from=getattr(state, "control_offsets", None),
                # A checkpoint from before control offsets: its service had read every
                # command up to the end when it started (the old rule), so start there.
                from_end=restored and getattr(state, "control_offsets", None) is None,
            )

        def _waiting(reason: str) -> None:
            starting["reason"] = reason
            heartbeat.beat()  # waiting for the broker is progress, not a stall

        reachable = wait_for_kafka(
            cluster_probe(producer, control),
            settings.kafka.bootstrap_servers,
            startup_stop.event,
            _waiting,
        )
        if not reachable:
            log.info("stopped while waiting for the Kafka cluster")
            return 0
        standby = StandbyWait(startup_stop.event)
        lineage = _lineage_source(store, state)
        lease = _become_active(
            settings, consumer_config, lineage, standby, heartbeat, starting, metrics
        )
        if lease is None:
            log.info("stopped while standing by")
            return 0
        metrics.state.state("restoring")
        if isinstance(store, ObjectCheckpointStore):
            checkpoint_lease = _hold_store_lease(
                settings, store.store, CHECKPOINT_LEASE, "checkpoint", startup_stop.event, _waiting
            )
            if checkpoint_lease is None:
                log.info("stopped while waiting for the checkpoints' lease")
                return 0
            store.lease = checkpoint_lease
            state, restored = _restore_shared(settings, store, state, consumer_config, control)
        registry_store = open_registry(
            settings.registry.root,
            settings.model.name,
            settings.checkpoint.key(),
            settings.registry.keep_last,
            settings.object_store,
            crash=crash.reached,
            observe=metrics.observe_object_store,
        )
        if isinstance(registry_store, StoreRegistry):
            store_lease = _hold_store_lease(
                settings,
                registry_store.store,
                f"{settings.model.name}/LEASE",
                "registry",
                startup_stop.event,
                _waiting,
            )
            if store_lease is None:
                log.info("stopped while waiting for the registry's lease")
                return 0
            registry_store.lease = store_lease
        events = VersionEventPublisher(producer, settings.topics.versions, settings.model.name)
        if settings.registry.mlflow.enabled:
            for secret in settings.registry.mlflow.secrets():
                register_secret(secret)
            try:
                exporter = MlflowExporter.build(settings, registry_store, registry)
            except MlflowError as error:  # a CA file that cannot be read: a start-up error
                raise StartupError(str(error)) from None
            exporter.start()  # its first pass exports what a previous run left pending
        publisher = ModelPublisher(
            settings,
            registry_store,
            events,
            metrics,
            crash=crash,
            on_published=None if exporter is None else exporter.notify,
        )
        publisher.reconcile(state)

        def make_source(service: Service) -> Source:
            # The service's next offsets, read on the poll thread that moves them.
            return kafka_source(
                settings,
                consumer_config,
                metrics,
                service,
                service.on_kafka_error,
                lambda: service.state.offsets,
                sole_member=True,  # it holds the lease
            )

        service = Service(
            settings,
            state,
            make_source=make_source,
            decoder=decoder,
            trainer=trainer,
            store=store,
            dead_letters=dead_letter_publisher(settings, producer),
            publisher=publisher,
            metrics=metrics,
            heartbeat=heartbeat,
            control=control,
            unit_decoder=unit_decoder,
            reload_state=lambda: restore_state(settings, store)[0],
            crash=crash,
            lease=lease,
            wire=wire,
            store_leases=_lease_keeper(checkpoint_lease, store_lease),
        )
        service_ref["service"] = service
        if signals is not None:
            signals.attach(service)
        # Start-up objects (libraries, the restored model) live for the whole run: moving
        # them out of the collector's generations measured +8-23 % throughput.
        gc.collect()
        gc.freeze()
        try:
            return service.run()
        except RetentionGap as gap:
            raise StartupError(str(gap)) from None
    finally:
        if lease is not None:  # after the source: a standby starts from our last commit
            lease.close()
        for held in (store_lease, checkpoint_lease):
            if held is not None:
                held.release()  # a successor need not wait for it to expire
        if control is not None and "service" not in service_ref:
            control.close()  # else the service closed it
        if isinstance(trainer, FullBatchTrainer):
            trainer.close()
        if unit_decoder is not None:
            unit_decoder.close()
        if wire is not None:
            wire.close()
        if exporter is not None:
            exporter.close()  # bounded; what it had not exported, the next start does
        if producer is not None:
            producer.flush(5.0)
        if http is not None:
            http.stop()
        if owns_lock and lock is not None:
            lock.release()


def kafka_source(
    settings: Settings,
    consumer_config: dict[str, Any],
    metrics: Metrics,
    listener: RebalanceListener,
    on_error: Callable[[KafkaError], None],
    positions: Callable[[], Mapping[TopicPartitionKey, int]],
    *,
    sole_member: bool = False,
    on_commit_failed: Callable[[dict[TopicPartitionKey, int]], None] | None = None,
) -> KafkaSource:
    """The input topics' consumer for ``listener`` (a service's rebalance hooks), with the
    lag gauges fed from ``positions`` (the service's next offsets, read on the poll
    thread that moves them)."""
    lag = LagTracker(
        metrics, read_committed=consumer_config.get("isolation.level") != "read_uncommitted"
    )
    source = KafkaSource(
        consumer_config,
        settings.topics.input,
        listener,
        on_error=on_error,
        on_stats=lag.on_stats,
        accept_retention_gap=settings.checkpoint.accept_retention_gap,
        on_retention_gap=lambda _gap: metrics.retention_gap_accepted.inc(),
        sole_member=sole_member,
        on_commit_failed=on_commit_failed,
    )
    lag.attach(source, positions)
    return source


def dead_letter_publisher(settings: Settings, producer: Producer) -> DeadLetterPublisher:
    """The dead-letter topic's publisher on ``producer``."""
    return DeadLetterPublisher(
        producer,
        settings.topics.dead_letter,
        settings.kafka.group_id,
        __version__,
        # The producer's own limit: a bigger dead letter is cut to fit it.
        int(settings.kafka.extra.get("message.max.bytes", DEFAULT_MESSAGE_MAX_BYTES)),
    )


def _partition_service(
    settings: Settings,
    producer: Producer,
    decoder: RecordDecoder,
    wire: WireDecoder | None,
    metrics: Metrics,
    heartbeat: Heartbeat,
    crash: CrashPoints,
    consumer_config: dict[str, Any],
) -> PartitionService:
    """The poll loop of ``model.scope: partition`` and its state manager: slots in the
    shared checkpoint store, versions under each slot's registry folder (docs/scale-out.md)."""
    topic = settings.topics.input[0]
    metadata = producer.list_topics(topic, timeout=10.0)
    found = metadata.topics.get(topic)
    if found is None or found.error is not None or not found.partitions:
        raise StartupError(f"topics.input: {topic} cannot be read ({found and found.error})")
    key_scope = settings.model.scope == "key"
    source = KAFKA_KEY
    if key_scope and settings.model.key.source == "field":
        source = f"field:{settings.model.key.field}"
    routing = Routing(source, settings.routing.partitioner, len(found.partitions), topic)
    publishing = ScopedPublishing(
        settings, settings.model.scope, routing, producer, metrics, crash=crash
    )
    ckpt = settings.checkpoint
    checkpoints = open_store(ckpt.dir, settings.object_store, metrics.observe_object_store)
    member = f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
    if ckpt.key() is None:
        log.warning("running without a checkpoint key: checkpoints are unsigned")

    def open_slot(scope_id: str) -> SlotStore:
        return SlotStore(
            checkpoints,
            PARTITION_SCOPE,
            scope_id,
            member,
            ckpt.key(),
            ckpt.allow_unsigned,
            ckpt.keep_last,
            on_quarantine=lambda _where, reason: metrics.checkpoints_quarantined.labels(
                reason=reason
            ).inc(),
            crash=crash.reached,
        )

    def make_slots(service: PartitionService) -> PartitionSlots:
        def source() -> Source:
            return cast("Source", service.commits)

        if isinstance(service, KeyService):
            return KeyedSlots(
                settings,
                open_slot,
                new_keyed_state(settings),
                validate_keyed(settings),
                publishing,
                service.snapshot,
                source,
                metrics,
                fenced_registry=publishing.store is not None,
                crash=crash,
                on_close=service.forget_slot,
            )
        return PartitionSlots(
            settings,
            open_slot,
            lambda: new_state(settings),
            validate_restored(settings),
            publishing,
            service.snapshot,
            source,
            metrics,
            fenced_registry=publishing.store is not None,
            crash=crash,
        )

    def make_source(service: PartitionService) -> Source:
        return kafka_source(
            settings,
            consumer_config,
            metrics,
            service,
            service.on_kafka_error,
            service.next_offsets,
            on_commit_failed=service.commits.retry,
        )

    args = (
        settings,
        make_slots,
        make_source,
        decoder,
        build_trainer(settings, crash),
        dead_letter_publisher(settings, producer),
        metrics,
        heartbeat,
    )
    if key_scope:
        return KeyService(
            *args,
            wire=wire,
            crash=crash,
            objects=KeyStateObjects(
                checkpoints, ckpt.key(), ckpt.allow_unsigned, settings.config_hash()
            ),
            publishing=publishing,
            new_state=lambda: new_state(settings),
            fenced_registry=publishing.store is not None,
        )
    return PartitionService(*args, wire=wire, crash=crash)


def _peek_state(settings: Settings, store: ObjectCheckpointStore) -> tuple[TrainingState, bool]:
    """The newest readable shared checkpoint's state, read only (nothing quarantined), or a
    fresh state; what a member needs before it may write: the lineage it claims."""
    try:
        loaded = store.read_latest()
    except CheckpointError as error:
        raise StartupError(str(error)) from None
    if loaded is None or not isinstance(loaded.state, TrainingState):
        return new_state(settings), False
    return loaded.state, True


def _restore_shared(
    settings: Settings,
    store: ObjectCheckpointStore,
    peeked: TrainingState,
    consumer_config: dict[str, Any],
    control: ControlChannel | None,
) -> tuple[TrainingState, bool]:
    """Restore for writing from the shared store, under its lease: the peeked state may be
    stale (another member wrote while this one stood by). The control channel moves to the
    restored state's command offsets, so no command is applied twice."""
    try:
        state, restored = restore_state(settings, store)
    except CheckpointError as error:
        raise StartupError(str(error)) from None
    if not restored or not getattr(state, "lineage", None):
        state.lineage = peeked.lineage or str(consumer_config["group.instance.id"])
    offsets = getattr(state, "control_offsets", None)
    if control is not None and offsets:
        control.seek(offsets)
    return state, restored


def _lease_keeper(
    checkpoint_lease: StoreLease | None, registry_lease: StoreLease | None
) -> LeaseKeeper | None:
    """Renews the store leases this writer holds from its poll loop (None: holds none)."""
    held = {
        what: lease
        for what, lease in (("checkpoints", checkpoint_lease), ("registry", registry_lease))
        if lease is not None
    }
    return LeaseKeeper(held) if held else None


def _hold_store_lease(
    settings: Settings,
    store: ObjectStore,
    key: str,
    what: str,
    stop: threading.Event,
    waiting: Callable[[str], None],
) -> StoreLease | None:
    """Take the lease object ``key`` of ``store`` (the registry's or the checkpoints');
    None if stopped meanwhile.

    This member already holds the Kafka lease, so another holder is a writer that lost it
    (a zombie) or one that crashed: wait until its lease expires, then take it over with a
    higher token, which fences the old writer's writes. The holder name is the member's
    ``group.instance.id`` (by default the host name, i.e. the pod name, and a digest of
    checkpoint.dir), so a restarted container of the same pod takes it back at once.
    """
    holder = settings.group_instance_id(socket.gethostname())
    lease = StoreLease(store, key, holder, ttl_s=settings.object_store.lease_seconds)
    unreachable_since: float | None = None
    while not stop.is_set():
        try:
            token = lease.acquire()
        except LeaseHeld as held:
            waiting(f"{what} lease: {held}")
            stop.wait(1.0)
            continue
        except StoreLeaseError as error:
            # A store that blinks (it answered the start-up check a moment ago) is waited
            # for as at the check; retrying is safe: a lease whose write was applied but
            # whose answer was lost is ours (same holder) at the next attempt.
            cause = error.__cause__
            now = time.monotonic()
            unreachable_since = unreachable_since if unreachable_since is not None else now
            bound = settings.object_store.startup_wait_seconds
            if not (isinstance(cause, ObjectStoreError) and is_transient(cause)) or (
                now - unreachable_since >= bound
            ):
                raise StartupError(f"{what} lease: {error}") from None
            waiting(f"{what} lease: store unavailable: {error}")
            log.warning("%s lease: store unavailable, retrying: %s", what, error)
            stop.wait(1.0)
            continue
        log.info(f"{what} lease held", extra={"token": token, "holder": holder})
        return lease
    return None


def _acquire_lease(
    settings: Settings,
    consumer_config: dict[str, Any],
    standby: StandbyWait,
    heartbeat: Heartbeat,
    not_ready: dict[str, str],
    metrics: Metrics,
) -> KafkaLease | None:
    """Stand by until this member holds the model's lease; None if stopped meanwhile.

    Raises StartupError when the lease topic cannot be used.
    """
    topic = settings.lease_topic()
    admin_config = settings.kafka.client_config()
    not_ready["reason"] = f"waiting for the Kafka cluster at {settings.kafka.bootstrap_servers}"
    try:
        while not ensure_lease_topic(admin_config, topic):
            heartbeat.beat()
            if standby.wait(1.0):
                return None
    except LeaseError as error:
        raise StartupError(str(error)) from None
    lease = KafkaLease(consumer_config, topic)
    not_ready["reason"] = (
        f"standing by: another member of group {settings.kafka.group_id} holds the lease "
        f"(topic {topic})"
    )
    if standby.until_held(lease, heartbeat.beat, on_standby=lambda: metrics.state.state("standby")):
        log.info("active: this member holds the lease", extra={"topic": topic})
        return lease
    lease.close()
    return None


def _lineage_source(store: Checkpoints, state: TrainingState) -> Callable[[], str]:
    """The lineage this member claims, asked at every check of the claim: fixed for a
    folder; for a shared store, that of its newest checkpoint (another member may have
    written the first one since this member started), else the one known so far."""
    if not isinstance(store, ObjectCheckpointStore):
        return lambda: state.lineage

    # Read again even at the first check: it comes after the wait for the Kafka lease,
    # which for a standby may be long after the read at start.
    def newest() -> str:
        try:
            loaded = store.read_latest()
        except (CheckpointError, ObjectStoreError) as error:
            log.warning("shared checkpoints unreadable, lineage kept: %s", error)
            return state.lineage
        if loaded is not None and getattr(loaded.state, "lineage", None):
            state.lineage = loaded.state.lineage
        return state.lineage

    return newest


def _become_active(
    settings: Settings,
    consumer_config: dict[str, Any],
    lineage_of: Callable[[], str],
    standby: StandbyWait,
    heartbeat: Heartbeat,
    not_ready: dict[str, str],
    metrics: Metrics,
) -> KafkaLease | None:
    """Hold the lease with the group claimed by this model's lineage; None if stopped.

    A member holding the lease while another lineage's claim stands gives the lease back
    and stands by (the owner of that model can take it), re-checking every session
    timeout: it never trains a group another model has trained.
    """
    topic = settings.lease_topic()
    client = settings.kafka.client_config()
    member = str(consumer_config["group.instance.id"])
    lease_config = dict(consumer_config)
    while True:
        lease = _acquire_lease(settings, lease_config, standby, heartbeat, not_ready, metrics)
        if lease is None:
            return None
        lineage = lineage_of()
        try:
            claim = read_claim(client, topic)
            if claim is None:
                write_claim(settings.kafka.producer_config(), topic, lineage, member)
                log.info("claimed the group for this model", extra={"lineage": lineage})
                return lease
            if claim == lineage:
                return lease
            reason = (
                f"standing by: group {settings.kafka.group_id} is trained by another model "
                f"(lineage {claim}, claimed on topic {topic}); this member's model is lineage "
                f"{lineage}. Start the member that holds that model's checkpoints, or start "
                "a new model with a new kafka.group_id"
            )
        except (KafkaException, NotDelivered) as error:
            reason = f"standing by: cannot read the claim on {topic}: {error}"
        log.error("%s", reason)
        lease.close()
        # A static member's close keeps its slot until the session ends: retry as a
        # dynamic member, whose close hands the lease on at once.
        lease_config.pop("group.instance.id", None)
        not_ready["reason"] = reason
        metrics.state.state("standby")
        if standby.wait(settings.kafka.session_timeout_ms / 1000):
            return None
