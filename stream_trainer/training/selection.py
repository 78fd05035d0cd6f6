"""Online model selection for per_record and mini_batch: successive halving on the stream.

Several candidate configurations (overrides of the configured model's params) learn side by
side, each test-then-train on the same records and scored prequentially. Every
``rung_records`` records the live candidates are ranked by their score over that rung and
the worse half stops learning (down to ``min_live``). The leader, the model the service
predicts with, checkpoints and publishes, is the live candidate with the best score over
its last ``rung_records`` records, chosen again every tenth of a rung (at least a unit in
mini_batch), so a poor first candidate does not lead a whole rung. Decisions fall at exact
record counts (a unit is split there), never at times, so a run resumed from a checkpoint
decides exactly as a run that never stopped.

Pure: no I/O, no metrics. The trainer feeds it predictions and record counts; the whole
object is part of the pickled :class:`~stream_trainer.state.training_state.TrainingState`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stream_trainer.config import Settings
from stream_trainer.training.evaluation import PrequentialEvaluator, lower_is_better
from stream_trainer.training.learners import ModelAdapter

# The leader is chosen again this many times per rung (at exact record counts).
LEADER_CHECKS_PER_RUNG = 10
# Rung scores and decisions kept in the (checkpointed) state: the latest this many.
_KEPT = 100


@dataclass(frozen=True)
class SelectionSpec:
    """The plain values a selection keeps from the config (never ``Settings``)."""

    method: str
    names: tuple[str, ...]
    params: tuple[dict[str, Any], ...]
    min_live: int
    rung_records: int
    check_every: int  # records between leader checks (a rung's end is one too)
    metric: str
    task: str
    labels: tuple[Any, ...] | None


def check_interval(rung_records: int, mode: str, unit_records: int) -> int:
    """Records between leader checks: a tenth of a rung; in mini_batch at least a unit,
    since the trainer cuts a unit at every decision and ``learn_many`` / ``partial_fit`` on
    a cut unit is slower per record (and learns from smaller batches)."""
    every = max(1, rung_records // LEADER_CHECKS_PER_RUNG)
    if mode == "mini_batch":
        every = max(every, unit_records)
    return min(every, rung_records)


def selection_spec(settings: Settings) -> SelectionSpec | None:
    """The configured selection as plain values; None when it is off."""
    cfg = settings.training.selection
    if not cfg.enabled:
        return None
    mode = settings.training.mode
    return SelectionSpec(
        method=cfg.method,
        names=tuple(cfg.candidate_names()),
        params=tuple(dict(c.params) for c in cfg.candidates),
        min_live=cfg.min_live,
        rung_records=cfg.rung_records,
        check_every=check_interval(cfg.rung_records, mode, settings.training.mini_batch.size),
        metric=settings.selection_metric(),
        task=settings.model.task,
        labels=tuple(settings.record.labels) if settings.record.labels else None,
    )


@dataclass
class Candidate:
    """One configuration: its model, its prequential scores and its cost."""

    name: str
    params: dict[str, Any]
    # None once it stopped: a stopped candidate never learns or leads again, and its model
    # would only cost memory and checkpoint size.
    model: ModelAdapter | None
    # Since the candidate started (total_values: the score reported per candidate) and over
    # its last rung_records records (window_values: what the leader and halving rank by; at
    # a rung's end that window is the rung, which every live candidate learnt whole).
    evaluator: PrequentialEvaluator
    live: bool = True
    stopped_at: int | None = None  # the selection's record count when it stopped learning
    records_learnt: int = 0
    cpu_seconds: float = 0.0  # thread CPU time predicting and learning (measured by the trainer)
    rung_scores: list[float] = field(default_factory=list)

    def score(self) -> float:
        """Since-start prequential score in the metric's units (NaN before any prediction)."""
        return next(iter(self.evaluator.total_values().values()))

    def recent_score(self) -> float:
        """Score over the last ``rung_records`` records, in the metric's units."""
        return next(iter(self.evaluator.window_values().values()))


def _rank_value(value: float, metric: str) -> float:
    """Higher is better; an undefined score ranks last."""
    if math.isnan(value):
        return -math.inf
    return -value if lower_is_better(metric) else value


