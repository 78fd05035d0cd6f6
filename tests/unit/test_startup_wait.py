"""The start-up wait for the Kafka cluster: retries, never gives up, stops on request."""

from __future__ import annotations

import logging
import threading

import pytest

from stream_trainer.operations.app import wait_for_kafka

BOOTSTRAP = "broker:9092"


class _Probe:
    """Answers each attempt from a script; counts attempts."""

    def __init__(self, answers: list[str | None], stop: threading.Event | None = None) -> None:
        self._answers = answers
        self._stop = stop
        self.attempts = 0

    def __call__(self) -> str | None:
        self.attempts += 1
        answer = self._answers.pop(0) if self._answers else None
        if self._stop is not None and not self._answers:
            self._stop.set()
        return answer


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 5.0  # every attempt looks 5 s later
        return self.now


def test_waits_through_every_failure_and_logs_each_reason_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    down = "no broker answered (Local: Broker transport failure)"
    missing = "control topic c does not exist (create it, or unset topics.control)"
    probe = _Probe([down, down, down, missing, missing, None])
    reasons: list[str] = []
    with caplog.at_level(logging.INFO, logger="stream_trainer.operations.app"):
        assert wait_for_kafka(probe, BOOTSTRAP, threading.Event(), reasons.append, _Clock())
    assert probe.attempts == 6
    assert reasons == [
        f"waiting for the Kafka cluster at {BOOTSTRAP}: {r}"
        for r in [down, down, down, missing, missing]
    ]
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        f"waiting for the Kafka cluster at {BOOTSTRAP}: {down}; retrying until it answers",
        f"waiting for the Kafka cluster at {BOOTSTRAP}: {missing}; retrying until it answers",
        "Kafka cluster reachable",
    ]


def test_a_long_wait_is_logged_again_every_30_s(caplog: pytest.LogCaptureFixture) -> None:
    probe = _Probe(["no broker answered"] * 13 + [None])  # 5 s apart: 65 s of waiting
    with caplog.at_level(logging.WARNING, logger="stream_trainer.operations.app"):
        assert wait_for_kafka(probe, BOOTSTRAP, threading.Event(), lambda _r: None, _Clock())
    assert len(caplog.records) == 3  # at 5 s, 35 s and 65 s


def test_a_stop_request_ends_the_wait() -> None:
    stop = threading.Event()
    probe = _Probe(["no broker answered"] * 3, stop=stop)
    assert not wait_for_kafka(probe, BOOTSTRAP, stop, lambda _r: None)
    assert probe.attempts == 3
