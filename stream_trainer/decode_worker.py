"""Decoding one unit ahead of training, in a child process (the decode pipeline).

The poll loop hands a unit's message values to the worker and, while the worker decodes
them, trains on the previous unit: JSON decoding and learning then run on two cores instead
of taking turns on one (threads cannot do this: msgspec and the learners' Python both hold
the GIL; a thread pipeline measured 30 % *slower*). Only values cross the pipe; the Kafka
messages, and with them every offset, stay in the poll loop.

Contract of :class:`UnitDecoder`: at most one unit is in the decoder at a time; ``result``
returns the :class:`DecodedBatch` of the unit given to the last ``submit``. The poll loop
therefore always collects a unit before it submits the next, which also keeps the pipes free
of deadlock (neither side ever writes while the other is writing).

Frames: an 8-byte big-endian length, then a pickle (protocol 5). Pickle is safe here: both
ends are this package, over the anonymous pipes of a child this process started.
"""

from __future__ import annotations

import contextlib
import fcntl
import pickle
import signal
import struct
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import IO, Any, Final, Protocol, cast

import numpy as np

from stream_trainer.config import RecordSettings
from stream_trainer.records import DecodedBatch, DecodedValues, MessageLike, RecordDecoder

_HEADER: Final = struct.Struct(">Q")
_VALUES_HEADER: Final = struct.Struct(">QQ")
_PIPE_BYTES: Final = 1 << 20
_OK: Final = "ok"
_FAILED: Final = "failed"


class DecodeWorkerError(RuntimeError):
    """The decode worker died or failed; the message says how. The service must restart."""


class UnitDecoder(Protocol):
    """Decodes whole units, possibly while the caller does other work (see module doc)."""

    @property
    def busy(self) -> bool:
        """True between ``submit`` and ``result``."""

    def submit(self, messages: Sequence[MessageLike]) -> None:
        """Start decoding ``messages``; the decoder must not be busy."""

    def result(self) -> DecodedBatch:
        """The decoded unit of the last ``submit`` (waits for it); raises DecodeWorkerError."""

    def close(self) -> None:
        """Release the worker, if any. Idempotent."""


class _OneUnitSlot:
    """The one-unit-at-a-time bookkeeping both decoders share."""

    def __init__(self) -> None:
        self._messages: Sequence[MessageLike] | None = None

    @property
    def busy(self) -> bool:
        """See :class:`UnitDecoder`."""
        return self._messages is not None

    def _hold(self, messages: Sequence[MessageLike]) -> None:
        if self._messages is not None:
            raise RuntimeError("submit while a unit is still being decoded")
        self._messages = messages

    def _take(self) -> Sequence[MessageLike]:
        messages, self._messages = self._messages, None
        if messages is None:
            raise RuntimeError("result without a submitted unit")
        return messages


class InlineDecoder(_OneUnitSlot):
    """Decodes on the caller's thread when ``result`` is called (no worker process)."""

    def __init__(self, decoder: RecordDecoder) -> None:
        super().__init__()
        self._decoder = decoder

    def submit(self, messages: Sequence[MessageLike]) -> None:
        """See :class:`UnitDecoder`."""
        self._hold(messages)

    def result(self) -> DecodedBatch:
        """See :class:`UnitDecoder`."""
        return self._decoder.decode(self._take())

    def close(self) -> None:
        """See :class:`UnitDecoder`."""
        self._messages = None


