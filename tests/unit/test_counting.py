"""The counting learner: admitted only under its switch, counts through both adapters,
survives a checkpoint, and its verdict finds what is lost and what is twice."""

from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stream_trainer.config import Settings, settings_from_mapping
from stream_trainer.operations.app import new_state
from stream_trainer.state.checkpoint import CheckpointStore
from stream_trainer.testing.counting import (
    FEATURES,
    RIVER_PATH,
    SKLEARN_PATH,
    CountingError,
    counts_of,
    judge_counts,
    learnt_counts,
)
from stream_trainer.training.learners import TESTING_ENV, IncompatibleLearner, build_model

KEY = b"k" * 32


def settings(path: str, mode: str, directory: Path = Path("/tmp/ck")) -> Settings:
    return settings_from_mapping(
        {
            "kafka": {"bootstrap_servers": "localhost:9092", "group_id": "g"},
            "topics": {"input": ["in"], "dead_letter": "dlq", "versions": "v"},
            "record": {"features": list(FEATURES)},
            "model": {"name": "m", "task": "regression", "learner": {"path": path}},
            "training": {"mode": mode},
            "checkpoint": {"dir": str(directory), "allow_unsigned": True},
            "registry": {"root": "/tmp/reg"},
        },
        env={},
    )


@pytest.fixture
def switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TESTING_ENV, "1")


@pytest.mark.parametrize("value", [None, "0", "yes"])
@pytest.mark.parametrize("path", [RIVER_PATH, SKLEARN_PATH])
def test_refused_without_the_switch_naming_the_field(
    path: str, value: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if value is None:
        monkeypatch.delenv(TESTING_ENV, raising=False)
    else:
        monkeypatch.setenv(TESTING_ENV, value)
    with pytest.raises(IncompatibleLearner, match=rf"model\.learner\.path: .*{TESTING_ENV}=1"):
        build_model(settings(path, "mini_batch"))


def test_other_testing_paths_stay_refused(switch: None) -> None:
    with pytest.raises(IncompatibleLearner, match=r"model\.learner\.path: .* is not allowed"):
        build_model(settings("stream_trainer.testing.counting.CountingProducer", "per_record"))


def test_sklearn_form_refuses_per_record_like_any_sklearn_learner(switch: None) -> None:
    with pytest.raises(IncompatibleLearner, match="per_record needs a River learner"):
        build_model(settings(SKLEARN_PATH, "per_record"))


ROWS = np.array([[0, 0, 7], [1, 0, 3], [0, 1, 7], [1, 1, 9]], dtype=np.float64)
Y = np.array([0.7, 0.3, 0.7, 0.9])
EXPECTED = Counter({(0, 0, 7): 1, (1, 0, 3): 1, (0, 1, 7): 1, (1, 1, 9): 1})


@pytest.mark.parametrize(
    ("path", "mode"),
    [(RIVER_PATH, "per_record"), (RIVER_PATH, "mini_batch"), (SKLEARN_PATH, "mini_batch")],
)
def test_counts_each_learnt_row_and_pickles(path: str, mode: str, switch: None) -> None:
    model = build_model(settings(path, mode))
    assert counts_of(model) == Counter()
    if mode == "per_record":
        for row, y in zip(ROWS.tolist(), Y.tolist(), strict=True):
            model.learn_one(dict(zip(model.feature_names, row, strict=True)), y)
    else:
        model.learn_many(ROWS[:2], Y[:2], None)
        model.learn_many(ROWS[2:], Y[2:], None)
    values, _ = model.predict_many(ROWS)
    assert values.tolist() == [0.0] * len(ROWS)
    assert model.is_fitted() and model.parameters_finite()
    restored = pickle.loads(pickle.dumps(model, protocol=5))
    assert counts_of(restored) == EXPECTED
    model.learn_many(ROWS[:1], Y[:1], None)
    assert counts_of(model)[(0, 0, 7)] == 2
    assert counts_of(restored)[(0, 0, 7)] == 1, "the copy shares no state with the original"
    assert counts_of(model.fresh()) == Counter()


def test_learnt_counts_reads_the_newest_verified_checkpoint(tmp_path: Path, switch: None) -> None:
    config = settings(RIVER_PATH, "per_record", tmp_path)
    store = CheckpointStore(tmp_path, KEY, allow_unsigned=False, keep_last=5)
    assert learnt_counts(tmp_path, KEY) == Counter()
    state = new_state(config)
    fields: dict[str, Any] = {
        "offsets": {"in:0": 1},
        "model_version": None,
        "config_hash": "c" * 64,
        "records_learnt": 1,
        "metrics": {},
        "extra": {},
    }
    state.model.learn_one({"partition": 0.0, "offset": 0.0, "key": 7.0}, 0.7)
    store.write(store.serialize(state), fields)
    state.model.learn_one({"partition": 0.0, "offset": 0.0, "key": 7.0}, 0.7)
    store.write(store.serialize(state), {**fields, "records_learnt": 2})
    assert learnt_counts(tmp_path, KEY) == Counter({(0, 0, 7): 2})
    # A file whose HMAC fails is skipped (and left in place: the read is read-only).
    newest = store.list()[-1]
    data = newest.read_bytes()
    newest.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert learnt_counts(tmp_path, KEY) == Counter({(0, 0, 7): 1})
    assert newest.exists()


def test_counts_of_refuses_another_model() -> None:
    with pytest.raises(CountingError, match="not a counting learner"):
        counts_of(object())


def test_verdict_finds_lost_twice_and_unexpected() -> None:
    produced = [(0, 0, 1), (0, 1, 2), (1, 0, 3), (1, 1, 4)]
    learnt = Counter({(0, 0, 1): 1, (0, 1, 2): 3, (1, 0, 3): 1, (2, 0, 9): 1})
    verdict = judge_counts(produced, learnt)
    assert (verdict.lost, verdict.twice, verdict.extra, verdict.unexpected) == (1, 1, 2, 1)
    assert verdict.lost_by_partition == {1: 1}
    assert verdict.twice_by_partition == {0: 1}
    assert verdict.examples["lost"] == [(1, 1, 4)]
    assert "lost 1, twice 1" in verdict.line()
    clean = judge_counts(produced, Counter(produced))
    assert (clean.lost, clean.twice, clean.unexpected) == (0, 0, 0)
