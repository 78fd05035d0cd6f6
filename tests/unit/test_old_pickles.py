"""Pickles written before the package move still load (docs/design/scale-out.md 9.3).

``tests/data/pickles-0.x/`` holds training states and published models pickled by the
release whose modules were flat (``stream_trainer.state``, ``stream_trainer.learners``,
...), trained on 300 records of three shipped configs. Checkpoints and artifacts name their
classes by those paths, and serving processes unpickle artifacts themselves, so the old
paths stay importable: one-line re-export modules, and ``stream_trainer.state`` (now a
package) resolving the old class names lazily.
"""

from __future__ import annotations

import gzip
import importlib
import pickle
import pickletools
from pathlib import Path

import numpy as np
import pytest

from stream_trainer.state.training_state import TrainingState

DATA = Path(__file__).resolve().parents[1] / "data" / "pickles-0.x"
CONFIGS = ("per-record", "mini-batch", "per-record-selection")


def old_globals(blob: bytes) -> set[str]:
    """``module.name`` of every stream_trainer class the pickle references."""
    strings: list[str] = []
    found: set[str] = set()
    for op, arg, _pos in pickletools.genops(blob):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(str(arg))
        elif op.name == "STACK_GLOBAL" and strings[-2].startswith("stream_trainer."):
            found.add(f"{strings[-2]}.{strings[-1]}")
    return found


@pytest.mark.parametrize("config", CONFIGS)
def test_an_old_training_state_loads_and_predicts(config: str) -> None:
    blob = gzip.decompress((DATA / f"{config}.state.pkl.gz").read_bytes())
    assert "stream_trainer.state.TrainingState" in old_globals(blob)  # really an old one
    state = pickle.loads(blob)
    assert isinstance(state, TrainingState)
    assert state.records_learnt == 300
    assert state.offsets == {("t", 0): 300}
    assert state.model.is_fitted()
    width = len(state.model.feature_names)
    predictions, _scores = state.model.predict_many(np.zeros((1, width)))
    assert len(predictions) == 1


@pytest.mark.parametrize("config", CONFIGS)
def test_an_old_published_model_loads_and_predicts(config: str) -> None:
    blob = gzip.decompress((DATA / f"{config}.model.pkl.gz").read_bytes())
    assert any(name.startswith("stream_trainer.learners.") for name in old_globals(blob))
    model = pickle.loads(blob)
    assert model.is_fitted()
    predictions, _scores = model.predict_many(np.zeros((2, len(model.feature_names))))
    assert len(predictions) == 2


def test_every_old_path_in_the_pickles_resolves_to_the_moved_class() -> None:
    names: set[str] = set()
    for blob_path in DATA.glob("*.pkl.gz"):
        names |= old_globals(gzip.decompress(blob_path.read_bytes()))
    assert len(names) >= 8
    for dotted in sorted(names):
        module_name, _, attribute = dotted.rpartition(".")
        resolved = getattr(importlib.import_module(module_name), attribute)
        assert resolved.__module__ != module_name, f"{dotted} was not moved"
        moved = importlib.import_module(resolved.__module__)
        assert getattr(moved, attribute) is resolved
