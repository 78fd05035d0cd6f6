"""Named crash points, so fault-injection tests can ``kill -9`` the service at an exact step.

Inert unless the process was started with ``STREAM_TRAINER_CRASH_AT=point:n`` (crash the
n-th time ``point`` is reached). The composition root reads the variable once at start;
nothing here does I/O at import. The points:

- ``after_learn``: a unit is learnt, its checkpoint not written;
- ``mid_checkpoint_write``: half of the checkpoint's bytes are in the temp file;
- ``after_rename``: the checkpoint is renamed into place, the directory not yet fsynced;
- ``after_checkpoint``: the checkpoint is durable, its offsets not committed;
- ``before_version_visible``: a version's artifact is written, the write that makes the
  version visible (rename, or the create-only ``metadata.json`` on a store) not done;
- ``after_version_files``: a version's files are durable, its event not sent;
- ``mid_retrain``: a full retrain is running;
- ``in_revoke``: inside the revoke callback, before its checkpoint;
- ``mid_handover``: partition scope, in the revoke callback: the revoked slot's
  checkpoint is durable, its offset not committed;
- ``after_claim``: partition scope, in the assign callback: the new owner claimed the
  slot (the previous owner is fenced), nothing restored or read yet;
- ``after_command``: control commands are acted on, their checkpoint not written;
- ``before_ack``: that checkpoint is durable, the acks not sent.
"""

from __future__ import annotations

import os
import signal
import threading

CRASH_ENV = "STREAM_TRAINER_CRASH_AT"
POINTS = (
    "after_learn",
    "mid_checkpoint_write",
    "before_checkpoint_visible",
    "after_rename",
    "after_checkpoint",
    "before_version_visible",
    "after_version_files",
    "mid_retrain",
    "in_revoke",
    "mid_handover",
    "after_claim",
    "after_command",
    "before_ack",
)


class CrashPoints:
    """Counts arrivals at named points and SIGKILLs the process at the configured one."""

    def __init__(self, spec: str | None) -> None:
        self._point: str | None = None
        self._at = 0
        self._seen = 0
        self._lock = threading.Lock()
        if spec:
            point, _, count = spec.partition(":")
            if point not in POINTS:
                raise ValueError(f"{CRASH_ENV}: unknown point {point!r}; one of {POINTS}")
            self._point, self._at = point, int(count or "1")

    def reached(self, point: str) -> None:
        """Called at ``point``; kills the process (no cleanup at all) when it is the one."""
        if point != self._point:
            return
        with self._lock:
            self._seen += 1
            if self._seen >= self._at:
                os.kill(os.getpid(), signal.SIGKILL)


NO_CRASHES = CrashPoints(None)
