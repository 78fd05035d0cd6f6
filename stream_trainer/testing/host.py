"""What the test servers (Kafka, Apicurio, SeaweedFS, MLflow) share on the host: the Java
they run on, the file lock that keeps concurrent builds of one cache folder apart, and the
stop / close lifecycle of a server process (:class:`ServerProcess`)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from stream_trainer.laptop.embedded import unregister_for_exit
from stream_trainer.operations.processes import stop_process_group


def java_executable() -> str | None:
    """``$JAVA_HOME/bin/java`` if it exists, else ``java`` on PATH, else None."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    return shutil.which("java")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created with its folder) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class ServerProcess:
    """The lifecycle the test servers share: ``start`` (the subclass's) launches the server
    in a process group of its own, logging to ``_log_file`` in ``_work_dir``; ``stop`` ends
    the group and keeps the work folder (so ``start`` can run again on the same data);
    ``close`` stops and deletes the folder. A context manager: start, then close."""

    _proc: subprocess.Popen[bytes] | None
    _log_file: IO[bytes] | None
    _work_dir: Path | None

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (SIGKILL after ``timeout`` s) the server's process group."""
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process_group(proc, timeout)
        unregister_for_exit(self)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def close(self) -> None:
        """Stop and delete the work folder (data, log)."""
        self.stop()
        if self._work_dir is not None:
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
