"""``bench --members 1,2 --scope partition``: scale-out of partition scope.

Members are ``stream-trainer run`` processes of one consumer group (same config, same
checkpoint folder and registry, each its own HTTP port and log) on the bench's pre-filled
topic. One run per repeat walks through the member counts: the first count starts, and
once every partition is assigned and learnt by some member its throughput is measured over
a steady window; then members join up to the next count (measured the same way), and at the
end they leave again in reverse order, down to the first count.

Per-partition progress is each member's "unit learnt" log lines (members run at DEBUG:
one line per unit with its partition and records, millisecond timestamps), so a gap is
known to the millisecond; a member that logged none falls back to its
``stream_trainer_slot_records_learnt_total{topic,partition}``, sampled from ``/metrics``
every :data:`FAST_INTERVAL_S` while members join or leave (and for half a window before the
change and half a window after it settled), known to about that period. The steady states' own
longest gaps, sampled the same way, are reported beside it, and the longer of the two is
the yardstick: after a leave an owner's unmoved partitions share its loop with those it was
given, so their sum's steady gaps are longer than before, and that is the new steady state,
not a stop. A poll thread held in a rebalance callback shows as counters that stop.

Figures per change (join or leave):

* unmoved partitions (same owner before and after, never revoked in between): longest gap
  between consecutive rises of the sum of an owner's unmoved counters, in seconds and in
  median unit times (loop seconds per ``stream_trainer_batches_total`` in the steady
  windows), and the same per partition. The per-owner sum is the figure the target is on:
  a single partition's records arrive in fetch-sized bursts, so its gaps are many units
  long even in steady state, while an owner learns some unmoved partition at nearly every
  unit unless its poll thread stops;
* moved partitions: hand-over = the start of the old owner's revoke callback (its
  ``stream_trainer_rebalances_total{kind="revoke"}`` rising, bounded by its "partitions
  revoked" log line, written at the callback's end) to the first sample in which the new
  owner's counter for it has risen (from its value when the new owner logged "partitions
  assigned", 0 if it had none); the callback's own length is reported beside it.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from stream_trainer.errors import StreamTrainerError
from stream_trainer.laptop.benchmarks import report as rep
from stream_trainer.laptop.benchmarks.service_run import STOP_TIMEOUT_S
from stream_trainer.laptop.service_process import ServiceProcess, ServiceProcessError

P = "stream_trainer"
LEARNT = f"{P}_records_learnt_total"
BATCHES = f"{P}_batches_total"
ASSIGNED = f"{P}_assigned_partitions"
REVOKES = f'{P}_rebalances_total{{kind="revoke"}}'
CPU = "process_cpu_seconds_total"  # prometheus_client's process collector (Linux)
SLOT_LEARNT = f"{P}_slot_records_learnt_total"
FAST_INTERVAL_S = 0.05  # /metrics while members join or leave (each render ~3 ms of GIL)
TRACE_RESOLUTION_S = 0.001  # the members' "unit learnt" log lines: millisecond timestamps
SLOW_INTERVAL_S = 1.0  # in steady windows: throughput only (see bench.SAMPLE_INTERVAL_S)
SETTLE_S = 2.0  # after every partition is learning again (at most a window)
SCOPES = ("partition",)
DRAINED = 0.95  # of the topic learnt: too close to its end to measure
PARTITIONS = 6  # the input topic's partitions with --members (unless --partitions)
# A join on Tansu takes ~10 s to rebalance (docs/design/scale-out.md 4.1), plus start-up.
SETTLE_TIMEOUT_S = 120.0

PartitionKey = tuple[str, int]


class ScaleOutFailed(StreamTrainerError):
    """A member exited, the group did not settle in time, or the topic ran out of records
    before the last phase; the message says which, with the member's log tail."""


