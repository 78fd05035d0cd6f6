"""Hyperparameter search: config parsing and validation, the time-ordered split, metric
direction, failing trials, warm start, and the search inside the full-batch trainer."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from stream_trainer.checkpoint import CheckpointStore
from stream_trainer.cli import main
from stream_trainer.config import (
    ConfigError,
    DeadLetterSettings,
    Settings,
    settings_from_mapping,
)
from stream_trainer.deadletter import BadRecordBreaker
from stream_trainer.evaluation import PrequentialEvaluator
from stream_trainer.fit_worker import FitWorker
from stream_trainer.learners import IncompatibleLearner, ModelAdapter, build_model
from stream_trainer.metrics import SEARCH_TRIAL_STATES
from stream_trainer.search import (
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
from stream_trainer.state import RecordWindow, TrainingState
from stream_trainer.trainers import FullBatchTrainer

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
    from stream_trainer.kube_jobs import KubeApiError

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
    from stream_trainer.search_jobs import JobSearchCancelled

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
