"""Hyperparameter search for a full-batch retrain: an Optuna study run with the ask/tell API.

Pure: no I/O, no metrics, no ``Settings``. :func:`run_search` takes the candidate adapter,
the retrain's training rows (oldest first) and a :class:`SearchSpec` of plain values, so it
runs wherever the single fit runs (the retrain thread or the fit worker process) and what
it returns pickles cleanly. The newest ``validation_fraction`` of the rows scores the
trials (time order, never shuffled: the model is judged on data newer than it learnt, as
it will be in service); the best trial's params are then refit on all the rows, and that
model is the retrain's candidate, which the promotion gate judges like any other.

Trials run one after the other in this process with an in-memory study, or, with
``workers`` > 1 or a ``memory_limit_mb``, several at once in joblib worker processes
(:mod:`stream_trainer.training.search.trial_pool`), each under its memory cap. Either way every
trial's peak
resident memory is measured (:func:`measured_trial`). The seams for what comes later:
:func:`run_trial` is one trial with no study state (a Kubernetes Job pod can call it), and
the study is created in one place (:func:`_study`), where shared storage would be passed.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from stream_trainer.errors import StreamTrainerError
from stream_trainer.operations.memory import (
    data_limit,
    peak_memory_mb,
    release_free_memory,
    reset_peak_memory,
)
from stream_trainer.training.evaluation import evaluate_holdout, lower_is_better

if TYPE_CHECKING:
    import optuna

    from stream_trainer.config import Settings
    from stream_trainer.training.learners import ModelAdapter

log = logging.getLogger(__name__)

COMPLETE = "complete"
FAILED = "failed"
PRUNED = "pruned"  # no pruner yet: reported, always 0, so dashboards need no change later
TRIAL_STATES = (COMPLETE, FAILED, PRUNED)


class SearchFailed(StreamTrainerError):
    """No trial completed (every one raised or scored NaN), or too few rows to split."""


@dataclass(frozen=True)
class SearchSpec:
    """What a search needs from the config, as plain values (pickled to the fit worker)."""

    algorithm: str
    space: tuple[tuple[str, dict[str, Any]], ...]
    trials: int | None
    timeout_s: float | None
    validation_fraction: float
    warm_start_trials: int
    seed: int
    task: str
    metric: str
    labels: tuple[Any, ...] | None
    # Trials at once in worker processes (1: in the searching process, unless capped).
    workers: int = 1
    # MB a trial may allocate on top of its worker's memory at its start; None: no cap.
    memory_limit_mb: int | None = None
    # The nice value trial worker processes take at least (the fit worker's).
    nice: int = 0

    @property
    def pooled(self) -> bool:
        """Trials run in worker processes: several at once, or capped (a cap must never be
        set on the service's or the fit worker's own process)."""
        return self.workers > 1 or self.memory_limit_mb is not None

    def space_dict(self) -> dict[str, dict[str, Any]]:
        """``{path: distribution}`` as JSON-able data."""
        return {path: dict(dist) for path, dist in self.space}


def search_spec(settings: Settings) -> SearchSpec | None:
    """The configured search, or None when it is disabled."""
    cfg = settings.training.full_batch.search
    if not cfg.enabled:
        return None
    return SearchSpec(
        algorithm=cfg.algorithm,
        space=tuple((path, param.distribution()) for path, param in cfg.space.items()),
        trials=cfg.trials,
        timeout_s=cfg.timeout_s,
        validation_fraction=cfg.validation_fraction,
        warm_start_trials=cfg.warm_start_trials,
        seed=cfg.seed,
        task=settings.model.task,
        metric=settings.evaluation_metrics()[0],
        labels=None if settings.record.labels is None else tuple(settings.record.labels),
        workers=cfg.workers,
        memory_limit_mb=cfg.memory_limit_mb,
        nice=settings.training.full_batch.fit_nice,
    )


@dataclass
class TrialRecord:
    """One trial: its params, its score in the metric's own units (NaN unless complete)."""

    number: int
    params: dict[str, Any]
    score: float
    seconds: float
    state: str
    error: str | None = None
    warm_start: bool = False
    # Peak resident memory of the process that ran the trial, during it (MB); None if the
    # process died before it could report.
    peak_memory_mb: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-able (NaN becomes null)."""
        return {
            "number": self.number,
            "params": dict(self.params),
            "score": None if math.isnan(self.score) else self.score,
            "seconds": round(self.seconds, 4),
            "state": self.state,
            "error": self.error,
            "warm_start": self.warm_start,
            "peak_memory_mb": None
            if self.peak_memory_mb is None
            else round(self.peak_memory_mb, 1),
        }


@dataclass(frozen=True)
class TrialOutcome:
    """What running one trial gave, wherever it ran: the higher-is-better score (NaN unless
    complete), why it failed (None if complete), its seconds and peak memory (MB)."""

    score: float
    error: str | None
    seconds: float
    peak_memory_mb: float | None


@dataclass
class SearchSummary:
    """What a search did; ``as_dict`` goes into version metadata and the checkpoint."""

    algorithm: str
    metric: str
    direction: str  # "maximize" or "minimize", in the metric's own units
    space: dict[str, dict[str, Any]]
    train_records: int
    validation_records: int
    # The candidate's own params (the current model's: the configured ones until a search
    # winner replaced it) on the same split; NaN if they failed.
    baseline_score: float
    trials: list[TrialRecord] = field(default_factory=list)
    duration_s: float = 0.0
    refit_seconds: float = 0.0
    baseline_seconds: float = 0.0
    workers: int = 1
    memory_limit_mb: int | None = None

    def counts(self) -> dict[str, int]:
        """Trials by state (every state present)."""
        return {state: sum(t.state == state for t in self.trials) for state in TRIAL_STATES}

    def best(self) -> TrialRecord | None:
        """The best complete trial (the earliest among equals), or None."""
        complete = [t for t in self.trials if t.state == COMPLETE]
        if not complete:
            return None
        sign = -1.0 if self.direction == "minimize" else 1.0
        return max(complete, key=lambda t: (sign * t.score, -t.number))

    def peak_memory_mb(self) -> float | None:
        """The largest trial peak (MB), or None when no trial reported one."""
        peaks = [t.peak_memory_mb for t in self.trials if t.peak_memory_mb is not None]
        return max(peaks) if peaks else None

    def as_dict(self) -> dict[str, Any]:
        """JSON-able summary (scores NaN -> null)."""
        best = self.best()
        peak = self.peak_memory_mb()
        return {
            "algorithm": self.algorithm,
            "metric": self.metric,
            "direction": self.direction,
            "space": self.space,
            "train_records": self.train_records,
            "validation_records": self.validation_records,
            "baseline_score": None if math.isnan(self.baseline_score) else self.baseline_score,
            "trials": [t.as_dict() for t in self.trials],
            "counts": self.counts(),
            "best": None if best is None else best.as_dict(),
            "duration_s": round(self.duration_s, 4),
            "refit_seconds": round(self.refit_seconds, 4),
            "baseline_seconds": round(self.baseline_seconds, 4),
            "workers": self.workers,
            "memory_limit_mb": self.memory_limit_mb,
            "peak_memory_mb": None if peak is None else round(peak, 1),
        }


def validation_start(n: int, fraction: float) -> int:
    """Index where the validation rows begin: the newest ``fraction`` of ``n`` rows, at
    least one row on each side. Raises SearchFailed below two rows."""
    if n < 2:
        raise SearchFailed(f"a search needs at least 2 training records, got {n}")
    validation = min(n - 1, max(1, round(n * fraction)))
    return n - validation


def warm_start_params(previous: Mapping[str, Any] | None, spec: SearchSpec) -> list[dict[str, Any]]:
    """The previous search's best complete trials (at most ``spec.warm_start_trials``, best
    first) whose params all lie in the current space, each with exactly its paths."""
    if previous is None or spec.warm_start_trials == 0:
        return []
    sign = -1.0 if previous.get("direction") == "minimize" else 1.0
    complete = [
        t
        for t in previous.get("trials", [])
        if t.get("state") == COMPLETE and t.get("score") is not None
    ]
    complete.sort(key=lambda t: (-sign * float(t["score"]), t["number"]))
    space = spec.space_dict()
    chosen: list[dict[str, Any]] = []
    for trial in complete:
        params = trial.get("params", {})
        if set(params) != set(space) or not all(_inside(space[p], v) for p, v in params.items()):
            continue
        if params not in chosen:
            chosen.append(dict(params))
        if len(chosen) == spec.warm_start_trials:
            break
    return chosen


def _inside(dist: Mapping[str, Any], value: Any) -> bool:
    if dist["type"] == "categorical":
        return value in dist["choices"]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if dist["type"] == "int" and not float(value).is_integer():
        return False
    return bool(dist["low"] <= value <= dist["high"])


def _suggest(trial: optuna.Trial, path: str, dist: Mapping[str, Any]) -> Any:
    if dist["type"] == "categorical":
        return trial.suggest_categorical(path, list(dist["choices"]))
    if dist["type"] == "int":
        return trial.suggest_int(path, int(dist["low"]), int(dist["high"]), log=dist["log"])
    return trial.suggest_float(path, float(dist["low"]), float(dist["high"]), log=dist["log"])


def _study(spec: SearchSpec) -> optuna.Study:
    """An in-memory study maximising the evaluation module's higher-is-better score."""
    # Imported here: only a search needs Optuna, and it costs a noticeable part of a second.
    import optuna  # noqa: PLC0415

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one INFO line per trial otherwise
    # constant_liar: trials still running count as bad results while TPE samples, so the
    # trials asked while others run are not all drawn near the same best point.
    sampler: optuna.samplers.BaseSampler = (
        optuna.samplers.TPESampler(seed=spec.seed, constant_liar=spec.workers > 1)
        if spec.algorithm == "tpe"
        else optuna.samplers.RandomSampler(seed=spec.seed)
    )
    return optuna.create_study(direction="maximize", sampler=sampler)