def parse_members(text: str) -> list[int]:
    """``"1,2"`` -> ``[1, 2]``: strictly increasing positive member counts."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--members {text!r}: comma-separated integers, e.g. 1,2") from None
    if not counts or counts[0] < 1 or any(b <= a for a, b in itertools.pairwise(counts)):
        raise ValueError(f"--members {text!r}: increasing positive counts, e.g. 1,2")
    return counts


def member_config(config: dict[str, Any], port: int) -> dict[str, Any]:
    """One member's config: ``config`` (the bench's service config, same group, folder and
    registry for all) in partition scope, without the control topic (refused in that
    scope), dynamic membership (no ``group_instance_id``), on its own port."""
    out = copy.deepcopy(config)
    out.setdefault("model", {})["scope"] = "partition"
    # DEBUG: a "unit learnt" line per unit, each partition's progress to the millisecond.
    out["logging"] = {**out.get("logging", {}), "level": "DEBUG", "format": "json"}
    out["topics"]["control"] = None
    kafka = out.setdefault("kafka", {})
    kafka.pop("group_instance_id", None)
    out["http"] = {**out.get("http", {}), "port": port}
    return out


@dataclass
class Sample:
    """One scrape of one member: wall time, its counters and its slots' learnt records."""

    t: float  # time.time(): comparable with the members' log timestamps
    learnt: float
    batches: float
    assigned: float
    slots: dict[PartitionKey, float]  # records learnt per partition (its slot counters)
    revokes: float = 0.0  # revoke callbacks begun (counted on entry)
    cpu_s: float = math.nan  # the process's CPU seconds, user + system


def _sample(metrics: dict[str, float], partitions: Sequence[PartitionKey]) -> Sample:
    slots: dict[PartitionKey, float] = {}
    prefix = SLOT_LEARNT + "{"
    for key, value in metrics.items():
        if key.startswith(prefix):
            labels = dict(
                part.split("=", 1) for part in key[len(prefix) : -1].split(",") if "=" in part
            )
            tp = (labels["topic"].strip('"'), int(labels["partition"].strip('"')))
            if tp in partitions:
                slots[tp] = value
    return Sample(
        time.time(),
        metrics.get(LEARNT, 0.0),
        metrics.get(BATCHES, 0.0),
        metrics.get(ASSIGNED, 0.0),
        slots,
        metrics.get(REVOKES, 0.0),
        metrics.get(CPU, math.nan),
    )


@dataclass
class Member:
    """One member process and everything sampled from it."""

    name: str
    process: ServiceProcess
    samples: list[Sample] = field(default_factory=list)
    stopping: bool = False  # sent SIGTERM: sampled until it exits, no longer counted live
    stopped: bool = False

    def unit_trace(self) -> list[Sample]:
        """Its progress from the "unit learnt" lines of its DEBUG log: a sample at each
        unit (millisecond timestamps), with the records it learnt so far in each partition
        (as its slot counters count them); empty without such lines."""
        return unit_trace(self._log_lines())

    def _log_lines(self) -> list[str]:
        try:
            return self.process.log_path.read_text(errors="replace").splitlines()
        except OSError:  # not written yet
            return []

    def log_events(self) -> list[tuple[float, str, list[PartitionKey]]]:
        """(time, "assigned" / "revoked" / "lost", partitions) from its JSON log."""
        events: list[tuple[float, str, list[PartitionKey]]] = []
        for line in self._log_lines():
            if not line.startswith("{") or '"partitions' not in line:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            event = str(entry.get("event", ""))
            kind = next(
                (k for k in ("assigned", "revoked", "lost") if event == f"partitions {k}"), None
            )
            if kind is None or not isinstance(entry.get("partitions"), list):
                continue
            stamp = datetime.fromisoformat(str(entry["ts"]).replace("Z", "+00:00")).timestamp()
            keys = []
            for item in entry["partitions"]:
                topic, _, partition = str(item).rpartition(":")
                keys.append((topic, int(partition)))
            events.append((stamp, kind, keys))
        return events


def unit_trace(lines: Sequence[str]) -> list[Sample]:
    """See :meth:`Member.unit_trace`; ``lines`` are a member's log lines."""
    learnt: dict[PartitionKey, float] = {}
    total = 0.0
    samples: list[Sample] = []
    for line in lines:
        if '"unit learnt"' not in line or not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
            topic, _, partition = str(entry["partition"]).rpartition(":")
            key = (topic, int(partition))
            records = float(entry["records"])
            stamp = datetime.fromisoformat(str(entry["ts"]).replace("Z", "+00:00")).timestamp()
        except (ValueError, KeyError, TypeError):
            continue
        learnt[key] = learnt.get(key, 0.0) + records
        total += records
        samples.append(Sample(stamp, total, float(len(samples) + 1), math.nan, dict(learnt)))
    return samples