class OnlineSelection:
    """Successive halving over candidates built from one base model (see module doc)."""

    def __init__(self, spec: SelectionSpec, base: ModelAdapter) -> None:
        self.spec = spec
        self.candidates = [
            Candidate(name, dict(params), base.with_params(params), self._evaluator())
            for name, params in zip(spec.names, spec.params, strict=True)
        ]
        self.leader_index = 0
        self.records = 0
        self.rungs = 0
        self.rung_left = spec.rung_records
        self.check_left = self._check_every
        self.history: list[dict[str, Any]] = []

    def _evaluator(self) -> PrequentialEvaluator:
        spec = self.spec
        return PrequentialEvaluator(spec.task, [spec.metric], spec.rung_records, spec.labels)

    @property
    def _check_every(self) -> int:
        return self.spec.check_every

    @property
    def until_decision(self) -> int:
        """Records until the next decision (a leader check or a rung's end): the most the
        trainer may pass to :meth:`advance` at once."""
        return min(self.rung_left, self.check_left)

    @property
    def leader(self) -> Candidate:
        """The candidate whose model is the service's model."""
        return self.candidates[self.leader_index]

    @property
    def leader_model(self) -> ModelAdapter:
        """The leader's model (a live candidate's: never released)."""
        model = self.leader.model
        assert model is not None, "the leader is always live"
        return model

    @property
    def live(self) -> list[Candidate]:
        """The candidates still learning, in configured order."""
        return [c for c in self.candidates if c.live]

    def observe(
        self, candidate: Candidate, y: np.ndarray, predictions: np.ndarray, proba: np.ndarray
    ) -> None:
        """Score ``candidate``'s predictions (made before it learnt these records)."""
        candidate.evaluator.update(y, predictions, proba)
        candidate.records_learnt += len(y)

    def advance(self, n: int) -> bool:
        """``n`` records were learnt by every live candidate; at most :attr:`until_decision`
        (the trainer splits units there). True when this ended a rung."""
        if not 0 <= n <= self.until_decision:
            raise ValueError(f"advance({n}) crosses a decision ({self.until_decision} left)")
        self.records += n
        self.rung_left -= n
        self.check_left -= n
        if self.rung_left == 0:
            self._decide()
            self.rung_left = self.spec.rung_records
            self.check_left = self._check_every
            return True
        if self.check_left == 0:
            self.leader_index = self.candidates.index(self._ranked(self.live)[0])
            self.check_left = self._check_every
        return False

    def _ranked(self, candidates: list[Candidate]) -> list[Candidate]:
        """Best first by recent score; a stable sort: ties keep the configured order, so
        every decision is deterministic."""
        metric = self.spec.metric
        return sorted(candidates, key=lambda c: -_rank_value(c.recent_score(), metric))

    def _decide(self) -> None:
        live = self.live
        scores = {c.name: c.recent_score() for c in live}
        ranked = self._ranked(live)
        keep = max(self.spec.min_live, math.ceil(len(live) / 2))
        stopped = ranked[keep:]
        for candidate in stopped:
            candidate.live = False
            candidate.stopped_at = self.records
            candidate.model = None
        for candidate in live:
            candidate.rung_scores = [*candidate.rung_scores[-_KEPT + 1 :], scores[candidate.name]]
        self.leader_index = self.candidates.index(ranked[0])
        self.rungs += 1
        self.history = self.history[-_KEPT + 1 :]
        self.history.append(
            {
                "rung": self.rungs,
                "records": self.records,
                "scores": {name: _json_number(v) for name, v in scores.items()},
                "stopped": [c.name for c in stopped],
                "leader": ranked[0].name,
            }
        )

    def summary(self) -> dict[str, Any]:
        """JSON-able record of the selection for version metadata and logs."""
        total_cpu = sum(c.cpu_seconds for c in self.candidates)
        return {
            "method": self.spec.method,
            "metric": self.spec.metric,
            "rung_records": self.spec.rung_records,
            "min_live": self.spec.min_live,
            "records": self.records,
            "rungs": self.rungs,
            "leader": self.leader.name,
            "live": [c.name for c in self.live],
            "cpu_seconds": round(total_cpu, 6),
            "candidates": [
                {
                    "name": c.name,
                    "params": c.params,
                    "live": c.live,
                    "stopped_at": c.stopped_at,
                    "score": _json_number(c.score()),
                    "rung_scores": [_json_number(v) for v in c.rung_scores[-20:]],
                    "records_learnt": c.records_learnt,
                    "cpu_seconds": round(c.cpu_seconds, 6),
                }
                for c in self.candidates
            ],
            "decisions": self.history[-20:],
        }


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def build_selection(settings: Settings, base: ModelAdapter) -> OnlineSelection | None:
    """The configured selection over copies of ``base`` (None when off)."""
    spec = selection_spec(settings)
    return None if spec is None else OnlineSelection(spec, base)
