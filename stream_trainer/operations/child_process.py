"""A worker child of this package, spoken to over its stdin / stdout pipes.

Both workers (decoding, full-batch fitting) use it. The child is ``python -m <module>``; it
gets SIGKILL if the thread that started it dies (Linux), runs in its own session (a Ctrl-C
on the terminal's process group must not kill it before the service has drained it) and
exits when its stdin closes.

Frames: an 8-byte big-endian length, then a pickle (protocol 5). Pickle is safe here: both
ends are this package, over the anonymous pipes of a child this process started.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pickle
import signal
import struct
import subprocess
import sys
import traceback
from collections.abc import Callable
from typing import IO, Any, Final

from stream_trainer.errors import StreamTrainerError
from stream_trainer.operations.processes import pdeathsig_preexec

_HEADER: Final = struct.Struct(">Q")
_PIPE_BYTES: Final = 1 << 20
OK: Final = "ok"
FAILED: Final = "failed"


def widen_pipe(stream: IO[bytes]) -> None:
    """Grow a pipe to 1 MB (Linux), so writing a frame rarely waits for the reader
    (a 64 kB pipe made the poll loop wait ~5 % of its time on the decode worker's reads)."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    if set_size is None:
        return
    with contextlib.suppress(OSError):  # capped by /proc/sys/fs/pipe-max-size: best effort
        fcntl.fcntl(stream.fileno(), set_size, _PIPE_BYTES)


def write_frame(stream: IO[bytes], obj: Any) -> None:
    """Write one pickled frame and flush it."""
    payload = pickle.dumps(obj, protocol=5)
    stream.write(_HEADER.pack(len(payload)) + payload)
    stream.flush()


def read_exactly(stream: IO[bytes], size: int) -> bytes:
    """``size`` bytes, or raises EOFError when the other end has gone."""
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("pipe closed")
    return data


def read_frame(stream: IO[bytes]) -> Any:
    """The next object, or raises EOFError when the other end has gone."""
    (size,) = _HEADER.unpack(read_exactly(stream, _HEADER.size))
    return pickle.loads(read_exactly(stream, size))  # noqa: S301 - our own child over a private pipe


def ignore_stop_signals() -> None:
    """For the child: stopping is the parent's job (it drains or abandons the work)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def protocol_streams() -> tuple[IO[bytes], IO[bytes]]:
    """For the child: its frame streams. Anything else printed to stdout (a verbose
    estimator, a library warning) goes to stderr, so it cannot corrupt a frame."""
    frames_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return sys.stdin.buffer, frames_out


def serve(
    stdin: IO[bytes],
    stdout: IO[bytes],
    read_job: Callable[[IO[bytes]], Any],
    handle: Callable[[Any], Any],
) -> int:
    """For the child: answer each job with ``(OK, handle(job))``, or ``(FAILED, traceback)``
    if ``handle`` raised, until stdin closes. Returns the child's exit code."""
    while True:
        try:
            job = read_job(stdin)
        except EOFError:
            return 0
        try:
            reply: tuple[str, Any] = (OK, handle(job))
        except Exception:  # the parent decides what a failure means
            reply = (FAILED, traceback.format_exc()[-4000:])
        try:
            write_frame(stdout, reply)
        except (BrokenPipeError, OSError):
            return 0


class WorkerDied(StreamTrainerError, RuntimeError):
    """A worker child died, could not be written to, or reported a failure."""


class ChildWorker:
    """One running ``python -m <module>`` child and its two pipes."""

    def __init__(self, module: str, kind: str, error: type[WorkerDied] = WorkerDied) -> None:
        self._kind = kind
        self._error = error
        self._proc = subprocess.Popen(
            [sys.executable, "-m", module],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            preexec_fn=pdeathsig_preexec(),  # noqa: PLW1509 - one prctl, set up in the parent
            start_new_session=True,
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self.to_child: IO[bytes] = self._proc.stdin
        self.from_child: IO[bytes] = self._proc.stdout
        for stream in (self.to_child, self.from_child):
            widen_pipe(stream)
        self._closed = False

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """The child's exit code, or None while it runs."""
        return self._proc.poll()

    def send(self, write: Callable[[IO[bytes]], None]) -> None:
        """Run ``write`` on the child's stdin; raises WorkerDied if the child has gone."""
        try:
            write(self.to_child)
        except (BrokenPipeError, OSError, ValueError) as error:
            raise self.died(f"cannot write to it ({error})") from None

    def receive(self) -> Any:
        """The child's next frame; raises WorkerDied if the child has gone."""
        try:
            return read_frame(self.from_child)
        except (EOFError, OSError, ValueError) as error:
            raise self.died(f"no answer ({error})") from None

    def died(self, how: str) -> WorkerDied:
        """An error naming the child, its state and ``how`` it failed."""
        code = self._proc.poll()
        status = "still running" if code is None else f"exit code {code}"
        return self._error(f"{self._kind} (pid {self._proc.pid}, {status}): {how}")

    def close(self, timeout_s: float = 5.0, kill: bool = False) -> None:
        """Close its stdin and wait (SIGKILL after ``timeout_s``, or at once if ``kill``).
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        if kill:
            self._proc.kill()
        for stream in (self.to_child, self.from_child):
            with contextlib.suppress(OSError):
                stream.close()
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