@dataclass
class Window:
    """A steady window: members, its span and the group's learnt records per second."""

    members: int
    start: float
    end: float
    rate: float
    unit_s: dict[str, float]  # per member: median loop seconds per unit
    cores: float = math.nan  # the members' CPU seconds per second, together
    # The whole machine's busy CPU seconds per second (members, broker, everything): a
    # second member can only scale while this is under the machine's cores.
    machine_cores: float = math.nan


def machine_busy_s(stat: str) -> float:
    """CPU seconds the machine spent busy (not idle, not waiting on I/O) since boot, from
    the text of ``/proc/stat``; NaN when its ``cpu`` line is missing."""
    for line in stat.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            ticks = [int(v) for v in fields[1:]]
            idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
            return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    return math.nan


def _machine_busy_now() -> float:
    try:
        return machine_busy_s(Path("/proc/stat").read_text(encoding="ascii"))
    except OSError:  # not Linux: the figure is unknown
        return math.nan


@dataclass
class Change:
    """A join or a leave, and the fast-sampled steady windows just before and after it."""

    kind: str  # "join" / "leave"
    members_before: int
    members_after: int
    baseline: tuple[float, float]
    span: tuple[float, float]
    # After it settled: an owner's unmoved partitions share its loop with those it was
    # given (a leave doubles them), so their sum's steady gaps may be longer than before.
    after: tuple[float, float] | None = None


