"""The one launcher of ``stream-trainer run`` (demo, bench, tests): probes, bounded waits
that fail early with the log's tail, and the stop. No broker is needed: without one the
service stays up, waiting for it, with /readyz 503."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stream_trainer.laptop.embedded import free_port
from stream_trainer.laptop.service_process import (
    ServiceProcessError,
    parse_samples,
    sample_key,
    scrape,
)
from tests.harness import ServiceProcess, service_config

WAITING = "waiting for the Kafka cluster at"
EXPOSITION = """\
# HELP jobs_total Jobs.
# TYPE jobs_total counter
jobs_total{b="2",a="1"} 3.0
# HELP took_seconds Took.
# TYPE took_seconds histogram
took_seconds_bucket{le="1.0"} 1.0
took_seconds_bucket{le="+Inf"} 2.0
took_seconds_count 2.0
took_seconds_sum 1.5
"""


def test_samples_are_keyed_by_name_and_sorted_labels() -> None:
    samples = parse_samples(EXPOSITION)
    assert samples['jobs_total{a="1",b="2"}'] == 3.0
    assert samples['took_seconds_bucket{le="+Inf"}'] == 2.0
    assert samples["took_seconds_sum"] == 1.5
    assert sample_key("x", {"b": "2", "a": "1"}) == 'x{a="1",b="2"}'
    assert sample_key("x", {}) == "x"


def test_scrape_is_none_when_nothing_answers() -> None:
    assert scrape(f"http://127.0.0.1:{free_port()}/metrics", timeout=1.0) is None


@pytest.fixture
def waiting(tmp_path: Path) -> Iterator[ServiceProcess]:
    """A service whose broker never comes up (so it stays up, not ready)."""
    config = service_config(tmp_path, f"127.0.0.1:{free_port()}", "linear20", create=False)
    with ServiceProcess(config, tmp_path) as service:
        yield service


def test_probes_of_a_service_that_is_up_but_not_ready(waiting: ServiceProcess) -> None:
    waiting.poll_until(lambda: WAITING in waiting.http("/readyz")[1], 60, "/readyz: waiting")
    assert waiting.http("/readyz")[0] == 503
    assert waiting.metric("stream_trainer_ready", -1.0) == 0.0
    assert waiting.metric("no_such_sample", 7.0) == 7.0
    started = time.monotonic()
    with pytest.raises(ServiceProcessError, match=f"last /readyz: {WAITING}") as caught:
        waiting.wait_ready(timeout=1.0)
    assert time.monotonic() - started < 10.0
    assert caught.value.returncode is None  # it still runs
    assert waiting.stop(20.0) == 0, waiting.tail()
    assert waiting.returncode == 0 and not waiting.alive()
    assert waiting.scrape() is None
    assert waiting.http("/metrics")[0] == 0


def test_a_wait_fails_as_soon_as_the_service_exits(tmp_path: Path) -> None:
    config = service_config(
        tmp_path, "127.0.0.1:9", "linear20", create=False, overrides={"training": {"mode": "?"}}
    )
    service = ServiceProcess(config, tmp_path).start()
    try:
        started = time.monotonic()
        with pytest.raises(ServiceProcessError, match="exited") as caught:
            service.wait_metric("stream_trainer_records_learnt_total", 1, timeout=120.0)
        assert time.monotonic() - started < 60.0, "failed at the deadline, not at the exit"
        assert caught.value.returncode == 1
        assert "training.mode" in str(caught.value), "the log's tail is in the message"
        assert service.stop(5.0) == 1  # an exited service just gives its code
    finally:
        service.kill()


def test_stop_kills_a_service_that_does_not_stop_and_says_so(waiting: ServiceProcess) -> None:
    waiting.poll_until(lambda: waiting.http("/readyz")[0] == 503, 60, "/readyz answering")
    os.kill(waiting.pid, signal.SIGSTOP)  # SIGTERM stays pending; SIGKILL still works
    with pytest.raises(ServiceProcessError, match="did not stop within 1 s") as caught:
        waiting.stop(1.0)
    assert caught.value.returncode == -signal.SIGKILL
    assert not waiting.alive()
