"""``bench --members``: the figures computed from sampled per-partition offsets and the
members' assign / revoke log lines (pure logic; the integration smoke run is in
tests/integration/test_bench.py)."""

from __future__ import annotations

import json
import math
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from stream_trainer.laptop.benchmarks import scale_out as so
from stream_trainer.laptop.service_process import ServiceProcess

T = "t"


def test_members_are_increasing_positive_counts() -> None:
    assert so.parse_members("1,2") == [1, 2]
    assert so.parse_members("1, 2,4") == [1, 2, 4]
    for bad in ("2,1", "0,1", "1,1", "a", ""):
        with pytest.raises(ValueError, match="--members"):
            so.parse_members(bad)


def test_member_config_is_partition_scope_without_control_on_its_port() -> None:
    base: dict[str, Any] = {
        "topics": {"input": ["in"], "control": "ctl"},
        "kafka": {"group_instance_id": "x", "group_id": "g"},
        "http": {"enabled": True, "port": 1},
    }
    out = so.member_config(base, 4242)
    assert out["model"]["scope"] == "partition"
    assert out["topics"]["control"] is None
    assert "group_instance_id" not in out["kafka"]
    assert out["http"] == {"enabled": True, "port": 4242}
    assert base["topics"]["control"] == "ctl"  # the shared config is not modified


def test_a_sample_reads_each_slots_learnt_records() -> None:
    metrics = {
        so.LEARNT: 900.0,
        so.BATCHES: 9.0,
        so.ASSIGNED: 2.0,
        f'{so.SLOT_LEARNT}{{partition="0",topic="t"}}': 400.0,
        f'{so.SLOT_LEARNT}{{partition="1",topic="t"}}': 500.0,
        f'{so.SLOT_LEARNT}{{partition="0",topic="other"}}': 5.0,  # not the bench's topic
    }
    sample = so._sample(metrics, [(T, 0), (T, 1)])
    assert sample.slots == {(T, 0): 400.0, (T, 1): 500.0}
    assert (sample.learnt, sample.batches, sample.assigned) == (900.0, 9.0, 2.0)


def test_longest_gap_is_between_rises_with_the_span_ends_counted() -> None:
    series = [(0.0, 0.0), (1.0, 10.0), (2.0, 10.0), (3.0, 10.0), (4.0, 20.0), (5.0, 30.0)]
    assert so.rises(series) == [1.0, 4.0, 5.0]
    assert so.longest_gap(series, 0.0, 5.0) == 3.0
    assert so.longest_gap([(0.0, 5.0), (9.0, 5.0)], 0.0, 10.0) == 10.0  # never rose


def test_owners_follow_assign_revoke_and_lost() -> None:
    events = {
        "m1": [(0.0, "assigned", [(T, 0), (T, 1)]), (5.0, "revoked", [(T, 1)])],
        "m2": [(6.0, "assigned", [(T, 1)]), (9.0, "lost", [(T, 1)])],
    }
    assert so.owners(events, 1.0) == {(T, 0): "m1", (T, 1): "m1"}
    assert so.owners(events, 5.5) == {(T, 0): "m1"}
    assert so.owners(events, 7.0) == {(T, 0): "m1", (T, 1): "m2"}
    assert so.owners(events, 10.0) == {(T, 0): "m1"}


def _samples(name_offsets: dict[float, dict[tuple[str, int], float]]) -> list[so.Sample]:
    return [so.Sample(t, 0.0, 0.0, 0.0, offsets) for t, offsets in sorted(name_offsets.items())]


