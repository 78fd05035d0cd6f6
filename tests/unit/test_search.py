"""Hyperparameter search: config parsing and validation, the time-ordered split, metric
direction, failing trials, warm start, and the search inside the full-batch trainer."""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from stream_trainer.cli import main
from stream_trainer.config import (
    ConfigError,
    DeadLetterSettings,
    Settings,
    settings_from_mapping,
)
from stream_trainer.ingest.deadletter import BadRecordBreaker
from stream_trainer.operations.memory import data_limit, peak_memory_mb, reset_peak_memory
from stream_trainer.operations.metrics import SEARCH_TRIAL_STATES
from stream_trainer.state.checkpoint import CheckpointStore
from stream_trainer.state.training_state import RecordWindow, TrainingState
from stream_trainer.training.evaluation import PrequentialEvaluator
from stream_trainer.training.fit_worker import FitWorker, FitWorkerError
from stream_trainer.training.learners import IncompatibleLearner, ModelAdapter, build_model
from stream_trainer.training.search.search import (
    COMPLETE,
    FAILED,
    TRIAL_STATES,
    SearchFailed,
    SearchSpec,
    run_search,
    search_spec,
    validation_start,
    warm_start_params,
)
from stream_trainer.training.trainers import FullBatchTrainer
from tests.trial_adapters import DiesOnDepth, FailsOnDepth

FEATURES = ["f0", "f1"]
TREE = "sklearn.tree.DecisionTreeClassifier"


def make_settings(
    space: dict[str, Any] | None = None,
    *,
    learner: str = TREE,
    params: dict[str, Any] | None = None,
    preprocessing: list[str] | None = None,
    task: str = "binary_classification",
    metrics: list[str] | None = None,
    mode: str = "full_batch",
    checkpoint_dir: str = "/tmp/ck",
    **search: Any,
) -> Settings:
    labels = None if task == "regression" else [0, 1]
    data: dict[str, Any] = {
        "kafka": {"bootstrap_servers": "localhost:9092", "group_id": "g"},
        "topics": {"input": ["in"], "dead_letter": "dlq", "versions": "v"},
        "record": {"features": FEATURES, "labels": labels},
        "model": {
            "name": "m",
            "task": task,
            "learner": {
                "path": learner,
                "params": {"max_depth": 1, "random_state": 0} if params is None else params,
            },
            "preprocessing": [{"path": p} for p in preprocessing or []],
        },
        "training": {
            "mode": mode,
            "full_batch": {
                "fit_in_worker": False,
                "search": {
                    "enabled": True,
                    "space": space if space is not None else {"learner.max_depth": INT_1_12},
                    **search,
                },
            },
        },
        "checkpoint": {"dir": checkpoint_dir, "allow_unsigned": True},
        "registry": {"root": "/tmp/reg"},
    }
    if metrics is not None:
        data["evaluation"] = {"metrics": metrics}
    return settings_from_mapping(data, env={})


INT_1_12 = {"type": "int", "low": 1, "high": 12}


