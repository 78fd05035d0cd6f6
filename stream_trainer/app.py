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
from collections.abc import Callable
from typing import Any

import numpy as np
from confluent_kafka import KafkaException, Producer
from prometheus_client import CollectorRegistry

from stream_trainer import __version__
from stream_trainer.checkpoint import (
    CheckpointLocked,
    CheckpointManifest,
    CheckpointStore,
    DirectoryLock,
)
from stream_trainer.config import Settings
from stream_trainer.consumer import KafkaSource, RetentionGap
from stream_trainer.control import ControlChannel
from stream_trainer.deadletter import (
    DEFAULT_MESSAGE_MAX_BYTES,
    BadRecordBreaker,
    DeadLetterPublisher,
)
from stream_trainer.decode_worker import InlineDecoder, UnitDecoder, build_unit_decoder
from stream_trainer.delivery import NotDelivered
from stream_trainer.errors import StreamTrainerError
from stream_trainer.evaluation import DriftMonitor, PrequentialEvaluator
from stream_trainer.faults import CRASH_ENV, CrashPoints
from stream_trainer.http import HealthServer, Heartbeat
from stream_trainer.learners import build_model
from stream_trainer.lease import (
    KafkaLease,
    LeaseError,
    StandbyWait,
    ensure_lease_topic,
    read_claim,
    write_claim,
)
from stream_trainer.logs import configure_logging, register_secret
from stream_trainer.metrics import LagTracker, Metrics, build_metrics
from stream_trainer.mlflow_export import MlflowError, MlflowExporter
from stream_trainer.publisher import ModelPublisher
from stream_trainer.records import RecordDecoder
from stream_trainer.registry import open_registry
from stream_trainer.selection import build_selection
from stream_trainer.service import Service
from stream_trainer.signals import ShutdownSignals
from stream_trainer.state import RecordWindow, TrainingState
from stream_trainer.store_lease import LeaseHeld, StoreLease, StoreLeaseError
from stream_trainer.store_registry import StoreRegistry
from stream_trainer.trainers import FullBatchTrainer, Trainer, build_trainer
from stream_trainer.versions import VersionEventPublisher
from stream_trainer.wire import WireDecoder

log = logging.getLogger(__name__)

# One metadata request per attempt: a stop signal is seen within about this long.
KAFKA_PROBE_TIMEOUT_S = 1.0
KAFKA_RETRY_MAX_S = 1.0
# While the reason stays the same, "still waiting" is logged this often.
KAFKA_WAIT_LOG_EVERY_S = 30.0


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


