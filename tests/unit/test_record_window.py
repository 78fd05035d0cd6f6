"""RecordWindow: a ring of recent records whose pickle holds the records, not the ring."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from stream_trainer.state.training_state import RecordWindow


def filled(rows: int, capacity: int = 100) -> RecordWindow:
    window = RecordWindow(capacity, 4, np.int64)
    rng = np.random.default_rng(rows)
    X = rng.random((rows, 4))
    window.extend(X, np.arange(rows), np.arange(rows).astype(object), X[:, 0])
    return window


def same(a: RecordWindow, b: RecordWindow) -> bool:
    return a.size == b.size and all(
        np.array_equal(x, y) for x, y in zip(a.arrays(), b.arrays(), strict=True)
    )


@pytest.mark.parametrize("rows", [0, 7, 100, 163])  # empty, partial, exactly full, wrapped
def test_a_pickled_window_holds_the_same_records_and_goes_on_the_same(rows: int) -> None:
    window = filled(rows)
    restored = pickle.loads(pickle.dumps(window, protocol=5))
    assert same(window, restored) and restored.capacity == window.capacity
    more = np.ones((60, 4))
    for w in (window, restored):
        w.extend(more, np.full(60, 9), None, None)
    assert same(window, restored)


def test_an_empty_window_pickles_no_buffer() -> None:
    big = RecordWindow(100_000, 20, np.float64)  # a full-batch window: 16 MB of float64
    assert len(pickle.dumps(big, protocol=5)) < 2_000
    assert len(pickle.dumps(filled(7), protocol=5)) < len(pickle.dumps(filled(100), protocol=5))


def test_a_window_pickled_whole_by_an_earlier_release_still_loads() -> None:
    window = filled(163)
    earlier = RecordWindow.__new__(RecordWindow)
    earlier.__setstate__(dict(vars(window)))  # what pickle hands over for a whole pickle
    assert same(window, earlier)