def checkerboard(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 4x4 checkerboard: a depth-1 tree is at chance (~0.5), a deep one near 1."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(0, 4, size=(n, 2))
    y = ((np.floor(X[:, 0]) + np.floor(X[:, 1])) % 2).astype(np.int64)
    return X, y


def spec_of(settings: Settings) -> SearchSpec:
    spec = search_spec(settings)
    assert spec is not None
    return spec


# -- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("space", "field", "message"),
    [
        ({"learner.max_depth": {"type": "int", "low": 5, "high": 5}}, "learner.max_depth", "below"),
        ({"learner.max_depth": {"type": "int", "low": 1}}, "learner.max_depth", "low and high"),
        ({"learner.criterion": {"type": "categorical", "choices": []}}, "criterion", "choice"),
        ({"learner.alpha": {"type": "float", "low": 0, "high": 1, "log": True}}, "alpha", "log"),
        ({"learner.max_depth": {"type": "int", "low": 1.5, "high": 4}}, "max_depth", "whole"),
        ({"learner": {"type": "int", "low": 1, "high": 4}}, "space", "parameter path"),
        ({"preprocessing.x.a": {"type": "int", "low": 1, "high": 4}}, "space", "parameter path"),
    ],
)
def test_invalid_space_is_a_config_error_naming_the_field(
    space: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(ConfigError) as error:
        make_settings(space)
    text = str(error.value)
    assert "training.full_batch.search.space" in text
    assert field in text
    assert message in text


def test_preprocessing_index_out_of_range_names_the_path() -> None:
    with pytest.raises(ConfigError, match=r"search\.space\.preprocessing\.1\.with_mean.*1 step"):
        make_settings(
            {"preprocessing.1.with_mean": {"type": "categorical", "choices": [True, False]}},
            preprocessing=["sklearn.preprocessing.StandardScaler"],
        )


def test_search_needs_full_batch_and_a_budget() -> None:
    with pytest.raises(ConfigError, match=r"only training\.mode full_batch"):
        make_settings(
            learner="river.tree.HoeffdingTreeClassifier",
            params={},
            space={"learner.grace_period": INT_1_12},
            mode="per_record",
        )
    with pytest.raises(ConfigError, match="set at least one"):
        make_settings(trials=None)


def test_unknown_estimator_param_fails_at_build_naming_the_field() -> None:
    settings = make_settings({"learner.max_dept": INT_1_12})
    with pytest.raises(
        IncompatibleLearner,
        match=r"training\.full_batch\.search\.space\.learner\.max_dept: unknown parameter",
    ):
        build_model(settings)


def test_space_becomes_plain_distributions() -> None:
    settings = make_settings(
        {
            "learner.max_depth": INT_1_12,
            "learner.min_samples_leaf": {"type": "int", "low": 1, "high": 64, "log": True},
            "learner.criterion": {"type": "categorical", "choices": ["gini", "entropy"]},
            "learner.ccp_alpha": {"type": "float", "low": 0.0, "high": 0.1},
        },
        algorithm="random",
    )
    spec = spec_of(settings)
    assert spec.space_dict() == {
        "learner.max_depth": {"type": "int", "low": 1, "high": 12, "log": False},
        "learner.min_samples_leaf": {"type": "int", "low": 1, "high": 64, "log": True},
        "learner.criterion": {"type": "categorical", "choices": ["gini", "entropy"]},
        "learner.ccp_alpha": {"type": "float", "low": 0.0, "high": 0.1, "log": False},
    }
    assert spec.algorithm == "random"
    assert spec.metric == "accuracy"
    pickle.loads(pickle.dumps(spec))  # travels to the fit worker


def test_disabled_search_has_no_spec() -> None:
    settings = make_settings(enabled=False)
    assert search_spec(settings) is None


# -- split and direction --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "fraction", "start"), [(100, 0.2, 80), (10, 0.25, 8), (2, 0.5, 1), (3, 0.01, 2)]
)
def test_validation_is_the_newest_rows(n: int, fraction: float, start: int) -> None:
    assert validation_start(n, fraction) == start


def test_too_few_rows_fail_the_search() -> None:
    with pytest.raises(SearchFailed, match="at least 2"):
        validation_start(1, 0.2)


def test_split_is_time_ordered_not_shuffled() -> None:
    """The first 80 rows are one concept, the newest 20 the opposite: a search that
    validated on shuffled rows would see the first concept in validation too."""
    settings = make_settings(trials=3, validation_fraction=0.2)
    model = build_model(settings)
    X, _ = checkerboard(100)
    y = (X[:, 0] > 2).astype(np.int64)
    y[80:] = 1 - y[80:]  # the newest fifth contradicts the rest
    _winner, summary = run_search(model, X, y, None, spec_of(settings))
    assert summary.train_records == 80
    assert summary.validation_records == 20
    # Every tree learns the first concept and is wrong on the flipped newest rows; shuffled
    # validation rows would be mostly of the first concept (accuracy ~0.8).
    scores = [t.score for t in summary.trials if t.state == COMPLETE]
    assert max(scores) <= 0.2


