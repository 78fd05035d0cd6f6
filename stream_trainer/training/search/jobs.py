"""A retrain's search run as a Kubernetes Indexed Job: the service side.

On the retrain thread, :meth:`JobSearch.run` writes the window once as a signed snapshot,
creates the study in the shared database, creates the Job from the chart's template (its
pods run ``stream-trainer search worker``), waits until the study's budget is used (or the
Job failed, or ``wait_timeout_s``), deletes the Job, and refits the best trial's params on
the whole window with the caller's fit (the niced fit worker): the winner then goes through
the promotion gate like any retrain's candidate.

Why the service creates the Job rather than the chart running a CronJob: retrains are fired
by record counts, time, drift and manual requests, which only the service sees, and each
search trains on the window of that moment; a schedule could neither follow the triggers
nor know which window to read.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from stream_trainer.training.search.kube_jobs import (
    FAILED,
    SUCCEEDED,
    KubeApi,
    KubeApiError,
    in_cluster_url,
    job_manifest,
    job_name,
    job_state,
    namespace_of_pod,
)
from stream_trainer.training.search.search import SearchFailed, validation_start, warm_start_params
from stream_trainer.training.search.snapshot import Snapshot, write_snapshot
from stream_trainer.training.search.study import (
    TRIAL_WORKER,
    create_study,
    database_url,
    fail_orphans,
    finished,
    load_study,
    summary_from_study,
)

if TYPE_CHECKING:
    import numpy as np

    from stream_trainer.config import SearchJobsSettings
    from stream_trainer.training.learners import ModelAdapter
    from stream_trainer.training.search.search import SearchSpec

log = logging.getLogger(__name__)

# fit(candidate, X, y, weights) -> (fitted, seconds): the fit worker's, or an in-process one.
Refit = Callable[["ModelAdapter", "np.ndarray", "np.ndarray", "np.ndarray | None"], Any]


class JobSearchCancelled(SearchFailed):
    """The service is stopping: the Job was deleted and the retrain abandoned."""


@dataclass
class JobSearch:
    """Runs searches as Jobs; one per full-batch trainer. ``cancel`` is thread-safe."""

    api: KubeApi
    template_file: Path
    snapshot_dir: Path
    parallelism: int
    wait_timeout_s: float
    poll_interval_s: float
    key: bytes
    prefix: str = "stream-trainer-search"
    environ: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        self._cancelled = threading.Event()

    @classmethod
    def from_settings(cls, cfg: SearchJobsSettings, key: bytes | None, model: str) -> JobSearch:
        """From ``training.full_batch.search.jobs`` and the checkpoint key (required)."""
        if not key:
            raise SearchFailed("search jobs sign their snapshot: a checkpoint HMAC key is needed")
        api = KubeApi(
            url=cfg.api_server or in_cluster_url(),
            namespace=cfg.namespace or namespace_of_pod(),
            token_file=cfg.token_file,
            ca_file=cfg.ca_file,
        )
        return cls(
            api=api,
            template_file=cfg.job_template,
            snapshot_dir=cfg.snapshot_dir,
            parallelism=cfg.parallelism,
            wait_timeout_s=cfg.wait_timeout_s,
            poll_interval_s=cfg.poll_interval_s,
            key=key,
            prefix=f"{model}-search",
        )

    def cancel(self) -> None:
        """Stop waiting: the running search deletes its Job and raises JobSearchCancelled."""
        self._cancelled.set()

    def template(self) -> dict[str, Any]:
        """The chart's Job template (read at every search: a chart upgrade may change it)."""
        try:
            loaded = yaml.safe_load(self.template_file.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as error:
            raise SearchFailed(f"search Job template {self.template_file}: {error}") from error
        if not isinstance(loaded, dict):
            raise SearchFailed(f"search Job template {self.template_file} is not a mapping")
        return loaded

    def run(
        self,
        candidate: ModelAdapter,
        X: np.ndarray,
        y: np.ndarray,
        weights: np.ndarray | None,
        spec: SearchSpec,
        previous: Mapping[str, Any] | None,
        refit: Refit,
        clock: Callable[[], float] = time.monotonic,
    ) -> tuple[ModelAdapter, float, dict[str, Any]]:
        """The refit winner, the search's seconds and its summary (``SearchSummary.as_dict``
        plus ``job``). Raises SearchFailed (no trial completed, timeout, cancelled) or
        KubeApiError / StudyError / SnapshotError."""
        started = clock()
        start = validation_start(len(y), spec.validation_fraction)
        w_train = None if weights is None else weights[:start]
        snapshot = Snapshot(
            candidate, (X[:start], y[:start], w_train), (X[start:], y[start:]), spec
        )
        path = write_snapshot(self.snapshot_dir, snapshot, self.key)
        sha256 = path.name[len("window-") : -len(".snap")]
        name = job_name(self.prefix, f"{sha256[:10]}-{int(time.time()):x}")
        url = database_url(self.environ)
        try:
            create_study(url, name, spec, sha256, warm_start_params(previous, spec))
            manifest = job_manifest(self.template(), name, name, path, self.parallelism)
            self.api.create_job(manifest)
            log.info(
                "search job created",
                extra={"job": name, "parallelism": self.parallelism, "snapshot": sha256},
            )
            try:
                outcome = self._wait(url, name, started, clock)
            finally:
                with contextlib.suppress(KubeApiError):  # best effort: its TTL removes it too
                    self.api.delete_job(name)
        finally:
            with contextlib.suppress(OSError):
                path.unlink()
        study = load_study(url, name)
        summary = summary_from_study(study, snapshot, duration_s=0.0)
        best = summary.best()
        if best is None:
            counts = summary.counts()
            raise SearchFailed(
                f"search job {name} ({outcome}): no trial of {len(summary.trials)} completed "
                f"({counts})"
            )
        refit_started = clock()
        winner, _seconds = refit(candidate.with_params(best.params), X, y, weights)
        summary.refit_seconds = clock() - refit_started
        summary.duration_s = clock() - started
        result = summary.as_dict()
        workers = Counter(
            str(t.user_attrs.get(TRIAL_WORKER))
            for t in study.get_trials(deepcopy=False)
            if t.state.is_finished()
        )
        result["job"] = {
            "name": name,
            "study": name,
            "outcome": outcome,
            "parallelism": self.parallelism,
            "snapshot_sha256": sha256,
            "trials_by_worker": dict(sorted(workers.items())),
        }
        return winner, summary.duration_s, result

    def _wait(self, url: str, name: str, started: float, clock: Callable[[], float]) -> str:
        """Until the study is finished: ``finished``; or the Job ended first (its orphaned
        running trials are failed): ``job succeeded`` / ``job failed``. Raises SearchFailed
        on timeout or cancel."""
        study = load_study(url, name)
        while True:
            if finished(study):
                return "finished"
            state = job_state(self.api.get_job(name))
            if state in (SUCCEEDED, FAILED):
                orphans = fail_orphans(study)
                if state == FAILED or orphans:
                    log.warning(
                        "search job ended before its study",
                        extra={"job": name, "state": state, "orphaned_trials": orphans},
                    )
                return f"job {state}"
            if clock() - started > self.wait_timeout_s:
                raise SearchFailed(
                    f"search job {name}: the study did not finish within {self.wait_timeout_s} s"
                )
            if self._cancelled.wait(self.poll_interval_s):
                raise JobSearchCancelled(f"search job {name}: cancelled (the service stops)")
