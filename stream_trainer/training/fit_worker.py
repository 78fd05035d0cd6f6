"""Full-batch fits in a child process, at a lower CPU priority than ingestion.

A fit on a thread of the service holds the GIL for whatever part of it runs in Python: a
River model refit by replaying ``learn_one`` holds it throughout, and ingestion during such a
retrain measured 0.35 of ingestion without one (0.88 in the worker; HoeffdingTree, Tansu, 2
cores). In a child process the fit holds no lock the poll loop needs, and its nice value lets
the kernel give the poll loop and the decode worker the CPU first: a retrain takes longer,
ingestion keeps up with the topic.

The child runs in a session of its own (a Ctrl-C in a terminal must not reach it). With the
kernel's autogroup scheduling on (``/proc/sys/kernel/sched_autogroup_enabled``, the default
of most distributions), CPU time is divided between sessions first and by nice value only
within one, so a process's nice value alone does nothing against another session: the worker
also gives its session's group the same nice value. Ingestion during a retrain measured 0.72
of ingestion without one before that, 0.88 after (RandomForest, Tansu, 2 vCPUs).

Contract: ``FitWorker.fit`` blocks its caller (the trainer's retrain thread) and returns the
fitted candidate, or raises :class:`FitWorkerError` (the estimator raised, or the child
died). ``close`` abandons a fit in progress by killing the child.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING, Any

from stream_trainer.operations.child_process import (
    OK,
    ChildWorker,
    WorkerDied,
    ignore_stop_signals,
    protocol_streams,
    read_frame,
    serve,
    write_frame,
)
from stream_trainer.operations.memory import release_free_memory
from stream_trainer.training.search.search import run_search

if TYPE_CHECKING:
    import numpy as np

    from stream_trainer.training.learners import ModelAdapter
    from stream_trainer.training.search.search import SearchSpec

log = logging.getLogger(__name__)

AUTOGROUP = "/proc/self/autogroup"
# The kernel accepts a change of any autogroup's nice value at most every 100 ms (machine-
# wide, for unprivileged writers) and answers EAGAIN in between.
AUTOGROUP_ATTEMPTS = 20
AUTOGROUP_RETRY_S = 0.11


class FitWorkerError(WorkerDied):
    """The fit failed in the worker (the message has its traceback) or the worker died."""


class FitWorker:
    """A persistent ``python -m stream_trainer.training.fit_worker`` child running at ``nice``."""

    def __init__(self, nice: int, preload: Sequence[str] = ()) -> None:
        """``preload``: modules the child imports at start (the estimator's), so the first
        retrain does not wait for them and the child's memory is steady from the start."""
        self._child = ChildWorker(
            "stream_trainer.training.fit_worker", "fit worker", error=FitWorkerError
        )
        setup = (nice, list(preload))
        self._child.send(lambda stream: write_frame(stream, setup))
        self._lock = threading.Lock()  # one fit at a time; the frames must not interleave
        self._priority_reported = False

    @property
    def pid(self) -> int:
        """The worker's process id."""
        return self._child.pid

    def fit(
        self, candidate: ModelAdapter, X: np.ndarray, y: np.ndarray, weights: np.ndarray | None
    ) -> tuple[ModelAdapter, float]:
        """The fitted ``candidate`` and the seconds the fit took in the worker."""
        fitted, seconds, _summary = self._run((candidate, X, y, weights, None))
        return fitted, seconds

    def search(
        self,
        candidate: ModelAdapter,
        X: np.ndarray,
        y: np.ndarray,
        weights: np.ndarray | None,
        spec: SearchSpec,
        previous: dict[str, Any] | None,
    ) -> tuple[ModelAdapter, float, dict[str, Any]]:
        """:func:`~stream_trainer.training.search.search.run_search` in the worker: the refit
        winner, the
        search's seconds and its summary (``SearchSummary.as_dict``)."""
        fitted, seconds, summary = self._run((candidate, X, y, weights, (spec, previous)))
        assert summary is not None
        return fitted, seconds, summary

    def _run(self, job: tuple[Any, ...]) -> tuple[ModelAdapter, float, dict[str, Any] | None]:
        with self._lock:
            self._child.send(lambda stream: write_frame(stream, job))
            status, body = self._child.receive()
        if status != OK:
            raise self._child.died(f"the fit raised:\n{body}")
        fitted, seconds, priority_problem, summary = body
        if priority_problem is not None and not self._priority_reported:
            self._priority_reported = True
            log.warning(
                "the fit worker's session keeps normal CPU priority; ingestion may slow "
                "during retrains",
                extra={"reason": priority_problem, "pid": self.pid},
            )
        return fitted, seconds, summary

    def close(self) -> None:
        """Stop the worker now, abandoning any fit in progress. Idempotent."""
        self._child.close(timeout_s=5.0, kill=True)


def lower_session_priority(nice: int, path: str = AUTOGROUP) -> str | None:
    """Give the calling process's autogroup (its session) the nice value ``nice`` (the
    process's own, so the group never ranks above it).

    Returns None when done or when the kernel has no autogroups (the nice value of the
    process then applies across sessions), else why it could not be done."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except FileNotFoundError:
        return None
    except OSError as error:
        return f"{path}: {error.strerror}"
    try:
        for _ in range(AUTOGROUP_ATTEMPTS):
            try:
                os.write(fd, f"{nice}\n".encode())
                return None
            except BlockingIOError:  # EAGAIN: the kernel's rate limit; nothing to wait on
                time.sleep(AUTOGROUP_RETRY_S)
            except OSError as error:
                return f"{path}: {error.strerror}"
    finally:
        os.close(fd)
    return f"{path}: the kernel kept refusing (EAGAIN) for {AUTOGROUP_ATTEMPTS} attempts"


def worker_main(stdin: IO[bytes], stdout: IO[bytes]) -> int:
    """The child's loop: first frame (nice value, modules to preload), then (candidate, X, y,
    weights, search) jobs, search None (one fit) or (SearchSpec, previous summary), each
    answered with (fitted candidate, seconds, why the worker could not lower its priority or
    None, the search summary or None)."""
    ignore_stop_signals()
    try:
        nice, preload = read_frame(stdin)
    except EOFError:
        return 0
    priority_problem: str | None = None
    if nice:
        priority_problem = lower_session_priority(os.nice(nice))
    importlib.import_module("stream_trainer.training.learners")
    for module in preload:
        with contextlib.suppress(ImportError):  # the parent imported it; a failure shows later
            importlib.import_module(module)

    def fit(job: tuple[Any, ...]) -> Any:
        candidate, X, y, weights, search = job
        started = time.perf_counter()
        summary = None
        if search is None:
            candidate.fit(X, y, weights)
        else:
            spec, previous = search
            candidate, found = run_search(candidate, X, y, weights, spec, previous)
            summary = found.as_dict()
        seconds = time.perf_counter() - started
        release_free_memory()  # the fit's working set, so the idle worker stays small
        return candidate, seconds, priority_problem, summary

    return serve(stdin, stdout, read_frame, fit)


if __name__ == "__main__":
    sys.exit(worker_main(*protocol_streams()))