def test_lower_is_better_metric_minimises_in_its_own_units() -> None:
    X = np.random.default_rng(0).uniform(0, 10, size=(400, 2))
    y = np.sin(X[:, 0]) * 5 + X[:, 1]
    settings = make_settings(
        {"learner.max_depth": INT_1_12},
        learner="sklearn.tree.DecisionTreeRegressor",
        params={"max_depth": 1, "random_state": 0},
        task="regression",
        metrics=["mae"],
        trials=8,
        algorithm="random",
    )
    _winner, summary = run_search(build_model(settings), X, y, None, spec_of(settings))
    assert summary.direction == "minimize"
    best = summary.best()
    assert best is not None
    complete = [t.score for t in summary.trials if t.state == COMPLETE]
    assert best.score == min(complete) > 0  # mae, not its negation
    assert best.score < summary.baseline_score


# -- trials ---------------------------------------------------------------------------------


def test_search_beats_the_configured_params_and_refits_on_all_rows() -> None:
    settings = make_settings(trials=10, algorithm="tpe")
    X, y = checkerboard(2000)
    winner, summary = run_search(build_model(settings), X, y, None, spec_of(settings))
    best = summary.best()
    assert best is not None
    assert summary.baseline_score < 0.6
    assert best.score >= summary.baseline_score + 0.3
    assert winner.describe()["params"]["max_depth"] == best.params["learner.max_depth"]
    # Refit on all 2000 rows: the winner's tree saw the validation rows as well.
    assert winner.model.steps[-1][1].tree_.n_node_samples[0] == 2000  # type: ignore[attr-defined]
    data = summary.as_dict()
    assert data["counts"] == {"complete": 10, "failed": 0, "pruned": 0}
    assert len(data["trials"]) == 10
    assert all(t["seconds"] >= 0 for t in data["trials"])


class _FailingOnDepth:
    """An adapter wrapper whose fit raises for one depth (a trial the estimator refuses)."""

    def __init__(self, inner: ModelAdapter, bad_depth: int) -> None:
        self.inner, self.bad = inner, bad_depth

    def with_params(self, overrides: dict[str, Any]) -> Any:
        model = self.inner.with_params(overrides)
        if overrides.get("learner.max_depth") == self.bad:
            raise ValueError(f"depth {self.bad} refused")
        return model


def test_failing_trial_is_counted_and_the_search_goes_on() -> None:
    settings = make_settings(
        {"learner.max_depth": {"type": "categorical", "choices": [1, 6]}},
        trials=12,
        algorithm="random",
    )
    adapter: Any = _FailingOnDepth(build_model(settings), bad_depth=6)
    _winner, summary = run_search(adapter, *checkerboard(400), None, spec_of(settings))
    counts = summary.counts()
    assert counts[FAILED] >= 1
    assert counts[COMPLETE] >= 1
    assert counts[FAILED] + counts[COMPLETE] == 12
    failed = [t for t in summary.trials if t.state == FAILED]
    assert all(t.error == "ValueError: depth 6 refused" and math.isnan(t.score) for t in failed)
    assert all(t.params["learner.max_depth"] == 6 for t in failed)
    assert summary.as_dict()["trials"][failed[0].number]["score"] is None


def test_every_trial_failing_fails_the_search_with_the_reason() -> None:
    settings = make_settings(
        {"learner.max_depth": {"type": "categorical", "choices": [6]}}, trials=3
    )
    adapter: Any = _FailingOnDepth(build_model(settings), bad_depth=6)
    with pytest.raises(SearchFailed, match=r"no trial of 3 completed.*depth 6 refused"):
        run_search(adapter, *checkerboard(100), None, spec_of(settings))


def test_invalid_sampled_value_fails_its_trial_only() -> None:
    # criterion "bogus" is refused by scikit-learn's parameter validation.
    settings = make_settings(
        {"learner.criterion": {"type": "categorical", "choices": ["gini", "bogus"]}},
        trials=8,
        algorithm="random",
        seed=1,
    )
    _winner, summary = run_search(
        build_model(settings), *checkerboard(200), None, spec_of(settings)
    )
    states = {t.params["learner.criterion"]: t.state for t in summary.trials}
    assert states == {"gini": COMPLETE, "bogus": FAILED}