class ScaleOutRun:
    """Drives the members through the counts of one repeat and keeps what it sampled."""

    def __init__(
        self,
        start_member: Callable[[int], ServiceProcess],
        partitions: Sequence[PartitionKey],
        total: int,
        *,
        window_s: float,
        settle_timeout_s: float,
        progress: Callable[[str], None],
    ) -> None:
        self._start_member = start_member
        self.partitions = list(partitions)
        self.total = total
        self.window_s = window_s
        self.settle_timeout_s = settle_timeout_s
        self._progress = progress
        self.members: list[Member] = []
        self.windows: list[Window] = []
        self.changes: list[Change] = []

    # -- sampling --------------------------------------------------------------------------

    def _live(self) -> list[Member]:
        return [m for m in self.members if not (m.stopped or m.stopping)]

    def _scrape_all(self) -> None:
        for member in (m for m in self.members if not m.stopped):
            if member.stopping and not member.process.alive():
                continue
            if not member.process.alive():
                raise ScaleOutFailed(
                    f"member {member.name} exited ({member.process.returncode}):\n"
                    + member.process.tail(30)
                )
            metrics = member.process.scrape()
            if metrics is not None:
                member.samples.append(_sample(metrics, self.partitions))
        learnt = sum(m.samples[-1].learnt for m in self.members if m.samples)
        # Round-robin partitions drain at about the same time, but not exactly: near the
        # end a drained partition would pass for a paused one.
        if learnt >= DRAINED * self.total:
            raise ScaleOutFailed(
                f"the members learnt {learnt:,.0f} of {self.total:,} records before the last "
                "phase: "
                "raise --members-records (or lower --members-window)"
            )

    def _sample_for(self, seconds: float, interval: float) -> None:
        deadline = time.time() + seconds
        while True:
            self._scrape_all()
            if time.time() >= deadline:
                return
            time.sleep(interval)  # the sampling period, not synchronisation

    def _settled(self, since: float) -> bool:
        """Every partition assigned to exactly the live members' sum, each live member owns
        some (when there are enough partitions), and each partition's learnt offset rose
        on its owner after ``since``."""
        live = self._live()
        last = [m.samples[-1] for m in live if m.samples]
        if len(last) < len(live) or sum(s.assigned for s in last) != len(self.partitions):
            return False
        if len(live) <= len(self.partitions) and any(s.assigned == 0 for s in last):
            return False
        for key in self.partitions:
            rose = False
            for m in live:
                after = [s.slots[key] for s in m.samples if s.t > since and key in s.slots]
                rose = rose or (len(after) >= 2 and after[-1] > after[0])
            if not rose:
                return False
        return True

    def _until_settled(self, since: float) -> None:
        deadline = time.time() + self.settle_timeout_s
        while not self._settled(since):
            if time.time() > deadline:
                raise ScaleOutFailed(
                    f"the group did not settle within {self.settle_timeout_s:.0f} s with "
                    f"{len(self._live())} member(s):\n"
                    + "\n".join(m.process.tail(10) for m in self._live())
                )
            self._sample_for(0.0, FAST_INTERVAL_S)
            time.sleep(FAST_INTERVAL_S)
        self._sample_for(min(SETTLE_S, self.window_s), FAST_INTERVAL_S)

    def _window(self) -> None:
        live = self._live()
        start = time.time()
        busy_before = _machine_busy_now()
        first = {m.name: len(m.samples) for m in live}
        self._sample_for(self.window_s, SLOW_INTERVAL_S)
        end = time.time()
        machine = (_machine_busy_now() - busy_before) / (end - start)
        learnt = cpu = 0.0
        unit_s: dict[str, float] = {}
        for m in live:
            inside = m.samples[first[m.name] :]
            learnt += inside[-1].learnt - inside[0].learnt
            cpu += inside[-1].cpu_s - inside[0].cpu_s
            per_unit = [
                (b.t - a.t) / (b.batches - a.batches)
                for a, b in itertools.pairwise(inside)
                if b.batches > a.batches
            ]
            unit_s[m.name] = statistics.median(per_unit) if per_unit else math.nan
        span = max(m.samples[-1].t for m in live) - min(m.samples[first[m.name]].t for m in live)
        rate = learnt / span if span > 0 else math.nan
        cores = cpu / span if span > 0 else math.nan
        self.windows.append(Window(len(live), start, end, rate, unit_s, cores, machine))
        self._progress(
            f"{len(live)} member(s): {rate:,.0f} records/s on {cores:.2f} cores "
            f"(machine busy {machine:.2f} of {os.cpu_count()})"
        )

    # -- the walk --------------------------------------------------------------------------

    def _add_member(self) -> None:
        index = len(self.members)
        self.members.append(Member(f"m{index + 1}", self._start_member(index)))

    def run(self, counts: Sequence[int]) -> None:
        """Start ``counts[0]`` members, then join up to each next count and leave back down;
        a steady window at every count on the way up."""
        began = time.time()
        for _ in range(counts[0]):
            self._add_member()
        self._until_settled(began)
        self._window()
        for count in counts[1:]:
            self._change("join", count)
            self._window()
        for count in reversed(counts[:-1]):
            self._change("leave", count)

    def _change(self, kind: str, count: int) -> None:
        before = len(self._live())
        baseline_start = time.time()
        self._sample_for(self.window_s / 2, FAST_INTERVAL_S)
        start = time.time()
        self._progress(f"{kind}: {before} -> {count} member(s)")
        if kind == "join":
            while len(self._live()) < count:
                self._add_member()
        else:
            for member in self._live()[count:]:
                self._stop(member)
        self._until_settled(start)
        end = time.time()
        self._sample_for(self.window_s / 2, FAST_INTERVAL_S)
        self.changes.append(
            Change(kind, before, count, (baseline_start, start), (start, end), (end, time.time()))
        )

    def _stop(self, member: Member) -> None:
        """SIGTERM (graceful: revoke, checkpoint, commit, leave), sampling it (its revoke)
        and the others meanwhile."""
        process = member.process
        proc = process.proc
        assert proc is not None
        proc.send_signal(15)
        deadline = time.time() + STOP_TIMEOUT_S
        member.stopping = True
        while proc.poll() is None:
            if time.time() > deadline:
                process.kill()
                raise ScaleOutFailed(f"member {member.name} did not stop:\n{process.tail(20)}")
            self._sample_for(0.0, FAST_INTERVAL_S)
            time.sleep(FAST_INTERVAL_S)
        member.stopped = True

    def close(self) -> None:
        """Stop every member still running (graceful, then killed)."""
        for member in self.members:
            try:
                if member.process.alive():
                    member.process.stop(STOP_TIMEOUT_S)
            except ServiceProcessError:
                pass
            member.process.kill()
            member.stopped = True


# -- analysis (pure: unit-tested) ------------------------------------------------------------


def rises(series: Sequence[tuple[float, float]]) -> list[float]:
    """Times of the samples whose value is above the previous sample's."""
    return [b[0] for a, b in itertools.pairwise(series) if b[1] > a[1]]


