"""HealthServer on a real ephemeral port; Heartbeat with an injected clock."""

from __future__ import annotations

import gzip
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from stream_trainer.operations.http import METRICS_CONTENT_TYPE, HealthServer, Heartbeat
from stream_trainer.operations.metrics import build_metrics


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    assert url.startswith("http://127.0.0.1:")
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310 - loopback http
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def server(clock: FakeClock) -> Iterator[tuple[HealthServer, Heartbeat, dict[str, object]]]:
    registry = CollectorRegistry()
    metrics = build_metrics(registry)
    metrics.records_learnt.inc(5)
    heartbeat = Heartbeat(clock=clock, wall_clock=lambda: 1_700_000_000.0, metrics=metrics)
    state: dict[str, object] = {"ready": (False, "restoring checkpoint")}

    def ready() -> tuple[bool, str]:
        result = state["ready"]
        if isinstance(result, Exception):
            raise result
        assert isinstance(result, tuple)
        return result

    srv = HealthServer(registry, "127.0.0.1", 0, lambda: heartbeat.healthy(30.0), ready)
    srv.start()
    yield srv, heartbeat, state
    srv.stop()


def url(srv: HealthServer, path: str) -> str:
    return f"http://127.0.0.1:{srv.port}{path}"


def test_ephemeral_port_is_reported(
    server: tuple[HealthServer, Heartbeat, dict[str, object]],
) -> None:
    srv, _, _ = server
    assert srv.port > 0


def test_healthz_flips_when_the_loop_stalls(
    server: tuple[HealthServer, Heartbeat, dict[str, object]], clock: FakeClock
) -> None:
    srv, heartbeat, _ = server
    heartbeat.beat()
    status, _, body = get(url(srv, "/healthz"))
    assert (status, body) == (200, b"ok\n")
    clock.now += 31.0
    status, _, body = get(url(srv, "/healthz"))
    assert status == 503
    assert b"poll loop stalled" in body
    heartbeat.beat()
    assert get(url(srv, "/healthz"))[0] == 200


def test_readyz_follows_the_check(
    server: tuple[HealthServer, Heartbeat, dict[str, object]],
) -> None:
    srv, _, state = server
    status, _, body = get(url(srv, "/readyz"))
    assert (status, body) == (503, b"restoring checkpoint\n")
    state["ready"] = (True, "ok")
    assert get(url(srv, "/readyz"))[:3:2] == (200, b"ok\n")
    state["ready"] = RuntimeError("boom")
    status, _, body = get(url(srv, "/readyz"))
    assert status == 503
    assert b"RuntimeError: boom" in body


def test_metrics_endpoint(server: tuple[HealthServer, Heartbeat, dict[str, object]]) -> None:
    srv, heartbeat, _ = server
    heartbeat.beat()
    status, headers, body = get(url(srv, "/metrics"))
    assert status == 200
    assert headers["Content-Type"] == METRICS_CONTENT_TYPE
    text = body.decode()
    assert "stream_trainer_records_learnt_total 5.0" in text
    assert "stream_trainer_poll_heartbeat_timestamp_seconds 1.7e+09" in text
    assert "process_cpu_seconds_total" in text
    status, headers, body = get(url(srv, "/metrics"), {"Accept-Encoding": "gzip"})
    assert headers["Content-Encoding"] == "gzip"
    assert b"stream_trainer_records_learnt_total" in gzip.decompress(body)


def test_unknown_path_is_404(server: tuple[HealthServer, Heartbeat, dict[str, object]]) -> None:
    srv, _, _ = server
    assert get(url(srv, "/"))[0] == 404
    assert get(url(srv, "/metricsx"))[0] == 404


def test_stop_releases_the_port() -> None:
    srv = HealthServer(
        CollectorRegistry(), "127.0.0.1", 0, lambda: (True, "ok"), lambda: (True, "ok")
    )
    with srv:
        port = srv.port
        assert get(url(srv, "/healthz"))[0] == 200
    srv.stop()  # idempotent
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
    again = HealthServer(
        CollectorRegistry(), "127.0.0.1", port, lambda: (True, "ok"), lambda: (True, "ok")
    )
    with again:
        assert again.port == port


def test_heartbeat_age_gap_and_metrics(clock: FakeClock) -> None:
    registry = CollectorRegistry()
    metrics = build_metrics(registry)
    heartbeat = Heartbeat(clock=clock, wall_clock=lambda: 42.0, metrics=metrics)
    assert heartbeat.last_beat is None
    clock.now += 5
    assert heartbeat.healthy(10.0) == (True, "ok")  # counts from construction
    clock.now += 6
    assert heartbeat.healthy(10.0)[0] is False
    heartbeat.beat()
    heartbeat.beat(clock.now + 3.0)
    heartbeat.beat(clock.now + 4.0)
    assert heartbeat.max_gap == 3.0
    assert heartbeat.healthy(10.0, now=clock.now + 14.0)[0] is True
    assert heartbeat.healthy(10.0, now=clock.now + 14.5)[0] is False
    assert registry.get_sample_value("stream_trainer_poll_gap_max_seconds") == 3.0
    assert registry.get_sample_value("stream_trainer_poll_heartbeat_timestamp_seconds") == 42.0


def test_heartbeat_is_thread_safe() -> None:
    heartbeat = Heartbeat()
    start = threading.Barrier(4)

    def beat() -> None:
        start.wait()
        for _ in range(2000):
            heartbeat.beat()

    threads = [threading.Thread(target=beat) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert heartbeat.last_beat is not None
    assert heartbeat.max_gap >= 0.0
    assert heartbeat.healthy(60.0)[0] is True
