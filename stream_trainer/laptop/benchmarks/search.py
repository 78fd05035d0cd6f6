"""``bench --search``: hyperparameter search trials per minute with 1 and N workers.

The search the service runs (:func:`stream_trainer.training.search.search.run_search`) on the
newest window of
the decoded workload, with the bench's full_batch model, in this process: once with
``workers: 1`` (trials one after the other in the searching process, the default) and once
with N workers (joblib's loky pool), alternating within each repeat so a noisy minute
weighs on both. The speedup is N workers' trials per minute over one worker's, per repeat.
Both use the random sampler with the same seed, so they run the same trials (TPE would
sample differently with and without trials in flight, and a deeper forest costs more).
The machine's own parallel ceiling is measured next to them: the same pure-Python CPU work
in 1 and N processes of a pool, so on a shared machine the speedup can be read against
what N processes got at that moment. The pool is started (and its workers have imported
scikit-learn) before the first timed search: its start-up is reported on its own, as a cost
paid once per idle period. Both run at this process's priority (the service runs a whole
search at the fit worker's nice value).

The search's effect on ingestion is the service stage of the same run (its retrains are
searches): ``service.full_batch.ratio``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from stream_trainer.config import Settings
from stream_trainer.laptop.benchmarks import report as rep
from stream_trainer.laptop.benchmarks.workload import InMemory
from stream_trainer.training.learners import build_model
from stream_trainer.training.search import trial_pool
from stream_trainer.training.search.search import run_search, search_spec

# The searched space of the bench's RandomForest: trials of comparable cost (depth and
# leaf size move a fit's time by a few times, not by orders).
SPACE: dict[str, dict[str, Any]] = {
    "learner.max_depth": {"type": "int", "low": 4, "high": 12},
    "learner.min_samples_leaf": {"type": "int", "low": 1, "high": 32, "log": True},
    "learner.max_features": {"type": "categorical", "choices": ["sqrt", "log2"]},
}


# The built-in config's window under --search: ~3 s per search on 2 cores beside ingestion,
# so searches finish and alternate with periods without one within the stream.
WINDOW_RECORDS = 10_000


def search_section(workers: int, trials: int) -> dict[str, Any]:
    """The ``training.full_batch.search`` config the bench's service runs."""
    return {
        "enabled": True,
        "algorithm": "tpe",
        "space": SPACE,
        "trials": trials,
        "workers": workers,
        "seed": 0,
    }


def trials_per_minute(
    data: InMemory,
    settings: Settings,
    workers: int,
    trials: int,
    repeats: int,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """Trials per minute with 1 and ``workers`` workers, their ratio per repeat, and the
    pool's start-up; ``settings`` is the service's (its model, search and window)."""
    window = settings.training.full_batch.window_records
    X, y = data.X[-window:], data.y[-window:]
    base = search_spec(settings)
    assert base is not None, "bench --search configures a search"
    # nice 0 for both: the pool's workers would otherwise take the fit worker's nice value
    # while one worker's trials run in this process at 0, and on a shared machine the
    # comparison would be of priorities, not of worker counts.
    specs = {
        n: dataclasses.replace(base, algorithm="random", workers=n, trials=trials, nice=0)
        for n in (1, workers)
    }
    model = build_model(settings)

    def rate(n: int) -> float:
        _winner, summary = run_search(model.fresh(), X, y, None, specs[n])
        # The trials' wall time: the baseline fit before them and the refit after them run
        # once, in this process, whatever the workers.
        trials_s = summary.duration_s - summary.baseline_seconds - summary.refit_seconds
        return 60.0 * len(summary.trials) / trials_s if trials_s > 0 else float("nan")

    progress(f"search: starting the {workers}-worker pool")
    began = time.perf_counter()
    run_search(model.fresh(), X[:2000], y[:2000], None, specs[workers])  # warm-up, untimed
    pool_start = time.perf_counter() - began
    rates: dict[int, list[float]] = {1: [], workers: []}
    ceilings: list[float] = []
    for repeat in range(repeats):
        for n in (1, workers) if repeat % 2 == 0 else (workers, 1):
            rates[n].append(rate(n))
            progress(f"search {repeat + 1}/{repeats}: {n} worker(s) {rates[n][-1]:.1f} trials/min")
        ceilings.append(cpu_speedup(workers))
        progress(f"search {repeat + 1}/{repeats}: CPU ceiling {ceilings[-1]:.2f}x")
    speedups = [rep.ratio(b, a) for a, b in zip(rates[1], rates[workers], strict=True)]
    return {
        "workers": workers,
        "trials_per_search": trials,
        "window_records": len(y),
        "trials_per_minute": {str(n): rep.spread(r) for n, r in rates.items()},
        "speedup": rep.spread(speedups),
        "cpu_speedup_ceiling": rep.spread(ceilings),
        "speedup_vs_ceiling": rep.spread(
            [rep.ratio(s, c) for s, c in zip(speedups, ceilings, strict=True)]
        ),
        "pool_start_s": pool_start,
    }


def _burn(size: float) -> float:
    """Pure-Python CPU work proportional to ``size``; returns its wall seconds."""
    started = time.perf_counter()
    total = 0
    for i in range(int(size * 20_000_000)):
        total += i * i
    return time.perf_counter() - started


def cpu_speedup(workers: int, tasks_per_worker: int = 2, size: float = 0.1) -> float:
    """The machine's parallel ceiling now: ``workers * tasks_per_worker`` equal CPU tasks
    in this process, then in ``workers`` processes of a loky pool (started beforehand)."""
    tasks = [size] * (workers * tasks_per_worker)
    # The search's own pool: another configuration would make loky restart it, and the next
    # timed search would pay that start.
    pool = trial_pool.pool(workers, nice=0)
    list(pool.map(_burn, [0.001] * workers))  # started, warm
    began = time.perf_counter()
    for task in tasks:
        _burn(task)
    alone = time.perf_counter() - began
    began = time.perf_counter()
    list(pool.map(_burn, tasks))
    return alone / (time.perf_counter() - began)
