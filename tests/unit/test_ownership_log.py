"""The commit-against-ownership check of the scale-out fault test (tests/faults/ownership.py)
finds a commit of a partition the member does not own, whatever the reason."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.faults.ownership import ASSIGNED, COMMITTED, LOST, REVOKED, MemberLog, Ownership


def line(event: str, **fields: Any) -> dict[str, Any]:
    return {"ts": "2026-12-05T12:00:00Z", "level": "info", "event": event, **fields}


def commit(sync: bool, **offsets: int) -> dict[str, Any]:
    return line(
        COMMITTED, offsets={k.replace("_", ":"): v for k, v in offsets.items()}, synchronous=sync
    )


def replay(*lines: dict[str, Any]) -> Ownership:
    ownership = Ownership("m1")
    for one in lines:
        ownership.feed(one)
    return ownership


def test_commits_inside_the_ownership_pass() -> None:
    found = replay(
        line(ASSIGNED, partitions=["t:0", "t:1"]),
        line(ASSIGNED, partitions=[]),  # cooperative: empty callbacks at every rebalance
        commit(False, t_0=5, t_1=7),
        commit(True, t_1=9),  # the revoke's hand-over commit, before its "revoked" line
        line(REVOKED, partitions=["t:1"]),
        commit(False, t_0=6),
        line("checkpoint written", partition=0),
    )
    assert found.violations == []
    assert (found.commits, found.synchronous) == (4, 1)
    assert (found.assigned, found.revoked, found.lost, found.owned) == (2, 1, 0, {"t:0"})


def test_a_commit_after_revoke_or_lost_or_before_assign_is_a_violation() -> None:
    found = replay(
        commit(False, t_3=1),
        line(ASSIGNED, partitions=["t:0", "t:1"]),
        line(REVOKED, partitions=["t:1"]),
        commit(True, t_1=9),
        line(LOST, partitions=["t:0"]),
        commit(False, t_0=4),
    )
    assert len(found.violations) == 3
    assert "line 1: asynchronous commit of t:3@1 while owning []" in found.violations[0]
    assert "synchronous commit of t:1@9 while owning ['t:0']" in found.violations[1]
    assert "t:0@4" in found.violations[2]
    assert found.lost == 1


def test_member_log_reads_complete_json_lines_incrementally(tmp_path: Path) -> None:
    path = tmp_path / "m1.log"
    log = MemberLog("m1", path)
    assert log.refresh().lines == 0  # not written yet
    path.write_text(
        json.dumps(line(ASSIGNED, partitions=["t:0"])) + "\nplain text from a library\n"
    )
    assert log.refresh().owned == {"t:0"}
    half = json.dumps(commit(False, t_2=1))
    with path.open("a") as handle:
        handle.write(half[:10])
    assert log.refresh().commits == 0  # a half line waits for its end
    with path.open("a") as handle:
        handle.write(half[10:] + "\n")
    found = log.refresh()
    assert (found.commits, len(found.violations)) == (1, 1)