def test_timeout_bounds_the_search() -> None:
    ticks = iter(float(i) for i in range(1000))
    settings = make_settings(trials=None, timeout_s=5.0)
    _winner, summary = run_search(
        build_model(settings),
        *checkerboard(200),
        None,
        spec_of(settings),
        clock=lambda: next(ticks),
    )
    # Every clock read advances 1 s and a trial reads it several times: 5 s allow a few.
    assert 0 < len(summary.trials) < 5


def test_preprocessing_params_are_searched() -> None:
    settings = make_settings(
        {"preprocessing.0.with_mean": {"type": "categorical", "choices": [True, False]}},
        preprocessing=["sklearn.preprocessing.StandardScaler"],
        trials=4,
        algorithm="random",
    )
    winner, summary = run_search(build_model(settings), *checkerboard(200), None, spec_of(settings))
    best = summary.best()
    assert best is not None
    scaler = winner.model.steps[0][1]  # type: ignore[attr-defined]
    assert scaler.with_mean is best.params["preprocessing.0.with_mean"]
    assert winner.describe()["pipeline"][0]["params"] == {
        "with_mean": best.params["preprocessing.0.with_mean"]
    }


def test_river_learner_params_are_searched() -> None:
    settings = make_settings(
        {"learner.grace_period": {"type": "int", "low": 10, "high": 200}},
        learner="river.tree.HoeffdingTreeClassifier",
        params={},
        preprocessing=["river.preprocessing.StandardScaler"],
        trials=3,
        algorithm="random",
    )
    winner, summary = run_search(build_model(settings), *checkerboard(300), None, spec_of(settings))
    best = summary.best()
    assert best is not None
    tree: Any = winner.model["HoeffdingTreeClassifier"]  # type: ignore[attr-defined]
    assert tree.grace_period == best.params["learner.grace_period"]
    assert winner.is_fitted()


# -- warm start -----------------------------------------------------------------------------


def _previous(scores: dict[int, float | None], direction: str = "maximize") -> dict[str, Any]:
    return {
        "direction": direction,
        "trials": [
            {
                "number": i,
                "params": {"learner.max_depth": depth},
                "score": score,
                "state": COMPLETE if score is not None else FAILED,
            }
            for i, (depth, score) in enumerate(scores.items())
        ],
    }


def test_warm_start_takes_the_best_previous_trials_inside_the_space() -> None:
    spec = spec_of(make_settings(warm_start_trials=2))
    previous = _previous({3: 0.7, 9: 0.9, 40: 0.95, 5: None, 8: 0.8})
    # 40 is outside 1..12 now; 5 failed.
    assert warm_start_params(previous, spec) == [
        {"learner.max_depth": 9},
        {"learner.max_depth": 8},
    ]
    minimise = _previous({3: 0.7, 9: 0.9}, direction="minimize")
    assert warm_start_params(minimise, spec)[0] == {"learner.max_depth": 3}
    assert warm_start_params(None, spec) == []
    assert warm_start_params(previous, spec_of(make_settings(warm_start_trials=0))) == []


def test_warm_start_trials_run_first() -> None:
    settings = make_settings(trials=4, warm_start_trials=2, algorithm="random", seed=3)
    previous = _previous({11: 0.9, 7: 0.8, 2: 0.6})
    _winner, summary = run_search(
        build_model(settings), *checkerboard(300), None, spec_of(settings), previous
    )
    first = [(t.params["learner.max_depth"], t.warm_start) for t in summary.trials[:3]]
    assert first[:2] == [(11, True), (7, True)]
    assert first[2][1] is False


# -- in the trainer -------------------------------------------------------------------------


def _state(model: ModelAdapter, capacity: int) -> TrainingState:
    return TrainingState(
        model=model,
        evaluator=PrequentialEvaluator("binary_classification", ["accuracy"], 100, [0, 1]),
        drift=None,
        breaker=BadRecordBreaker(DeadLetterSettings()),
        recent=RecordWindow(100, 2, np.int64),
        window=RecordWindow(capacity, 2, np.int64),
    )


