"""A stop signal that arrives during start-up is honoured once the service exists."""

from __future__ import annotations

import signal

from stream_trainer.operations.signals import ShutdownSignals


class _Target:
    def __init__(self) -> None:
        self.stops = 0

    def request_stop(self) -> None:
        self.stops += 1


def test_signal_before_attach_stops_the_service_when_attached() -> None:
    handlers = ShutdownSignals(bound_s=3600)  # the watchdog never fires within a test
    handlers._handle(signal.SIGTERM, None)
    assert handlers.requested
    target = _Target()
    handlers.attach(target)
    assert target.stops == 1


def test_signal_after_attach_stops_the_service_at_once() -> None:
    handlers = ShutdownSignals(bound_s=3600)
    target = _Target()
    handlers.attach(target)
    assert target.stops == 0 and not handlers.requested
    handlers._handle(signal.SIGTERM, None)
    assert target.stops == 1