def test_a_join_reports_the_unmoved_pause_and_the_hand_over() -> None:
    # m1 owns p0 and p1; m2 joins at t=10, p1 is revoked from m1 at 11.0, assigned to m2 at
    # 11.9 and learnt by m2 from 12.5. p0 stops from 11.0 to 11.6 (the revoke callback),
    # while in the baseline (5..10) it rose every 0.1 s.
    m1: dict[float, dict[tuple[str, int], float]] = {}
    value0 = value1 = 0.0
    for step in range(50, 151):
        t = step / 10
        if not (11.0 < t < 11.6):
            value0 += 10
        if t < 11.0:
            value1 += 10
        m1[t] = {(T, 0): value0, **({(T, 1): value1} if t < 11.0 else {})}
    # m2's own counter for p1: 0 until its first unit at 12.5.
    m2 = {t: {(T, 1): max(0.0, 10 * (t - 12.4))} for t in (12.0, 12.2, 12.4, 12.5, 12.7, 14.9)}
    events = {
        "m1": [(1.0, "assigned", [(T, 0), (T, 1)]), (11.0, "revoked", [(T, 1)])],
        "m2": [(11.9, "assigned", [(T, 1)])],
    }
    change = so.Change("join", 1, 2, (5.0, 10.0), (10.0, 15.0))
    out = so.analyse_change(change, {"m1": _samples(m1), "m2": _samples(m2)}, events, unit_s=0.1)
    assert list(out["unmoved_longest_gap_s"]) == ["t:0"]
    assert out["owner_unmoved_gap_s"] == {"m1": pytest.approx(0.6)}
    assert math.isclose(out["worst_unmoved_gap_s"], 0.6)  # rises at 11.0, then 11.6
    assert math.isclose(out["worst_baseline_gap_s"], 0.1)
    assert math.isclose(out["excess_gap_units"], 5.0)
    assert math.isclose(out["handover_s"]["t:1"], 1.5)  # revoke 11.0 -> first rise 12.5


def test_the_longer_steady_state_after_a_change_is_the_yardstick() -> None:
    # m1 owns p0 throughout; after the change its p0 rises every 0.4 s (its loop now also
    # serves partitions it was given), before it rose every 0.1 s; during the change one
    # gap of 0.6 s. Against the state before that is 5 units; against the one after, 2.
    m1: dict[float, dict[tuple[str, int], float]] = {}
    value = 0.0
    for step in range(50, 201):
        t = round(step / 10, 1)
        if t <= 11.0 or (t >= 11.6 and step % 4 == 0):
            value += 10
        m1[t] = {(T, 0): value}
    events = {"m1": [(1.0, "assigned", [(T, 0)])]}
    change = so.Change("leave", 2, 1, (5.0, 10.0), (10.0, 15.0), (15.0, 20.0))
    out = so.analyse_change(change, {"m1": _samples(m1)}, events, unit_s=0.1)
    assert math.isclose(out["worst_baseline_gap_s"], 0.1)
    assert math.isclose(out["worst_after_gap_s"], 0.4)
    assert math.isclose(out["worst_steady_gap_s"], 0.4)
    assert math.isclose(out["worst_unmoved_gap_s"], 0.6)  # 11.0 -> 11.6
    assert math.isclose(out["excess_gap_units"], 2.0)
    # Without a window after it, the one before is the yardstick.
    out = so.analyse_change(
        so.Change("leave", 2, 1, (5.0, 10.0), (10.0, 15.0)), {"m1": _samples(m1)}, events, 0.1
    )
    assert math.isclose(out["excess_gap_units"], 5.0)


def test_log_events_are_parsed_from_the_members_json_lines(tmp_path: Path) -> None:
    log = tmp_path / "m.log"
    lines = [
        {
            "ts": "2026-12-05T12:00:00.500Z",
            "event": "partitions assigned",
            "partitions": ["a.b:0", "a.b:3"],
        },
        {"ts": "2026-12-05T12:00:01.000Z", "event": "checkpoint written", "partition": 3},
        {"ts": "2026-12-05T12:00:02.250Z", "event": "partitions revoked", "partitions": ["a.b:3"]},
    ]
    log.write_text("plain text line\n" + "\n".join(json.dumps(x) for x in lines) + "\n")
    member = so.Member("m1", ServiceProcess(tmp_path / "c.yaml", port=1, log_path=log))
    events = member.log_events()
    assert [(kind, keys) for _, kind, keys in events] == [
        ("assigned", [("a.b", 0), ("a.b", 3)]),
        ("revoked", [("a.b", 3)]),
    ]
    assert math.isclose(events[1][0] - events[0][0], 1.75)


