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

Messages go to the worker as a raw values frame (not pickled: this half runs on the poll
loop); results come back as pickled frames (:mod:`stream_trainer.operations.child_process`).
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Sequence
from typing import IO, Final, Protocol, cast

import numpy as np

from stream_trainer.config import RecordSettings
from stream_trainer.ingest.records import DecodedBatch, DecodedValues, MessageLike, RecordDecoder
from stream_trainer.operations.child_process import (
    OK,
    ChildWorker,
    WorkerDied,
    ignore_stop_signals,
    protocol_streams,
    read_exactly,
    read_frame,
    serve,
    write_frame,
)

_VALUES_HEADER: Final = struct.Struct(">QQ")


class DecodeWorkerError(WorkerDied):
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


def _read_values(stream: IO[bytes]) -> list[bytes | None]:
    count, size = _VALUES_HEADER.unpack(read_exactly(stream, _VALUES_HEADER.size))
    lengths = np.frombuffer(read_exactly(stream, 8 * count), dtype=np.int64).tolist()
    buffer = read_exactly(stream, size)
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
    """Decodes in a child process (``python -m stream_trainer.ingest.decode_worker``).

    The child gets SIGKILL if this process dies (Linux) and exits when its stdin closes. It
    runs in its own session and ignores SIGINT / SIGTERM: stopping is the poll loop's job,
    which drains the unit in the worker first.
    """

    def __init__(self, record: RecordSettings, task: str) -> None:
        super().__init__()
        # Validates the layout here, in the parent, so a bad one fails at start-up.
        self._local = RecordDecoder(record, task)
        self._child = ChildWorker(
            "stream_trainer.ingest.decode_worker", "decode worker", error=DecodeWorkerError
        )
        setup = (record.model_dump(mode="json"), task)
        self._child.send(lambda stream: write_frame(stream, setup))

    @property
    def pid(self) -> int:
        """The worker's process id."""
        return self._child.pid

    @property
    def returncode(self) -> int | None:
        """The worker's exit code, or None while it runs."""
        return self._child.returncode

    def submit(self, messages: Sequence[MessageLike]) -> None:
        """See :class:`UnitDecoder`."""
        self._hold(messages)  # first: a busy decoder must not get a second unit's frame
        values = [message.value() for message in messages]
        self._child.send(lambda stream: _write_values(stream, values))

    def result(self) -> DecodedBatch:
        """See :class:`UnitDecoder`."""
        messages = self._take()
        status, body = self._child.receive()
        if status != OK:
            raise self._child.died(f"decoding failed:\n{body}")
        decoded: DecodedValues = body
        return self._local.assemble(messages, decoded)

    def close(self, timeout_s: float = 5.0) -> None:
        """See :class:`UnitDecoder`: closes its stdin, then waits (kills after ``timeout_s``)."""
        self._child.close(timeout_s)


def build_unit_decoder(record: RecordSettings, task: str, worker: bool) -> UnitDecoder:
    """A :class:`WorkerDecoder` when ``worker``, else an :class:`InlineDecoder`."""
    if worker:
        return WorkerDecoder(record, task)
    return InlineDecoder(RecordDecoder(record, task))


def worker_main(stdin: IO[bytes], stdout: IO[bytes]) -> int:
    """The child's loop: first frame (record settings, task), then values in, verdicts out."""
    ignore_stop_signals()
    try:
        record_json, task = read_frame(stdin)
    except EOFError:
        return 0
    decoder = RecordDecoder(RecordSettings.model_validate(record_json), task)
    return serve(stdin, stdout, _read_values, decoder.decode_values)


if __name__ == "__main__":
    sys.exit(worker_main(*protocol_streams()))