def longest_gap(series: Sequence[tuple[float, float]], start: float, end: float) -> float:
    """Longest time between consecutive rises of ``series`` within [start, end], the span's
    ends counted as rises (a partition that never rises has the whole span as its gap)."""
    times = [start, *(t for t in rises(series) if start < t < end), end]
    return max(b - a for a, b in itertools.pairwise(times))


def summed(
    samples: Sequence[Sample], keys: Sequence[PartitionKey], lo: float, hi: float
) -> list[tuple[float, float]]:
    """(time, the sum of ``keys``' counters) of the samples in [lo, hi] that show them all."""
    return [
        (s.t, math.fsum(s.slots[k] for k in keys))
        for s in samples
        if lo <= s.t <= hi and all(k in s.slots for k in keys)
    ]


def revoke_started(samples: Sequence[Sample], logged: float | None, since: float) -> float | None:
    """When the revoke callback that logged "partitions revoked" at ``logged`` began: the
    last rise of the member's revoke counter after ``since`` and up to a sample past the
    log line (a callback shorter than the sampling period shows only after it), never later
    than the log line; the log line itself without such a rise; None without a log line."""
    if logged is None:
        return None
    inside = [x for x in samples if x.t >= since]
    rose = [
        b.t
        for a, b in itertools.pairwise(inside)
        if b.revokes > a.revokes and b.t <= logged + 2 * FAST_INTERVAL_S
    ]
    return min(rose[-1], logged) if rose else logged


def owners(
    events: dict[str, list[tuple[float, str, list[PartitionKey]]]], at: float
) -> dict[PartitionKey, str]:
    """Who owns each partition at time ``at``, from the members' assign / revoke / lost
    log events."""
    owned: dict[PartitionKey, str] = {}
    timeline = sorted(
        (t, name, kind, keys) for name, items in events.items() for t, kind, keys in items
    )
    for t, name, kind, keys in timeline:
        if t > at:
            break
        for key in keys:
            if kind == "assigned":
                owned[key] = name
            elif owned.get(key) == name:
                del owned[key]
    return owned


