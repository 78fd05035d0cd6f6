"""One rule for "every N records or every T seconds": checkpoints, publishes, retrains.

Each owner keeps one :class:`Cadence` and chooses what counts (the service counts records
processed for its checkpoints, the publisher and the full-batch trainer count records
learnt). The time rule always needs at least one counted record: a checkpoint, a version
or a retrain of a state that took in nothing since the last one would be a copy of it.
Times are the caller's (the service's injected clock); the cadence reads no clock itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Trigger = Literal["records", "time"]


@dataclass
class Cadence:
    """Due after ``every_records`` counted records, or after ``every_seconds`` once at
    least one record was counted; None disables that half.

    ``count`` and ``since`` are plain data: an owner that persists the count (the
    publisher in ``TrainingState.records_since_publish``, the trainer in
    ``records_since_retrain``) loads it with :meth:`restart` at install and copies
    ``count`` back after each :meth:`observe` and :meth:`reset`. ``since`` is never
    persisted: after a restore the period starts at the install time, so a restored
    state does not fire the instant it lands.
    """

    every_records: int | None
    every_seconds: float | None
    count: int = 0
    since: float = 0.0

    def __post_init__(self) -> None:
        if self.every_records is not None and self.every_records < 1:
            raise ValueError(f"every_records must be >= 1 or None, not {self.every_records}")
        if self.every_seconds is not None and not self.every_seconds > 0:
            raise ValueError(f"every_seconds must be > 0 or None, not {self.every_seconds}")

    def observe(self, records: int) -> None:
        """Count ``records`` more (zero is allowed and changes nothing)."""
        if records < 0:
            raise ValueError(f"cannot observe a negative number of records: {records}")
        self.count += records

    def trigger(self, now: float) -> Trigger | None:
        """Why it is due at ``now`` ("records" before "time"), or None."""
        if self.every_records is not None and self.count >= self.every_records:
            return "records"
        if (
            self.every_seconds is not None
            and self.count >= 1
            and now - self.since >= self.every_seconds
        ):
            return "time"
        return None

    def due(self, now: float) -> bool:
        """``count >= every_records``, or ``count >= 1 and now - since >= every_seconds``."""
        return self.trigger(now) is not None

    def reset(self, now: float) -> None:
        """The action ran (or was decided against) at ``now``: count from zero again."""
        self.count = 0
        self.since = now

    def restart(self, count: int, now: float) -> None:
        """Install a restored ``count``; the period starts at ``now``."""
        self.count = 0
        self.observe(count)
        self.since = now

    def defer(self, now: float) -> None:
        """An attempt failed at ``now``: keep the count, try again one period later."""
        self.since = now