def _widen_pipe(stream: IO[bytes]) -> None:
    """Grow a pipe to hold a whole unit (Linux), so writing one never waits for the reader
    (a 64 kB pipe made the poll loop wait ~5 % of its time on the worker's reads)."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    if set_size is None:
        return
    with contextlib.suppress(OSError):  # capped by /proc/sys/fs/pipe-max-size: best effort
        fcntl.fcntl(stream.fileno(), set_size, _PIPE_BYTES)


def _write_frame(stream: IO[bytes], obj: Any) -> None:
    payload = pickle.dumps(obj, protocol=5)
    stream.write(_HEADER.pack(len(payload)) + payload)
    stream.flush()


def _read_frame(stream: IO[bytes]) -> Any:
    """The next object, or raises EOFError when the other end has gone."""
    (size,) = _HEADER.unpack(_read_exactly(stream, _HEADER.size))
    return pickle.loads(_read_exactly(stream, size))  # noqa: S301 - our own child over a private pipe


def _write_values(stream: IO[bytes], values: list[bytes | None]) -> None:
    """A values frame: (count, buffer size), int64 lengths (-1 = null), the joined values.
    Raw, not pickled: this half of the exchange runs on the poll loop (2x cheaper)."""
    if None in values:
        lengths = np.array([-1 if v is None else len(v) for v in values], dtype=np.int64)
        buffer = b"".join([v for v in values if v is not None])
    else:
        present = cast("list[bytes]", values)
        lengths = np.fromiter(map(len, present), dtype=np.int64, count=len(present))
        buffer = b"".join(present)
    stream.write(_VALUES_HEADER.pack(len(values), len(buffer)))
    stream.write(lengths.tobytes())
    stream.write(buffer)
    stream.flush()


def _read_exactly(stream: IO[bytes], size: int) -> bytes:
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("pipe closed")
    return data


def _read_values(stream: IO[bytes]) -> list[bytes | None]:
    count, size = _VALUES_HEADER.unpack(_read_exactly(stream, _VALUES_HEADER.size))
    lengths = np.frombuffer(_read_exactly(stream, 8 * count), dtype=np.int64).tolist()
    buffer = _read_exactly(stream, size)
    values: list[bytes | None] = []
    start = 0
    for length in lengths:
        if length < 0:
            values.append(None)
            continue
        values.append(buffer[start : start + length])
        start += length
    return values


class WorkerDecoder(_OneUnitSlot):
    """Decodes in a child process (``python -m stream_trainer.decode_worker``).

    The child gets SIGKILL if this process dies (Linux) and exits when its stdin closes. It
    runs in its own session and ignores SIGINT / SIGTERM: stopping is the poll loop's job,
    which drains the unit in the worker first.
    """

    def __init__(self, record: RecordSettings, task: str) -> None:
        from stream_trainer.embedded import pdeathsig_preexec  # noqa: PLC0415

        super().__init__()
        # Validates the layout here, in the parent, so a bad one fails at start-up.
        self._local = RecordDecoder(record, task)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "stream_trainer.decode_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            preexec_fn=pdeathsig_preexec(),  # noqa: PLW1509 - one prctl, set up in the parent
            # Its own session: a Ctrl-C on the terminal's process group must not kill it
            # before the poll loop has drained the unit it holds.
            start_new_session=True,
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._to_worker: IO[bytes] = self._proc.stdin
        self._from_worker: IO[bytes] = self._proc.stdout
        for stream in (self._to_worker, self._from_worker):
            _widen_pipe(stream)
        self._closed = False
        setup = (record.model_dump(mode="json"), task)
        self._send(lambda stream: _write_frame(stream, setup))

    @property
    def pid(self) -> int:
        """The worker's process id."""
        return self._proc.pid

    def _send(self, write: Callable[[IO[bytes]], None]) -> None:
        try:
            write(self._to_worker)
        except (BrokenPipeError, OSError, ValueError) as error:
            raise self._died(f"cannot write to it ({error})") from None

    def _died(self, how: str) -> DecodeWorkerError:
        code = self._proc.poll()
        status = "still running" if code is None else f"exit code {code}"
        return DecodeWorkerError(f"decode worker (pid {self._proc.pid}, {status}): {how}")

    def submit(self, messages: Sequence[MessageLike]) -> None:
        """See :class:`UnitDecoder`."""
        self._hold(messages)  # first: a busy decoder must not get a second unit's frame
        values = [message.value() for message in messages]
        self._send(lambda stream: _write_values(stream, values))

    def result(self) -> DecodedBatch:
        """See :class:`UnitDecoder`."""
        messages = self._take()
        try:
            status, body = _read_frame(self._from_worker)
        except (EOFError, OSError) as error:
            raise self._died(f"no answer ({error})") from None
        if status != _OK:
            raise self._died(f"decoding failed:\n{body}")
        decoded: DecodedValues = body
        return self._local.assemble(messages, decoded)

    def close(self, timeout_s: float = 5.0) -> None:
        """See :class:`UnitDecoder`: closes its stdin, then waits (kills after ``timeout_s``)."""
        if self._closed:
            return
        self._closed = True
        for stream in (self._to_worker, self._from_worker):
            with contextlib.suppress(OSError):
                stream.close()
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def build_unit_decoder(record: RecordSettings, task: str, worker: bool) -> UnitDecoder:
    """A :class:`WorkerDecoder` when ``worker``, else an :class:`InlineDecoder`."""
    if worker:
        return WorkerDecoder(record, task)
    return InlineDecoder(RecordDecoder(record, task))


def worker_main(stdin: IO[bytes], stdout: IO[bytes]) -> int:
    """The child's loop: first frame (record settings, task), then values in, verdicts out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        record_json, task = _read_frame(stdin)
    except EOFError:
        return 0
    decoder = RecordDecoder(RecordSettings.model_validate(record_json), task)
    while True:
        try:
            values = _read_values(stdin)
        except EOFError:
            return 0
        try:
            reply: tuple[str, Any] = (_OK, decoder.decode_values(values))
        except Exception:  # a bug, not bad data: report it, the parent restarts
            import traceback  # noqa: PLC0415

            reply = (_FAILED, traceback.format_exc()[-4000:])
        try:
            _write_frame(stdout, reply)
        except (BrokenPipeError, OSError):
            return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.stdin.buffer, sys.stdout.buffer))
