"""A private PostgreSQL server for the tests (Debian's ``postgresql`` package).

``initdb`` + ``postgres`` in a temporary folder, listening on a free loopback port only
(and a socket in that folder), password authentication (scram-sha-256) for one role that
owns one database. PostgreSQL refuses to run as root, so as root it runs as the
``postgres`` user (``runuser``). Stopped by pid (SIGINT: fast shutdown) and its folder
removed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg


class PostgresError(Exception):
    """The server could not be found, initialised or started."""


def bin_dir() -> Path:
    """The newest /usr/lib/postgresql/<major>/bin holding initdb and postgres."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if not found:
        raise PostgresError(
            "no PostgreSQL server (/usr/lib/postgresql/*/bin/postgres): apt-get install postgresql"
        )
    return found[-1].parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Postgres:
    """``start()``, ``url`` (with the password), ``stop()``."""

    user = "trainer"
    database = "studies"

    def __init__(self) -> None:
        self.password = secrets.token_urlsafe(16)
        self.port = 0
        self.start_seconds = 0.0
        self._folder: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._as: list[str] = []

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            [*self._as, *args], capture_output=True, text=True, timeout=120, check=False
        )
        if result.returncode != 0:
            raise PostgresError(f"{Path(args[0]).name} failed: {result.stderr[-2000:]}")

    def start(self, timeout: float = 60.0) -> None:
        began = time.monotonic()
        binaries = bin_dir()
        self._folder = Path(tempfile.mkdtemp(prefix="st-postgres-"))
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self._folder, "postgres", "postgres")
        data = self._folder / "data"
        pwfile = self._folder / "pw"
        pwfile.write_text(self.password, encoding="utf-8")
        if self._as:
            shutil.chown(pwfile, "postgres", "postgres")
        pwfile.chmod(0o600)
        self._run(
            str(binaries / "initdb"),
            "-D",
            str(data),
            "-U",
            self.user,
            "--pwfile",
            str(pwfile),
            "--auth=scram-sha-256",
            "-E",
            "UTF8",
            "--no-sync",
        )
        pwfile.unlink()
        self.port = _free_port()
        with (self._folder / "postgres.log").open("wb") as log:
            self._process = subprocess.Popen(
                [
                    *self._as,
                    str(binaries / "postgres"),
                    "-D",
                    str(data),
                    "-p",
                    str(self.port),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    f"unix_socket_directories={self._folder}",
                    "-c",
                    "fsync=off",
                    "-c",
                    "max_connections=50",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise PostgresError(f"postgres exited at start: {self.log_tail()}")
            try:
                connection = psycopg.connect(
                    host="127.0.0.1",
                    port=self.port,
                    user=self.user,
                    password=self.password,
                    dbname="postgres",
                    connect_timeout=2,
                    autocommit=True,
                )
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise PostgresError(f"postgres not ready in {timeout} s: {self.log_tail()}")
                time.sleep(0.1)  # polled: the server says nothing when it is ready
        with connection:
            connection.execute(f"CREATE DATABASE {self.database}")
        self.start_seconds = time.monotonic() - began

    def log_tail(self, lines: int = 20) -> str:
        if self._folder is None:
            return ""
        path = self._folder / "postgres.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def new_database(self) -> str:
        """A fresh empty database; returns its URL (same role and password)."""
        name = f"db_{secrets.token_hex(6)}"
        with psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=self.user,
            password=self.password,
            dbname="postgres",
            autocommit=True,
        ) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return self.url.rsplit("/", 1)[0] + f"/{name}"

    def stop(self, timeout: float = 30.0) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            # The process group: with runuser the server is runuser's child.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
