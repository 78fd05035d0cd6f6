"""The three training modes, each test-then-train: predict, score, then learn.

A trainer turns one decoded unit into learning on ``state.model`` and returns the records
the learner refused (they go to the dead-letter topic like any bad record). Trainers do no
Kafka I/O and touch no metrics; the service times them and reports.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np

from stream_trainer.config import Settings
from stream_trainer.ingest.records import DecodedBatch
from stream_trainer.operations.cadence import Cadence
from stream_trainer.operations.faults import NO_CRASHES, CrashPoints
from stream_trainer.operations.memory import release_free_memory
from stream_trainer.publishing.events import Verdict, gate_metric, judge
from stream_trainer.state.training_state import RecordWindow, TrainingState
from stream_trainer.training.evaluation import evaluate_holdout
from stream_trainer.training.fit_worker import FitWorker
from stream_trainer.training.learners import ModelAdapter
from stream_trainer.training.search.search import SearchFailed, SearchSpec, run_search, search_spec

if TYPE_CHECKING:
    from stream_trainer.training.search.jobs import JobSearch

log = logging.getLogger(__name__)

# What a learner raises on data it cannot take (a label it was not told about, a value it
# overflows on). Anything else is a bug and must crash the process, not be dead-lettered.
LEARNER_DATA_ERRORS = (ValueError, TypeError, ArithmeticError, KeyError, IndexError)


@dataclass(frozen=True)
class Refusal:
    """A record the learner raised on: its index in the unit's message list, and why."""

    message_index: int
    error_class: str
    message: str


@dataclass
class UnitResult:
    """What a trainer did with one unit."""

    learnt: int
    refused: list[Refusal]
    predict_seconds: float
    learn_seconds: float
    unscored: int = 0  # records without a prediction (cold start): not in any metric


def _refused(batch: DecodedBatch, row: int, error: BaseException) -> Refusal:
    return Refusal(int(batch.valid_index[row]), type(error).__name__, str(error)[:500])


def _score(
    state: TrainingState,
    batch: DecodedBatch,
    keep: np.ndarray,
    predictions: np.ndarray,
    proba: np.ndarray | None,
) -> tuple[list[int], int]:
    """Prequential update, drift detection and the gate's recent-records ring.

    Returns the positions (among the kept rows) where drift was detected, and how many
    rows had no prediction to score."""
    y = batch.y[keep]
    preds = predictions[keep]
    errors = state.evaluator.update(y, preds, None if proba is None else proba[keep])
    detected: list[int] = []
    if state.drift is not None and len(errors):
        detected = state.drift.update(errors)
        if detected:
            state.drift_detections += len(detected)
            state.drift_since_publish += len(detected)
            log.warning(
                "concept drift detected",
                extra={"detections": len(detected), "records_learnt": state.records_learnt},
            )
    weights = None if batch.weights is None else batch.weights[keep]
    state.recent.extend(batch.X[keep], y, preds, weights)
    return detected, int(np.count_nonzero(np.isnan(errors)))


class Trainer(Protocol):
    """One training mode."""

    def learn(self, state: TrainingState, batch: DecodedBatch) -> UnitResult:
        """Test-then-train on the valid records of ``batch``; never raises on bad data."""


# One model's test-then-train pass over rows: predictions, P(positive) (NaN: none), which
# rows it learnt, and (row, error) for those it refused.
Pass = tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, BaseException]]]


def per_record_pass(
    model: ModelAdapter, xs: list[dict[str, Any]], ys: list[Any], ws: list[float] | None
) -> Pass:
    """``predict_one`` then ``learn_one`` for each row in order."""
    predict_one = model.predict_one
    learn_one = model.learn_one
    # Python lists in the loop (numpy item assignment costs more than the append).
    labels: list[Any] = []
    probabilities: list[float] = []
    refused: list[tuple[int, BaseException]] = []
    nan = math.nan
    for i, x in enumerate(xs):
        try:
            label, p = predict_one(x)
            if ws is None:
                learn_one(x, ys[i])
            else:
                learn_one(x, ys[i], ws[i])
        except LEARNER_DATA_ERRORS as error:
            refused.append((i, error))
            label, p = None, nan
        labels.append(label)
        probabilities.append(nan if p is None else p)
    predictions = np.empty(len(xs), dtype=object)
    predictions[:] = labels
    keep = np.ones(len(xs), dtype=bool)
    keep[[i for i, _ in refused]] = False
    return predictions, np.array(probabilities, dtype=np.float64), keep, refused


