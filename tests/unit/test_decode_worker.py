"""The decode worker: a real child process gives exactly what the in-process decoder gives."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import numpy as np
import pytest

from stream_trainer.config import RecordSettings
from stream_trainer.ingest.decode_worker import (
    DecodeWorkerError,
    InlineDecoder,
    WorkerDecoder,
    build_unit_decoder,
)
from stream_trainer.ingest.records import DecodedBatch, RecordDecoder
from tests.unit.test_records import FEATURES, POISON, messages, ok

SETTINGS = RecordSettings(features=FEATURES, labels=[0, 1], max_bytes=400)
TASK = "binary_classification"


def poison_mix() -> list[bytes | None]:
    values: list[bytes | None] = []
    for k, (poison, _reason) in enumerate(POISON):
        values.append(ok(b=k, a=-k, c=0.5, y=k % 2))
        values.append(poison)
    return values


def same(a: DecodedBatch, b: DecodedBatch) -> None:
    assert a.X.tolist() == b.X.tolist()
    assert a.y.tolist() == b.y.tolist() and a.y.dtype == b.y.dtype
    assert a.valid_index.tolist() == b.valid_index.tolist()
    assert a.invalid == b.invalid
    assert a.offsets.tolist() == b.offsets.tolist()
    assert a.message_offsets.tolist() == b.message_offsets.tolist()
    assert a.topics == b.topics


@pytest.fixture
def worker() -> Iterator[WorkerDecoder]:
    decoder = WorkerDecoder(SETTINGS, TASK)
    yield decoder
    decoder.close()


def test_worker_decodes_exactly_like_the_inline_decoder(worker: WorkerDecoder) -> None:
    units = [
        messages(poison_mix()),  # every reason, and null values in the frame
        messages([ok(b=i, a=i, c=i, y=i % 2) for i in range(1000)]),  # the common case
        messages([None, b"", None]),  # nothing valid
        messages([]),
    ]
    reference = RecordDecoder(SETTINGS, TASK)
    for unit in units:
        assert not worker.busy
        worker.submit(unit)
        assert worker.busy
        same(worker.result(), reference.decode(unit))


def test_one_unit_at_a_time(worker: WorkerDecoder) -> None:
    unit = messages([ok(1, 2, 3)])
    with pytest.raises(RuntimeError, match="without a submitted unit"):
        worker.result()
    worker.submit(unit)
    with pytest.raises(RuntimeError, match="still being decoded"):
        worker.submit(unit)
    assert len(worker.result()) == 1


def test_a_dead_worker_is_a_clear_error(worker: WorkerDecoder) -> None:
    os.kill(worker.pid, signal.SIGKILL)
    with pytest.raises(DecodeWorkerError, match=rf"pid {worker.pid}.*(answer|write)"):
        worker.submit(messages([ok(1, 2, 3)] * 2000))  # larger than the pipe buffer
        worker.result()


def test_the_worker_exits_when_closed_and_ignores_stop_signals(worker: WorkerDecoder) -> None:
    # A Ctrl-C goes to the terminal's process group: the worker is not in it.
    assert os.getsid(worker.pid) != os.getsid(0)
    worker.submit(messages([ok(1, 2, 3)]))
    assert len(worker.result()) == 1
    os.kill(worker.pid, signal.SIGINT)  # and stopping is the poll loop's job, not a signal's
    os.kill(worker.pid, signal.SIGTERM)
    worker.submit(messages([ok(1, 2, 3)]))
    assert len(worker.result()) == 1
    worker.close(timeout_s=5.0)
    assert worker.returncode == 0


def test_inline_decoder_has_the_same_contract() -> None:
    inline = build_unit_decoder(SETTINGS, TASK, worker=False)
    assert isinstance(inline, InlineDecoder)
    unit = messages(poison_mix())
    inline.submit(unit)
    with pytest.raises(RuntimeError):
        inline.submit(unit)
    batch = inline.result()
    assert np.isfinite(batch.X).all() and len(batch.invalid) == len(POISON)


def test_a_bad_layout_fails_in_the_parent() -> None:
    clash = RecordSettings(features=["y"], labels=[0, 1], features_field=None)
    with pytest.raises(ValueError, match="clash"):
        WorkerDecoder(clash, TASK)


def hostile_unit() -> list[bytes | None]:
    """Values that raised inside the decoder before issue 19 (each killed the worker)."""
    depth = 10_000
    nested = b"[" * depth + b"]" * depth
    return [
        ok(1, 2, 3),
        b'{"x": {"a": 1, "b": 2, "c": 3}, "y": 1, "meta": ' + nested + b"}",  # RecursionError
        ok(4, 5, 6, y=0),
        b'{"x": {"a": ' + nested + b', "b": 2, "c": 3}, "y": 1}',
        b'{"x": {"a": 1, "b": 2, "c": 3}, "y": ' + b"9" * 30 + b"}",  # OverflowError
        b'{"x": {"a": 1, "b": 2, "c": 3}, "y": 1, "id": "\xff"}',  # was learnt
        ok(7, 8, 9),
    ]


@pytest.mark.parametrize("in_worker", [True, False], ids=["worker", "inline"])
def test_values_that_raised_inside_the_decoder_are_rejected_and_the_decoder_lives_on(
    in_worker: bool,
) -> None:
    settings = RecordSettings(features=FEATURES, labels=[0, 1], max_bytes=100_000)
    decoder = build_unit_decoder(settings, TASK, worker=in_worker)
    try:
        unit = messages(hostile_unit())
        decoder.submit(unit)
        batch = decoder.result()
        assert batch.valid_index.tolist() == [0, 2, 6]
        assert batch.X.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
        assert [(r.offset - 100, r.reason) for r in batch.invalid] == [
            (1, "malformed_json"),
            (3, "malformed_json"),
            (4, "unknown_label"),
            (5, "malformed_json"),
        ]
        same(batch, RecordDecoder(settings, TASK).decode(unit))
        decoder.submit(messages([ok(1, 1, 1)]))  # the worker is still there
        assert len(decoder.result()) == 1
        if isinstance(decoder, WorkerDecoder):
            assert decoder.returncode is None
    finally:
        decoder.close()
