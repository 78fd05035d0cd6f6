"""Search trials in joblib worker processes: several at once, each under its memory cap.

The pool is joblib's reusable loky executor, started by the process that runs the search
(the fit worker by default, so the trial processes inherit its nice value and session and
ingestion keeps its core). ``spec.workers`` trials are in flight at a time; when one ends it
is told to the study and the next is asked (ask/tell, several trials pending: TPE uses
``constant_liar``), so a slow trial never holds the others back as a batch would.

A trial fails alone:

- it raises, or allocates past ``memory_limit_mb`` (``MemoryError`` under the worker's
  ``RLIMIT_DATA``, see :func:`stream_trainer.training.search.search.measured_trial`): recorded by
  the worker
  like any failure, the worker goes on;
- it kills its worker process (a crash in C code, the kernel's OOM killer): loky then breaks
  the whole pool and every trial in flight fails with it, the guilty and the innocent alike.
  Each of them is therefore run again, alone in a fresh pool; only a trial that breaks the
  pool while alone is recorded as failed.

Contract: :func:`run_pooled` returns when the budget is spent and every trial asked has been
told; it raises only for the pool's own failures (it cannot start processes).
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from joblib.externals.loky import get_reusable_executor
from joblib.externals.loky.process_executor import BrokenProcessPool

from stream_trainer.training.search.search import TrialOutcome, measured_trial

if TYPE_CHECKING:
    import numpy as np
    import optuna

    from stream_trainer.training.learners import ModelAdapter
    from stream_trainer.training.search.search import SearchSpec

# An idle trial worker exits after this long: the pool outlives one search for the next
# one's sake (a worker takes ~1 s to start and import scikit-learn), but no longer.
IDLE_TIMEOUT_S = 60
# How often a trial worker checks that the process that started it is alive.
PARENT_CHECK_S = 1.0
_THREAD_LIMITS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass
class _Pending:
    trial: optuna.Trial
    params: dict[str, Any]
    alone: bool = False  # run again by itself after the pool broke with it in flight
    executor: Any = None  # the pool it was submitted to


def run_pooled(
    candidate: ModelAdapter,
    train: tuple[np.ndarray, np.ndarray, np.ndarray | None],
    validation: tuple[np.ndarray, np.ndarray],
    spec: SearchSpec,
    ask: Callable[[], tuple[optuna.Trial, dict[str, Any]]],
    tell: Callable[[optuna.Trial, dict[str, Any], TrialOutcome], None],
    budget_left: Callable[[int], bool],
) -> None:
    """Run trials from ``ask`` in ``spec.workers`` processes until ``budget_left(asked)``
    says stop, handing each one's outcome to ``tell`` (in the calling thread)."""
    in_flight: dict[Future[TrialOutcome], _Pending] = {}
    suspects: deque[_Pending] = deque()
    asked = 0

    def submit(pending: _Pending) -> None:
        executor = pending.executor = pool(spec.workers, spec.nice)  # new after a break
        future = executor.submit(measured_trial, candidate, pending.params, train, validation, spec)
        in_flight[future] = pending

    while True:
        if suspects:
            if not in_flight:
                suspect = suspects.popleft()
                suspect.alone = True
                submit(suspect)
        else:
            while len(in_flight) < spec.workers and budget_left(asked):
                trial, params = ask()
                asked += 1
                submit(_Pending(trial, params))
        if not in_flight:
            return
        done, _running = wait(in_flight, return_when=FIRST_COMPLETED)
        for future in done:
            pending = in_flight.pop(future)
            try:
                outcome = future.result()
            except BrokenProcessPool as broken:  # TerminatedWorkerError among them
                # Wait for the broken pool's teardown (its workers killed) before the next
                # submit, so that submit gets a fresh pool and never races the old one's.
                pending.executor.shutdown(wait=True, kill_workers=True)
                if not pending.alone:
                    suspects.append(pending)
                    continue
                outcome = TrialOutcome(
                    float("nan"),
                    f"the trial's worker process died: {type(broken).__name__}: "
                    f"{str(broken)[:300]}",
                    0.0,
                    None,
                )
            tell(pending.trial, pending.params, outcome)


def pool(workers: int, nice: int) -> Any:
    """joblib's process-wide loky pool of ``workers`` trial processes at ``nice`` or lower
    priority (restarted if broken; a call with other arguments restarts it too)."""
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    # Native thread pools sized for the whole machine in each of several workers would
    # oversubscribe the cores, as joblib.Parallel avoids for its own workers.
    return get_reusable_executor(
        max_workers=workers,
        timeout=IDLE_TIMEOUT_S,
        env=dict.fromkeys(_THREAD_LIMITS, threads),
        initializer=_prepare_worker,
        initargs=(nice, os.getpid()),
    )


def _prepare_worker(nice: int, parent: int) -> None:
    """At a worker's start: take at least the fit worker's nice value (a pool started
    by the service's own thread would otherwise compete with ingestion at nice 0), and exit
    when ``parent`` goes (a killed fit worker's trials must not run on, orphaned: loky
    workers only notice when they next read their queue)."""
    if os.getpriority(os.PRIO_PROCESS, 0) < nice:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    threading.Thread(
        target=_exit_with_parent, args=(parent,), name="parent-watch", daemon=True
    ).start()


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os._exit(1)