def run_trial(
    candidate: ModelAdapter,
    params: Mapping[str, Any],
    train: tuple[np.ndarray, np.ndarray, np.ndarray | None],
    validation: tuple[np.ndarray, np.ndarray],
    spec: SearchSpec,
) -> float:
    """Fit ``candidate`` with ``params`` on ``train``, score it on ``validation``: higher is
    better (the evaluation module's sign), NaN if undefined. Raises what the fit raises."""
    model = candidate.with_params(params)
    model.fit(*train)
    return evaluate_holdout(
        model, *validation, task=spec.task, metric=spec.metric, labels=spec.labels
    )


def measured_trial(
    candidate: ModelAdapter,
    params: Mapping[str, Any],
    train: tuple[np.ndarray, np.ndarray, np.ndarray | None],
    validation: tuple[np.ndarray, np.ndarray],
    spec: SearchSpec,
    clock: Callable[[], float] = time.perf_counter,
) -> TrialOutcome:
    """:func:`run_trial` with its failure, seconds and peak resident memory recorded, under
    ``spec.memory_limit_mb`` when the trial runs in a worker process (``spec.pooled``).
    Never raises for the trial's own failure (``Exception``: the search's guesses may be
    values the estimator refuses; a MemoryError is a trial over its cap)."""
    reset_peak_memory()
    started = clock()
    error: str | None = None
    score = math.nan
    try:
        with data_limit(spec.memory_limit_mb if spec.pooled else None):
            score = run_trial(candidate, params, train, validation, spec)
    except MemoryError as failure:
        error = f"MemoryError: over the {spec.memory_limit_mb} MB cap ({str(failure)[:200]})"
    except Exception as failure:  # a trial's failure is its own; see the docstring
        error = f"{type(failure).__name__}: {str(failure)[:300]}"
    seconds = clock() - started
    peak = peak_memory_mb()
    if error is None and math.isnan(score):
        error = f"{spec.metric} is undefined on the validation records"
    gc.collect()  # a failed trial's arrays, before the next trial's peak starts
    release_free_memory()
    return TrialOutcome(score, error, seconds, peak)


