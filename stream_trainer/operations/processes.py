"""Child-process hygiene shared by the service's workers and the laptop tooling.

A product module: the worker children (:mod:`stream_trainer.operations.child_process`), the embedded
broker (:mod:`stream_trainer.laptop.embedded`), the Apache Kafka test broker and the demo
all use it, so none of them has to import another's module (the service and its workers
must not load :mod:`stream_trainer.laptop`). Linux is the target; elsewhere the death
signal is simply not set.

Nothing here does I/O at import time.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["pdeathsig_preexec", "stop_process_group", "tail_file"]

_PR_SET_PDEATHSIG = 1


def pdeathsig_preexec() -> Callable[[], None] | None:
    """Return a ``preexec_fn`` that makes the child get SIGKILL when its parent dies.

    Linux only (``None`` elsewhere). The signal follows the *thread* that called
    ``Popen``: start children from a thread that outlives them (normally the main thread).
    libc is resolved here, in the parent, so the child only makes one syscall.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def _preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return _preexec


def stop_process_group(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM the process group led by ``proc``, wait ``timeout`` s, then SIGKILL it.

    Returns once ``proc`` has been reaped. Safe to call on an exited process.
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    # Kill stragglers in the group even if the leader has exited.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def tail_file(path: Path | None, lines: int = 40) -> str:
    """Return the last ``lines`` lines of a child's text log ('' if it is missing)."""
    if path is None:
        return ""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])