def _retrain(trainer: FullBatchTrainer, state: TrainingState) -> Any:
    state.retrain_wanted = "manual"
    assert trainer.poll_retrain(state, 0.0) is None
    assert trainer._running is not None
    trainer._running.result(timeout=60)
    return trainer.poll_retrain(state, 0.0)


def test_trainer_retrain_searches_and_keeps_the_summary(tmp_path: Path) -> None:
    settings = make_settings(trials=6, checkpoint_dir=str(tmp_path))
    model = build_model(settings)
    state = _state(model, 2000)
    assert state.window is not None
    X, y = checkerboard(2000)
    state.window.extend(X, y.astype(np.int64))
    trainer = FullBatchTrainer(settings)
    outcome = _retrain(trainer, state)
    assert outcome is not None and outcome.accepted
    search = outcome.search
    assert search is not None
    assert search["counts"]["complete"] == 6
    assert search["gate"]["accepted"] is True
    best_depth = search["best"]["params"]["learner.max_depth"]
    assert state.model.describe()["params"]["max_depth"] == best_depth
    # The candidate trained on the window minus the gate's holdout.
    assert search["train_records"] + search["validation_records"] == outcome.trained_on
    assert state.last_search is search
    assert state.model_search is search
    # The next retrain starts from the previous best.
    outcome2 = _retrain(trainer, state)
    assert outcome2.search is not None
    assert outcome2.search["trials"][0]["warm_start"] is True
    assert outcome2.search["trials"][0]["params"] == {"learner.max_depth": best_depth}


class _FailingJobSearch:
    """Stands in for JobSearch (a pure-logic test): its run raises ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.runs = 0

    def run(self, *_args: Any, **_kwargs: Any) -> Any:
        self.runs += 1
        raise self.error

    def cancel(self) -> None:
        pass


def test_a_failed_search_job_falls_back_to_the_fit_worker_instead_of_failing_the_retrain(
    tmp_path: Path,
) -> None:
    from stream_trainer.training.search.kube_jobs import KubeApiError

    settings = make_settings(trials=4, checkpoint_dir=str(tmp_path))
    state = _state(build_model(settings), 2000)
    assert state.window is not None
    X, y = checkerboard(2000)
    state.window.extend(X, y.astype(np.int64))
    trainer = FullBatchTrainer(settings)
    job = _FailingJobSearch(KubeApiError("POST /apis/batch/v1/...: 503 Service Unavailable"))
    trainer._job_search = job  # type: ignore[assignment]
    outcome = _retrain(trainer, state)
    assert job.runs == 1
    assert outcome is not None and outcome.search is not None
    assert outcome.search["counts"]["complete"] == 4  # searched here instead
    assert outcome.search["job_fallback"].startswith("KubeApiError: POST")
    assert state.retrain_running is None


def test_a_stop_during_a_search_job_is_not_a_fallback(tmp_path: Path) -> None:
    from stream_trainer.training.search.jobs import JobSearchCancelled

    settings = make_settings(trials=4, checkpoint_dir=str(tmp_path))
    state = _state(build_model(settings), 2000)
    assert state.window is not None
    X, y = checkerboard(2000)
    state.window.extend(X, y.astype(np.int64))
    trainer = FullBatchTrainer(settings)
    trainer._job_search = _FailingJobSearch(JobSearchCancelled("stopping"))  # type: ignore[assignment]
    with pytest.raises(JobSearchCancelled):
        _retrain(trainer, state)


MANIFEST: dict[str, Any] = {
    "offsets": {},
    "model_version": None,
    "config_hash": "c" * 64,
    "records_learnt": 0,
    "metrics": {},
    "extra": {},
}


def test_search_show_prints_the_last_search(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(trials=2, checkpoint_dir=str(tmp_path / "ck"))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    monkeypatch.delenv("STREAM_TRAINER_CHECKPOINT__HMAC_KEY", raising=False)
    store = CheckpointStore(tmp_path / "ck", key=None, allow_unsigned=True, keep_last=5)
    state = _state(build_model(settings), 10)

    store.write(store.serialize(state), MANIFEST)
    assert main(["search", "show", "--config", str(config)]) == 1
    assert "no search recorded" in capsys.readouterr().err

    state.last_search = {"algorithm": "tpe", "best": {"params": {"learner.max_depth": 7}}}
    store.write(store.serialize(state), MANIFEST)
    assert main(["search", "show", "--config", str(config)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["best"]["params"] == {"learner.max_depth": 7}
    assert shown["checkpoint"].endswith(str(store.list()[-1].name))


def test_search_show_without_checkpoint_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(checkpoint_dir=str(tmp_path / "none"))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    assert main(["search", "show", "--config", str(config)]) == 1
    assert "no readable checkpoint" in capsys.readouterr().err


def test_search_settings_do_not_change_the_config_hash() -> None:
    """Enabling or tuning a search keeps the model's checkpoints (and older ones)."""
    searched = make_settings(trials=5)
    other = make_settings(trials=9, algorithm="random")
    plain = make_settings(enabled=False)
    assert searched.config_hash() == other.config_hash() == plain.config_hash()
    assert make_settings(params={"max_depth": 2}).config_hash() != searched.config_hash()


