"""The fit worker: a real, niced child process fits exactly what an in-process fit gives."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stream_trainer.training.fit_worker import FitWorker, FitWorkerError, lower_session_priority
from stream_trainer.training.learners import build_model
from tests.unit.test_learners import make_settings

FOREST = "sklearn.ensemble.RandomForestClassifier"


def data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4))
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(np.int64)
    return X, y


@pytest.fixture
def worker() -> Iterator[FitWorker]:
    fit_worker = FitWorker(nice=7)
    yield fit_worker
    fit_worker.close()


def forest(**params: Any) -> Any:
    settings = make_settings(FOREST, params={"random_state": 3, **params}, mode="full_batch")
    return build_model(settings)


def test_worker_fits_exactly_like_an_in_process_fit(worker: FitWorker) -> None:
    X, y = data(2000)
    weights = np.linspace(0.5, 2.0, len(y))
    probe, _ = data(50, seed=1)
    local = forest(n_estimators=7)
    local.fit(X, y, weights)
    remote, seconds = worker.fit(forest(n_estimators=7), X, y, weights)
    assert remote.is_fitted() and seconds > 0
    np.testing.assert_array_equal(remote.predict_many(probe)[1], local.predict_many(probe)[1])
    # The worker is persistent: a second job on the same child works too.
    again, _ = worker.fit(forest(n_estimators=7), X, y, weights)
    np.testing.assert_array_equal(again.predict_many(probe)[1], local.predict_many(probe)[1])


def test_worker_runs_at_its_nice_value(worker: FitWorker) -> None:
    X, y = data(200)
    worker.fit(forest(n_estimators=2), X, y, None)  # the nice value is set before any job
    assert os.getpriority(os.PRIO_PROCESS, worker.pid) == os.getpriority(os.PRIO_PROCESS, 0) + 7


def test_worker_gives_its_own_session_the_same_nice_value(worker: FitWorker) -> None:
    # With autogroup scheduling, CPU is shared between sessions before nice values count:
    # a niced process alone in its session would still get an equal share against the
    # service. This is what made ingestion slow during retrains.
    if not Path("/proc/self/autogroup").exists():
        pytest.skip("this kernel has no autogroup scheduling: the process nice value suffices")
    X, y = data(200)
    worker.fit(forest(n_estimators=2), X, y, None)
    group, _, group_nice = Path(f"/proc/{worker.pid}/autogroup").read_text().split()
    # A process still in the root task group (one whose session descends from init without
    # a setsid, as CI's runner does) reads an empty file: that is not the worker's group.
    own_group = (Path("/proc/self/autogroup").read_text().split() or ["root"])[0]
    assert group != own_group  # the worker's own session (Ctrl-C isolation)
    assert int(group_nice) == os.getpriority(os.PRIO_PROCESS, worker.pid)


def test_session_priority_reports_why_it_could_not_be_set(tmp_path: Path) -> None:
    assert lower_session_priority(5, str(tmp_path / "absent")) is None  # no autogroups: fine
    unwritable = tmp_path / "autogroup"
    unwritable.mkdir()  # a directory refuses writes even to root
    problem = lower_session_priority(5, str(unwritable))
    assert problem is not None and str(unwritable) in problem and "directory" in problem


def test_estimator_printing_to_stdout_does_not_corrupt_the_frames(worker: FitWorker) -> None:
    settings = make_settings(
        "sklearn.linear_model.SGDClassifier",
        params={"verbose": 1, "random_state": 0, "max_iter": 5, "tol": None},
        mode="full_batch",
    )
    X, y = data(500)
    fitted, _ = worker.fit(build_model(settings), X, y, None)
    assert fitted.is_fitted()


def test_failing_fit_raises_with_the_estimators_traceback(worker: FitWorker) -> None:
    settings = make_settings("sklearn.linear_model.LogisticRegression", mode="full_batch")
    X, _ = data(100)
    with pytest.raises(FitWorkerError, match=r"(?s)fit worker \(pid \d+.*the fit raised.*class"):
        worker.fit(build_model(settings), X, np.zeros(100, dtype=np.int64), None)
    # A failed fit leaves the worker usable.
    fitted, _ = worker.fit(forest(n_estimators=2), *data(200), None)
    assert fitted.is_fitted()


def test_close_abandons_a_fit_in_progress() -> None:
    fit_worker = FitWorker(nice=0)
    X, y = data(200_000)
    errors: list[BaseException] = []
    sent = threading.Event()

    def fit() -> None:
        sent.set()
        try:
            fit_worker.fit(forest(n_estimators=200), X, y, None)  # minutes of work
        except FitWorkerError as error:
            errors.append(error)

    thread = threading.Thread(target=fit)
    thread.start()
    assert sent.wait(10)
    fit_worker.close()
    thread.join(30)
    assert not thread.is_alive(), "the fitting thread must return once the worker is killed"
    assert len(errors) == 1, errors
    fit_worker.close()  # idempotent


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/maps")
def test_preloaded_modules_are_imported_before_the_first_job() -> None:
    fit_worker = FitWorker(nice=0, preload=["sklearn.ensemble"])
    maps = Path(f"/proc/{fit_worker.pid}/maps")
    try:
        deadline = time.monotonic() + 60
        while "sklearn/tree/_tree" not in maps.read_text():
            assert time.monotonic() < deadline, "the child never imported sklearn.ensemble"
            time.sleep(0.05)  # polling another process's state: there is no event to wait on
    finally:
        fit_worker.close()
