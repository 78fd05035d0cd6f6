"""A search shared by processes and pods: one Optuna study in a database (RDB storage).

The service creates the study (:func:`create_study`: its budget, the snapshot it is for,
the warm-start trials), then trial workers (:func:`run_worker`, the ``search worker``
subcommand, one per Job pod) load it and run trials until the budget is used up; the service
reads the result back with :func:`summary_from_study`.

The budget is counted in trials *started* (running, complete, failed), claimed under a
PostgreSQL advisory lock held while a worker asks for its next trial, so N workers finish
exactly ``trials`` trials between them (Optuna's own ``MaxTrialsCallback`` counts after the
fact and lets concurrent workers overshoot). A deadline (``timeout_s`` from the study's
creation) stops new trials the same way. A pod that dies mid-trial leaves a running trial
that counts against the budget; the service marks such trials failed when the Job has ended
(:func:`fail_orphans`; Optuna's heartbeat runs only inside ``Study.optimize``, not with
ask/tell), so the study still ends.

The database URL holds a password: it comes from the environment or a mounted file only
(:func:`database_url`), and no message of this module contains it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stream_trainer.errors import StreamTrainerError
from stream_trainer.operations.logs import register_secret
from stream_trainer.training.evaluation import lower_is_better
from stream_trainer.training.search.search import (
    COMPLETE,
    FAILED,
    PRUNED,
    SearchSpec,
    SearchSummary,
    TrialRecord,
    _natural,
    _suggest,
    run_trial,
)
from stream_trainer.training.search.snapshot import Snapshot, read_snapshot

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

DATABASE_URL_ENV = "STREAM_TRAINER_SEARCH_DATABASE_URL"
DATABASE_URL_FILE_ENV = "STREAM_TRAINER_SEARCH_DATABASE_URL_FILE"
# Set by Kubernetes in each pod of an Indexed Job: 0 .. completions-1.
JOB_INDEX_ENV = "JOB_COMPLETION_INDEX"

# Study user attributes (set once by the creator, read by every worker).
ATTR_BUDGET = "stream_trainer_trials"
ATTR_DEADLINE = "stream_trainer_deadline_unix"
ATTR_SNAPSHOT = "stream_trainer_snapshot_sha256"
ATTR_WARM = "stream_trainer_warm_start_trials"
ATTR_BASELINE = "stream_trainer_baseline_score"
ATTR_CREATED = "stream_trainer_created_unix"
# Trial user attributes.
TRIAL_WORKER = "worker"
TRIAL_ERROR = "error"
TRIAL_SECONDS = "seconds"


class StudyError(StreamTrainerError):
    """The study database is not configured or reachable, or the study is not the one the
    snapshot was made for."""


def database_url(environ: Mapping[str, str] | None = None) -> str:
    """The study database URL from ``STREAM_TRAINER_SEARCH_DATABASE_URL`` or the file named
    by ``STREAM_TRAINER_SEARCH_DATABASE_URL_FILE`` (a mounted Secret), whitespace stripped.
    Never from the config file; the URL and its password are registered for log redaction.
    Raises StudyError when neither is set."""
    env = os.environ if environ is None else environ
    url = env.get(DATABASE_URL_ENV, "").strip()
    if not url and env.get(DATABASE_URL_FILE_ENV):
        path = Path(env[DATABASE_URL_FILE_ENV])
        try:
            url = path.read_text(encoding="utf-8").strip()
        except OSError as error:
            raise StudyError(f"{DATABASE_URL_FILE_ENV}: cannot read {path}: {error}") from error
    if not url:
        raise StudyError(
            f"no study database: set {DATABASE_URL_ENV} or {DATABASE_URL_FILE_ENV} "
            "(from a Secret; it is never read from the config file)"
        )
    register_secret(url)  # masked in every log line, with its password alone
    with contextlib.suppress(Exception):  # an unparsable URL has no password to mask
        from sqlalchemy.engine import make_url  # noqa: PLC0415

        register_secret(make_url(url).password)
    return url


def scrub(text: str, url: str) -> str:
    """``text`` with the URL's password (and the URL itself) replaced by ``***``."""
    from sqlalchemy.engine import make_url  # noqa: PLC0415

    with contextlib.suppress(Exception):  # an unparsable URL has no password to find
        password = make_url(url).password
        if password:
            text = text.replace(str(password), "***")
    return text.replace(url, "***")