def test_search_runs_in_the_fit_worker_process() -> None:
    """The worker path: the study runs in the child, a refused value fails its trial there,
    and the refit winner and a plain-data summary come back."""
    settings = make_settings(
        {
            "learner.max_depth": {"type": "int", "low": 1, "high": 10},
            "learner.criterion": {"type": "categorical", "choices": ["gini", "bogus"]},
        },
        trials=8,
        algorithm="random",
        seed=2,
    )
    X, y = checkerboard(600)
    worker = FitWorker(nice=0)
    try:
        winner, seconds, summary = worker.search(
            build_model(settings), X, y, None, spec_of(settings), None
        )
    finally:
        worker.close()
    assert seconds > 0
    assert summary["counts"]["failed"] >= 1
    assert summary["counts"]["complete"] + summary["counts"]["failed"] == 8
    failed = [t for t in summary["trials"] if t["state"] == FAILED]
    assert all(t["params"]["learner.criterion"] == "bogus" for t in failed)
    assert all("InvalidParameterError" in t["error"] for t in failed)
    best = summary["best"]
    assert winner.describe()["params"]["max_depth"] == best["params"]["learner.max_depth"]
    assert winner.is_fitted()
    json.dumps(summary)  # plain data: goes into metadata and checkpoints as is


def test_metric_trial_states_are_the_search_states() -> None:
    """metrics.py keeps its own copy (it does not import the learners)."""
    assert SEARCH_TRIAL_STATES == TRIAL_STATES


# -- parallel trials, memory cap, peak memory ------------------------------------------------


def test_workers_and_memory_limit_reach_the_spec() -> None:
    spec = spec_of(make_settings(workers=3, memory_limit_mb=256))
    assert (spec.workers, spec.memory_limit_mb, spec.pooled) == (3, 256, True)
    plain = spec_of(make_settings())
    assert (plain.workers, plain.memory_limit_mb, plain.pooled) == (1, None, False)
    assert spec_of(make_settings(memory_limit_mb=64)).pooled  # a cap never in this process
    with pytest.raises(ConfigError, match=r"training\.full_batch\.search\.workers"):
        make_settings(workers=0)
    with pytest.raises(ConfigError, match=r"training\.full_batch\.search\.memory_limit_mb"):
        make_settings(memory_limit_mb=0)


def test_parallel_search_finds_what_the_sequential_one_finds() -> None:
    """Two trials at a time (TPE with constant_liar) on the checkerboard: as good as one at a
    time, every trial run and told once, in worker processes."""
    X, y = checkerboard(2000)
    found = {}
    for workers in (1, 2):
        settings = make_settings(trials=12, algorithm="tpe", workers=workers)
        _winner, summary = run_search(build_model(settings), X, y, None, spec_of(settings))
        best = summary.best()
        assert best is not None
        found[workers] = (best.score, summary)
    (sequential, _), (parallel, summary) = found[1], found[2]
    print(f"checkerboard best accuracy: sequential {sequential:.4f}, 2 workers {parallel:.4f}")
    assert parallel >= summary.baseline_score + 0.3
    assert parallel >= sequential - 0.02
    assert [t.number for t in summary.trials] == list(range(12))
    assert summary.counts() == {COMPLETE: 12, FAILED: 0, "pruned": 0}
    # constant_liar: the trials asked while others ran are not all one depth.
    assert len({t.params["learner.max_depth"] for t in summary.trials}) >= 4
    data = summary.as_dict()
    assert data["workers"] == 2 and data["memory_limit_mb"] is None


