"""The service itself: ``stream-trainer run`` as a subprocess (the production code path,
launched by :class:`~stream_trainer.laptop.service_process.ServiceProcess`), observed
through /metrics and /proc until it has learnt every record, then stopped.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stream_trainer.errors import StreamTrainerError
from stream_trainer.laptop.benchmarks.profiling import Profiler
from stream_trainer.laptop.service_process import ServiceProcess, ServiceProcessError
from stream_trainer.state.checkpoint import CheckpointStore
from stream_trainer.state.objectstore import is_store_url

P = "stream_trainer"
LEARNT = f"{P}_records_learnt_total"
RETRAINING = f'{P}_state{{{P}_state="retraining"}}'
STOP_TIMEOUT_S = 60.0  # the graceful stop: drain, final checkpoint, commit


class ServiceFailed(StreamTrainerError):
    """The service exited early or did not learn every record in time; has the log tail."""


@dataclass
class Sample:
    """One observation of the running service."""

    t: float  # perf_counter seconds
    learnt: float
    rss: float  # bytes (VmRSS), NaN if unknown
    retraining: bool


@dataclass
class ServiceRun:
    """Timeline and final metrics of one service run."""

    total: int
    started: float
    samples: list[Sample] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
    peak_rss: float = math.nan
    exit_code: int | None = None
    checkpoint_files: list[int] = field(default_factory=list)  # sizes, oldest first
    profile: Path | None = None  # py-spy's raw stacks, when profiled

    def rate(self) -> float:
        """records/s between the first and last samples taken while learning (both ends
        inside the run). With fewer than two such samples (a tiny run), a lower bound: the
        last sample before learning to the first after it."""
        inside = [s for s in self.samples if 0 < s.learnt < self.total]
        if len(inside) >= 2 and inside[-1].t > inside[0].t:
            a, b = inside[0], inside[-1]
        else:
            before = [s for s in self.samples if s.learnt <= 0]
            after = [s for s in self.samples if s.learnt >= self.total]
            if not before or not after:
                return 0.0
            a, b = (inside[0] if inside else before[-1]), after[0]
        return (b.learnt - a.learnt) / (b.t - a.t) if b.t > a.t else 0.0

    def startup_s(self) -> float:
        """Process start to the first observed learnt record."""
        first = next((s for s in self.samples if s.learnt > 0), None)
        return first.t - self.started if first is not None else math.nan

    def rss(self, warmup_fraction: float = 0.1) -> dict[str, float]:
        """Peak RSS, RSS after warm-up, RSS at the end, and the growth between the last two
        in percent. Warm-up ends at the first sample past ``warmup_fraction`` of the records
        and, if the run retrained, after the first retrain finished: a fit allocates its
        working set (in the fit worker and for the candidate) once, at its first run, and
        that step is not growth. ``warm_learnt`` says where warm-up ended."""
        known = [s for s in self.samples if not math.isnan(s.rss)]
        floor = warmup_fraction * self.total
        first_fit = next((i for i, s in enumerate(known) if s.retraining), None)
        if first_fit is not None:
            after = next((s for s in known[first_fit:] if not s.retraining), None)
            floor = max(floor, after.learnt if after is not None else math.inf)
        warm = next((s for s in known if s.learnt >= floor), None)
        end = known[-1] if known else None
        out = {
            "peak_bytes": self.peak_rss,
            "warm_bytes": math.nan,
            "end_bytes": math.nan,
            "growth_pct": math.nan,
            "warm_learnt": math.nan,
        }
        if warm is not None and end is not None:
            out.update(
                {
                    "warm_bytes": warm.rss,
                    "end_bytes": end.rss,
                    "warm_learnt": warm.learnt,
                    "growth_pct": 100.0 * (end.rss - warm.rss) / warm.rss,
                }
            )
        return out

    def checkpoints(self) -> dict[str, float]:
        """Count, mean, p50 / p99 (bucket-interpolated, like histogram_quantile) and size."""
        name = f"{P}_checkpoint_duration_seconds"
        count = self.final.get(f"{name}_count", 0.0)
        buckets = sorted(
            (float(key.split('le="')[1].rstrip('"}')), value)
            for key, value in self.final.items()
            if key.startswith(f"{name}_bucket{{")
        )
        return {
            "count": count,
            "mean_s": self.final.get(f"{name}_sum", 0.0) / count if count else math.nan,
            "p50_s": quantile(0.5, buckets),
            "p99_s": quantile(0.99, buckets),
            "size_bytes": self.final.get(f"{P}_checkpoint_size_bytes", math.nan),
            # After the graceful stop (which writes a final checkpoint): kept files.
            "files_after_stop": float(len(self.checkpoint_files)),
            "newest_file_bytes": float(self.checkpoint_files[-1])
            if self.checkpoint_files
            else math.nan,
        }

    def _seconds_in(self, histogram: str) -> float:
        """The service's final ``<histogram>_seconds_sum`` (0 when it never observed)."""
        return self.final.get(f"{P}_{histogram}_seconds_sum", 0.0)

    def learn_loop_rate(self) -> float:
        """Records/s of the trainer's own loop inside the service: records learnt over the
        seconds its predict + learn histograms add up to. Set beside the learner ceiling
        (the same calls, alone in the bench process), it splits service / learner ceiling
        into how fast the learner runs in the service and how much else the loop does."""
        seconds = self._seconds_in("learn_duration") + self._seconds_in("predict_duration")
        learnt = self.final.get(LEARNT, 0.0)
        return learnt / seconds if seconds > 0 and learnt > 0 else math.nan

    def time_shares(self) -> dict[str, float]:
        """Fractions of the run's wall time in learn, predict and waiting for the decode
        worker (the service's histograms); ``other`` is consume, scoring, dead letters,
        metrics and checkpoint snapshots (and decoding itself without a worker)."""
        rate = self.rate()
        if rate <= 0:
            return {}
        wall = self.total / rate
        learn = self._seconds_in("learn_duration") / wall
        predict = self._seconds_in("predict_duration") / wall
        wait = self._seconds_in("decode_wait") / wall
        other = max(0.0, 1.0 - learn - predict - wait)
        return {"learn": learn, "predict": predict, "decode_wait": wait, "other": other}

    def full_batch(self) -> dict[str, float]:
        """Ingestion rate between samples both taken while retraining vs both while not,
        from the end of the first retrain on. Before it there is no model, so the loop
        predicts nothing and runs faster whatever a fit does: like must be compared with like
        (that period's rate is reported as ``rate_before_first_model``)."""
        first = next((i for i, s in enumerate(self.samples) if s.retraining), len(self.samples))
        start = next(
            (i for i in range(first, len(self.samples)) if not self.samples[i].retraining),
            len(self.samples),
        )
        sums = {True: [0.0, 0.0], False: [0.0, 0.0]}
        before = [0.0, 0.0]
        for k, (a, b) in enumerate(zip(self.samples, self.samples[1:], strict=False)):
            if a.learnt <= 0 or b.learnt >= self.total or a.retraining != b.retraining:
                continue
            if first <= k < start:
                continue  # the first retrain: no model to predict with yet either
            bucket = before if k < first else sums[a.retraining]
            bucket[0] += b.learnt - a.learnt
            bucket[1] += b.t - a.t
        during = sums[True][0] / sums[True][1] if sums[True][1] else math.nan
        without = sums[False][0] / sums[False][1] if sums[False][1] else math.nan
        before_rate = before[0] / before[1] if before[1] else math.nan
        retrains = sum(v for k, v in self.final.items() if k.startswith(f"{P}_retrains_total"))
        rebalances = sum(
            v
            for k, v in self.final.items()
            if k.startswith(f"{P}_rebalances_total") and 'kind="assign"' not in k
        )
        return {
            "rate_during_retrain": during,
            "rate_without_retrain": without,
            "rate_before_first_model": before_rate,
            "ratio": during / without if without else math.nan,
            "seconds_retraining": sums[True][1],
            "retrains": retrains,
            "revokes_or_losses": rebalances,
        }


def quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """The ``q`` quantile of cumulative ``(le, count)`` buckets, interpolated within its
    bucket like PromQL's ``histogram_quantile``; NaN without observations."""
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            span = count - lower_count
            fraction = (rank - lower_count) / span if span else 1.0
            return lower_bound + (bound - lower_bound) * fraction
        lower_bound, lower_count = bound, count
    return math.nan


def process_memory(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in bytes of one process from /proc; NaN where unavailable."""
    values = {"VmRSS:": math.nan, "VmHWM:": math.nan}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            parts = line.split()
            if parts and parts[0] in values:
                values[parts[0]] = float(parts[1]) * 1024
    except OSError:
        pass
    return values["VmRSS:"], values["VmHWM:"]


def _proc_status(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in bytes of ``pid`` plus its children (the decode worker); NaN where
    unavailable (not Linux). The peak is the sum of each one's peak."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    members = [process_memory(member) for member in [pid, *map(int, children)]]
    rss = math.fsum(r for r, _ in members if not math.isnan(r))
    hwm = math.fsum(h for _, h in members if not math.isnan(h))
    known = not math.isnan(members[0][0])
    return (rss, hwm) if known else (math.nan, math.nan)


def run_service_process(
    config: dict[str, Any],
    workdir: Path,
    total: int,
    *,
    env: dict[str, str],
    port: int,
    timeout_s: float,
    interval_s: float = 0.25,
    profile_to: Path | None = None,
) -> ServiceRun:
    """Start ``stream-trainer run`` on ``config``, sample until ``total`` records are learnt,
    then SIGTERM it (graceful stop). Raises ServiceFailed with the log tail.

    With ``profile_to``, py-spy samples the service from the moment its /metrics answers
    (the interpreter is up) until every record is learnt, into that file (ProfilerError if
    it cannot); the graceful stop is not profiled."""
    config_path = workdir / "service.yaml"
    config_path.write_text(yaml.safe_dump(config))
    service = ServiceProcess(
        config_path, port=port, log_path=workdir / "service.log", workdir=workdir, env=env
    ).start()
    run = ServiceRun(total, time.perf_counter())
    deadline = time.monotonic() + timeout_s
    profiler: Profiler | None = None
    try:
        while True:
            if not service.alive():
                raise ServiceFailed(
                    f"service exited with {service.returncode}:\n{service.tail(30)}"
                )
            metrics = service.scrape() or {}
            if profile_to is not None and profiler is None and metrics:
                profiler = Profiler.attach(service.pid, profile_to)
            rss, hwm = _proc_status(service.pid)
            if math.isnan(rss):
                rss = metrics.get("process_resident_memory_bytes", math.nan)
            learnt = metrics.get(LEARNT, 0.0)
            run.samples.append(
                Sample(time.perf_counter(), learnt, rss, metrics.get(RETRAINING, 0.0) == 1.0)
            )
            run.peak_rss = hwm if not math.isnan(hwm) else max(run.peak_rss, rss)
            if learnt >= total:
                run.final = metrics
                if profiler is not None:
                    run.profile = profiler.stop()
                break
            if time.monotonic() > deadline:
                raise ServiceFailed(
                    f"learnt {learnt:.0f} of {total} in {timeout_s:.0f} s:\n{service.tail(30)}"
                )
            time.sleep(interval_s)  # sampling period, not synchronisation
        try:
            run.exit_code = service.stop(STOP_TIMEOUT_S)
        except ServiceProcessError as error:
            raise ServiceFailed(str(error)) from None
        checkpoint_dir = config["checkpoint"]["dir"]
        # Checkpoints on an object store (bench --store s3, once supported) are not listed
        # here: that run's files_after_stop reads 0 and newest_file_bytes NaN.
        if not is_store_url(checkpoint_dir):
            # Listing reads file names only; no key is needed (nothing is verified or loaded).
            store = CheckpointStore(
                Path(checkpoint_dir), key=None, allow_unsigned=True, keep_last=1000
            )
            run.checkpoint_files = [path.stat().st_size for path in store.list()]
    finally:
        if profiler is not None:
            profiler.close()
        service.kill()
    return run
