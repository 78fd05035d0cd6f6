"""The one HTTP port: ``/metrics``, ``/healthz``, ``/readyz``; and the poll-loop heartbeat.

prometheus_client's own ``start_http_server`` answers every path with metrics, so
it cannot serve health checks; this server routes by path and 404s the rest.
"""

from __future__ import annotations

import gzip
import logging
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest

if TYPE_CHECKING:
    from stream_trainer.operations.metrics import Metrics

Check = Callable[[], tuple[bool, str]]

_log = logging.getLogger(__name__)
# generate_latest() writes the 0.0.4 text format; say so (CONTENT_TYPE_LATEST now
# announces 1.0.0, which older Prometheus servers do not know).
METRICS_CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4


class Heartbeat:
    """Poll-loop liveness, thread-safe.

    The poll loop calls :meth:`beat` every iteration, whether or not ``consume()``
    returned records, so an unreachable broker never looks like a stall; only a
    loop that stops iterating (blocked, deadlocked, SIGSTOPped) goes stale.
    Before the first beat the age counts from construction.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
    ) -> None:
        self._clock = clock
        self._wall_clock = wall_clock
        self._metrics = metrics
        self._lock = threading.Lock()
        self._created = clock()
        self._last: float | None = None
        self._max_gap = 0.0

    def beat(self, now: float | None = None) -> None:
        """Record one loop iteration at ``now`` (monotonic seconds; default the clock)."""
        now = self._clock() if now is None else now
        with self._lock:
            if self._last is not None:
                self._max_gap = max(self._max_gap, now - self._last)
            self._last = now
            max_gap = self._max_gap
        if self._metrics is not None:
            self._metrics.poll_heartbeat_timestamp.set(self._wall_clock())
            self._metrics.poll_gap_max.set(max_gap)

    @property
    def last_beat(self) -> float | None:
        """Monotonic time of the last beat, or None before the first."""
        with self._lock:
            return self._last

    @property
    def max_gap(self) -> float:
        """Largest gap seen between two consecutive beats, in seconds."""
        with self._lock:
            return self._max_gap

    def age(self, now: float | None = None) -> float:
        """Seconds since the last beat (or since construction, before the first)."""
        now = self._clock() if now is None else now
        with self._lock:
            since = self._created if self._last is None else self._last
        return now - since

    def healthy(self, max_age_s: float, now: float | None = None) -> tuple[bool, str]:
        """``(True, "ok")`` unless the last beat is older than ``max_age_s``."""
        age = self.age(now)
        if age > max_age_s:
            return False, f"poll loop stalled: last iteration {age:.1f}s ago (max {max_age_s}s)"
        return True, "ok"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Restart on the same port while the old socket is in TIME_WAIT.
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        registry: CollectorRegistry,
        checks: dict[str, Check],
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.registry = registry
        self.checks = checks
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._metrics()
        elif path in self.server.checks:
            self._check(self.server.checks[path])
        else:
            self._send(404, b"not found\n", "text/plain; charset=utf-8")

    def _metrics(self) -> None:
        body = generate_latest(self.server.registry)
        headers = {}
        if "gzip" in self.headers.get("Accept-Encoding", ""):
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        self._send(200, body, METRICS_CONTENT_TYPE, headers)

    def _check(self, check: Check) -> None:
        try:
            ok, reason = check()
        except Exception as exc:  # a broken check must answer 503, not kill the handler
            ok, reason = False, f"check failed: {type(exc).__name__}: {exc}"
        status = 200 if ok else 503
        self._send(status, (reason + "\n").encode(), "text/plain; charset=utf-8")

    def _send(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # Probes hit these paths every few seconds: debug, and through our logging.
        _log.debug("http %s", format % args)


class HealthServer:
    """``/metrics``, ``/healthz``, ``/readyz`` on one port, served from a daemon thread.

    ``health`` and ``ready`` return ``(ok, reason)``; they run on request threads,
    so they must be thread-safe and fast. 200 + reason when ok, else 503 + reason.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        health: Check,
        ready: Check,
    ) -> None:
        self._registry = registry
        self._host = host
        self._requested_port = port
        self._checks = {"/healthz": health, "/readyz": ready}
        self._bound_port: int | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (the ephemeral one when constructed with port 0)."""
        return self._requested_port if self._bound_port is None else self._bound_port

    def start(self) -> None:
        """Bind and serve in a daemon thread. Raises OSError if the port is taken."""
        if self._server is not None:
            raise RuntimeError("HealthServer already started")
        self._server = _Server((self._host, self._requested_port), self._registry, self._checks)
        self._bound_port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="http-server",
            daemon=True,
        )
        self._thread.start()
        _log.info("http server listening", extra={"host": self._host, "port": self.port})

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop serving and close the socket; idempotent."""
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout_s)
        self._server = None
        self._thread = None

    def __enter__(self) -> HealthServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
