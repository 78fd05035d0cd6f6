"""Replaying one member's JSON log to check "no commit for an unowned partition" (design
13.1) and to see who owns what while a scale-out test runs.

A member logs (message text exact, extra fields top-level in the JSON line):

- ``partitions assigned`` / ``partitions revoked`` / ``partitions lost`` with
  ``partitions``: a list of ``"topic:p"``;
- ``offsets committed`` with ``offsets`` (``{"topic:p": next offset}``) and
  ``synchronous`` (bool), for every commit it makes.

Ownership is replayed in log order: a partition is owned from its ``assigned`` line until
its ``revoked`` or ``lost`` line; the revoke callback commits before it logs ``revoked``,
so its synchronous hand-over commit falls inside. Every committed partition must be
owned at that line. Each process is one member (dynamic membership: a restart is a new
member), so each log is replayed on its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ASSIGNED = "partitions assigned"
REVOKED = "partitions revoked"
LOST = "partitions lost"
COMMITTED = "offsets committed"
COLLECTED = "key objects collected"  # key scope: ``deleted`` key objects no checkpoint names


@dataclass
class Ownership:
    """One member's ownership and commits, replayed line by line (:meth:`feed`)."""

    member: str
    owned: set[str] = field(default_factory=set)
    ever: set[str] = field(default_factory=set)  # partitions it was ever assigned
    commits: int = 0  # committed partition entries checked
    synchronous: int = 0  # of which in a synchronous commit
    assigned: int = 0  # partition entries of each kind
    revoked: int = 0
    lost: int = 0
    violations: list[str] = field(default_factory=list)
    lines: int = 0
    key_objects_deleted: int = 0

    def feed(self, line: dict[str, Any]) -> None:
        """Apply one parsed log line (lines of other events are counted and ignored)."""
        self.lines += 1
        event = line.get("event")
        if event in (ASSIGNED, REVOKED, LOST):
            partitions = set(line.get("partitions") or [])
            if event == ASSIGNED:
                self.owned |= partitions
                self.ever |= partitions
                self.assigned += len(partitions)
            elif event == REVOKED:
                self.owned -= partitions
                self.revoked += len(partitions)
            else:
                self.owned -= partitions
                self.lost += len(partitions)
        elif event == COLLECTED:
            self.key_objects_deleted += int(line.get("deleted") or 0)
        elif event == COMMITTED:
            offsets: dict[str, int] = line.get("offsets") or {}
            synchronous = bool(line.get("synchronous"))
            for partition, offset in sorted(offsets.items()):
                self.commits += 1
                self.synchronous += synchronous
                if partition not in self.owned:
                    kind = "synchronous" if synchronous else "asynchronous"
                    self.violations.append(
                        f"{self.member} log line {self.lines}: {kind} commit of "
                        f"{partition}@{offset} while owning {sorted(self.owned)}"
                    )


class MemberLog:
    """A member's log file, followed incrementally: :meth:`refresh` feeds the complete
    JSON lines written since the last call (others, e.g. a crash's half line or a
    library's plain text, are skipped) into :attr:`ownership`."""

    def __init__(self, member: str, path: Path) -> None:
        self.path = path
        self.ownership = Ownership(member)
        self._offset = 0

    def refresh(self) -> Ownership:
        """The ownership after every complete line so far."""
        try:
            with self.path.open("rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return self.ownership
        end = data.rfind(b"\n") + 1  # only complete lines; the rest is read next time
        self._offset += end
        for raw in data[:end].splitlines():
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if isinstance(line, dict):
                self.ownership.feed(line)
        return self.ownership