def restore_state(settings: Settings, store: CheckpointStore) -> tuple[TrainingState, bool]:
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
                "quarantined (see the quarantine/ folder and the logs); to start a fresh model "
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
    producer: Producer, control: ControlChannel | None, timeout_s: float = KAFKA_PROBE_TIMEOUT_S
) -> Callable[[], str | None]:
    """One attempt to reach the cluster (and the control topic, if any): None when both
    answer, else why not."""

    def probe() -> str | None:
        try:
            metadata = producer.list_topics(timeout=timeout_s)
        except KafkaException as error:
            detail = error.args[0].str() if error.args else str(error)
            return f"no broker answered ({detail})"
        if not metadata.brokers:
            return "the cluster's metadata lists no brokers"
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
    owns_lock = lock is None
    if lock is None:
        lock = DirectoryLock(settings.checkpoint.dir)
        try:
            lock.acquire()
        except CheckpointLocked as error:
            log.error("%s", error)
            raise StartupError(str(error)) from None
    crash = CrashPoints(os.environ.get(CRASH_ENV))
    heartbeat = Heartbeat(metrics=metrics)
    service_ref: dict[str, Service] = {}
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
    wire: WireDecoder | None = None
    exporter: MlflowExporter | None = None
    consumer_config = settings.kafka.consumer_config()
    consumer_config["group.instance.id"] = settings.group_instance_id(socket.gethostname())
    try:
        metrics.state.state("restoring")
        # First, so the decode worker's interpreter starts while the checkpoint loads.
        if settings.record.format != "json":
            wire = WireDecoder(settings.schema_registry)
        decoder = RecordDecoder(settings.record, settings.model.task, wire)
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
        store = CheckpointStore(
            settings.checkpoint.dir,
            key=settings.checkpoint.key(),
            allow_unsigned=settings.checkpoint.allow_unsigned,
            keep_last=settings.checkpoint.keep_last,
            on_quarantine=lambda path, reason: metrics.checkpoints_quarantined.labels(
                reason=reason
            ).inc(),
            crash=crash.reached,
        )
        if settings.checkpoint.key() is None:
            log.warning("running without a checkpoint key: checkpoints are unsigned")
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
        lease = _become_active(
            settings, consumer_config, state.lineage, standby, heartbeat, starting, metrics
        )
        if lease is None:
            log.info("stopped while standing by")
            return 0
        metrics.state.state("restoring")
        registry_store = open_registry(
            settings.registry.root,
            settings.model.name,
            settings.checkpoint.key(),
            settings.registry.keep_last,
            settings.object_store,
            crash=crash.reached,
        )
        if isinstance(registry_store, StoreRegistry):
            store_lease = _hold_store_lease(settings, registry_store, startup_stop.event, _waiting)
            if store_lease is None:
                log.info("stopped while waiting for the registry's lease")
                return 0
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

        def make_source(service: Service) -> KafkaSource:
            lag = LagTracker(
                metrics,
                read_committed=consumer_config.get("isolation.level") != "read_uncommitted",
            )
            source = KafkaSource(
                consumer_config,
                settings.topics.input,
                service,
                on_error=service.on_kafka_error,
                on_stats=lag.on_stats,
                accept_retention_gap=settings.checkpoint.accept_retention_gap,
                on_retention_gap=lambda _gap: metrics.retention_gap_accepted.inc(),
                sole_member=True,  # it holds the lease
            )
            # The service's next offsets, read on the poll thread that moves them.
            lag.attach(source, lambda: service.state.offsets)
            return source

        service = Service(
            settings,
            state,
            make_source=make_source,
            decoder=decoder,
            trainer=trainer,
            store=store,
            dead_letters=DeadLetterPublisher(
                producer,
                settings.topics.dead_letter,
                settings.kafka.group_id,
                __version__,
                # The producer's own limit: a bigger dead letter is cut to fit it.
                int(settings.kafka.extra.get("message.max.bytes", DEFAULT_MESSAGE_MAX_BYTES)),
            ),
            publisher=publisher,
            metrics=metrics,
            heartbeat=heartbeat,
            control=control,
            unit_decoder=unit_decoder,
            reload_state=lambda: restore_state(settings, store)[0],
            crash=crash,
            lease=lease,
            wire=wire,
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
        if store_lease is not None:
            store_lease.release()  # a successor need not wait for it to expire
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
        if owns_lock:
            lock.release()


def _hold_store_lease(
    settings: Settings,
    registry: StoreRegistry,
    stop: threading.Event,
    waiting: Callable[[str], None],
) -> StoreLease | None:
    """Take the registry's lease object (``<model>/LEASE``) and fence the registry with it;
    None if stopped meanwhile.

    This member already holds the Kafka lease, so another holder is a writer that lost it
    (a zombie) or one that crashed: wait until its lease expires, then take it over with a
    higher token, which fences the old writer's publishes. The holder name is this host and
    checkpoint folder, so a restarted container of the same pod takes it back at once.
    """
    holder = f"{socket.gethostname()}:{settings.checkpoint.dir}"
    lease = StoreLease(
        registry.store,
        f"{settings.model.name}/LEASE",
        holder,
        ttl_s=settings.object_store.lease_seconds,
    )
    while not stop.is_set():
        try:
            token = lease.acquire()
        except LeaseHeld as held:
            waiting(f"registry lease: {held}")
            stop.wait(1.0)
            continue
        except StoreLeaseError as error:
            raise StartupError(f"registry lease: {error}") from None
        registry.lease = lease
        log.info("registry lease held", extra={"token": token, "holder": holder})
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


def _become_active(
    settings: Settings,
    consumer_config: dict[str, Any],
    lineage: str,
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