def analyse_change(
    change: Change,
    samples: dict[str, list[Sample]],
    events: dict[str, list[tuple[float, str, list[PartitionKey]]]],
    unit_s: float,
    traces: dict[str, list[Sample]] | None = None,
) -> dict[str, Any]:
    """Pause of the unmoved partitions and hand-over of the moved ones during ``change``.
    Progress is read from a member's unit trace (:func:`unit_trace`) where it has one,
    else from its scrapes; the revoke counter from its scrapes."""
    progress = {name: (traces or {}).get(name) or taken for name, taken in samples.items()}
    start, end = change.span
    before, after = owners(events, start), owners(events, end)
    revokes = {
        (name, key): t
        for name, items in events.items()
        for t, kind, keys in items
        if kind in ("revoked", "lost") and start <= t <= end
        for key in keys
    }
    revoked = {key for _, key in revokes}

    def series(name: str, key: PartitionKey, lo: float, hi: float) -> list[tuple[float, float]]:
        return [
            (s.t, s.slots[key])
            for s in progress.get(name, [])
            if lo <= s.t <= hi and key in s.slots
        ]

    unmoved: dict[str, float] = {}
    baseline: dict[str, float] = {}
    handover: dict[str, float] = {}
    revoke_s: dict[str, float] = {}
    for key in sorted(set(before) | set(after)):
        label = f"{key[0]}:{key[1]}"
        old, new = before.get(key), after.get(key)
        if old is not None and old == new and key not in revoked:
            unmoved[label] = longest_gap(series(old, key, start, end), start, end)
            lo, hi = change.baseline
            baseline[label] = longest_gap(series(old, key, lo, hi), lo, hi)
        elif old is not None and new is not None and new != old:
            revoked_at = revoke_started(samples.get(old, []), revokes.get((old, key)), start)
            if revoked_at is not None:
                revoke_s[label] = revokes[(old, key)] - revoked_at
            assigned_at = max(
                (
                    t
                    for t, kind, keys in events.get(new, [])
                    if kind == "assigned" and key in keys and start <= t <= end
                ),
                default=start,
            )
            # The new owner's counter from its assignment on: its value then (a member that
            # owned the partition before keeps its series), else 0.
            earlier = series(new, key, -math.inf, assigned_at)
            mine = [(assigned_at, earlier[-1][1] if earlier else 0.0)]
            mine += series(new, key, assigned_at, end)
            first = next((b[0] for a, b in itertools.pairwise(mine) if b[1] > a[1]), None)
            handover[label] = (
                first - revoked_at if first is not None and revoked_at is not None else math.nan
            )
    # Per owner, its unmoved partitions together: a partition's records come in fetch-sized
    # bursts (its steady-state gaps are many units long), but the owner learns some unmoved
    # partition at nearly every unit unless its poll thread stops.
    by_owner: dict[str, list[PartitionKey]] = {}
    for label in unmoved:
        topic, _, partition = label.rpartition(":")
        key = (topic, int(partition))
        by_owner.setdefault(before[key], []).append(key)
    owner_gap: dict[str, float] = {}
    owner_baseline: dict[str, float] = {}
    owner_after: dict[str, float] = {}
    # Everything the owner learnt (moved-in partitions too): 0 while its poll thread stops,
    # where the unmoved sum also stops when new partitions' backlog fills its fetch queue.
    loop_gap: dict[str, float] = {}
    for name, keys in by_owner.items():
        taken = progress.get(name, [])
        loop_gap[name] = longest_gap(
            [(x.t, x.learnt) for x in taken if start <= x.t <= end], start, end
        )
        owner_gap[name] = longest_gap(summed(taken, keys, start, end), start, end)
        lo, hi = change.baseline
        owner_baseline[name] = longest_gap(summed(taken, keys, lo, hi), lo, hi)
        if change.after is not None:
            lo, hi = change.after
            owner_after[name] = longest_gap(summed(taken, keys, lo, hi), lo, hi)
    worst = max(owner_gap.values(), default=math.nan)
    worst_baseline = max(owner_baseline.values(), default=math.nan)
    worst_after = max(owner_after.values(), default=math.nan)
    # The yardstick: the longer of the two steady states (NaN-safe: no after window, the
    # one before).
    steady = max(worst_baseline, worst_after) if not math.isnan(worst_after) else worst_baseline
    return {
        "kind": change.kind,
        "members": [change.members_before, change.members_after],
        "seconds": end - start,
        "unmoved_longest_gap_s": unmoved,
        "baseline_longest_gap_s": baseline,
        "handover_s": handover,
        "revoke_s": revoke_s,
        "worst_revoke_s": max(revoke_s.values(), default=math.nan),
        "owner_unmoved_gap_s": owner_gap,
        "owner_loop_gap_s": loop_gap,
        "worst_loop_gap_s": max(loop_gap.values(), default=math.nan),
        "owner_baseline_gap_s": owner_baseline,
        "owner_after_gap_s": owner_after,
        "worst_partition_gap_s": max(unmoved.values(), default=math.nan),
        "worst_partition_baseline_gap_s": max(baseline.values(), default=math.nan),
        "worst_unmoved_gap_s": worst,
        "worst_baseline_gap_s": worst_baseline,
        "worst_after_gap_s": worst_after,
        "worst_steady_gap_s": steady,
        "median_unit_s": unit_s,
        "worst_unmoved_gap_units": rep.ratio(worst, unit_s),
        # Above the same sampling's steady-state gap: the stop the rebalance itself caused.
        "excess_gap_units": rep.ratio(worst - steady, unit_s),
        "worst_handover_s": max(
            (v for v in handover.values() if not math.isnan(v)), default=math.nan
        ),
    }