def mini_batch_pass(
    model: ModelAdapter, X: np.ndarray, y: np.ndarray, weights: np.ndarray | None
) -> tuple[Pass, float]:
    """``predict_many`` then ``learn_many`` on all rows (row by row when the learner refuses
    the unit, to find the rows it refuses), and the seconds the predict took."""
    n = len(y)
    t0 = time.perf_counter()
    predictions, proba = model.predict_many(X)
    predict_seconds = time.perf_counter() - t0
    keep = np.ones(n, dtype=bool)
    refused: list[tuple[int, BaseException]] = []
    try:
        model.learn_many(X, y, weights)
    except LEARNER_DATA_ERRORS:
        # Find the records the learner refuses instead of dropping the whole unit.
        for i in range(n):
            w = None if weights is None else weights[i : i + 1]
            try:
                model.learn_many(X[i : i + 1], y[i : i + 1], w)
            except LEARNER_DATA_ERRORS as error:
                keep[i] = False
                refused.append((i, error))
    probabilities = np.full(n, np.nan) if proba is None else np.asarray(proba, dtype=np.float64)
    return (
        np.asarray(predictions, dtype=object),
        probabilities,
        keep,
        refused,
    ), predict_seconds


class PerRecordTrainer:
    """River ``predict_one`` then ``learn_one``, record by record."""

    def learn(self, state: TrainingState, batch: DecodedBatch) -> UnitResult:
        """See :class:`Trainer`."""
        xs = batch.x_dicts(state.model.feature_names)
        ys = batch.y.tolist()
        ws = None if batch.weights is None else batch.weights.tolist()
        started = time.perf_counter()
        predictions, proba, keep, refused = per_record_pass(state.model, xs, ys, ws)
        elapsed = time.perf_counter() - started
        _detected, unscored = _score(state, batch, keep, predictions, proba)
        learnt = int(keep.sum())
        state.records_learnt += learnt
        # predict and learn interleave per record; the split is not measured separately.
        refusals = [_refused(batch, i, error) for i, error in refused]
        return UnitResult(learnt, refusals, 0.0, elapsed, unscored)


class MiniBatchTrainer:
    """``predict_many`` then ``learn_many`` / ``partial_fit`` on the whole unit."""

    def learn(self, state: TrainingState, batch: DecodedBatch) -> UnitResult:
        """See :class:`Trainer`. A unit the learner refuses is retried row by row."""
        n = len(batch.y)
        if n == 0:
            return UnitResult(0, [], 0.0, 0.0)
        t0 = time.perf_counter()
        (predictions, proba, keep, refused), predict_seconds = mini_batch_pass(
            state.model, batch.X, batch.y, batch.weights
        )
        elapsed = time.perf_counter() - t0
        _detected, unscored = _score(state, batch, keep, predictions, proba)
        learnt = int(keep.sum())
        state.records_learnt += learnt
        refusals = [_refused(batch, i, error) for i, error in refused]
        return UnitResult(learnt, refusals, predict_seconds, elapsed - predict_seconds, unscored)


