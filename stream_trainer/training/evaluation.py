"""Prequential (test-then-train) evaluation and concept-drift detection.

Everything here is picklable (it travels in checkpoints) and batch-oriented: call
:meth:`PrequentialEvaluator.update` once per batch of predictions, not once per record
(numpy's per-call cost would dominate a one-record update).

Missing predictions ("no prediction yet", see :mod:`stream_trainer.training.learners`) are not
scored, River's convention (``progressive_val_score`` skips an empty prediction): a record
whose label is ``None`` / unknown / NaN (classification) or whose value is NaN
(regression) is left out of every metric, window and since start, and counted in
:attr:`PrequentialEvaluator.unscored`. A NaN probability beside a label is left out of
log_loss and roc_auc only. The error signal returned for drift is NaN for an unscored
record, which :class:`DriftMonitor` skips, so a cold start does not look like a change.

A metric with nothing to measure (no records, one class only for roc_auc) is NaN.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from river import drift
from scipy.stats import rankdata

from stream_trainer.config import DriftSettings
from stream_trainer.training.learners import ModelAdapter

CLASSIFICATION_METRICS = ("accuracy", "f1", "macro_f1", "log_loss", "roc_auc")
REGRESSION_METRICS = ("mae", "rmse", "r2")
_LOWER_IS_BETTER = frozenset({"log_loss", "mae", "rmse"})
_BINARY_ONLY = frozenset({"f1", "log_loss", "roc_auc"})
# roc_auc since start is computed from per-class histograms of the positive-class
# probability: pairs within one bin count as ties, so the error is at most the share of
# positive/negative pairs that fall in the same 1/_AUC_BINS-wide bin.
_AUC_BINS = 10_000
_EPS = float(np.finfo(np.float64).eps)


def lower_is_better(metric: str) -> bool:
    """True for the metrics where a smaller value is better (log_loss, mae, rmse)."""
    return metric in _LOWER_IS_BETTER


def _encoder(labels: Sequence[Any]) -> dict[Any, int]:
    return {label: index for index, label in enumerate(labels)}


def _encode(values: np.ndarray, lut: dict[Any, int]) -> np.ndarray:
    """Label -> index in ``labels``; anything else (None, NaN, unknown) -> -1."""
    items = np.asarray(values, dtype=object).tolist()
    # dict.get does the whole job in C: None and NaN are never keys, so they map to -1.
    return np.fromiter(
        map(lut.get, items, itertools.repeat(-1, len(items))), dtype=np.int64, count=len(items)
    )


def _f1(tp: float, fp: float, fn: float) -> float:
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0


def _auc_exact(positive: np.ndarray, proba: np.ndarray) -> float:
    """Mann-Whitney U with average ranks for ties (what sklearn's roc_auc_score gives)."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(proba)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _auc_hist(pos_hist: np.ndarray, neg_hist: np.ndarray) -> float:
    n_pos = int(pos_hist.sum())
    n_neg = int(neg_hist.sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    neg_below = np.cumsum(neg_hist) - neg_hist
    wins = float((pos_hist * (neg_below + 0.5 * neg_hist)).sum())
    return wins / (n_pos * n_neg)


def _classification_values(
    metrics: Sequence[str],
    true_idx: np.ndarray,
    pred_idx: np.ndarray,
    proba: np.ndarray | None,
    n_labels: int,
) -> dict[str, float]:
    """Classification metrics of aligned arrays (rows with pred -1, no prediction, ignored)."""
    scored = pred_idx >= 0
    if not scored.all():  # only in windows restored from checkpoints that kept them
        true_idx, pred_idx = true_idx[scored], pred_idx[scored]
        proba = None if proba is None else proba[scored]
    out: dict[str, float] = {}
    n = len(true_idx)
    correct = true_idx == pred_idx
    for metric in metrics:
        if metric == "accuracy":
            out[metric] = float(correct.mean()) if n else math.nan
        elif metric == "f1":
            out[metric] = _f1(*_binary_counts(true_idx, pred_idx)) if n else math.nan
        elif metric == "macro_f1":
            out[metric] = _macro_f1(_confusion(true_idx, pred_idx, n_labels)) if n else math.nan
        elif metric == "log_loss":
            out[metric] = _log_loss(true_idx, proba)
        elif metric == "roc_auc":
            if proba is None:
                out[metric] = math.nan
            else:
                known = ~np.isnan(proba)
                out[metric] = _auc_exact(true_idx[known] == 1, proba[known])
    return out


def _binary_counts(true_idx: np.ndarray, pred_idx: np.ndarray) -> tuple[float, float, float]:
    true_pos = true_idx == 1
    pred_pos = pred_idx == 1
    tp = float(np.count_nonzero(true_pos & pred_pos))
    fp = float(np.count_nonzero(~true_pos & pred_pos))
    fn = float(np.count_nonzero(true_pos & ~pred_pos))
    return tp, fp, fn


def _confusion(true_idx: np.ndarray, pred_idx: np.ndarray, n_labels: int) -> np.ndarray:
    """(n_labels, n_labels + 1) counts; the last column holds "no prediction" (kept so
    checkpoints whose confusion counted unscored records there still load; ignored)."""
    width = n_labels + 1
    pred_col = np.where(pred_idx < 0, n_labels, pred_idx)
    flat = true_idx * width + pred_col
    counts: np.ndarray = np.bincount(flat, minlength=n_labels * width)
    return counts.reshape(n_labels, width)


def _macro_f1(confusion: np.ndarray) -> float:
    """Mean F1 over the labels that occur as truth or prediction (sklearn's default set)."""
    n_labels = confusion.shape[0]
    scored = confusion[:, :n_labels]
    tp = np.diag(scored).astype(np.float64)
    support = scored.sum(axis=1)
    predicted = scored.sum(axis=0)
    present = (support + predicted) > 0
    if not present.any():
        return math.nan
    fp = predicted - tp
    fn = support - tp
    denominator = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return float(f1[present].mean())


def _log_loss_terms(true_idx: np.ndarray, proba: np.ndarray) -> np.ndarray:
    known = ~np.isnan(proba)
    p = np.clip(proba[known], _EPS, 1 - _EPS)
    terms: np.ndarray = -np.where(true_idx[known] == 1, np.log(p), np.log1p(-p))
    return terms


def _log_loss(true_idx: np.ndarray, proba: np.ndarray | None) -> float:
    if proba is None:
        return math.nan
    terms = _log_loss_terms(true_idx, proba)
    return float(terms.mean()) if len(terms) else math.nan


def _regression_values(
    metrics: Sequence[str], y_true: np.ndarray, y_pred: np.ndarray
) -> dict[str, float]:
    known = ~np.isnan(y_pred)
    t = y_true[known]
    p = y_pred[known]
    n = len(t)
    out: dict[str, float] = {}
    for metric in metrics:
        if n == 0:
            out[metric] = math.nan
        elif metric == "mae":
            out[metric] = float(np.abs(t - p).mean())
        elif metric == "rmse":
            out[metric] = float(np.sqrt(((t - p) ** 2).mean()))
        elif metric == "r2":
            sse = float(((t - p) ** 2).sum())
            sst = float(((t - t.mean()) ** 2).sum())
            out[metric] = _r2(sse, sst)
    return out


def _as_float(values: np.ndarray) -> np.ndarray:
    """Regression predictions as float64, ``None`` -> NaN."""
    array = np.asarray(values)
    if array.dtype != object:
        return np.asarray(array, dtype=np.float64)
    return np.array([np.nan if v is None else v for v in array.tolist()], dtype=np.float64)


def _r2(sse: float, sst: float) -> float:
    # sklearn's r2_score(force_finite=True) convention for a constant target.
    if sst == 0.0:
        return 1.0 if sse == 0.0 else 0.0
    return 1.0 - sse / sst


# The evaluator's ring buffers (classification's, then regression's).
_WINDOW_BUFFERS = ("_buf_true", "_buf_pred", "_buf_proba", "_buf_true_f", "_buf_pred_f")
# A pickled evaluator whose ring buffers hold only the filled slots.
_HELD_ONLY = "_ring_held_only"
# The ROC AUC histograms (binary classification), pickled as their non-zero bins.
_HISTOGRAMS = ("_pos_hist", "_neg_hist")


class PrequentialEvaluator:
    """Test-then-train metrics over a sliding window and since the start.

    ``labels`` is required for classification (``labels[1]`` is the positive class of
    binary f1 / log_loss / roc_auc, whose probabilities are P(labels[1])).
    """

    def __init__(
        self, task: str, metrics: Sequence[str], window: int, labels: Sequence[Any] | None
    ) -> None:
        if not metrics:
            raise ValueError("evaluation.metrics: at least one metric is needed")
        if window < 1:
            raise ValueError("evaluation.window must be >= 1")
        self.task = task
        self.metrics = list(metrics)
        self.primary_metric = self.metrics[0]
        self.window = window
        self._classification = task != "regression"
        allowed = CLASSIFICATION_METRICS if self._classification else REGRESSION_METRICS
        for metric in self.metrics:
            if metric not in allowed:
                raise ValueError(f"evaluation.metrics: {metric!r} does not fit {task}")
            if metric in _BINARY_ONLY and task != "binary_classification":
                raise ValueError(f"evaluation.metrics: {metric!r} needs binary_classification")
        if self._classification:
            if not labels:
                raise ValueError("record.labels: classification needs the labels")
            self.labels = list(labels)
        else:
            self.labels = []
        self._lut = _encoder(self.labels)
        self._n_labels = len(self.labels)
        self._count = 0
        # Ring buffer: slot i of the last `window` records; `_filled` of them valid.
        self._pos = 0
        self._filled = 0
        if self._classification:
            self._buf_true = np.zeros(window, dtype=np.int64)
            self._buf_pred = np.zeros(window, dtype=np.int64)
            self._buf_proba = np.full(window, np.nan)
            self._confusion = np.zeros((self._n_labels, self._n_labels + 1), dtype=np.int64)
            self._ll_sum = 0.0
            self._ll_n = 0
            self._pos_hist = np.zeros(_AUC_BINS, dtype=np.int64)
            self._neg_hist = np.zeros(_AUC_BINS, dtype=np.int64)
        else:
            self._buf_true_f = np.zeros(window)
            self._buf_pred_f = np.zeros(window)
            # Exact streaming sums; the target's mean / M2 merged with Chan's formula so
            # r2 stays accurate far from zero.
            self._n = 0
            self._abs_sum = 0.0
            self._sq_sum = 0.0
            self._y_mean = 0.0
            self._y_m2 = 0.0

    def __getstate__(self) -> dict[str, Any]:
        # Pickled lean, for key scope's thousands of evaluators: until the ring first
        # fills only its first `_filled` slots hold records (not `window` zeros: 16-24 kB),
        # and the ROC AUC histograms (160 kB of 10 000 bins) go as their non-zero bins.
        state = dict(self.__dict__)
        if self._filled < self.window:
            for name in _WINDOW_BUFFERS:
                if name in state:
                    state[name] = state[name][: self._filled].copy()
            state[_HELD_ONLY] = True
        for name in _HISTOGRAMS:
            if name in state:
                bins = np.flatnonzero(state[name]).astype(np.int32)
                state[name] = (bins, state[name][bins])
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        held_only = state.pop(_HELD_ONLY, False)
        self.__dict__.update(state)
        for name in _HISTOGRAMS:
            value = state.get(name)
            if isinstance(value, tuple):  # non-zero bins (not pickled whole, as before)
                bins, counts = value
                histogram = np.zeros(_AUC_BINS, dtype=np.int64)
                histogram[bins] = counts
                setattr(self, name, histogram)
        if not held_only:  # a full ring, or pickled whole before held-only pickling
            return
        for name in _WINDOW_BUFFERS:
            held = state.get(name)
            if held is not None:
                fill = np.nan if name == "_buf_proba" else 0
                ring = np.full(self.window, fill, dtype=held.dtype)
                ring[: len(held)] = held
                setattr(self, name, ring)

    @property
    def count(self) -> int:
        """Records passed to :meth:`update` so far (including those without a prediction)."""
        return self._count

    @property
    def unscored(self) -> int:
        """Records passed to :meth:`update` without a prediction (not in any metric).

        Derived from the since-start counts, so evaluators checkpointed before unscored
        records were set apart report theirs too."""
        if self._classification:
            return self._count - int(self._confusion[:, : self._n_labels].sum())
        return self._count - self._n

    def _push(self, *columns: tuple[np.ndarray, np.ndarray]) -> None:
        """Write aligned (buffer, values) pairs into the ring, keeping the newest ``window``."""
        n = len(columns[0][1])
        size = self.window
        if n >= size:
            for buffer, values in columns:
                buffer[:] = values[n - size :]
            self._pos = 0
            self._filled = size
            return
        end = self._pos + n
        first = min(end, size) - self._pos
        for buffer, values in columns:
            buffer[self._pos : self._pos + first] = values[:first]
            buffer[: n - first] = values[first:]
        self._pos = end % size
        self._filled = min(size, self._filled + n)

    def update(
        self, y_true: np.ndarray, y_pred: np.ndarray, proba: np.ndarray | None
    ) -> np.ndarray:
        """Score one batch (predictions made before learning it).

        Returns the per-record error signal for drift: 0/1 misclassification or the
        absolute error; NaN where there was no prediction.
        """
        n = len(y_true)
        if len(y_pred) != n or (proba is not None and len(proba) != n):
            raise ValueError("y_true, y_pred and proba must have the same length")
        self._count += n
        if n == 0:
            return np.zeros(0)
        if self._classification:
            return self._update_classification(y_true, y_pred, proba)
        return self._update_regression(y_true, y_pred)

    def _update_classification(
        self, y_true: np.ndarray, y_pred: np.ndarray, proba: np.ndarray | None
    ) -> np.ndarray:
        true_idx = _encode(y_true, self._lut)
        if (true_idx < 0).any():
            raise ValueError("y_true holds a label outside record.labels")
        pred_idx = _encode(y_pred, self._lut)
        p = np.full(len(true_idx), np.nan) if proba is None else np.asarray(proba, np.float64)
        errors: np.ndarray = (true_idx != pred_idx).astype(np.float64)
        scored = pred_idx >= 0
        if not scored.all():  # a cold start: the usual unit copies nothing
            errors[~scored] = np.nan
            true_idx, pred_idx, p = true_idx[scored], pred_idx[scored], p[scored]
            if not len(true_idx):
                return errors
        self._push((self._buf_true, true_idx), (self._buf_pred, pred_idx), (self._buf_proba, p))
        self._confusion += _confusion(true_idx, pred_idx, self._n_labels)
        if self.task == "binary_classification":
            terms = _log_loss_terms(true_idx, p)
            self._ll_sum += float(terms.sum())
            self._ll_n += len(terms)
            known = ~np.isnan(p)
            bins = np.minimum((p[known] * _AUC_BINS).astype(np.int64), _AUC_BINS - 1)
            positive = true_idx[known] == 1
            self._pos_hist += np.bincount(bins[positive], minlength=_AUC_BINS)
            self._neg_hist += np.bincount(bins[~positive], minlength=_AUC_BINS)
        return errors

    def _update_regression(self, y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
        t = np.asarray(y_true, dtype=np.float64)
        p = _as_float(y_pred)
        errors: np.ndarray = np.abs(t - p)
        known = ~np.isnan(p)
        tk, pk, e = (t, p, errors) if known.all() else (t[known], p[known], errors[known])
        m = len(tk)
        if m:
            self._push((self._buf_true_f, tk), (self._buf_pred_f, pk))
            self._abs_sum += float(e.sum())
            self._sq_sum += float((e**2).sum())
            batch_mean = float(tk.mean())
            batch_m2 = float(((tk - batch_mean) ** 2).sum())
            total = self._n + m
            delta = batch_mean - self._y_mean
            self._y_m2 += batch_m2 + delta * delta * self._n * m / total
            self._y_mean += delta * m / total
            self._n = total
        return errors

    def _window_arrays(self) -> tuple[np.ndarray, ...]:
        """The buffered records, oldest first (order matters to nothing but tests)."""
        f = self._filled
        if self._classification:
            buffers: tuple[np.ndarray, ...] = (self._buf_true, self._buf_pred, self._buf_proba)
        else:
            buffers = (self._buf_true_f, self._buf_pred_f)
        if f < self.window:
            return tuple(b[:f] for b in buffers)
        return tuple(np.roll(b, -self._pos) for b in buffers)

    def window_values(self) -> dict[str, float]:
        """Each metric over the last ``window`` records (NaN when undefined)."""
        arrays = self._window_arrays()
        if self._classification:
            true_idx, pred_idx, proba = arrays
            binary = self.task == "binary_classification"
            return _classification_values(
                self.metrics, true_idx, pred_idx, proba if binary else None, self._n_labels
            )
        return _regression_values(self.metrics, *arrays)

    def total_values(self) -> dict[str, float]:
        """Each metric since the start: exact except roc_auc (binned, see module constants)."""
        out: dict[str, float] = {}
        if self._classification:
            confusion = self._confusion
            n = int(confusion[:, : self._n_labels].sum())
            for metric in self.metrics:
                if n == 0:
                    out[metric] = math.nan
                elif metric == "accuracy":
                    out[metric] = float(np.trace(confusion[:, : self._n_labels])) / n
                elif metric == "f1":
                    tp = float(confusion[1, 1])
                    fp = float(confusion[0, 1])
                    fn = float(confusion[1, : self._n_labels].sum()) - tp
                    out[metric] = _f1(tp, fp, fn)
                elif metric == "macro_f1":
                    out[metric] = _macro_f1(confusion)
                elif metric == "log_loss":
                    out[metric] = self._ll_sum / self._ll_n if self._ll_n else math.nan
                elif metric == "roc_auc":
                    out[metric] = _auc_hist(self._pos_hist, self._neg_hist)
            return out
        n = self._n
        for metric in self.metrics:
            if n == 0:
                out[metric] = math.nan
            elif metric == "mae":
                out[metric] = self._abs_sum / n
            elif metric == "rmse":
                out[metric] = math.sqrt(self._sq_sum / n)
            elif metric == "r2":
                out[metric] = _r2(self._sq_sum, self._y_m2)
        return out

    def score(self, metric: str | None = None) -> float:
        """The window value of ``metric`` (default: the primary one), higher is better
        (``-value`` for mae, rmse and log_loss). NaN when undefined."""
        name = metric or self.primary_metric
        if name not in self.metrics:
            raise ValueError(f"metric {name!r} is not configured ({self.metrics})")
        value = self.window_values()[name]
        return -value if name in _LOWER_IS_BETTER else value


def evaluate_holdout(
    model: ModelAdapter,
    X: np.ndarray,
    y: np.ndarray,
    *,
    task: str,
    metric: str,
    labels: Sequence[Any] | None,
) -> float:
    """Score of ``model`` on held-out rows, higher is better; NaN if undefined (no rows,
    an unfitted model for a regressor, a single class for roc_auc). Does not train."""
    predictions, proba = model.predict_many(X)
    evaluator = PrequentialEvaluator(task, [metric], max(1, len(y)), labels)
    evaluator.update(y, predictions, proba)
    return evaluator.score(metric)


class DriftMonitor:
    """A River drift detector fed with the prequential error signal (NaN skipped)."""

    def __init__(self, settings: DriftSettings) -> None:
        self.enabled = settings.enabled
        self.detector_name = settings.detector
        cls = getattr(drift, settings.detector)
        accepted = set(inspect.signature(cls).parameters)
        unknown = sorted(set(settings.params) - accepted)
        if unknown:
            raise ValueError(
                f"drift.params: unknown parameter(s) {unknown} for {settings.detector} "
                f"(accepted: {sorted(accepted)})"
            )
        try:
            self._detector = cls(**settings.params)
        except (TypeError, ValueError) as error:
            raise ValueError(f"drift.params: invalid for {settings.detector}: {error}") from None
        self.detections = 0

    def update(self, errors: np.ndarray) -> list[int]:
        """Feed ``errors`` in order; indexes within this batch where drift was detected.

        The detector keeps running (River resets its own window after a detection)."""
        if not self.enabled:
            return []
        signal = np.asarray(errors, dtype=np.float64)
        known = np.flatnonzero(~np.isnan(signal))  # NaN: no prediction for this record
        values = signal[known].tolist()
        detector = self._detector
        if type(detector) is drift.ADWIN:
            positions = _feed_adwin(detector, values)
        else:
            positions = _feed(detector, values)
        found = known[positions].tolist() if positions else []
        self.detections += len(found)
        return found


def _feed(detector: Any, values: list[float]) -> list[int]:
    """Any River drift detector, through its public ``update``."""
    feed = detector.update
    found: list[int] = []
    for index, value in enumerate(values):
        feed(value)
        if detector.drift_detected:
            found.append(index)
    return found


def _feed_adwin(detector: Any, values: list[float]) -> list[int]:
    """What :func:`_feed` does for ADWIN, at a quarter of the cost.

    ``ADWIN.update`` is a Python wrapper (reset the window if the previous update
    detected drift, then update the Cython window); its call overhead was ~8 % of a
    mini-batch unit. Between detections this calls the Cython window directly; the update
    after a detection goes through the public method, which resets. The detector's state
    stays exactly what the public path leaves (tests compare both on drifting streams).
    """
    found: list[int] = []
    update = detector._helper.update
    reset_next = detector.drift_detected
    for index, value in enumerate(values):
        if reset_next:  # River's update resets the window, then updates it
            detector.update(value)
            update = detector._helper.update
            reset_next = detector.drift_detected
        else:
            reset_next = update(value)
            if reset_next:
                detector._drift_detected = True
        if reset_next:
            found.append(index)
    return found