def analyse(run: ScaleOutRun, counts: Sequence[int]) -> dict[str, Any]:
    """One repeat's figures: throughput per count, efficiency, and each change."""
    by_count = {w.members: w for w in run.windows}
    rates = {str(c): by_count[c].rate if c in by_count else math.nan for c in counts}
    cores = {str(c): by_count[c].cores if c in by_count else math.nan for c in counts}
    machine = {str(c): by_count[c].machine_cores if c in by_count else math.nan for c in counts}
    per_core = {k: rep.ratio(rates[k], cores[k]) for k in rates}
    base = counts[0]
    efficiency = {str(c): rep.ratio(rates[str(c)] * base, c * rates[str(base)]) for c in counts[1:]}
    events = {m.name: m.log_events() for m in run.members}
    samples = {m.name: m.samples for m in run.members}
    traces = {m.name: m.unit_trace() for m in run.members}
    units = [u for w in run.windows for u in w.unit_s.values() if not math.isnan(u)]
    unit_s = statistics.median(units) if units else math.nan
    return {
        "records_per_s": rates,
        "efficiency": efficiency,
        # The CPU the members got in each window: on a shared machine a second member may
        # not get a second core, and records per CPU second tell that from a service that
        # does not scale.
        "cores_used": cores,
        "machine_busy_cores": machine,
        "records_per_cpu_s": per_core,
        "per_cpu_s_ratio": {
            str(c): rep.ratio(per_core[str(c)], per_core[str(base)]) for c in counts[1:]
        },
        "median_unit_s": unit_s,
        "changes": [analyse_change(c, samples, events, unit_s, traces) for c in run.changes],
        # Where the gaps were read: every member's unit trace (to the millisecond), or
        # the 50 ms scrapes of a member that logged none.
        "unit_trace": all(traces.values()),
    }


def summarize(
    repeats: list[dict[str, Any]],
    cpu_ceilings: list[float],
    counts: Sequence[int],
    ceilings: dict[str, float],
) -> dict[str, Any]:
    """Medians and spread over repeats of :func:`analyse`'s figures. ``cpu_ceilings`` is the
    machine's parallel ceiling at each repeat (cores free for 2 processes);
    ``ceilings`` the run's ingest / learner ceiling medians, for the ratios."""
    keys = [str(c) for c in counts]
    rates = {k: rep.spread([r["records_per_s"][k] for r in repeats]) for k in keys}
    changes: list[dict[str, Any]] = []
    for i, first in enumerate(repeats[0]["changes"] if repeats else []):
        each = [r["changes"][i] for r in repeats if len(r["changes"]) > i]
        handovers = [v for c in each for v in c["handover_s"].values()]
        changes.append(
            {
                "kind": first["kind"],
                "members": first["members"],
                **{
                    # .get: a figure a repeat lacks (no window after its change) is unknown.
                    name: rep.spread([c.get(name, math.nan) for c in each])
                    for name in (
                        "seconds",
                        "worst_unmoved_gap_s",
                        "worst_baseline_gap_s",
                        "worst_after_gap_s",
                        "worst_steady_gap_s",
                        "worst_partition_gap_s",
                        "worst_partition_baseline_gap_s",
                        "worst_loop_gap_s",
                        "worst_unmoved_gap_units",
                        "excess_gap_units",
                        "worst_handover_s",
                        "worst_revoke_s",
                    )
                },
                "unmoved_partitions": len(first["unmoved_longest_gap_s"]),
                "moved_partitions": len(first["handover_s"]),
                "handover_s": rep.spread(handovers),
            }
        )
    return {
        "members": list(counts),
        "scope": "partition",
        "records_per_s": rates,
        "efficiency": {k: rep.spread([r["efficiency"][k] for r in repeats]) for k in keys[1:]},
        "cores_used": {
            k: rep.spread([r.get("cores_used", {}).get(k, math.nan) for r in repeats]) for k in keys
        },
        "machine_busy_cores": {
            k: rep.spread([r.get("machine_busy_cores", {}).get(k, math.nan) for r in repeats])
            for k in keys
        },
        "machine_cores": os.cpu_count() or math.nan,
        "records_per_cpu_s": {
            k: rep.spread([r.get("records_per_cpu_s", {}).get(k, math.nan) for r in repeats])
            for k in keys
        },
        "per_cpu_s_ratio": {
            k: rep.spread([r.get("per_cpu_s_ratio", {}).get(k, math.nan) for r in repeats])
            for k in keys[1:]
        },
        "vs_ceilings": {
            k: {name: rep.ratio(rates[k]["median"], value) for name, value in ceilings.items()}
            for k in keys
        },
        "cpu_ceiling": rep.spread(cpu_ceilings),
        "median_unit_s": rep.spread([r["median_unit_s"] for r in repeats]),
        "changes": changes,
        "resolution_s": (
            TRACE_RESOLUTION_S
            if repeats and all(r.get("unit_trace") for r in repeats)
            else FAST_INTERVAL_S
        ),
        "per_repeat": repeats,
    }


