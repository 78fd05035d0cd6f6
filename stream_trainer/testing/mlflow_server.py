"""A real MLflow tracking server for tests (SQLite backend, artifact proxy).

MLflow is installed from PyPI into its own virtualenv under
``${STREAM_TRAINER_CACHE:-~/.cache/stream-trainer}/mlflow-venv`` (once, under a file lock;
a marker written last holds the requirement, so an interrupted install or a
change of :data:`MLFLOW_REQUIREMENT` reinstall), so neither the project's venv nor its image
carries MLflow's dependency tree. :class:`MlflowServer` runs ``mlflow server`` with a SQLite
database and ``--serve-artifacts`` in a temp folder on a free loopback port, and returns
once ``/health`` answers.

CLI::

    python -m stream_trainer.testing.mlflow_server install       # only install into the cache
    python -m stream_trainer.testing.mlflow_server run [--port N]  # foreground, Ctrl-C stops

No I/O at import time.
"""

from __future__ import annotations

import argparse
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
from stream_trainer.testing.host import ServerProcess, file_lock
from stream_trainer.testing.kafka_broker import cache_root

__all__ = ["MLFLOW_REQUIREMENT", "MlflowServer", "MlflowUnavailable", "install", "main"]

# The newest 3.x when this was written; the bound keeps a 4.0 from changing the REST API
# under the tests unnoticed.
MLFLOW_REQUIREMENT = "mlflow>=3.17,<4"
_MARKER = ".installed"


class MlflowUnavailable(BrokerStartError):
    """MLflow cannot run here: no Python venv, or pip could not install it."""


def venv_home() -> Path:
    """The cached virtualenv holding MLflow."""
    return cache_root() / "mlflow-venv"


def _is_installed(venv: Path) -> bool:
    marker = venv / _MARKER
    return (
        marker.is_file()
        and marker.read_text().strip() == MLFLOW_REQUIREMENT
        and (venv / "bin" / "mlflow").is_file()
    )


def install(*, timeout: float = 1200.0) -> Path:
    """Return the virtualenv holding MLflow (``bin/mlflow``), installing it once.

    Concurrent callers wait on a file lock and reuse the result. Raises
    :class:`MlflowUnavailable` when the venv cannot be made or pip fails (with the end of
    pip's output).
    """
    venv = venv_home()
    if _is_installed(venv):
        return venv
    with file_lock(venv.parent / "mlflow-venv.lock"):
        if _is_installed(venv):
            return venv
        # Built in place (a venv's scripts hold its absolute path); the marker, written
        # last, is what makes it count, so an interrupted install is redone.
        shutil.rmtree(venv, ignore_errors=True)
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [
                str(venv / "bin" / "pip"),
                "install",
                "--quiet",
                "--disable-pip-version-check",
                MLFLOW_REQUIREMENT,
            ],
        ]
        for cmd in steps:
            try:
                result = subprocess.run(
                    cmd, capture_output=True, text=True, timeout=timeout, check=False
                )
            except subprocess.TimeoutExpired as exc:
                raise MlflowUnavailable(f"{cmd[0]} timed out after {timeout:.0f} s") from exc
            if result.returncode != 0:
                output = (result.stdout + result.stderr).strip().splitlines()[-30:]
                raise MlflowUnavailable(
                    f"could not install {MLFLOW_REQUIREMENT} (exit {result.returncode})",
                    "\n".join(output),
                )
        (venv / _MARKER).write_text(MLFLOW_REQUIREMENT + "\n")
    return venv


class MlflowServer(ServerProcess):
    """One ``mlflow server`` on ``127.0.0.1:<port>``: SQLite backend, artifacts proxied.

    ``start()`` installs MLflow if needed, launches the server and returns once
    ``GET <url>/health`` answers 200 (else raises :class:`BrokerStartError`). ``stop()``
    ends it; ``start()`` again reuses the port and the data (the database and artifacts
    stay in the work folder until :meth:`close`).
    """

    def __init__(
        self, *, host: str = "127.0.0.1", port: int | None = None, startup_timeout: float = 120.0
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
        return "mlflow"

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("MlflowServer has not been started")
        return f"http://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path | None:
        return self._work_dir / "mlflow.log" if self._work_dir is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return tail_file(self.log_path, lines)

    def start(self) -> Self:
        """Start and wait until ``/health`` answers. No-op if running."""
        if self.is_running():
            return self
        began = time.monotonic()
        venv = install()
        if self._work_dir is None:
            self._work_dir = Path(tempfile.mkdtemp(prefix="stream-trainer-mlflow-"))
        if self.port is None:
            self.port = free_port(self.host)
        work = self._work_dir
        cmd = [
            str(venv / "bin" / "mlflow"),
            "server",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{work / 'mlflow.db'}",
            "--serve-artifacts",
            "--artifacts-destination",
            str(work / "artifacts"),
        ]
        assert self.log_path is not None
        self._log_file = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=pdeathsig_preexec(),  # noqa: PLW1509
            cwd=work,
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
        pause = threading.Event()
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise BrokerStartError(
                    f"mlflow server exited during start-up (code {code})", self.log_tail()
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2.0) as response:  # noqa: S310
                    if response.status == 200:
                        return
                    last = f"HTTP {response.status}"
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            pause.wait(0.2)
        raise BrokerStartError(
            f"mlflow server did not answer on {self.url} within {self.startup_timeout:.0f} s "
            f"(last: {last})",
            self.log_tail(),
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m stream_trainer.testing.mlflow_server``."""
    parser = argparse.ArgumentParser(
        prog="python -m stream_trainer.testing.mlflow_server",
        description=f"An MLflow tracking server ({MLFLOW_REQUIREMENT}) from PyPI.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("install", help="only install into the cache (prints the folder and seconds)")
    p_run = sub.add_parser("run", help="run in the foreground until Ctrl-C / SIGTERM")
    p_run.add_argument("--port", type=int, default=None, help="HTTP port (default: free)")
    args = parser.parse_args(argv)
    began = time.monotonic()
    try:
        if args.command == "install":
            print(f"{install()} ({time.monotonic() - began:.1f} s)")
            return 0
        stop = threading.Event()
        # SIGTERM must end the server's whole group too (its job runner and consumers).
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        with MlflowServer(port=args.port) as server:
            print(f"MLflow at {server.url} (started in {server.start_seconds:.1f} s)", flush=True)
            stop.wait()
    except BrokerStartError as error:
        print(f"error: {error}\n{error.log_tail}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