class SelectionTrainer:
    """Online model selection (per_record or mini_batch): every live candidate runs the
    mode's test-then-train pass on the unit; the leader's predictions are the service's
    (scored, drift-checked, kept for the gate) and the records the leader refuses are the
    unit's refusals (a candidate that refuses others skips them). A unit is cut at each
    decision (leader check, rung end) so the selection decides at exact record counts."""

    def __init__(self, per_record: bool) -> None:
        self._per_record = per_record

    def learn(self, state: TrainingState, batch: DecodedBatch) -> UnitResult:
        """See :class:`Trainer`. ``state.selection`` must be set; ``state.model`` becomes
        the leader's model."""
        selection = state.selection
        assert selection is not None
        n = len(batch.y)
        if n == 0:
            return UnitResult(0, [], 0.0, 0.0)
        started = time.perf_counter()
        predictions = np.empty(n, dtype=object)
        proba = np.full(n, np.nan)
        keep = np.ones(n, dtype=bool)
        refusals: list[Refusal] = []
        xs = batch.x_dicts(state.model.feature_names) if self._per_record else []
        ys = batch.y.tolist() if self._per_record else []
        ws = None if batch.weights is None else batch.weights.tolist()
        start = 0
        while start < n:
            end = min(n, start + selection.until_decision)
            leader = selection.leader
            for candidate in selection.live:
                model = candidate.model
                assert model is not None  # released only when it stops
                cpu = time.thread_time()
                if self._per_record:
                    outcome = per_record_pass(
                        model,
                        xs[start:end],
                        ys[start:end],
                        None if ws is None else ws[start:end],
                    )
                else:
                    weights = None if batch.weights is None else batch.weights[start:end]
                    outcome, _ = mini_batch_pass(
                        model, batch.X[start:end], batch.y[start:end], weights
                    )
                candidate.cpu_seconds += time.thread_time() - cpu
                preds, probs, ok, refused = outcome
                selection.observe(candidate, batch.y[start:end][ok], preds[ok], probs[ok])
                if candidate is leader:
                    predictions[start:end] = preds
                    proba[start:end] = probs
                    keep[start:end] = ok
                    refusals += [_refused(batch, start + i, error) for i, error in refused]
            selection.advance(end - start)
            start = end
        state.model = selection.leader_model
        elapsed = time.perf_counter() - started
        _detected, unscored = _score(state, batch, keep, predictions, proba)
        learnt = int(keep.sum())
        state.records_learnt += learnt
        return UnitResult(learnt, refusals, 0.0, elapsed, unscored)


@dataclass
class RetrainOutcome:
    """A finished full retrain and the gate's verdict."""

    trigger: str
    accepted: bool
    candidate: ModelAdapter
    champion_score: float | None
    candidate_score: float
    duration_s: float
    trained_on: int
    reason: str
    # The hyperparameter search that made the candidate (SearchSummary.as_dict), if any.
    search: dict[str, Any] | None = None
    # The gate's Verdict.code (versions.GATE_CODES); None for outcomes built elsewhere.
    code: str | None = None


# A finished retrain off the poll thread: the candidate, its seconds, the search summary.
FitResult = tuple[ModelAdapter, float, dict[str, Any] | None]


T = TypeVar("T")


def run_in_daemon_thread(name: str, fn: Callable[[], T]) -> Future[T]:
    """``fn()`` on a new daemon thread; its result or exception in the returned future.

    A daemon thread, unlike an executor's worker, is not joined at interpreter exit: a stop
    can abandon a fit that is still running (a thread cannot be killed) and exit on time.
    """
    future: Future[T] = Future()

    def _target() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = fn()
        except BaseException as error:  # re-raised on the poll thread by future.result()
            future.set_exception(error)
        else:
            future.set_result(result)

    threading.Thread(target=_target, name=name, daemon=True).start()
    return future


