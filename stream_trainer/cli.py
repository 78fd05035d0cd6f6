"""The ``stream-trainer`` command. Exit codes: 0 ok, 1 failure, 2 usage error."""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stream_trainer import __version__
from stream_trainer.operations.signals import ShutdownSignals

if TYPE_CHECKING:
    from stream_trainer.config import Settings

# Installed by main() before anything heavy is imported, for the `run` command only.
_RUN_SIGNALS: ShutdownSignals | None = None

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
# `control --wait`: the service refused the command; no ack came within the wait.
EXIT_REFUSED, EXIT_NO_ANSWER = 3, 4
# How long CLI commands retry a registry store's transient read errors.
CLI_STORE_RETRY_S = 30.0
DEFAULT_CONTROL_WAIT_S = 30.0
DEFAULT_INPUT_PARTITIONS = (
    3  # stream_trainer.operations.topics's, without importing confluent_kafka
)


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        type=Path,
        default=None,
        help="YAML config file (default: $STREAM_TRAINER_CONFIG)",
    )


def _settings(args: argparse.Namespace) -> Settings:
    from stream_trainer.config import load_settings  # noqa: PLC0415

    return load_settings(args.config)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


# -- commands ---------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    """Run the service until SIGTERM/SIGINT."""
    from stream_trainer.state.checkpoint import CheckpointLocked, DirectoryLock  # noqa: PLC0415

    settings = _settings(args)
    signals = _RUN_SIGNALS or ShutdownSignals(settings.shutdown.timeout_s)
    signals.set_bound(settings.shutdown.timeout_s)
    signals.install()
    # The single-writer lock comes before the heavy imports, so a second process on the
    # same checkpoint directory fails in milliseconds, not after loading River/sklearn.
    # (An object store's writer holds a lease instead, taken once the member is active.)
    where = settings.checkpoint.dir
    # Partition scope: members share the folder; each slot is claimed by its MANIFEST.
    lock = DirectoryLock(where) if isinstance(where, Path) and not settings.model.scoped else None
    try:
        if lock is not None:
            lock.acquire()
    except CheckpointLocked as error:
        print(f"stream-trainer: cannot start: {error}", file=sys.stderr)
        return EXIT_FAILURE
    from stream_trainer.operations.app import StartupError, run_service  # noqa: PLC0415
    from stream_trainer.state.checkpoint import CheckpointFenced  # noqa: PLC0415
    from stream_trainer.training.learners import IncompatibleLearner, build_model  # noqa: PLC0415

    try:
        build_model(settings)  # incompatible learner choices fail before anything starts
        return run_service(settings, lock=lock, signals=signals)
    except (StartupError, IncompatibleLearner) as error:
        print(f"stream-trainer: cannot start: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except CheckpointFenced as error:
        print(f"stream-trainer: stopped, fenced off: {error}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        if lock is not None:
            lock.release()


def cmd_validate_config(args: argparse.Namespace) -> int:
    """Print the effective config as JSON (secrets masked); exit 1 when invalid."""
    from stream_trainer.training.learners import IncompatibleLearner, build_model  # noqa: PLC0415

    settings = _settings(args)
    try:
        build_model(settings)
    except IncompatibleLearner as error:
        print(f"stream-trainer: invalid configuration:\n  {error}", file=sys.stderr)
        return EXIT_FAILURE
    _print_json(settings.masked())
    return EXIT_OK


def cmd_produce(args: argparse.Namespace) -> int:
    """Write a dataset to a topic (created if missing)."""
    from confluent_kafka import KafkaException  # noqa: PLC0415

    from stream_trainer.laptop.datasets import get_dataset  # noqa: PLC0415
    from stream_trainer.laptop.produce import (  # noqa: PLC0415
        SchemaRegistrationError,
        produce,
    )
    from stream_trainer.operations.topics import (  # noqa: PLC0415
        TopicError,
        TopicSpec,
        admin_client,
        ensure_topics,
        quiet_logger,
        wait_for_broker,
    )

    try:
        dataset = get_dataset(args.dataset)
    except ValueError as error:
        print(f"stream-trainer produce: {error}", file=sys.stderr)
        return EXIT_USAGE
    if args.format != "json" and not args.schema_registry:
        print(
            f"stream-trainer produce: --format {args.format} needs --schema-registry URL",
            file=sys.stderr,
        )
        return EXIT_USAGE
    registry = {"url": args.schema_registry} if args.schema_registry else None
    client = {"bootstrap.servers": args.bootstrap_servers}
    try:
        admin = admin_client(client)
        wait_for_broker(admin, args.bootstrap_servers, args.timeout)
        spec = TopicSpec(args.topic, "input", args.partitions)
        ensure_topics(admin, [spec], replication_factor=1, timeout=args.timeout)
        report = produce(
            {**client, "logger": quiet_logger()},
            args.topic,
            dataset,
            args.records,
            partitions=args.partitions,
            bad_ratio=args.bad_records,
            seed=args.seed,
            value_format=args.format,
            registry_config=registry,
        )
    except (TopicError, KafkaException) as error:
        print(f"stream-trainer produce: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except SchemaRegistrationError as error:
        print(f"stream-trainer produce: {error}", file=sys.stderr)
        return EXIT_FAILURE
    _print_json(
        {
            "topic": args.topic,
            "dataset": dataset.name,
            "valid": report.valid,
            "invalid": report.invalid,
            "invalid_reasons": report.invalid_reasons,
            "format": args.format,
            "schema_id": report.schema_id,
        }
    )
    return EXIT_OK


def cmd_checkpoint_inspect(args: argparse.Namespace) -> int:
    """Show checkpoint manifests and their verification, never unpickling anything."""
    from stream_trainer.config import ObjectStoreSettings  # noqa: PLC0415
    from stream_trainer.state.checkpoint import CheckpointError, CheckpointStore  # noqa: PLC0415
    from stream_trainer.state.objectstore import (  # noqa: PLC0415
        ObjectStoreError,
        is_store_url,
        open_store,
    )
    from stream_trainer.state.store_checkpoint import ObjectCheckpointStore  # noqa: PLC0415

    key: bytes | None = None
    unsigned = True
    where: str | Path | None = None
    object_store = ObjectStoreSettings()
    if args.config is not None or args.path is None:
        settings = _settings(args)
        key, unsigned = settings.checkpoint.key(), settings.checkpoint.allow_unsigned
        where, object_store = settings.checkpoint.dir, settings.object_store
    if args.path is not None:
        where = args.path if is_store_url(args.path) else Path(args.path)
    assert where is not None
    # Without a key nothing can be verified, but manifests can still be shown.
    allow_unsigned = unsigned or key is None
    results: list[dict[str, Any]]
    if isinstance(where, str):
        prefix, _, last = where.rstrip("/").rpartition("/")
        names: list[str] | None = [last] if last.endswith(".ckpt") else None
        try:
            remote = ObjectCheckpointStore(
                open_store(prefix if names else where, object_store),
                key=key,
                allow_unsigned=allow_unsigned,
                keep_last=1_000_000,
            )
            results = [remote.inspect(name) for name in names or remote.names(args.all)]
        except (ObjectStoreError, CheckpointError) as error:
            print(f"stream-trainer: {error}", file=sys.stderr)
            return EXIT_FAILURE
    else:
        paths: list[Path] = []
        if where.is_file():
            where, paths = where.parent, [where]
        store = CheckpointStore(where, key=key, allow_unsigned=allow_unsigned, keep_last=1_000_000)
        if not paths:
            paths = store.list()[-1:] if not args.all else store.list()
        results = [store.inspect(path) for path in paths]
    if not results:
        print(f"no checkpoints in {where}", file=sys.stderr)
        return EXIT_FAILURE
    _print_json(results)
    return EXIT_OK


def cmd_search_show(args: argparse.Namespace) -> int:
    """Print the last hyperparameter search recorded in the newest checkpoint."""
    from stream_trainer.operations.app import open_checkpoints  # noqa: PLC0415
    from stream_trainer.state.checkpoint import CheckpointError  # noqa: PLC0415
    from stream_trainer.state.objectstore import ObjectStoreError  # noqa: PLC0415

    settings = _settings(args)
    cfg = settings.checkpoint
    try:
        loaded = open_checkpoints(settings).read_latest()
    except (CheckpointError, ObjectStoreError) as error:
        print(f"stream-trainer: {error}", file=sys.stderr)
        return EXIT_FAILURE
    if loaded is None:
        print(f"stream-trainer: no readable checkpoint in {cfg.dir}", file=sys.stderr)
        return EXIT_FAILURE
    search = getattr(loaded.state, "last_search", None)
    if search is None:
        print(
            f"stream-trainer: no search recorded in checkpoint {loaded.path} (a search runs "
            "at a full retrain with training.full_batch.search.enabled)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    _print_json({"checkpoint": str(loaded.path), **search})
    return EXIT_OK


def cmd_search_worker(args: argparse.Namespace) -> int:
    """Run trials of a shared study (one Kubernetes Job pod) until its budget is used."""
    from stream_trainer.config import ConfigError  # noqa: PLC0415
    from stream_trainer.operations.logs import configure_logging, register_secret  # noqa: PLC0415
    from stream_trainer.training.search.snapshot import SnapshotError  # noqa: PLC0415
    from stream_trainer.training.search.study import (  # noqa: PLC0415
        JOB_INDEX_ENV,
        StudyError,
        database_url,
        run_worker,
    )

    try:
        settings = _settings(args)
        # Logs on stderr: stdout carries the worker's report (JSON) alone.
        configure_logging(settings.logging.level, settings.logging.format, stream=sys.stderr)
        key = settings.checkpoint.key()
        register_secret(key)
        if key is None:
            raise SnapshotError(
                "search worker: no checkpoint HMAC key to verify the snapshot with "
                "(STREAM_TRAINER_CHECKPOINT__HMAC_KEY or checkpoint.hmac_key_file)"
            )
        index = args.worker_index
        if index is None:
            index = int(os.environ.get(JOB_INDEX_ENV, "0") or 0)
        report = run_worker(args.snapshot, args.study, database_url(), key, index=index)
    except (ConfigError, SnapshotError, StudyError) as error:
        print(f"stream-trainer: {error}", file=sys.stderr)
        return EXIT_FAILURE
    _print_json({"study": args.study, **report.as_dict()})
    return EXIT_OK


def _slot_routing(settings: Settings, slot: str) -> tuple[str, Any]:
    """``(scope, routing)`` of a scoped model, from its ``ROUTING.json``; RegistryError
    when there is none (a global model, or nothing published yet)."""
    from stream_trainer.publishing.registry import RegistryError  # noqa: PLC0415
    from stream_trainer.publishing.routing_file import ROUTING_FILE, read_routing  # noqa: PLC0415
    from stream_trainer.state.objectstore import is_store_url, open_store  # noqa: PLC0415

    root = settings.registry.root
    where = open_store(root, settings.object_store) if is_store_url(root) else Path(root)
    found = read_routing(where, settings.model.name)
    if found is None:
        raise RegistryError(
            f"--slot {slot}: no {settings.model.name}/{ROUTING_FILE} under {root}: the model "
            "is not scoped, or no slot of it was published yet"
        )
    return found


def _registry(settings: Settings, slot: str | None = None) -> Any:
    from stream_trainer.publishing.registry import open_registry  # noqa: PLC0415
    from stream_trainer.publishing.scoped_versions import scope_prefix  # noqa: PLC0415

    folder = None
    if slot is not None:
        scope, _ = _slot_routing(settings, slot)
        folder = scope_prefix(settings.model.name, scope, slot)
    return open_registry(
        settings.registry.root,
        settings.model.name,
        settings.checkpoint.key(),
        settings.registry.keep_last,
        settings.object_store,
        # A store that blinks (a restart, a 503) should not fail `versions list` at once.
        read_retry_s=CLI_STORE_RETRY_S,
        folder=folder,
    )


def _announce_champion(settings: Settings, info: Any, reason: str, slot: str | None) -> None:
    """Tell serving readers about a manual champion change (a champion event; of a slot:
    a scoped_champion event with the model's routing)."""
    from confluent_kafka import Producer  # noqa: PLC0415

    from stream_trainer.publishing.events import VersionEventPublisher  # noqa: PLC0415
    from stream_trainer.publishing.scoped_publish import ScopedEventPublisher  # noqa: PLC0415

    producer = Producer(settings.kafka.producer_config())
    topic, model = settings.topics.versions, settings.model.name
    events = VersionEventPublisher(producer, topic, model)
    if slot is not None:
        scope, routing = _slot_routing(settings, slot)
        events = ScopedEventPublisher(producer, topic, model, scope, slot, routing)
    events.publish_champion(info, reason)


def _move_mlflow_alias(settings: Settings, registry: Any, slot: str | None) -> None:
    """With registry.mlflow enabled, move MLflow's champion alias too. A failure is a
    warning, not an error: our registry changed, and the running service's exporter moves
    the alias on its next pass."""
    if not settings.registry.mlflow.enabled or slot is not None:
        return  # MLflow holds the global model only: a slot's champion is not its alias
    from stream_trainer.publishing.mlflow_export import MlflowError, move_champion_alias  # noqa: PLC0415

    try:
        print(move_champion_alias(settings, registry))
    except MlflowError as error:
        print(f"stream-trainer: warning: MLflow alias not moved now: {error}", file=sys.stderr)


def cmd_versions(args: argparse.Namespace) -> int:
    """List, show, promote or roll back model versions."""
    from stream_trainer.publishing.events import VersionEventError  # noqa: PLC0415
    from stream_trainer.publishing.registry import RegistryError  # noqa: PLC0415
    from stream_trainer.publishing.routing_file import RoutingConflict  # noqa: PLC0415
    from stream_trainer.publishing.scoped_versions import ScopedEventError  # noqa: PLC0415
    from stream_trainer.state.objectstore import ObjectStoreError  # noqa: PLC0415

    settings = _settings(args)
    slot: str | None = args.slot
    try:
        registry = _registry(settings, slot)
        if args.versions_command == "list":
            champion = registry.champion()
            rows = [
                {
                    "version": info.version,
                    "champion": champion is not None and info.version == champion.version,
                    "parent": info.metadata.get("parent_version"),
                    "created_at": info.metadata.get("created_at"),
                    "trigger": info.metadata.get("trigger"),
                    "records_learnt": info.metadata.get("records_learnt"),
                    "metrics_window": info.metadata.get("metrics", {}).get("window"),
                }
                for info in registry.list()
            ]
            _print_json(rows)
        elif args.versions_command == "show":
            info = registry.get(args.version)
            champion = registry.champion()
            # metadata["champion"] is frozen at publish time: say what is true now.
            current = champion is not None and champion.version == info.version
            _print_json(
                {
                    "version": info.version,
                    "path": info.location,
                    **info.metadata,
                    "champion": current,
                    "champion_when_published": info.metadata.get("champion"),
                }
            )
        elif args.versions_command == "promote":
            registry.promote(args.version, reason=args.reason)
            _announce_champion(settings, registry.get(args.version), args.reason, slot)
            print(f"version {args.version} is now the champion")
            _move_mlflow_alias(settings, registry, slot)
        elif args.versions_command == "rollback":
            info = registry.rollback(reason=args.reason)
            _announce_champion(settings, info, args.reason, slot)
            print(f"rolled back: version {info.version} is now the champion")
            _move_mlflow_alias(settings, registry, slot)
    except (
        RegistryError,
        VersionEventError,
        ObjectStoreError,
        RoutingConflict,
        ScopedEventError,
    ) as error:
        print(f"stream-trainer: {error}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_control(args: argparse.Namespace) -> int:
    """Queue a manual request for the model's service on the control topic; with --wait,
    wait for the service's ack."""
    from stream_trainer.operations.control import ControlError, send_command, wait_for_ack  # noqa: PLC0415
    from stream_trainer.operations.topics import quiet_logger  # noqa: PLC0415

    settings = _settings(args)
    topic, model = settings.topics.control, settings.model.name
    if not topic:
        print("stream-trainer: topics.control is not configured", file=sys.stderr)
        return EXIT_FAILURE
    max_age = f"{settings.control.max_age_s:g} s"
    try:
        producer_config = {**settings.kafka.producer_config(), "logger": quiet_logger()}
        sent = send_command(producer_config, topic, model, args.command)
        if args.wait is None:
            print(
                f"queued {args.command} for model {model} on {topic} (id {sent.id}): a service "
                f"for that model acts on it when it reads it - at once if one is running, else "
                f"when one starts within control.max_age_s ({max_age}); --wait shows the outcome"
            )
            return EXIT_OK
        consumer_config = {**settings.kafka.client_config(), "logger": quiet_logger()}
        ack = wait_for_ack(consumer_config, topic, sent, args.wait)
    except ControlError as error:
        print(f"stream-trainer: {error}", file=sys.stderr)
        return EXIT_FAILURE
    if ack is None:
        print(
            f"stream-trainer: no answer to {args.command} (id {sent.id}) within {args.wait:g} s: "
            f"no service for model {model} read it (is one running?). It stays queued: a "
            f"service for that model that starts within control.max_age_s ({max_age}) of "
            "now acts on it",
            file=sys.stderr,
        )
        return EXIT_NO_ANSWER
    if ack.outcome == "refused":
        print(
            f"stream-trainer: {args.command} refused (id {sent.id}): {ack.reason}", file=sys.stderr
        )
        return EXIT_REFUSED
    print(f"{args.command} done (id {sent.id}): {ack.reason}")
    return EXIT_OK


def _wait_seconds(value: str) -> float:
    """--wait's value: positive seconds."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {value}")
    return seconds


def cmd_topics_create(args: argparse.Namespace) -> int:
    """Create the topics the config names; report the ones that exist."""
    from stream_trainer.operations.topics import (  # noqa: PLC0415
        TopicError,
        admin_client,
        ensure_topics,
        planned_topics,
        wait_for_broker,
    )

    if args.partitions < 1 or (args.replication_factor is not None and args.replication_factor < 1):
        print(
            "stream-trainer topics: --partitions and --replication-factor must be >= 1",
            file=sys.stderr,
        )
        return EXIT_USAGE
    settings = _settings(args)
    bootstrap = settings.kafka.bootstrap_servers
    specs = planned_topics(settings, args.partitions)
    try:
        admin = admin_client(settings.kafka.client_config())
        wait_for_broker(admin, bootstrap, args.timeout)
        results = ensure_topics(
            admin,
            specs,
            # -1: the broker's default.replication.factor
            replication_factor=args.replication_factor or -1,
            timeout=args.timeout,
        )
    except TopicError as error:
        print(f"stream-trainer topics: {error}", file=sys.stderr)
        return EXIT_FAILURE
    width = max(len(result.name) for result in results)
    for result in results:
        plural = "s" if result.partitions != 1 else ""
        print(
            f"{result.status:7}  {result.role:11}  {result.name:{width}}  "
            f"{result.partitions} partition{plural}"
        )
    for warning in (text for result in results for text in result.warnings):
        print(f"stream-trainer topics: warning: {warning}", file=sys.stderr)
    problems = [result.problem for result in results if result.problem]
    for problem in problems:
        print(f"stream-trainer topics: {problem}", file=sys.stderr)
    return EXIT_FAILURE if problems else EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """Embedded broker + dataset + the real service."""
    from stream_trainer.laptop.demo import run_demo  # noqa: PLC0415

    return run_demo(args)


def cmd_bench(args: argparse.Namespace) -> int:
    """Measure the service against its ceilings and the naive script."""
    from stream_trainer.laptop.bench import run_bench  # noqa: PLC0415

    return run_bench(args)


# -- parser -----------------------------------------------------------------------------


def _exit_codes(*lines: str) -> str:
    """The epilog's exit-code section: the command's own lines, then the usage error."""
    ordered = sorted([*lines, "2  usage error"], key=lambda line: int(line.split()[0]))
    return "\n".join(["Exit codes:", *(f"  {line}" for line in ordered)])


def _command(
    sub: Any,
    name: str,
    *,
    summary: str,
    description: str,
    examples: Sequence[str],
    exits: Sequence[str] = ("0  done", "1  failure, explained in one line on stderr"),
) -> argparse.ArgumentParser:
    """A subcommand whose --help shows its description, an example and its exit codes."""
    example_lines = "\n".join(f"  {line}" for line in examples)
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=summary,
        description=textwrap.fill(description, width=78),  # the raw formatter won't wrap it
        epilog=f"Example{'s' if len(examples) > 1 else ''}:\n{example_lines}\n\n"
        + _exit_codes(*exits),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def _add_run_commands(sub: Any) -> None:
    p = _command(
        sub,
        "run",
        summary="run the service (until SIGTERM)",
        description="Consume, train, checkpoint and publish until SIGTERM/SIGINT.",
        examples=["stream-trainer run --config configs/per-record.yaml"],
        exits=(
            "0  stopped by SIGTERM/SIGINT after a graceful shutdown",
            "1  cannot start (invalid config, checkpoint directory locked, incompatible learner)",
        ),
    )
    _add_config(p)
    p.set_defaults(func=cmd_run)

    p = _command(
        sub,
        "validate-config",
        summary="print the effective config (secrets masked)",
        description="Validate a config (file + STREAM_TRAINER_* env) and print "
        "it as JSON with secrets masked. Exit 1 with the offending fields.",
        examples=[
            "STREAM_TRAINER_CHECKPOINT__HMAC_KEY=... "
            "stream-trainer validate-config --config my.yaml"
        ],
        exits=("0  valid (the effective config is printed)", "1  invalid, naming every field"),
    )
    _add_config(p)
    p.set_defaults(func=cmd_validate_config)


def _add_produce(sub: Any) -> None:
    p = _command(
        sub,
        "produce",
        summary="write a dataset or synthetic stream to a topic",
        description="Write a bundled dataset (optionally mixed with invalid records) to a "
        "topic in the service's wire format; the topic is created if missing.",
        examples=[
            "stream-trainer produce --bootstrap-servers localhost:9092 --topic clicks \\\n"
            "      --dataset phishing --records 5000 --bad-records 0.01",
            "stream-trainer produce --bootstrap-servers localhost:9092 --topic txns \\\n"
            "      --format avro --schema-registry http://localhost:8081",
        ],
        exits=(
            "0  every record was delivered (a JSON report is printed)",
            "1  no broker answered within --timeout, or a record was not delivered",
        ),
    )
    p.add_argument("--bootstrap-servers", required=True, help="Kafka bootstrap host:port")
    p.add_argument("--topic", required=True, help="topic to write to (created if missing)")
    p.add_argument(
        "--dataset",
        default="phishing",
        help="phishing, bananas, trump-approval, sea-drift, linear20, friedman",
    )
    p.add_argument("--records", type=int, default=1250, help="records to write (default 1250)")
    p.add_argument(
        "--partitions",
        type=int,
        default=1,
        help="partitions to spread the records over, round-robin (default 1)",
    )
    p.add_argument(
        "--bad-records",
        type=float,
        default=0.0,
        metavar="RATIO",
        help="fraction of invalid records mixed in (default 0)",
    )
    p.add_argument("--seed", type=int, default=42, help="seed of the row order and bad-record mix")
    p.add_argument(
        "--format",
        choices=("json", "avro", "json_schema"),
        default="json",
        help="value format (default json); avro and json_schema register the schema under "
        "<topic>-value and write the Confluent wire format",
    )
    p.add_argument(
        "--schema-registry",
        metavar="URL",
        default=None,
        help="Schema Registry (Confluent API) for --format avro / json_schema, e.g. "
        "http://localhost:8081",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="give up when no broker answers within this long (default 10)",
    )
    p.set_defaults(func=cmd_produce)


def _add_checkpoint(sub: Any) -> None:
    p = _command(
        sub,
        "checkpoint",
        summary="inspect checkpoints",
        description="Read checkpoints without loading them.",
        examples=["stream-trainer checkpoint inspect --config my.yaml --all"],
        exits=("0  done", "1  failure, explained on stderr"),
    )
    csub = p.add_subparsers(
        dest="checkpoint_command", required=True, metavar="ACTION", help="inspect"
    )
    q = _command(
        csub,
        "inspect",
        summary="show a checkpoint's manifest and verification (never unpickles)",
        description="Print the manifest of the newest checkpoint (or every one) as JSON, "
        "with its verification: ok, bad_signature, payload_checksum, unsigned... Nothing is "
        "unpickled, so an untrusted file is safe to inspect. Without a key (no --config), "
        "manifests are shown but signatures cannot be checked.",
        examples=[
            "stream-trainer checkpoint inspect --config my.yaml",
            "stream-trainer checkpoint inspect /var/lib/stream-trainer/checkpoints --all | less",
        ],
        exits=("0  printed (also when the reader of stdout closed it)", "1  no checkpoints"),
    )
    _add_config(q)
    q.add_argument(
        "path",
        nargs="?",
        help=(
            "a checkpoint file or directory, or an s3:// prefix or object (default: "
            "checkpoint.dir of the config)"
        ),
    )
    q.add_argument("--all", action="store_true", help="every checkpoint, not just the newest")
    q.set_defaults(func=cmd_checkpoint_inspect)


def _add_search(sub: Any) -> None:
    p = _command(
        sub,
        "search",
        summary="show the last hyperparameter search",
        description="Hyperparameter searches of full retrains (training.full_batch.search).",
        examples=["stream-trainer search show --config my.yaml"],
        exits=("0  done", "1  failure, explained on stderr"),
    )
    ssub = p.add_subparsers(
        dest="search_command", required=True, metavar="ACTION", help="show, worker"
    )
    q = _command(
        ssub,
        "show",
        summary="the last search, from the newest checkpoint",
        description="Print the last search recorded in the newest checkpoint as JSON: "
        "algorithm, space, every trial (params, score, seconds, state), the best, the "
        "configured params' score on the same split, the duration and the gate's verdict. "
        "Reads the checkpoint only; safe beside a running service.",
        examples=["stream-trainer search show --config my.yaml | jq .best"],
        exits=("0  printed", "1  no checkpoint, or no search recorded in it"),
    )
    _add_config(q)
    q.set_defaults(func=cmd_search_show)
    w = _command(
        ssub,
        "worker",
        summary="run trials of a shared study (a Kubernetes Job pod)",
        description="Run trials of the study NAME in the study database on the window in "
        "the signed snapshot PATH, until the study's budget (trials / seconds) is used, then "
        "exit 0. The snapshot is verified with the checkpoint key before anything is read "
        "from it. The database URL comes from $STREAM_TRAINER_SEARCH_DATABASE_URL or the file "
        "named by $STREAM_TRAINER_SEARCH_DATABASE_URL_FILE, never from the config. The "
        "service starts these as an Indexed Job (docs/search.md).",
        examples=[
            "stream-trainer search worker --config my.yaml --study NAME "
            "--snapshot /snapshots/window-<sha256>.snap"
        ],
        exits=("0  the budget is used", "1  bad snapshot, study or database, explained"),
    )
    _add_config(w)
    w.add_argument("--snapshot", type=Path, required=True, help="the signed window snapshot")
    w.add_argument("--study", required=True, help="the study's name in the study database")
    w.add_argument(
        "--worker-index",
        type=int,
        default=None,
        help="this worker's index (seeds its sampler; 0 also scores the baseline); "
        "default $JOB_COMPLETION_INDEX or 0",
    )
    w.set_defaults(func=cmd_search_worker)


_VERSION_ACTIONS = (
    ("list", "all versions, champion marked", "List the published versions as JSON."),
    ("show", "one version's metadata", "Print one version's metadata as JSON."),
    (
        "promote",
        "make a version the champion",
        "Make a version the champion and announce it on the versions topic; with "
        "registry.mlflow on, move MLflow's champion alias too.",
    ),
    (
        "rollback",
        "return to the previous champion",
        "Make the previous champion the champion again and announce it on the versions "
        "topic; with registry.mlflow on, move MLflow's champion alias too.",
    ),
)


def _add_versions(sub: Any) -> None:
    p = _command(
        sub,
        "versions",
        summary="list, show, promote, roll back model versions",
        description="The model registry of the config's model.",
        examples=["stream-trainer versions list --config my.yaml"],
    )
    vsub = p.add_subparsers(
        dest="versions_command",
        required=True,
        metavar="ACTION",
        help="list, show, promote, rollback",
    )
    for name, summary, description in _VERSION_ACTIONS:
        number = " 7" if name in ("show", "promote") else ""
        q = _command(
            vsub,
            name,
            summary=summary,
            description=description,
            examples=[f"stream-trainer versions {name}{number} --config my.yaml"],
            exits=("0  done", "1  no such version, or the registry refused the change"),
        )
        _add_config(q)
        q.add_argument(
            "--slot",
            metavar="SCOPE_ID",
            help="one slot of a partition- or key-scoped model (<topic>:<p>, or the key's "
            "32-hex hash): its own versions and champion; a change is announced as a "
            "scoped_champion event, scope and routing read from <root>/<model>/ROUTING.json",
        )
        if name in ("show", "promote"):
            q.add_argument("version", type=int, help="version number (see `versions list`)")
        if name in ("promote", "rollback"):
            q.add_argument(
                "--reason",
                default="manual (CLI)",
                help="recorded in the registry and the champion event",
            )
        q.set_defaults(func=cmd_versions)


def _add_control(sub: Any) -> None:
    p = _command(
        sub,
        "control",
        summary="ask the model's service to retrain, publish, pause or resume",
        description="Queue a manual request on the control topic (topics.control). The "
        "model's service acts on it once: at once if it is running, else when it starts, "
        "unless the request is older than control.max_age_s by then (refused). It answers "
        "with an ack (done or refused, with a reason); --wait waits for it. A pause lasts "
        "until resume, across restarts. See docs/control.md.",
        examples=[
            "stream-trainer control publish --config my.yaml --wait",
            "stream-trainer control pause --config my.yaml",
        ],
        exits=(
            "0  queued (without --wait); done (with --wait)",
            "1  no control topic configured, not delivered, or acks unreadable",
            "3  --wait: the service refused it (the reason is on stderr)",
            "4  --wait: no answer in time (no service running?); it stays queued",
        ),
    )
    p.add_argument(
        "command",
        choices=["retrain", "publish", "pause", "resume"],
        help="retrain (full_batch), publish a version now, pause or resume consumption",
    )
    p.add_argument(
        "--wait",
        nargs="?",
        type=_wait_seconds,
        const=DEFAULT_CONTROL_WAIT_S,
        default=None,
        metavar="SECONDS",
        help=f"wait for the service's ack, at most SECONDS (default {DEFAULT_CONTROL_WAIT_S:g})",
    )
    _add_config(p)
    p.set_defaults(func=cmd_control)


def _add_topics(sub: Any) -> None:
    p = _command(
        sub,
        "topics",
        summary="create the topics a config names",
        description="Manage the Kafka topics of a config.",
        examples=["stream-trainer topics create --config my.yaml"],
    )
    tsub = p.add_subparsers(dest="topics_command", required=True, metavar="ACTION", help="create")
    q = _command(
        tsub,
        "create",
        summary="create the input, dead-letter, versions, control and lease topics",
        description="Create the topics of the config that do not exist: the input topic(s) "
        "with --partitions, the dead-letter topic (1 partition, retention.ms 14 days), the "
        "versions topic (1 partition, cleanup.policy=compact: readers rebuild the latest "
        "version per model), the control topic (1 partition) and the lease topic (exactly 1 "
        "partition; default <kafka.group_id>.lease). Existing topics are reported and left "
        "as they are, with a warning when a config differs. Connection settings (TLS, "
        "SASL) are the config's kafka section.",
        examples=[
            "stream-trainer topics create --config my.yaml --partitions 6 --replication-factor 3"
        ],
        exits=(
            "0  every topic exists or was created",
            "1  no broker answered, a creation was refused, or the lease topic exists "
            "with more than 1 partition",
        ),
    )
    _add_config(q)
    q.add_argument(
        "--partitions",
        type=int,
        default=DEFAULT_INPUT_PARTITIONS,
        metavar="N",
        help=f"partitions of each input topic (default {DEFAULT_INPUT_PARTITIONS}); the "
        "service's parallelism is at most this many members",
    )
    q.add_argument(
        "--replication-factor",
        type=int,
        default=None,
        metavar="N",
        help="replicas of every topic (default: the broker's default.replication.factor)",
    )
    q.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="give up when the broker does not answer or the topics have no leader "
        "within this long (default 30)",
    )
    q.set_defaults(func=cmd_topics_create)


def _add_laptop_commands(sub: Any) -> None:
    from stream_trainer.laptop.demo import add_demo_arguments  # noqa: PLC0415

    p = _command(
        sub,
        "demo",
        summary="embedded broker + real dataset + the service",
        description="Start an embedded Kafka-compatible broker (Tansu), stream "
        "a real dataset into it and run the service on it, with live progress.",
        examples=["stream-trainer demo --dataset sea-drift --mode mini_batch"],
        exits=(
            "0  the stream was learnt and a version published",
            "1  failure (the service died, or the timeout passed)",
            "130  interrupted (Ctrl-C)",
        ),
    )
    add_demo_arguments(p)
    p.set_defaults(func=cmd_demo)

    from stream_trainer.laptop.bench import add_bench_arguments  # noqa: PLC0415

    p = _command(
        sub,
        "bench",
        summary="benchmark against ingest/learner ceilings and a naive script",
        description="Measure the service against the ingest and learner ceilings and a "
        "naive consume-and-learn script on a pre-produced topic; report medians and "
        "spread (targets are reported, not enforced). --decode-only times the record "
        "decoder alone, typed JSON, Avro and JSON Schema against all-numeric JSON.",
        examples=[
            "stream-trainer bench --mode per_record --records 200000 --json",
            "stream-trainer bench --dataset transactions --mode mini_batch",
            "stream-trainer bench --decode-only --records 200000",
        ],
        exits=("0  every stage ran", "1  a stage failed"),
    )
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)


def build_parser(*, laptop: bool = True) -> argparse.ArgumentParser:
    """The argument parser of every subcommand; without ``demo`` and ``bench`` (whose
    arguments live in :mod:`stream_trainer.laptop`) when ``laptop`` is false."""
    parser = argparse.ArgumentParser(
        prog="stream-trainer",
        description="Continuous model training on Kafka streams (River, scikit-learn).",
        epilog="`stream-trainer COMMAND --help` documents each command.\n\n"
        + _exit_codes("0  ok", "1  failure"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"stream-trainer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run_commands(sub)
    _add_produce(sub)
    _add_checkpoint(sub)
    _add_versions(sub)
    _add_search(sub)
    _add_control(sub)
    _add_topics(sub)
    if laptop:
        _add_laptop_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    global _RUN_SIGNALS  # noqa: PLW0603 - one process, one set of signal handlers
    words = sys.argv[1:] if argv is None else list(argv)
    if words[:1] == ["run"]:
        # Handlers before the heavy imports: a SIGTERM during start-up is honoured once the
        # service exists, instead of killing the process by the default action.
        _RUN_SIGNALS = ShutdownSignals(bound_s=25.0)
        _RUN_SIGNALS.install()
    from stream_trainer.config import ConfigError  # noqa: PLC0415

    # `run` is the production process: it must not load the laptop package just to parse.
    parser = build_parser(laptop=words[:1] != ["run"])
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
    except ConfigError as error:
        print(f"stream-trainer: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`... | head`): stop quietly, as other Unix tools do.
        # stdout points at /dev/null so the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    return code