def test_summary_takes_medians_and_targets_the_excess_pause() -> None:
    def repeat(r1: float, r2: float, excess: float) -> dict[str, object]:
        return {
            "records_per_s": {"1": r1, "2": r2},
            "efficiency": {"2": r2 / (2 * r1)},
            "cores_used": {"1": 1.0, "2": 1.5},
            "machine_busy_cores": {"1": 1.3, "2": 1.9},
            "records_per_cpu_s": {"1": r1, "2": r2 / 1.5},
            "per_cpu_s_ratio": {"2": r2 / 1.5 / r1},
            "median_unit_s": 0.05,
            "changes": [
                {
                    "kind": "join",
                    "members": [1, 2],
                    "seconds": 4.0,
                    "unmoved_longest_gap_s": {"t:0": 0.2},
                    "handover_s": {"t:1": 1.0},
                    "worst_unmoved_gap_s": 0.2,
                    "worst_baseline_gap_s": 0.1,
                    "worst_partition_gap_s": 1.2,
                    "worst_partition_baseline_gap_s": 1.1,
                    "worst_loop_gap_s": 0.2,
                    "worst_unmoved_gap_units": 4.0,
                    "excess_gap_units": excess,
                    "worst_handover_s": 1.0,
                    "worst_revoke_s": 0.1,
                }
            ],
        }

    section = so.summarize(
        [repeat(100, 180, 0.5), repeat(100, 160, 2.0), repeat(120, 200, 0.2)],
        [1.9, 1.8, 2.0],
        [1, 2],
        {"ingest_ceiling": 400.0, "learner_ceiling": 100.0},
    )
    assert section["records_per_s"]["2"]["median"] == 180
    # per repeat 0.9, 0.8, 0.833: the median of the repeats, not of the medians
    assert math.isclose(section["efficiency"]["2"]["median"], 200 / 240)
    assert section["vs_ceilings"]["1"]["learner_ceiling"] == 1.0
    # Per CPU second: 1.2, 1.07, 1.11 -> the second member's records cost no more CPU.
    assert math.isclose(section["per_cpu_s_ratio"]["2"]["median"], 200 / 1.5 / 120)
    assert section["cores_used"]["2"]["median"] == 1.5
    targets = so.targets(section)
    assert targets["scaling_efficiency_2_members"] == (
        section["efficiency"]["2"]["median"],
        ">=",
        0.8,
    )
    assert targets["join_1to2_unmoved_pause_units"] == (2.0, "<=", 1.0)  # the worst repeat
    assert section["machine_busy_cores"]["2"]["median"] == 1.9
    lines = so.table_lines(section)
    assert any("join 1->2" in line for line in lines)
    assert any(f"1.90 of {section['machine_cores']}" in line for line in lines)


def test_the_machines_busy_seconds_leave_out_idle_and_iowait() -> None:
    # user nice system idle iowait irq softirq steal (guest, guest_nice: inside user)
    stat = "cpu  100 20 30 500 50 5 5 0 0 0\ncpu0 50 10 15 250 25 2 3 0 0 0\n"
    assert so.machine_busy_s(stat) == (100 + 20 + 30 + 5 + 5) / os.sysconf("SC_CLK_TCK")
    assert math.isnan(so.machine_busy_s("intr 1 2 3\n"))