def _storage(url: str) -> optuna.storages.RDBStorage:
    import optuna  # noqa: PLC0415  (only a search needs it; it takes a while to import)
    from sqlalchemy.pool import NullPool  # noqa: PLC0415

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if url.startswith("postgresql"):
        try:
            # The driver SQLAlchemy picks for postgresql:// (the image ships it): imported
            # here so that a missing one is named, not reported as an unreachable database.
            import psycopg  # noqa: F401, PLC0415
        except ImportError as error:
            raise StudyError(f"the PostgreSQL driver psycopg is not installed: {error}") from None
    try:
        # No pool: a connection per storage call, closed after it. Workers call the database
        # a few times per trial, and a pooled connection left idle between searches (or
        # dropped by the server) would outlive the study it served.
        return optuna.storages.RDBStorage(url, engine_kwargs={"poolclass": NullPool})
    except Exception as error:  # SQLAlchemy / driver errors of every kind: say which, safely
        raise StudyError(
            f"study database unreachable: {type(error).__name__}: "
            f"{scrub(str(error), url).splitlines()[0][:300]}"
        ) from None


def _sampler(spec: SearchSpec, index: int) -> optuna.samplers.BaseSampler:
    import optuna  # noqa: PLC0415

    # Each worker its own seed: with one seed, parallel workers would draw the same params.
    seed = spec.seed + index
    if spec.algorithm == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def create_study(
    url: str,
    name: str,
    spec: SearchSpec,
    snapshot_sha256: str,
    warm_start: list[dict[str, Any]],
    clock: Callable[[], float] = time.time,
) -> None:
    """Create study ``name`` for the snapshot with this sha256: maximise the evaluation
    module's higher-is-better score, ``spec.trials`` trials and / or ``spec.timeout_s``
    seconds from now, ``warm_start`` params tried first. Raises StudyError if it exists."""
    import optuna  # noqa: PLC0415

    storage = _storage(url)
    try:
        study = optuna.create_study(
            study_name=name, storage=storage, direction="maximize", load_if_exists=False
        )
    except optuna.exceptions.DuplicatedStudyError:
        raise StudyError(f"study {name} already exists") from None
    now = clock()
    study.set_user_attr(ATTR_BUDGET, spec.trials)
    study.set_user_attr(ATTR_DEADLINE, None if spec.timeout_s is None else now + spec.timeout_s)
    study.set_user_attr(ATTR_SNAPSHOT, snapshot_sha256)
    study.set_user_attr(ATTR_WARM, len(warm_start))
    study.set_user_attr(ATTR_CREATED, now)
    for params in warm_start:
        study.enqueue_trial(params)


def _load(url: str, name: str, sampler: optuna.samplers.BaseSampler | None) -> optuna.Study:
    import optuna  # noqa: PLC0415

    storage = _storage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except KeyError:
        raise StudyError(f"no study named {name} in the study database") from None


_STARTED = ("RUNNING", "COMPLETE", "FAIL", "PRUNED")


def _started(study: optuna.Study) -> int:
    return sum(t.state.name in _STARTED for t in study.get_trials(deepcopy=False))


def budget_used(study: optuna.Study, clock: Callable[[], float] = time.time) -> bool:
    """True when the study's trial budget or deadline is reached (no new trial may start)."""
    attrs = study.user_attrs
    budget, deadline = attrs.get(ATTR_BUDGET), attrs.get(ATTR_DEADLINE)
    if deadline is not None and clock() >= float(deadline):
        return True
    return budget is not None and _started(study) >= int(budget)


def finished(study: optuna.Study, clock: Callable[[], float] = time.time) -> bool:
    """True when the budget is used and no trial is running: the study's result is final."""
    running = any(t.state.name == "RUNNING" for t in study.get_trials(deepcopy=False))
    return budget_used(study, clock) and not running


@contextlib.contextmanager
def _claim_lock(url: str, study_id: int) -> Iterator[None]:
    """Hold a PostgreSQL advisory lock for this study (other databases: none needed here,
    SQLite serialises writers itself)."""
    import sqlalchemy  # noqa: PLC0415
    from sqlalchemy.pool import NullPool  # noqa: PLC0415

    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    if engine.dialect.name != "postgresql":
        engine.dispose()
        yield
        return
    # A constant namespace in the high bits keeps clear of other users of advisory locks.
    lock_id = (0x5354 << 32) | study_id
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": lock_id})
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": lock_id})
    finally:
        engine.dispose()


def _claim(study: optuna.Study, url: str) -> optuna.Trial | None:
    """The next trial of the study, or None when the budget is used (atomically)."""
    with _claim_lock(url, study._study_id):
        if budget_used(study):
            return None
        return study.ask()