class FullBatchTrainer:
    """Keeps a bounded window; refits a fresh clone on it off the poll thread.

    Ingestion goes on while a retrain runs: ``learn`` only predicts with the current model
    and appends to the window. ``poll_retrain`` starts a due retrain and collects a finished
    one; the candidate replaces the model only if the gate accepts it.
    """

    def __init__(
        self,
        settings: Settings,
        crash: CrashPoints = NO_CRASHES,
        fit_worker: FitWorker | None = None,
    ) -> None:
        self._crash = crash
        self._fit_worker = fit_worker
        self._cfg = settings.training.full_batch
        self._gate = settings.registry.gate
        self._task = settings.model.task
        # The same metric as the publish path's gate (one gate, one metric).
        self._metric = gate_metric(settings.evaluation_metrics())
        self._labels = settings.record.labels
        self._search = search_spec(settings)
        # Trials as Kubernetes Jobs instead of in the fit worker (training/search/jobs.py).
        self._job_search: JobSearch | None = None
        if self._search is not None and self._cfg.search.jobs.enabled:
            from stream_trainer.training.search import jobs as search_jobs  # noqa: PLC0415  (Kubernetes only)

            self._job_search = search_jobs.JobSearch.from_settings(
                self._cfg.search.jobs, settings.checkpoint.key(), settings.model.name
            )
        self._running: Future[FitResult] | None = None
        self._running_meta: dict[str, Any] = {}
        # Counts records learnt (persisted as state.records_since_retrain). The period starts
        # at install, on the service's clock: the trainer reads no clock of its own.
        self._cadence = Cadence(self._cfg.retrain_every_records, self._cfg.retrain_every_seconds)

    def install(self, state: TrainingState, now: float) -> None:
        """Take ``state``'s count of records learnt since its last retrain; the period
        starts at ``now`` (a restored state does not retrain by time the instant it lands)."""
        self._cadence.restart(state.records_since_retrain, now)

    @property
    def retraining(self) -> bool:
        """True while a retrain runs in the background."""
        return self._running is not None

    def learn(self, state: TrainingState, batch: DecodedBatch) -> UnitResult:
        """See :class:`Trainer`."""
        assert state.window is not None
        n = len(batch.y)
        if n == 0:
            return UnitResult(0, [], 0.0, 0.0)
        t0 = time.perf_counter()
        if state.model.is_fitted():
            predictions, proba = state.model.predict_many(batch.X)
            predictions = np.asarray(predictions, dtype=object)
        else:
            predictions, proba = np.full(n, None, dtype=object), None
        t1 = time.perf_counter()
        keep = np.ones(n, dtype=bool)
        detected, unscored = _score(state, batch, keep, predictions, proba)
        state.window.extend(batch.X, batch.y, None, batch.weights)
        if detected and self._cfg.retrain_on_drift:
            # A refit on a window of the old concept would restore the old concept: keep
            # only the records after the detection; the retrain waits for min_records of them.
            self._restart_window(state, n - detected[-1] - 1)
            if state.retrain_wanted in (None, "count", "time"):
                state.retrain_wanted = "drift"
        state.records_learnt += n
        self._cadence.observe(n)
        state.records_since_retrain = self._cadence.count
        return UnitResult(n, [], t1 - t0, 0.0, unscored)

    @staticmethod
    def _restart_window(state: TrainingState, keep_last: int) -> None:
        """Replace the window by a new one holding only its ``keep_last`` newest records."""
        old = state.window
        assert old is not None
        X, y, _pred, w = old.arrays()
        new = RecordWindow(old.capacity, X.shape[1], y.dtype)
        if keep_last > 0:
            new.extend(X[-keep_last:], y[-keep_last:], None, w[-keep_last:])
        state.window = new

    def poll_retrain(self, state: TrainingState, now: float) -> RetrainOutcome | None:
        """Start a due retrain or collect a finished one. Cheap; call every loop.

        The cadence (``retrain_every_records`` / ``retrain_every_seconds``) queues trigger
        "count" or "time" when nothing else is queued; "time" needs at least one record
        learnt since the last retrain: a refit of an unchanged window is wasted CPU.
        """
        assert state.window is not None
        if self._running is not None:
            if not self._running.done():
                return None
            return self._finish(state)
        if state.retrain_wanted is None:
            fired = self._cadence.trigger(now)
            if fired is not None:
                state.retrain_wanted = "count" if fired == "records" else "time"
        # A retrain a stop or crash abandoned before the gate judged it comes first.
        trigger = state.retrain_running or state.retrain_wanted
        if trigger is None or state.window.size < self._cfg.min_records:
            return None
        self._start(state, trigger, now)
        return None

    def _start(self, state: TrainingState, trigger: str, now: float) -> None:
        assert state.window is not None
        X, y, _pred, w = state.window.arrays()
        holdout = min(self._gate.holdout_records, len(y) // 4) if self._gate.enabled else 0
        # The most recent records are held out of the candidate's training so the gate can
        # score candidate and champion on data neither has learnt.
        split = len(y) - holdout
        candidate = state.model.fresh()
        self._running_meta = {
            "trigger": trigger,
            "holdout": (X[split:], y[split:]),
            "trained_on": split,
            "started": time.perf_counter(),
        }
        search, previous = self._search, state.last_search
        self._running = run_in_daemon_thread(
            "retrain",
            lambda: self._fit(candidate, X[:split], y[:split], w[:split], search, previous),
        )
        if state.retrain_running is None:  # a resumed retrain keeps any newer trigger waiting
            state.retrain_wanted = None
        state.retrain_running = trigger
        self._cadence.reset(now)
        state.records_since_retrain = 0
        log.info("full retrain started", extra={"trigger": trigger, "records": split})

    def _fit(
        self,
        candidate: ModelAdapter,
        X: np.ndarray,
        y: np.ndarray,
        w: np.ndarray,
        search: SearchSpec | None,
        previous: dict[str, Any] | None,
    ) -> FitResult:
        """On the retrain thread: the fitted candidate (the search's refit winner when a
        search is configured), the fit's or search's seconds, and the search summary."""
        started = time.perf_counter()
        self._crash.reached("mid_retrain")
        weights = None if np.all(w == 1.0) else w
        if search is not None:
            fallback: str | None = None
            if self._job_search is not None:
                in_job = self._search_in_a_job(candidate, X, y, weights, search, previous)
                if not isinstance(in_job, str):
                    return in_job
                fallback = in_job
            if self._fit_worker is not None:
                result = self._fit_worker.search(candidate, X, y, weights, search, previous)
            else:
                winner, summary = run_search(candidate, X, y, weights, search, previous)
                result = (winner, time.perf_counter() - started, summary.as_dict())
            if fallback is not None and result[2] is not None:
                result[2]["job_fallback"] = fallback
            return result
        if self._fit_worker is not None:
            fitted, seconds = self._fit_worker.fit(candidate, X, y, weights)
            return fitted, seconds, None
        candidate.fit(X, y, weights)
        return candidate, time.perf_counter() - started, None

    def _search_in_a_job(
        self,
        candidate: ModelAdapter,
        X: np.ndarray,
        y: np.ndarray,
        weights: np.ndarray | None,
        search: SearchSpec,
        previous: dict[str, Any] | None,
    ) -> FitResult | str:
        """The Job search's result; or, when the Job search failed for a reason outside
        this process (API server, study database, the Job's pods), that reason: the caller
        then searches in the fit worker. Failing the retrain instead would exit the service
        and, the trigger being checkpointed, crash-loop it for as long as the database or
        the API server is away. A stop (JobSearchCancelled) still propagates."""
        from stream_trainer.training.search.jobs import JobSearchCancelled  # noqa: PLC0415
        from stream_trainer.training.search.kube_jobs import KubeApiError  # noqa: PLC0415
        from stream_trainer.training.search.study import StudyError  # noqa: PLC0415

        assert self._job_search is not None
        try:
            return self._job_search.run(
                candidate, X, y, weights, search, previous, refit=self._refit
            )
        except JobSearchCancelled:
            raise
        except (SearchFailed, KubeApiError, StudyError, OSError) as error:
            reason = f"{type(error).__name__}: {error}"
            log.error(
                "search job failed; this retrain searches in the fit worker instead",
                extra={"reason": reason},
            )
            return reason

    def _refit(
        self, candidate: ModelAdapter, X: np.ndarray, y: np.ndarray, weights: np.ndarray | None
    ) -> tuple[ModelAdapter, float]:
        """One fit where single fits run (the fit worker, else this thread)."""
        if self._fit_worker is not None:
            return self._fit_worker.fit(candidate, X, y, weights)
        started = time.perf_counter()
        candidate.fit(X, y, weights)
        return candidate, time.perf_counter() - started

    def holdout_scores(
        self,
        champion: ModelAdapter,
        candidate: ModelAdapter,
        X_hold: np.ndarray,
        y_hold: np.ndarray,
    ) -> tuple[float | None, float]:
        """(champion, candidate) scores on the held-out rows, higher is better. The champion
        is None when there is no holdout or it was never fitted; the candidate NaN when
        there is no holdout (or the metric is undefined on it)."""
        if not len(y_hold):
            return None, math.nan
        champion_score: float | None = None
        if champion.is_fitted():
            champion_score = evaluate_holdout(
                champion, X_hold, y_hold, task=self._task, metric=self._metric, labels=self._labels
            )
        candidate_score = evaluate_holdout(
            candidate, X_hold, y_hold, task=self._task, metric=self._metric, labels=self._labels
        )
        return champion_score, candidate_score

    def verdict(
        self, champion_score: float | None, candidate_score: float, candidate_finite: bool
    ) -> Verdict:
        """The retrain's gate: :func:`stream_trainer.publishing.events.judge`, the publish path's
        rule."""
        return judge(self._gate, champion_score, candidate_score, candidate_finite)

    def _finish(self, state: TrainingState) -> RetrainOutcome:
        assert self._running is not None
        future, meta = self._running, self._running_meta
        self._running = None
        # A failing fit is a bug, and a search none of whose trials completed is a
        # configuration that cannot train: let either raise.
        candidate, fit_seconds, search = future.result()
        state.retrain_running = None  # judged below: done, whatever the verdict
        X_hold, y_hold = meta["holdout"]
        champion_score, candidate_score = self.holdout_scores(
            state.model, candidate, X_hold, y_hold
        )
        verdict = self.verdict(champion_score, candidate_score, candidate.parameters_finite())
        accepted, reason = verdict.accepted, verdict.reason
        if search is not None:
            search["gate"] = {
                "accepted": accepted,
                "reason": reason,
                "code": verdict.code,
                "trigger": meta["trigger"],
                "metric": self._metric,
                "champion_score": champion_score,
                "candidate_score": None if math.isnan(candidate_score) else candidate_score,
                "holdout_records": len(y_hold),
            }
            state.last_search = search  # shown by `search show`, warm-starts the next one
        if accepted:
            state.model = candidate
            state.model_search = search
            state.retrains += 1
            release_free_memory()  # the replaced model's C-allocated trees / arrays
        log.info(
            "full retrain finished",
            extra={
                "trigger": meta["trigger"],
                "accepted": accepted,
                "reason": reason,
                "code": verdict.code,
                "seconds": round(fit_seconds, 3),
            },
        )
        return RetrainOutcome(
            trigger=meta["trigger"],
            accepted=accepted,
            candidate=candidate,
            champion_score=champion_score,
            candidate_score=candidate_score,
            duration_s=time.perf_counter() - meta["started"],
            trained_on=meta["trained_on"],
            reason=reason,
            search=search,
            code=verdict.code,
        )

    def close(self) -> None:
        """Abandon a running retrain, at once, in either fit mode. Idempotent.

        The worker's child is killed; a fit on a thread cannot be killed, so its daemon
        thread is left to the process's exit and its result is never used. The retrain's
        trigger stays in ``state.retrain_running`` (checkpointed), so the next start runs it
        again. A search running as a Job stops waiting and deletes its Job (the Job's own
        deadline and TTL bound it if the process exits first).
        """
        if self._job_search is not None:
            self._job_search.cancel()
        if self._fit_worker is not None:
            self._fit_worker.close()
        self._running = None


def build_trainer(
    settings: Settings, crash: CrashPoints = NO_CRASHES
) -> PerRecordTrainer | MiniBatchTrainer | SelectionTrainer | FullBatchTrainer:
    """The trainer for the configured mode (online selection when it is enabled)."""
    mode = settings.training.mode
    if settings.training.selection.enabled:
        return SelectionTrainer(per_record=mode == "per_record")
    if mode == "per_record":
        return PerRecordTrainer()
    if mode == "mini_batch":
        return MiniBatchTrainer()
    full_batch = settings.training.full_batch
    worker = None
    if full_batch.fit_in_worker:
        steps = [*settings.model.preprocessing, settings.model.learner]
        worker = FitWorker(full_batch.fit_nice, [step.path.rpartition(".")[0] for step in steps])
    return FullBatchTrainer(settings, crash, worker)