def test_an_owners_unmoved_partitions_together_rise_at_every_unit_despite_bursts() -> None:
    # Fetch-sized bursts: p0 learns in the first half of each second, p1 in the second.
    samples = [
        so.Sample(
            t / 10,
            0.0,
            0.0,
            2.0,
            {
                (T, 0): 5.0 * (t // 10) + min(t % 10, 5),
                (T, 1): 5.0 * (t // 10) + max(0, t % 10 - 5),
            },
        )
        for t in range(0, 41)
    ]
    alone = so.longest_gap([(s.t, s.slots[(T, 0)]) for s in samples if 0.0 <= s.t <= 4.0], 0.0, 4.0)
    together = so.longest_gap(so.summed(samples, [(T, 0), (T, 1)], 0.0, 4.0), 0.0, 4.0)
    assert alone == pytest.approx(0.6)
    assert together == pytest.approx(0.1)  # a rise at every sample


def test_a_revoke_starts_where_its_counter_rose_never_after_its_log_line() -> None:
    def at(*points: tuple[float, float]) -> list[so.Sample]:
        return [so.Sample(t, 0.0, 0.0, 0.0, {}, revokes) for t, revokes in points]

    slow = at((10.0, 0), (10.5, 0), (10.6, 1), (10.7, 1), (11.2, 1))
    assert so.revoke_started(slow, 11.0, 10.0) == 10.6
    # Shorter than a sample period: the counter shows it only after the log line.
    quick = at((10.0, 0), (10.95, 0), (11.04, 1))
    assert so.revoke_started(quick, 11.0, 10.0) == 11.0
    # An earlier revoke (before the change) and no rise since: the log line.
    assert so.revoke_started(at((9.0, 0), (9.5, 1), (10.5, 1)), 11.0, 10.0) == 11.0
    assert so.revoke_started(slow, None, 10.0) is None


def _unit_line(t: float, partition: int, records: int) -> str:
    stamp = datetime.fromtimestamp(t, tz=UTC).isoformat(timespec="milliseconds")
    return json.dumps(
        {
            "ts": stamp.replace("+00:00", "Z"),
            "level": "debug",
            "event": "unit learnt",
            "partition": f"{T}:{partition}",
            "records": records,
        }
    )


def test_the_unit_trace_counts_each_partitions_records_per_unit() -> None:
    lines = [
        _unit_line(100.000, 0, 500),
        '{"ts": "x", "event": "offsets committed"}',
        "not json",
        _unit_line(100.031, 1, 200),
        _unit_line(100.062, 0, 500),
    ]
    trace = so.unit_trace(lines)
    assert [round(s.t, 3) for s in trace] == [100.0, 100.031, 100.062]
    assert trace[-1].slots == {(T, 0): 1000.0, (T, 1): 200.0}
    assert trace[-1].learnt == 1200.0 and trace[-1].batches == 3.0
    assert trace[0].slots == {(T, 0): 500.0}  # each sample its own copy


def test_a_stop_shorter_than_the_scrape_period_shows_in_the_unit_trace() -> None:
    # m1 learns p0 every 10 ms from 5 s to 15 s, except for 40 ms at 11.00-11.04: scrapes
    # every 50 ms see at most one missed rise; the trace sees the 40 ms + 10 ms gap.
    units = [round(5 + i / 100, 2) for i in range(1001)]
    units = [t for t in units if not 11.0 < t < 11.05]
    trace = so.unit_trace([_unit_line(t, 0, 10) for t in units])
    scraped: dict[float, dict[tuple[str, int], float]] = {}
    for step in range(100, 301):
        t = step / 20
        scraped[t] = {(T, 0): 10.0 * sum(1 for u in units if u <= t)}
    events = {"m1": [(1.0, "assigned", [(T, 0)])]}
    change = so.Change("leave", 2, 1, (5.0, 10.0), (10.0, 15.0))
    coarse = so.analyse_change(change, {"m1": _samples(scraped)}, events, unit_s=0.01)
    fine = so.analyse_change(
        change, {"m1": _samples(scraped)}, events, unit_s=0.01, traces={"m1": trace}
    )
    assert coarse["worst_unmoved_gap_s"] == pytest.approx(0.05)  # the scrape period
    assert fine["worst_unmoved_gap_s"] == pytest.approx(0.05, abs=1e-3)  # 11.00 -> 11.05
    assert fine["worst_baseline_gap_s"] == pytest.approx(0.01, abs=1e-3)
    assert coarse["worst_baseline_gap_s"] == pytest.approx(0.05)
    assert fine["excess_gap_units"] == pytest.approx(4.0, abs=0.2)
    assert coarse["excess_gap_units"] == pytest.approx(0.0, abs=0.2)