def test_parallel_failing_trial_fails_alone_in_a_worker_process() -> None:
    settings = make_settings(
        {"learner.max_depth": {"type": "categorical", "choices": [2, 6]}},
        trials=8,
        algorithm="random",
        workers=2,
    )
    adapter: Any = FailsOnDepth(build_model(settings), bad_depth=6)
    _winner, summary = run_search(adapter, *checkerboard(400), None, spec_of(settings))
    counts = summary.counts()
    assert counts[FAILED] >= 1 and counts[COMPLETE] >= 1
    assert counts[FAILED] + counts[COMPLETE] == 8
    failed = [t for t in summary.trials if t.state == FAILED]
    assert all(t.params["learner.max_depth"] == 6 for t in failed)
    assert all(t.error is not None and "depth 6 refused" in t.error for t in failed)
    # The trials ran in the pool, not in this process.
    assert all(f"pid {os.getpid()}" not in (t.error or "") for t in failed)


def test_a_trial_that_kills_its_worker_fails_alone() -> None:
    """loky breaks the whole pool when a worker dies, failing every trial in flight: the
    innocent ones are run again alone and complete; only the killer is failed."""
    settings = make_settings(
        {"learner.max_depth": {"type": "categorical", "choices": [2, 6]}},
        trials=4,
        warm_start_trials=2,
        workers=2,
    )
    previous = _previous({6: 0.9, 2: 0.8})  # both run first, side by side
    adapter: Any = DiesOnDepth(build_model(settings), bad_depth=6)
    _winner, summary = run_search(adapter, *checkerboard(400), None, spec_of(settings), previous)
    first = summary.trials[:2]
    assert [t.params["learner.max_depth"] for t in first] == [6, 2]
    assert first[0].state == FAILED and first[0].error is not None
    assert "worker process died" in first[0].error and "TerminatedWorkerError" in first[0].error
    assert first[0].peak_memory_mb is None
    assert first[1].state == COMPLETE  # broken with the pool, run again, done
    assert all(
        t.state == (FAILED if t.params["learner.max_depth"] == 6 else COMPLETE)
        for t in summary.trials
    )
    assert len(summary.trials) == 4


def _polynomial_settings(**search: Any) -> Settings:
    """A space one point of which allocates hugely: PolynomialFeatures of degree 200 on 2
    features is 20 301 columns (130 MB for 800 rows), degree 1 is 3."""
    return make_settings(
        {"preprocessing.0.degree": {"type": "categorical", "choices": [1, 200]}},
        preprocessing=["sklearn.preprocessing.PolynomialFeatures"],
        params={"max_depth": 2, "random_state": 0},
        warm_start_trials=2,
        trials=3,
        workers=2,
        **search,
    )


def _polynomial_previous() -> dict[str, Any]:
    return {
        "direction": "maximize",
        "trials": [
            {"number": i, "params": {"preprocessing.0.degree": d}, "score": s, "state": COMPLETE}
            for i, (d, s) in enumerate([(200, 0.9), (1, 0.8)])
        ],
    }


