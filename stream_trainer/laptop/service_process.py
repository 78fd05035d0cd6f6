"""``stream-trainer run`` as a child process, observed over its HTTP port.

The one place that launches the service and reads its ``/metrics``: the demo, the bench
and the test suite (tests/harness.py) all go through :class:`ServiceProcess`. The child
runs the production code path (``python -m stream_trainer run --config FILE``) with its
output appended to a log file; every wait is a bounded poll that fails early, with the
log's tail, when the process has exited.

Nothing here does I/O at import time; prometheus_client's parser is imported on first use
(the CLI imports this module for argument parsing of every laptop command).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Self, TypeVar

from stream_trainer.errors import StreamTrainerError
from stream_trainer.operations.processes import tail_file

__all__ = ["ServiceProcess", "ServiceProcessError", "parse_samples", "sample_key", "scrape"]

KILL_WAIT_S = 10.0  # reaping after SIGKILL: the kernel frees a process this fast
_T = TypeVar("_T")


class ServiceProcessError(StreamTrainerError):
    """The service exited, was not ready, or did not stop in time; the message ends with
    its log's tail. ``returncode`` is the exit code when the process has ended."""

    def __init__(self, message: str, returncode: int | None = None) -> None:
        super().__init__(message)
        self.returncode = returncode


def sample_key(name: str, labels: Mapping[str, str]) -> str:
    """``name{k="v",...}`` with the labels sorted, or ``name`` without labels."""
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def parse_samples(text: str) -> dict[str, float]:
    """Every sample of a Prometheus text exposition as ``{sample_key: value}``."""
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    return {
        sample_key(sample.name, sample.labels): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _get(url: str, timeout: float) -> tuple[int, str]:
    """(status, body) of GET ``url``; (0, reason) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - http only
            return int(response.status), response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode("utf-8", "replace")
    except OSError as error:  # URLError, refused, reset, timeout
        return 0, str(error)


def scrape(url: str, timeout: float = 2.0) -> dict[str, float] | None:
    """The samples at a ``/metrics`` URL (:func:`parse_samples`); None unless it answers 200."""
    status, body = _get(url, timeout)
    return parse_samples(body) if status == 200 else None


class ServiceProcess:
    """``stream-trainer run --config CONFIG`` in a child process.

    ``env`` is added to this process's environment. ``port`` is the service's HTTP port
    (``http.port`` in the config), on ``host``. ``new_session`` puts the child in its own
    session (a terminal's Ctrl-C then reaches only the parent); ``preexec_fn`` runs in the
    child before exec (e.g. :func:`stream_trainer.operations.processes.pdeathsig_preexec`, or an
    rlimit). The log file is appended to, so a restarted service keeps one log.
    """

    def __init__(
        self,
        config_path: Path,
        *,
        port: int,
        log_path: Path,
        workdir: Path | None = None,
        env: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        new_session: bool = False,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.config_path = config_path
        self.port = port
        self.host = host
        self.log_path = log_path
        self.workdir = workdir if workdir is not None else config_path.parent
        self.env = {**os.environ, **(env or {})}
        self.new_session = new_session
        self.preexec_fn = preexec_fn
        self.proc: subprocess.Popen[bytes] | None = None

    # -- the process --------------------------------------------------------------------

    def start(self) -> Self:
        """Start the process and return at once (see :meth:`wait_ready`)."""
        # The child keeps its own descriptor of the log; ours is closed on leaving.
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "stream_trainer", "run", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.workdir,
                start_new_session=self.new_session,
                preexec_fn=self.preexec_fn,  # noqa: PLW1509 - a prctl or rlimit, set by the caller
            )
        return self

    def _started(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise ServiceProcessError("the service was not started")
        return self.proc

    @property
    def pid(self) -> int:
        return self._started().pid

    @property
    def returncode(self) -> int | None:
        """The exit code once the process ended (negative: that signal), else None."""
        return None if self.proc is None else self.proc.poll()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float | None = None) -> int:
        """The exit code once the process ended; ``None`` waits as long as it runs (the
        demo's ``--keep-running``). Raises ``subprocess.TimeoutExpired`` after ``timeout``."""
        return self._started().wait(timeout)

    def stop(self, timeout: float) -> int:
        """SIGTERM (graceful: drain, checkpoint, commit) and wait up to ``timeout`` s for
        the exit code. Past it, SIGKILL and raise :class:`ServiceProcessError` (its
        ``returncode`` is the killed one). An exited process just gives its code."""
        proc = self._started()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            code = self.kill()
            raise ServiceProcessError(
                f"the service did not stop within {timeout:g} s of SIGTERM; killed:\n"
                + self.tail(),
                code,
            ) from None

    def kill(self) -> int | None:
        """SIGKILL if running, and reap; the exit code (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait(KILL_WAIT_S)

    def tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the service's log ('' before it wrote any)."""
        return tail_file(self.log_path, lines)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()

    # -- HTTP -----------------------------------------------------------------------------

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def http(self, path: str, timeout: float = 2.0) -> tuple[int, str]:
        """(status, body) of GET ``path``; (0, reason) when nothing answers."""
        return _get(self.url(path), timeout)

    def scrape(self) -> dict[str, float] | None:
        """``/metrics`` as ``{sample_key: value}``; None while it does not answer 200."""
        return scrape(self.url("/metrics"))

    def metric(self, key: str, default: float = 0.0) -> float:
        """One sample (``name`` or ``name{k="v",...}``, labels sorted); ``default`` when it
        is absent or the service does not answer."""
        return (self.scrape() or {}).get(key, default)

    # -- bounded waits ----------------------------------------------------------------------

    def poll_until(
        self, check: Callable[[], _T | None], timeout: float, what: str, interval: float = 0.2
    ) -> _T:
        """Call ``check`` until it returns something other than None/False, at most
        ``timeout`` s; :class:`ServiceProcessError` (with the log tail) as soon as the
        process has exited, or at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                code = self.returncode
                raise ServiceProcessError(
                    f"the service exited ({code}) while waiting for {what}:\n{self.tail()}", code
                )
            value = check()
            if value is not None and value is not False:
                return value
            if time.monotonic() > deadline:
                raise ServiceProcessError(
                    f"timed out after {timeout:g} s waiting for {what}:\n{self.tail()}"
                )
            time.sleep(interval)  # the period of a bounded poll

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until ``/readyz`` answers 200 (restored, partitions assigned)."""
        last = ""

        def ready() -> bool:
            nonlocal last
            status, last = self.http("/readyz")
            return status == 200

        try:
            self.poll_until(ready, timeout, "/readyz 200")
        except ServiceProcessError as error:
            raise ServiceProcessError(
                f"{error}\nlast /readyz: {last.strip()}", error.returncode
            ) from None

    def wait_metric(self, key: str, at_least: float, timeout: float = 60.0) -> float:
        """Until sample ``key`` is >= ``at_least``; returns the value seen."""

        def reached() -> float | None:
            value = self.metric(key, -1.0)
            return value if value >= at_least else None

        return self.poll_until(reached, timeout, f"{key} >= {at_least:g}")