@dataclass
class WorkerReport:
    """What one worker did: its trials by state."""

    worker: str
    complete: int = 0
    failed: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-able."""
        return {"worker": self.worker, "complete": self.complete, "failed": self.failed}


def run_worker(
    snapshot_path: Path,
    study_name: str,
    url: str,
    key: bytes,
    index: int = 0,
    worker: str | None = None,
) -> WorkerReport:
    """Run trials of ``study_name`` on the verified snapshot until the study's budget is used.

    Worker ``index`` 0 also scores the snapshot's own params first (the search's baseline).
    A trial that raises or scores NaN is recorded as failed (its error in the trial's user
    attributes) and the worker goes on. Raises SnapshotError (snapshot does not verify) or
    StudyError (database, or the study was made for another snapshot)."""
    snapshot, sha256 = read_snapshot(snapshot_path, key)
    spec = snapshot.spec
    study = _load(url, study_name, _sampler(spec, index))
    if study.user_attrs.get(ATTR_SNAPSHOT) != sha256:
        raise StudyError(
            f"study {study_name} was made for snapshot {study.user_attrs.get(ATTR_SNAPSHOT)}, "
            f"not {sha256}"
        )
    report = WorkerReport(worker or f"{socket.gethostname()}:{os.getpid()}")
    if index == 0 and ATTR_BASELINE not in study.user_attrs:
        study.set_user_attr(ATTR_BASELINE, _baseline(snapshot))
    while (trial := _claim(study, url)) is not None:
        params = {path: _suggest(trial, path, dist) for path, dist in spec.space}
        started = time.perf_counter()
        error: str | None = None
        try:
            score = run_trial(snapshot.candidate, params, snapshot.train, snapshot.validation, spec)
        except Exception as failure:  # a trial's failure is its own, as in search.run_search
            score, error = math.nan, f"{type(failure).__name__}: {str(failure)[:300]}"
        if error is None and math.isnan(score):
            error = f"{spec.metric} is undefined on the validation records"
        trial.set_user_attr(TRIAL_WORKER, report.worker)
        trial.set_user_attr(TRIAL_SECONDS, time.perf_counter() - started)
        if error is None:
            study.tell(trial, score)
            report.complete += 1
        else:
            import optuna  # noqa: PLC0415

            trial.set_user_attr(TRIAL_ERROR, error)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            report.failed += 1
            log.warning("search trial failed", extra={"trial": trial.number, "reason": error})
    return report


def _baseline(snapshot: Snapshot) -> float | None:
    try:
        score = run_trial(
            snapshot.candidate, {}, snapshot.train, snapshot.validation, snapshot.spec
        )
    except Exception:  # the configured params may fail where the search's do not
        return None
    return None if math.isnan(score) else score


def load_study(url: str, name: str) -> optuna.Study:
    """The study ``name`` (read-only use: its trials and attributes). Raises StudyError."""
    return _load(url, name, None)


def fail_orphans(study: optuna.Study) -> int:
    """Mark the study's running trials failed (call once no worker is left: the Job ended);
    returns how many there were."""
    import optuna  # noqa: PLC0415

    orphans = [t for t in study.get_trials(deepcopy=False) if t.state.name == "RUNNING"]
    for trial in orphans:
        study._storage.set_trial_user_attr(
            trial._trial_id, TRIAL_ERROR, "its worker ended without finishing it"
        )
        study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
    return len(orphans)


def summary_from_study(study: optuna.Study, snapshot: Snapshot, duration_s: float) -> SearchSummary:
    """The study's trials as the in-process search's summary (scores in the metric's units)."""
    spec = snapshot.spec
    lower = lower_is_better(spec.metric)
    baseline = study.user_attrs.get(ATTR_BASELINE)
    warm = int(study.user_attrs.get(ATTR_WARM, 0))
    summary = SearchSummary(
        algorithm=spec.algorithm,
        metric=spec.metric,
        direction="minimize" if lower else "maximize",
        space=spec.space_dict(),
        train_records=len(snapshot.train[1]),
        validation_records=len(snapshot.validation[1]),
        baseline_score=_natural(math.nan if baseline is None else float(baseline), lower),
        duration_s=duration_s,
    )
    states = {"COMPLETE": COMPLETE, "FAIL": FAILED, "PRUNED": PRUNED}
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        state = states.get(trial.state.name)
        if state is None:  # waiting (never claimed) or still running: not part of the result
            continue
        value = trial.value if state == COMPLETE and trial.value is not None else math.nan
        summary.trials.append(
            TrialRecord(
                number=trial.number,
                params=dict(trial.params),
                score=_natural(float(value), lower),
                seconds=float(trial.user_attrs.get(TRIAL_SECONDS, 0.0)),
                state=state,
                error=trial.user_attrs.get(TRIAL_ERROR),
                warm_start=trial.number < warm,
            )
        )
    return summary