def targets(section: dict[str, Any]) -> dict[str, tuple[float, str, float]]:
    """Design 13.2's targets: efficiency >= 0.8 (while cores are free) and no unmoved
    partition stopped longer than one unit beyond its steady-state gap."""
    out: dict[str, tuple[float, str, float]] = {}
    for k, value in section["efficiency"].items():
        out[f"scaling_efficiency_{k}_members"] = (value["median"], ">=", 0.8)
    for change in section["changes"]:
        name = f"{change['kind']}_{change['members'][0]}to{change['members'][1]}"
        out[f"{name}_unmoved_pause_units"] = (change["excess_gap_units"]["max"], "<=", 1.0)
    return out


def table_lines(section: dict[str, Any]) -> list[str]:
    """The section in the bench's text report."""
    unit = section["median_unit_s"]["median"]
    cpu = section["cpu_ceiling"]
    lines = [
        "",
        f"scale-out (scope {section['scope']}, members {section['members']}; CPU ceiling "
        f"{rep.num(cpu['median'], digits=2)} cores free for 2 processes "
        f"[{rep.num(cpu['min'], digits=2)}-{rep.num(cpu['max'], digits=2)}]):",
        f"  {'members':<8} {'records/s med':>14} {'min':>10} {'max':>10} {'efficiency':>11} "
        f"{'/ ingest':>9} {'/ learner':>10} {'cores used':>11} {'rec/CPU-s':>10} "
        f"{'ratio':>6} {'machine busy':>13}",
    ]

    def busy(k: str) -> str:
        # .get: a report written before the machine's figure was measured
        spread = section.get("machine_busy_cores", {}).get(k)
        if spread is None:
            return "-"
        total = section.get("machine_cores", math.nan)
        return f"{rep.num(spread['median'], digits=2)} of {rep.num(total, digits=0)}"

    for k, rate in section["records_per_s"].items():
        eff = section["efficiency"].get(k)
        per_cpu = section["per_cpu_s_ratio"].get(k)
        ratios = section["vs_ceilings"][k]
        lines.append(
            f"  {k:<8} {rate['median']:>14,.0f} {rate['min']:>10,.0f} {rate['max']:>10,.0f} "
            f"{rep.num(eff['median'], digits=2) if eff else '-':>11} "
            f"{rep.num(ratios.get('ingest_ceiling', math.nan), digits=2):>9} "
            f"{rep.num(ratios.get('learner_ceiling', math.nan), digits=2):>10} "
            f"{rep.num(section['cores_used'][k]['median'], digits=2):>11} "
            f"{rep.num(section['records_per_cpu_s'][k]['median'], digits=0):>10} "
            f"{rep.num(per_cpu['median'], digits=2) if per_cpu else '-':>6} "
            f"{busy(k):>13}"
        )
    lines.append(
        f"  median unit (loop seconds per unit): {rep.num(unit, ' ms', 1000, 1)}; "
        f"per-partition progress resolution ~{section['resolution_s'] * 1000:.0f} ms"
    )
    for change in section["changes"]:
        a, b = change["members"]
        lines.append(
            f"  {change['kind']} {a}->{b} ({change['unmoved_partitions']} unmoved, "
            f"{change['moved_partitions']} moved; settled in "
            f"{rep.num(change['seconds']['median'], ' s', 1, 1)}): unmoved longest gap "
            f"{rep.num(change['worst_unmoved_gap_s']['median'], ' s', 1, 2)} (steady-state "
            f"{rep.num(change['worst_baseline_gap_s']['median'], ' s', 1, 2)} before, "
            f"{rep.num(change['worst_after_gap_s']['median'], ' s', 1, 2)}"
            " after; excess "
            f"{rep.num(change['excess_gap_units']['median'], ' units', 1, 1)}; the owner's "
            f"loop {rep.num(change['worst_loop_gap_s']['median'], ' s', 1, 2)}), hand-over "
            f"median {rep.num(change['handover_s']['median'], ' s', 1, 2)}, worst "
            f"{rep.num(change['worst_handover_s']['max'], ' s', 1, 2)} (of which the revoke "
            f"callback {rep.num(change['worst_revoke_s']['median'], ' s', 1, 2)})"
        )
    return lines


def write_member_config(config: dict[str, Any], path: Path) -> Path:
    """``config`` as the YAML file a member runs."""
    path.write_text(yaml.safe_dump(config))
    return path