def run_search(
    candidate: ModelAdapter,
    X: np.ndarray,
    y: np.ndarray,
    weights: np.ndarray | None,
    spec: SearchSpec,
    previous: Mapping[str, Any] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[ModelAdapter, SearchSummary]:
    """Search ``spec.space`` on ``(X, y, weights)`` (oldest first) and return the best
    params refit on all of them, with the summary.

    A trial that raises (``Exception``: the search's own guesses may be values the estimator
    refuses; a MemoryError over ``spec.memory_limit_mb``), scores NaN or kills its worker
    process is recorded as failed and the search goes on; the budget is ``spec.trials``
    and / or ``spec.timeout_s`` (checked before each trial starts). ``previous``
    is the last search's :meth:`SearchSummary.as_dict`, whose best trials run first.
    Raises SearchFailed when no trial completes; the refit's own errors propagate.
    """
    started = clock()
    start = validation_start(len(y), spec.validation_fraction)
    w_train = None if weights is None else weights[:start]
    train = (X[:start], y[:start], w_train)
    validation = (X[start:], y[start:])
    lower = lower_is_better(spec.metric)
    summary = SearchSummary(
        algorithm=spec.algorithm,
        metric=spec.metric,
        direction="minimize" if lower else "maximize",
        space=spec.space_dict(),
        train_records=start,
        validation_records=len(y) - start,
        baseline_score=_natural(_baseline(candidate, train, validation, spec), lower),
    )
    summary.baseline_seconds = clock() - started
    summary.workers, summary.memory_limit_mb = spec.workers, spec.memory_limit_mb
    study = _study(spec)
    warm = warm_start_params(previous, spec)
    for params in warm:
        study.enqueue_trial(params)
    last_error: str | None = None

    def ask() -> tuple[optuna.Trial, dict[str, Any]]:
        trial = study.ask()
        return trial, {path: _suggest(trial, path, dist) for path, dist in spec.space}

    def tell(trial: optuna.Trial, params: dict[str, Any], outcome: TrialOutcome) -> None:
        nonlocal last_error
        if outcome.error is None:
            study.tell(trial, outcome.score)
        else:
            import optuna  # noqa: PLC0415  (already imported by _study)

            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            last_error = outcome.error
            log.warning(
                "search trial failed", extra={"trial": trial.number, "reason": outcome.error}
            )
        summary.trials.append(
            TrialRecord(
                number=trial.number,
                params=params,
                score=_natural(outcome.score, lower),
                seconds=outcome.seconds,
                state=COMPLETE if outcome.error is None else FAILED,
                error=outcome.error,
                warm_start=trial.number < len(warm),
                peak_memory_mb=outcome.peak_memory_mb,
            )
        )

    def budget_left(asked: int) -> bool:
        return _budget_left(spec, asked, clock() - started)

    if spec.pooled:
        from stream_trainer.training.search.trial_pool import run_pooled  # noqa: PLC0415  (joblib: pooled only)

        run_pooled(candidate, train, validation, spec, ask, tell, budget_left)
    else:
        while budget_left(len(summary.trials)):
            trial, params = ask()
            tell(trial, params, measured_trial(candidate, params, train, validation, spec, clock))
    summary.trials.sort(key=lambda t: t.number)  # pooled trials finish out of order
    best = summary.best()
    if best is None:
        raise SearchFailed(
            f"no trial of {len(summary.trials)} completed; the last failure: {last_error}"
        )
    refit_started = clock()
    winner = candidate.with_params(best.params)
    winner.fit(X, y, weights)
    summary.refit_seconds = clock() - refit_started
    summary.duration_s = clock() - started
    return winner, summary


def _baseline(
    candidate: ModelAdapter,
    train: tuple[np.ndarray, np.ndarray, np.ndarray | None],
    validation: tuple[np.ndarray, np.ndarray],
    spec: SearchSpec,
) -> float:
    """The candidate's own params' score on the same split: what the search must beat."""
    try:
        return run_trial(candidate, {}, train, validation, spec)
    except Exception:  # the configured params may fail where the search's do not
        return math.nan


def _natural(score: float, lower: bool) -> float:
    """evaluate_holdout negates lower-is-better metrics; back to the metric's own units."""
    return -score if lower and not math.isnan(score) else score


def _budget_left(spec: SearchSpec, done: int, elapsed: float) -> bool:
    if spec.trials is not None and done >= spec.trials:
        return False
    return spec.timeout_s is None or elapsed < spec.timeout_s
