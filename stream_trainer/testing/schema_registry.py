"""Apicurio Registry 2.4.2.Final (Confluent REST API at ``/apis/ccompat/v7``) for tests.

The published ``io.apicurio:apicurio-registry-app`` jar is a Quarkus application without a
runner, so the small Maven project in ``stream_trainer/testing/apicurio/`` (pom.xml,
application.properties, settings.xml) re-runs the Quarkus build over it, from Maven Central
alone. :func:`build` does that once into
``${STREAM_TRAINER_CACHE:-~/.cache/stream-trainer}/apicurio-2.4.2/app`` (file lock; the
build runs in a scratch folder renamed into place; a ``.complete`` marker holds a digest of
the project files, so editing them rebuilds). :class:`SchemaRegistry` runs it with Java 17
on a free loopback port, in memory (H2), and returns once the API answers.

CLI::

    python -m stream_trainer.testing.schema_registry build     # only build into the cache
    python -m stream_trainer.testing.schema_registry run [--port N]  # foreground, Ctrl-C stops

Needs ``java`` (17+) and, on the first run, ``mvn``. No I/O at import time.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Self

from stream_trainer.laptop.embedded import (
    BrokerStartError,
    free_port,
    register_for_exit,
)
from stream_trainer.operations.processes import pdeathsig_preexec, tail_file
from stream_trainer.testing.host import ServerProcess, file_lock, java_executable
from stream_trainer.testing.kafka_broker import cache_root

__all__ = [
    "APICURIO_VERSION",
    "CCOMPAT_PATH",
    "RegistryUnavailable",
    "SchemaRegistry",
    "build",
    "main",
]

APICURIO_VERSION = "2.4.2"
CCOMPAT_PATH = "/apis/ccompat/v7"
_PROJECT = Path(__file__).resolve().parent / "apicurio"
_PROJECT_FILES = ("pom.xml", "application.properties", "settings.xml")
_MARKER = ".complete"

# A small JVM: the registry holds a handful of schemas in tests. C1 only and the serial
# collector start faster and keep RSS near 200 MB.
_JVM_OPTS = [
    "-Xms32m",
    "-Xmx256m",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-XX:-UsePerfData",
    "-Djava.awt.headless=true",
]


class RegistryUnavailable(BrokerStartError):
    """Apicurio cannot run here: Java or Maven missing, or the build failed."""


def registry_home() -> Path:
    """Cache folder of the build: ``app/`` (the Quarkus fast-jar), ``.lock``, ``build.log``."""
    return cache_root() / f"apicurio-{APICURIO_VERSION}"


def _project_digest() -> str:
    digest = hashlib.sha256()
    for name in _PROJECT_FILES:
        digest.update(name.encode() + b"\0" + (_PROJECT / name).read_bytes() + b"\0")
    return digest.hexdigest()


def _java() -> str:
    found = java_executable()
    if found is None:
        raise RegistryUnavailable("java not found on PATH (Apicurio needs Java 17+)")
    return found


def _is_built(app: Path, digest: str) -> bool:
    marker = app / _MARKER
    return (
        marker.is_file()
        and marker.read_text().strip() == digest
        and (app / "quarkus-run.jar").is_file()
    )


def build(*, timeout: float = 1200.0) -> Path:
    """Return the built application folder (holding ``quarkus-run.jar``), building it once.

    Runs ``mvn package`` on a copy of the project in a scratch folder next to the cache,
    renames ``target/quarkus-app`` into place and writes the marker last; concurrent callers
    wait on a file lock and reuse the result. Raises :class:`RegistryUnavailable` if Maven
    is missing or the build fails (the message holds the end of Maven's output).
    """
    home = registry_home()
    app = home / "app"
    digest = _project_digest()
    if _is_built(app, digest):
        return app
    with file_lock(home / ".lock"):
        if _is_built(app, digest):
            return app
        mvn = shutil.which("mvn")
        if mvn is None:
            raise RegistryUnavailable(f"mvn not found on PATH and {app} is not built")
        scratch = Path(tempfile.mkdtemp(prefix="build-", dir=home))
        try:
            resources = scratch / "src" / "main" / "resources"
            resources.mkdir(parents=True)
            shutil.copy(_PROJECT / "pom.xml", scratch / "pom.xml")
            shutil.copy(_PROJECT / "settings.xml", scratch / "settings.xml")
            shutil.copy(_PROJECT / "application.properties", resources)
            cmd = [
                mvn,
                "-B",
                "-q",
                "-s",
                str(scratch / "settings.xml"),
                "-f",
                str(scratch / "pom.xml"),
                "-DskipTests",
                "package",
            ]
            try:
                result = subprocess.run(
                    cmd, capture_output=True, text=True, timeout=timeout, check=False
                )
            except subprocess.TimeoutExpired as exc:
                raise RegistryUnavailable(f"mvn timed out after {timeout:.0f} s") from exc
            (home / "build.log").write_text(result.stdout + result.stderr)
            built = scratch / "target" / "quarkus-app"
            if result.returncode != 0 or not (built / "quarkus-run.jar").is_file():
                output = (result.stdout + result.stderr).strip().splitlines()[-40:]
                raise RegistryUnavailable(
                    f"mvn could not build Apicurio Registry {APICURIO_VERSION}.Final "
                    f"(exit {result.returncode}; full log {home / 'build.log'})",
                    "\n".join(output),
                )
            shutil.rmtree(app, ignore_errors=True)
            built.rename(app)
            (app / _MARKER).write_text(digest + "\n")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return app


class SchemaRegistry(ServerProcess):
    """One Apicurio Registry process on ``127.0.0.1:<port>``, in memory.

    ``start()`` builds if needed, launches the JVM and returns once
    ``GET <url>/subjects`` answers 200 (else raises :class:`BrokerStartError`). ``stop()``
    ends it (schemas are lost: in-memory storage); ``start()`` again reuses the port.
    ``url`` is the Confluent API base (``http://127.0.0.1:<port>/apis/ccompat/v7``).
    """

    def __init__(
        self, *, host: str = "127.0.0.1", port: int | None = None, startup_timeout: float = 90.0
    ) -> None:
        self.host = host
        self.port = port
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._work_dir: Path | None = None
        self.start_seconds: float | None = None

    @property
    def name(self) -> str:
        return "apicurio"

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("SchemaRegistry has not been started")
        return f"http://{self.host}:{self.port}{CCOMPAT_PATH}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path | None:
        return self._work_dir / "apicurio.log" if self._work_dir is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return tail_file(self.log_path, lines)

    def rss_bytes(self) -> int | None:
        """Resident memory of the JVM now (Linux ``/proc``), or None if not running."""
        if self._proc is None:
            return None
        try:
            status = Path(f"/proc/{self._proc.pid}/status").read_text()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return None

    def start(self) -> Self:
        """Start and wait until the Confluent API answers. No-op if running."""
        if self.is_running():
            return self
        began = time.monotonic()
        app = build()
        java = _java()
        if self._work_dir is None:
            self._work_dir = Path(tempfile.mkdtemp(prefix="stream-trainer-apicurio-"))
        if self.port is None:
            self.port = free_port(self.host)
        props = {
            "quarkus.http.host": self.host,
            "quarkus.http.port": str(self.port),
            # The app's own defaults keep 20-100 H2 connections open: far more than tests need.
            "quarkus.datasource.jdbc.min-size": "1",
            "quarkus.datasource.jdbc.initial-size": "1",
            "quarkus.datasource.jdbc.max-size": "8",
            "quarkus.log.level": "WARN",
            'quarkus.log.category."io.apicurio".level': "WARN",
        }
        args = [java, *_JVM_OPTS, *(f"-D{k}={v}" for k, v in props.items())]
        assert self.log_path is not None
        self._log_file = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [*args, "-jar", str(app / "quarkus-run.jar")],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=pdeathsig_preexec(),  # noqa: PLW1509
            cwd=self._work_dir,
        )
        register_for_exit(self)
        try:
            self._wait_ready(began + self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        return self

    def _wait_ready(self, deadline: float) -> None:
        """Poll ``GET <url>/subjects`` until 200, the process exits, or ``deadline``."""
        pause = threading.Event()
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise BrokerStartError(
                    f"Apicurio exited during start-up (code {code})", self.log_tail()
                )
            try:
                with urllib.request.urlopen(f"{self.url}/subjects", timeout=2.0) as response:  # noqa: S310
                    if response.status == 200:
                        return
                    last = f"HTTP {response.status}"
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            pause.wait(0.1)
        raise BrokerStartError(
            f"Apicurio did not answer on {self.url} within {self.startup_timeout:.0f} s "
            f"(last: {last})",
            self.log_tail(),
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m stream_trainer.testing.schema_registry``."""
    parser = argparse.ArgumentParser(
        prog="python -m stream_trainer.testing.schema_registry",
        description=f"Apicurio Registry {APICURIO_VERSION}.Final from Maven Central, in memory.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="only build into the cache (prints the folder and seconds)")
    p_run = sub.add_parser("run", help="run in the foreground until Ctrl-C / SIGTERM")
    p_run.add_argument("--port", type=int, default=None, help="HTTP port (default: free)")
    args = parser.parse_args(argv)
    began = time.monotonic()
    try:
        if args.command == "build":
            app = build()
            print(f"{app} ({time.monotonic() - began:.1f} s)")
            return 0
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        with SchemaRegistry(port=args.port) as registry:
            rss = (registry.rss_bytes() or 0) / 2**20
            print(registry.url)
            print(
                f"pid {registry.pid}, ready in {registry.start_seconds:.1f} s, RSS {rss:.0f} MiB",
                file=sys.stderr,
            )
            with contextlib.suppress(KeyboardInterrupt):
                stop.wait()
    except BrokerStartError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