def test_a_trial_over_its_memory_cap_fails_alone_and_the_cap_is_released() -> None:
    # Features in [0, 1): the degree-200 powers stay finite.
    X = np.random.default_rng(0).uniform(0, 1, size=(1000, 2))
    y = (X[:, 0] > X[:, 1]).astype(np.int64)
    capped = _polynomial_settings(memory_limit_mb=60)
    _winner, summary = run_search(
        build_model(capped), X, y, None, spec_of(capped), _polynomial_previous()
    )
    by_degree = {t.params["preprocessing.0.degree"]: t for t in summary.trials[:2]}
    hog, small = by_degree[200], by_degree[1]
    assert hog.state == FAILED and hog.error is not None
    assert hog.error.startswith("MemoryError: over the 60 MB cap"), hog.error
    assert small.state == COMPLETE
    assert summary.counts()[FAILED] + summary.counts()[COMPLETE] == 3
    assert summary.as_dict()["memory_limit_mb"] == 60
    # The same reused workers, no cap now: the degree-200 trial completes, so no worker
    # kept the previous trial's limit; its peak shows its ~130 MB of columns.
    free = _polynomial_settings()
    _winner, summary = run_search(
        build_model(free), X, y, None, spec_of(free), _polynomial_previous()
    )
    by_degree = {t.params["preprocessing.0.degree"]: t for t in summary.trials[:2]}
    hog, small = by_degree[200], by_degree[1]
    assert hog.state == COMPLETE, hog.error
    assert hog.peak_memory_mb is not None and small.peak_memory_mb is not None
    print(
        f"peak memory: degree 200 {hog.peak_memory_mb:.0f} MB, "
        f"degree 1 {small.peak_memory_mb:.0f} MB"
    )
    assert hog.peak_memory_mb >= small.peak_memory_mb + 100


def test_every_trial_reports_a_plausible_peak_memory() -> None:
    settings = make_settings(trials=3)
    _winner, summary = run_search(
        build_model(settings), *checkerboard(300), None, spec_of(settings)
    )
    peaks = [t.peak_memory_mb for t in summary.trials]
    # An interpreter with NumPy and scikit-learn loaded is tens of MB; this test is not GBs.
    assert all(p is not None and 30 < p < 4000 for p in peaks), peaks
    data = summary.as_dict()
    assert data["peak_memory_mb"] == round(max(p for p in peaks if p is not None), 1)
    assert all(t["peak_memory_mb"] is not None for t in data["trials"])


def test_data_limit_fails_an_allocation_over_it_and_is_released() -> None:
    with data_limit(50) as capped:
        assert capped
        with pytest.raises(MemoryError):
            np.ones(200 * 1024 * 1024 // 8)
    np.ones(200 * 1024 * 1024 // 8)  # the previous limit is back
    with data_limit(None) as capped:
        assert not capped
    assert reset_peak_memory()  # the 200 MB arrays above are gone from the new peak
    before = peak_memory_mb()
    touched = np.ones(100 * 1024 * 1024 // 8)
    assert peak_memory_mb() >= before + 90
    del touched
    reset_peak_memory()
    assert peak_memory_mb() < before + 50


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The parent pid is the 2nd field after the parenthesised command name.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_trial_workers_end_with_a_killed_fit_worker() -> None:
    """The service abandons a search by killing the fit worker (stop, shutdown): its trial
    processes must not run on as orphans."""
    settings = make_settings(trials=10_000, timeout_s=120, workers=2, algorithm="random")
    worker = FitWorker(nice=0)
    X, y = checkerboard(4000)

    def search() -> None:
        with contextlib.suppress(FitWorkerError):  # killed below, as intended
            worker.search(build_model(settings), X, y, None, spec_of(settings), None)

    searching = threading.Thread(target=search, daemon=True)
    try:
        searching.start()
        deadline = time.monotonic() + 60
        trial_workers: list[int] = []
        while len(trial_workers) < 2 and time.monotonic() < deadline:
            trial_workers = [
                p
                for p in _children(worker.pid)
                if b"LokyProcess" in (Path("/proc") / str(p) / "cmdline").read_bytes()
            ]
            time.sleep(0.1)  # polling for processes to appear: nothing to wait on
        assert len(trial_workers) == 2, "the pool never started"
    finally:
        worker.close()
    # They notice within a second on a quiet machine; nice'd workers on two loaded cores
    # (CI beside other test runs) took over 10 s once. An orphan never ends at all.
    deadline = time.monotonic() + 45
    while any(_alive(p) for p in trial_workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in trial_workers), "trial workers outlived the fit worker"
