"""SIGTERM/SIGINT handling for ``run``: installed first thing, before the heavy imports.

The first signal asks the service to stop gracefully and starts a watchdog that ends the
process once the shutdown bound has passed; a second signal exits at once. A signal that
arrives while the service is still starting (imports, restore, group join) is remembered
and honoured as soon as the service exists, so the process never dies by the default
action with its work unflushed.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType
from typing import Protocol

log = logging.getLogger(__name__)


class Stoppable(Protocol):
    """What a signal stops."""

    def request_stop(self) -> None:
        """Ask for a graceful stop (must be safe to call from a signal handler)."""


class ShutdownSignals:
    """The process's SIGTERM/SIGINT handler; attach the service once it is built."""

    def __init__(self, bound_s: float) -> None:
        self._bound_s = bound_s
        self._target: Stoppable | None = None
        self._requested = threading.Event()
        self._count = 0

    def set_bound(self, bound_s: float) -> None:
        """The shutdown bound, once the config is known."""
        self._bound_s = bound_s

    def install(self) -> None:
        """Replace the default handlers (call on the main thread)."""
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    @property
    def requested(self) -> bool:
        """True once a stop signal arrived."""
        return self._requested.is_set()

    def attach(self, target: Stoppable) -> None:
        """From now on signals stop ``target``; one that already arrived stops it now."""
        self._target = target
        if self._requested.is_set():
            target.request_stop()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self._count += 1
        if self._count > 1:
            os._exit(128 + signum)
        self._requested.set()
        if self._target is not None:
            self._target.request_stop()
        threading.Thread(target=self._watchdog, name="shutdown-watchdog", daemon=True).start()

    def _watchdog(self) -> None:
        # A deadline, not synchronisation: a graceful stop exits the process before it.
        time.sleep(self._bound_s)
        log.error("graceful stop exceeded its bound; exiting", extra={"bound_s": self._bound_s})
        logging.shutdown()
        os._exit(1)
