"""Apache Kafka 4.x, KRaft, single node, from Maven Central jars.

Jars are resolved once with Maven into
``${STREAM_TRAINER_CACHE:-~/.cache/stream-trainer}/kafka-<version>/libs`` (a marker file
``.complete`` is written after a full copy; later runs reuse it). :class:`KafkaBroker`
formats a temp data dir and runs ``kafka.Kafka`` on two free loopback ports
(PLAINTEXT + CONTROLLER) with a small JVM.

CLI for manual use::

    python -m stream_trainer.testing.kafka_broker fetch          # only download jars
    python -m stream_trainer.testing.kafka_broker start [--port N]  # detached, prints bootstrap
    python -m stream_trainer.testing.kafka_broker status|stop

Needs ``java`` (17+) and, on the first run, ``mvn``. No I/O at import time.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from stream_trainer.laptop.embedded import (
    BrokerStartError,
    free_port,
    register_for_exit,
    unregister_for_exit,
    wait_for_broker,
)
from stream_trainer.operations.processes import pdeathsig_preexec, stop_process_group, tail_file
from stream_trainer.testing.host import file_lock, java_executable

__all__ = [
    "DEFAULT_KAFKA_VERSION",
    "KafkaBroker",
    "KafkaUnavailable",
    "cache_root",
    "fetch_jars",
    "main",
]

DEFAULT_KAFKA_VERSION = "4.1.1"
_SLF4J_VERSION = "2.0.17"
_LOG4J_VERSION = "2.24.3"  # the log4j2 version kafka-server 4.1.x depends on
_MARKER = ".complete"

_POM = """<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.stream-trainer</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId>
      <version>{kafka}</version>
    </dependency>
    <dependency>
      <groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId>
      <version>{slf4j}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j2-impl</artifactId>
      <version>{log4j}</version>
    </dependency>
  </dependencies>
</project>
"""

_LOG4J2 = """status = warn
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
logger.state.name = state.change.logger
logger.state.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.zk.name = org.apache.kafka.common.config
logger.zk.level = WARN
"""

_JVM_OPTS = [
    "-Xms64m",
    "-Xmx512m",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-XX:-UsePerfData",
    "-Djava.awt.headless=true",
]


class KafkaUnavailable(BrokerStartError):
    """Kafka cannot run here: Java or Maven missing, or the jars cannot be resolved."""


def cache_root() -> Path:
    """``$STREAM_TRAINER_CACHE`` or ``~/.cache/stream-trainer`` (not created here)."""
    env = os.environ.get("STREAM_TRAINER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "stream-trainer"


def kafka_home(version: str = DEFAULT_KAFKA_VERSION) -> Path:
    """Cache folder for one Kafka version: ``pom.xml``, ``log4j2.properties``, ``libs/``."""
    return cache_root() / f"kafka-{version}"


def _java() -> str:
    found = java_executable()
    if found is None:
        raise KafkaUnavailable("java not found on PATH (Kafka needs Java 17+)")
    return found


def fetch_jars(version: str = DEFAULT_KAFKA_VERSION, *, timeout: float = 1200.0) -> Path:
    """Return the ``libs`` dir with Kafka ``version`` and its runtime deps, fetching once.

    Runs ``mvn dependency:copy-dependencies`` into a temp dir and renames it into place,
    then writes the ``.complete`` marker; safe against concurrent callers (file lock).
    Raises :class:`KafkaUnavailable` if Maven is missing or fails.
    """
    home = kafka_home(version)
    libs = home / "libs"
    if (libs / _MARKER).is_file():
        return libs
    with file_lock(home / ".lock"):
        if (libs / _MARKER).is_file():
            return libs
        mvn = shutil.which("mvn")
        if mvn is None:
            raise KafkaUnavailable(f"mvn not found on PATH and {libs} is not populated")
        pom = home / "pom.xml"
        pom.write_text(_POM.format(kafka=version, slf4j=_SLF4J_VERSION, log4j=_LOG4J_VERSION))
        staging = home / "libs.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(libs, ignore_errors=True)
        cmd = [
            mvn,
            "-B",
            "-q",
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={staging}",
            "-DincludeScope=runtime",
        ]
        try:
            result = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise KafkaUnavailable(f"mvn timed out after {timeout:.0f} s") from exc
        if result.returncode != 0 or not any(staging.glob(f"kafka_2.13-{version}.jar")):
            output = (result.stdout + result.stderr).strip().splitlines()[-40:]
            raise KafkaUnavailable(
                f"mvn could not resolve org.apache.kafka:kafka_2.13:{version} "
                f"(exit {result.returncode})",
                "\n".join(output),
            )
        staging.rename(libs)
        (libs / _MARKER).write_text(f"kafka_2.13 {version}\n")
    return libs


def _cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding, never starting
    with "-" (kafka-storage would read it as an option: 1 start in 64 failed; Kafka's own
    ``Uuid.randomUuid`` skips those ids for the same reason)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


class KafkaBroker:
    """A single-node KRaft Kafka (broker + controller) on loopback ports.

    ``start()`` fetches jars if needed, formats storage on first start, launches
    ``kafka.Kafka`` and returns once it answers metadata requests (else raises
    :class:`BrokerStartError`/:class:`KafkaUnavailable`). ``stop()`` SIGTERMs and waits
    (SIGKILL after ``timeout``) but keeps data; ``restart()`` = stop + start on the
    same ports and data dir; ``kill()`` is an abrupt SIGKILL. ``close()`` (and leaving
    the context manager) stops and deletes the temp dir. With ``detach=True`` the
    process survives this interpreter (no PDEATHSIG, no atexit stop) for manual use.
    """

    def __init__(
        self,
        *,
        version: str = DEFAULT_KAFKA_VERSION,
        host: str = "127.0.0.1",
        port: int | None = None,
        controller_port: int | None = None,
        work_dir: Path | None = None,
        startup_timeout: float = 60.0,
        extra_config: Mapping[str, str] | None = None,
        detach: bool = False,
    ) -> None:
        self.version = version
        self.host = host
        self.port = port
        self.controller_port = controller_port
        self.startup_timeout = startup_timeout
        self.extra_config = dict(extra_config or {})
        self.detach = detach
        self._work_dir = work_dir
        self._owns_work_dir = work_dir is None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self.start_seconds: float | None = None

    # -- properties -----------------------------------------------------------------

    @property
    def name(self) -> str:
        return "kafka"

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` of the PLAINTEXT listener (stable across ``restart()``)."""
        if self.port is None:
            raise RuntimeError("KafkaBroker has not been started")
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def work_dir(self) -> Path:
        if self._work_dir is None:
            raise RuntimeError("KafkaBroker has not been started")
        return self._work_dir

    @property
    def data_dir(self) -> Path:
        return self.work_dir / "data"

    @property
    def log_path(self) -> Path | None:
        return self._work_dir / "kafka.log" if self._work_dir is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the broker log (kept until ``close()``)."""
        return tail_file(self.log_path, lines)

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> Self:
        """Start (or restart after ``stop()``) and wait until ready. No-op if running."""
        if self.is_running():
            return self
        began = time.monotonic()
        libs = fetch_jars(self.version)
        java = _java()
        if self._work_dir is None:
            self._work_dir = Path(tempfile.mkdtemp(prefix="stream-trainer-kafka-"))
        self._work_dir.mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = free_port(self.host)
        if self.controller_port is None:
            self.controller_port = free_port(self.host)
            while self.controller_port == self.port:
                self.controller_port = free_port(self.host)
        log4j = self._work_dir / "log4j2.properties"
        log4j.write_text(_LOG4J2)
        props = self._work_dir / "server.properties"
        props.write_text(self._server_properties())
        base = [java, *_JVM_OPTS, f"-Dlog4j2.configurationFile={log4j}", "-cp", f"{libs}/*"]
        self._log_file = self.log_path.open("ab") if self.log_path else None
        if not (self.data_dir / "meta.properties").is_file():
            fmt = subprocess.run(
                [
                    *base,
                    "kafka.tools.StorageTool",
                    "format",
                    "--standalone",
                    "--cluster-id",
                    _cluster_id(),
                    "--config",
                    str(props),
                ],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if fmt.returncode != 0:
                raise BrokerStartError(
                    f"kafka StorageTool format failed (exit {fmt.returncode})",
                    "\n".join((fmt.stdout + fmt.stderr).splitlines()[-40:]),
                )
        self._proc = subprocess.Popen(
            [*base, "kafka.Kafka", str(props)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=None if self.detach else pdeathsig_preexec(),  # noqa: PLW1509
            cwd=self._work_dir,
        )
        if not self.detach:
            register_for_exit(self)
        try:
            wait_for_broker(
                self.bootstrap_servers,
                self.startup_timeout,
                proc=self._proc,
                log_path=self.log_path,
            )
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        return self

    def _server_properties(self) -> str:
        controller = f"{self.host}:{self.controller_port}"
        conf: dict[str, str] = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": controller,
            "controller.listener.names": "CONTROLLER",
            "listeners": f"PLAINTEXT://{self.host}:{self.port},CONTROLLER://{controller}",
            "advertised.listeners": f"PLAINTEXT://{self.host}:{self.port}",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "true",
            "delete.topic.enable": "true",
            "num.network.threads": "2",
            "num.io.threads": "2",
            "num.recovery.threads.per.data.dir": "1",
            "background.threads": "2",
        }
        conf.update(self.extra_config)
        return "".join(f"{k}={v}\n" for k, v in conf.items())

    def stop(self, timeout: float = 20.0) -> None:
        """Graceful stop (SIGTERM, SIGKILL after ``timeout`` s); keeps the data dir."""
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process_group(proc, timeout)
        unregister_for_exit(self)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def kill(self) -> None:
        """Abrupt stop (SIGKILL to the process group), like a crashed broker."""
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
        self.stop(timeout=5.0)

    def restart(self, timeout: float = 20.0) -> Self:
        """``stop()`` then ``start()`` on the same ports and data dir."""
        self.stop(timeout)
        return self.start()

    def close(self) -> None:
        """Stop and delete the temp work dir (only if this object created it)."""
        self.stop()
        if self._owns_work_dir and self._work_dir is not None:
            shutil.rmtree(self._work_dir, ignore_errors=True)
            self._work_dir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# -- CLI ------------------------------------------------------------------------------


def _run_dir() -> Path:
    return cache_root() / "kafka-run"


def _read_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a listener could bind ``host:port`` now (SO_REUSEADDR, as the JVM does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _cmd_start(args: argparse.Namespace) -> int:
    run = _run_dir()
    pid_file = run / "kafka.pid"
    if (pid := _read_pid(pid_file)) is not None:
        print((run / "bootstrap").read_text().strip())
        print(f"already running (pid {pid})", file=sys.stderr)
        return 0
    if args.port is not None and not _port_free(args.port):
        # Fails now, not after the JVM's start-up timeout with a bind error in its log.
        print(
            f"port {args.port} on 127.0.0.1 is in use (another Kafka?): stop it, or pick "
            "another port (make kafka-start KAFKA_PORT=19092)",
            file=sys.stderr,
        )
        return 1
    shutil.rmtree(run, ignore_errors=True)  # a manual broker starts empty
    run.mkdir(parents=True)
    broker = KafkaBroker(
        version=args.version,
        port=args.port,
        work_dir=run,
        startup_timeout=args.timeout,
        detach=True,
    )
    try:
        broker.start()
    except BrokerStartError as exc:
        print(f"kafka failed to start: {exc}", file=sys.stderr)
        return 1
    pid_file.write_text(f"{broker.pid}\n")
    (run / "bootstrap").write_text(broker.bootstrap_servers + "\n")
    print(broker.bootstrap_servers)
    print(
        f"pid {broker.pid}, log {broker.log_path}, ready in {broker.start_seconds:.1f} s",
        file=sys.stderr,
    )
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    pid_file = _run_dir() / "kafka.pid"
    pid = _read_pid(pid_file)
    if pid is None:
        print("not running", file=sys.stderr)
        pid_file.unlink(missing_ok=True)
        return 0
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    print(f"stopped (pid {pid})", file=sys.stderr)
    return 0


def _cmd_status(_: argparse.Namespace) -> int:
    run = _run_dir()
    pid = _read_pid(run / "kafka.pid")
    if pid is None:
        print("not running")
        return 1
    print(f"{(run / 'bootstrap').read_text().strip()} (pid {pid})")
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    began = time.monotonic()
    try:
        libs = fetch_jars(args.version)
    except BrokerStartError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(f"{libs} ({time.monotonic() - began:.1f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m stream_trainer.testing.kafka_broker``."""
    parser = argparse.ArgumentParser(
        prog="python -m stream_trainer.testing.kafka_broker",
        description="Single-node Apache Kafka (KRaft) from Maven Central, for manual use.",
    )
    parser.add_argument("--version", default=DEFAULT_KAFKA_VERSION, help="Kafka version")
    sub = parser.add_subparsers(dest="command", required=True)
    p_start = sub.add_parser("start", help="start detached; print the bootstrap address")
    p_start.add_argument("--port", type=int, default=None, help="PLAINTEXT port (default: free)")
    p_start.add_argument("--timeout", type=float, default=90.0, help="startup timeout, s")
    p_stop = sub.add_parser("stop", help="stop the broker started with 'start'")
    p_stop.add_argument("--timeout", type=float, default=30.0, help="SIGKILL after, s")
    sub.add_parser("status", help="print the bootstrap address if running")
    sub.add_parser("fetch", help="only resolve the jars into the cache")
    args = parser.parse_args(argv)
    handlers = {"start": _cmd_start, "stop": _cmd_stop, "status": _cmd_status, "fetch": _cmd_fetch}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
