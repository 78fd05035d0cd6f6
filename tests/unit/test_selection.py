"""Online model selection (training.selection): the halving logic, the trainer's unit
splitting, the checkpointed state, and config checks. Pure logic, no broker."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from stream_trainer.config import ConfigError, Settings, settings_from_mapping
from stream_trainer.ingest.records import DecodedBatch
from stream_trainer.operations.app import new_state
from stream_trainer.training.learners import IncompatibleLearner, build_model
from stream_trainer.training.selection import OnlineSelection, check_interval, selection_spec
from stream_trainer.training.trainers import SelectionTrainer, build_trainer

FEATURES = ["f0", "f1"]
LR = "river.linear_model.LogisticRegression"
CANDIDATES = [
    {"name": "slow", "params": {"learner.l2": 0.5}},
    {"name": "plain", "params": {}},
    {"name": "tiny", "params": {"learner.l2": 0.05}},
    {"name": "mid", "params": {"learner.l2": 0.2}},
]


def make_settings(
    selection: dict[str, Any] | None = None,
    mode: str = "per_record",
    learner: str = LR,
    preprocessing: list[dict[str, Any]] | None = None,
) -> Settings:
    training: dict[str, Any] = {"mode": mode}
    if selection is not None:
        training["selection"] = selection
    data: dict[str, Any] = {
        "kafka": {"bootstrap_servers": "localhost:9092", "group_id": "g"},
        "topics": {"input": ["in"], "dead_letter": "dlq", "versions": "v"},
        "record": {"features": FEATURES, "labels": [0, 1]},
        "model": {
            "name": "m",
            "task": "binary_classification",
            "learner": {"path": learner},
            "preprocessing": preprocessing or [],
        },
        "training": training,
        "evaluation": {"metrics": ["accuracy"]},
        "checkpoint": {"dir": "/tmp/ck", "allow_unsigned": True},
        "registry": {"root": "/tmp/reg"},
    }
    return settings_from_mapping(data, env={})


def enabled(**overrides: Any) -> dict[str, Any]:
    return {"enabled": True, "candidates": CANDIDATES, "rung_records": 100, **overrides}


def batch(X: np.ndarray, y: np.ndarray, first_offset: int = 0) -> DecodedBatch:
    n = len(y)
    offsets = np.arange(first_offset, first_offset + n)
    return DecodedBatch(
        X=X,
        y=y,
        weights=None,
        valid_index=np.arange(n),
        invalid=[],
        topics=["in"] * n,
        partitions=np.zeros(n, dtype=np.int64),
        offsets=offsets,
        feature_names=tuple(FEATURES),
        message_topics=["in"] * n,
        message_partitions=np.zeros(n, dtype=np.int64),
        message_offsets=offsets,
    )


def stream(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 2))
    return X, (X[:, 0] + 0.3 * X[:, 1] > 0).astype(np.int64)


def feed_scores(selection: OnlineSelection, accuracies: dict[str, float], n: int = 100) -> None:
    """Score each live candidate with a made-up accuracy over ``n`` records, advancing one
    leader check (a tenth of the rung) at a time."""
    while n:
        step = min(n, selection.until_decision)
        y = np.ones(step, dtype=np.int64)
        for candidate in selection.live:
            right = round(accuracies[candidate.name] * step)
            predictions = np.array([1] * right + [0] * (step - right), dtype=object)
            selection.observe(candidate, y, predictions, np.full(step, np.nan))
        selection.advance(step)
        n -= step


# --------------------------------------------------------------------------- halving


def test_halving_keeps_the_better_half_and_leads_with_the_rung_best() -> None:
    settings = make_settings(enabled())
    spec = selection_spec(settings)
    assert spec is not None
    selection = OnlineSelection(spec, build_model(settings))
    assert selection.leader.name == "slow"  # the first candidate until a rung has ended
    feed_scores(selection, {"slow": 0.6, "plain": 0.9, "tiny": 0.8, "mid": 0.7})
    assert [c.name for c in selection.live] == ["plain", "tiny"]
    assert selection.leader.name == "plain"
    assert {c.name: c.stopped_at for c in selection.candidates if not c.live} == {
        "slow": 100,
        "mid": 100,
    }
    # The leader is chosen again every rung, on that rung's records only.
    feed_scores(selection, {"plain": 0.5, "tiny": 0.9})
    assert [c.name for c in selection.live] == ["tiny"]
    assert selection.leader.name == "tiny"
    feed_scores(selection, {"tiny": 0.1})  # min_live (1) reached: nothing more stops
    assert [c.name for c in selection.live] == ["tiny"]
    summary = selection.summary()
    assert summary["leader"] == "tiny" and summary["rungs"] == 3
    assert [d["stopped"] for d in summary["decisions"]] == [
        ["mid", "slow"],
        ["plain"],
        [],
    ]  # by rank
    scores = {c["name"]: c["score"] for c in summary["candidates"]}
    assert scores["slow"] == pytest.approx(0.6)
    assert scores["tiny"] == pytest.approx((0.8 + 0.9 + 0.1) / 3)


def test_min_live_keeps_alternatives_and_the_leader_can_change_back() -> None:
    settings = make_settings(enabled(min_live=2))
    spec = selection_spec(settings)
    assert spec is not None
    selection = OnlineSelection(spec, build_model(settings))
    feed_scores(selection, {"slow": 0.6, "plain": 0.9, "tiny": 0.8, "mid": 0.7})
    feed_scores(selection, {"plain": 0.9, "tiny": 0.8})
    assert [c.name for c in selection.live] == ["plain", "tiny"]
    feed_scores(selection, {"plain": 0.7, "tiny": 0.8})  # a drift favours the other one
    assert selection.leader.name == "tiny"
    assert len(selection.live) == 2


def test_ties_keep_the_configured_order() -> None:
    settings = make_settings(enabled())
    spec = selection_spec(settings)
    assert spec is not None
    selection = OnlineSelection(spec, build_model(settings))
    feed_scores(selection, dict.fromkeys(("slow", "plain", "tiny", "mid"), 0.5))
    assert [c.name for c in selection.live] == ["slow", "plain"]
    assert selection.leader.name == "slow"


def test_a_lower_is_better_metric_ranks_by_the_smaller_value() -> None:
    settings = make_settings(enabled(metric="log_loss"))
    spec = selection_spec(settings)
    assert spec is not None and spec.metric == "log_loss"
    selection = OnlineSelection(spec, build_model(settings))
    for _ in range(10):
        y = np.ones(10, dtype=np.int64)
        for candidate, p in zip(selection.candidates, (0.9, 0.6, 0.99, 0.7), strict=True):
            selection.observe(candidate, y, np.ones(10, dtype=object), np.full(10, p))
        selection.advance(10)
    assert selection.leader.name == "tiny"
    assert [c.name for c in selection.live] == ["slow", "tiny"]


def test_advance_refuses_to_cross_a_rung_end() -> None:
    settings = make_settings(enabled())
    spec = selection_spec(settings)
    assert spec is not None
    selection = OnlineSelection(spec, build_model(settings))
    assert selection.until_decision == 10  # a leader check every tenth of the rung
    with pytest.raises(ValueError, match="crosses a decision"):
        selection.advance(11)


@pytest.mark.parametrize(
    ("rung", "mode", "unit", "every"),
    [
        (2000, "per_record", 1000, 200),
        (2000, "mini_batch", 1000, 1000),  # at least a unit: units stay whole
        (2000, "mini_batch", 100, 200),
        (500, "mini_batch", 1000, 500),  # never longer than a rung
        (15, "per_record", 1000, 1),
    ],
)
def test_leader_check_interval(rung: int, mode: str, unit: int, every: int) -> None:
    assert check_interval(rung, mode, unit) == every


def test_the_leader_is_rechosen_within_a_rung_on_recent_records() -> None:
    """A poor first candidate leads only until the first check, not for a whole rung."""
    settings = make_settings(enabled())
    spec = selection_spec(settings)
    assert spec is not None
    selection = OnlineSelection(spec, build_model(settings))
    feed_scores(selection, {"slow": 0.2, "plain": 0.9, "tiny": 0.5, "mid": 0.5}, n=10)
    assert selection.leader.name == "plain"
    assert len(selection.live) == 4 and selection.rungs == 0
    feed_scores(selection, {"slow": 0.2, "plain": 0.0, "tiny": 1.0, "mid": 0.5}, n=10)
    assert selection.leader.name == "tiny"  # 0.75 over its last 20 records vs plain's 0.45


# --------------------------------------------------------------------------- trainer


def _run(settings: Settings, units: list[int], X: np.ndarray, y: np.ndarray) -> Any:
    state = new_state(settings)
    trainer = build_trainer(settings)
    assert isinstance(trainer, SelectionTrainer)
    start = 0
    for size in units:
        trainer.learn(state, batch(X[start : start + size], y[start : start + size], start))
        start += size
    assert start == len(y)
    return state


@pytest.mark.parametrize("mode", ["per_record", "mini_batch"])
def test_decisions_do_not_depend_on_how_units_are_cut(mode: str) -> None:
    """Exactly-once needs a resumed run (other unit boundaries) to decide as an unbroken
    one: the trainer cuts units at rung ends."""
    settings = make_settings(enabled(rung_records=150), mode=mode)
    X, y = stream(1000)
    one = _run(settings, [1000] if mode == "per_record" else [150] * 6 + [100], X, y)
    cuts = [7, 250, 43, 300, 400] if mode == "per_record" else [150] * 6 + [100]
    other = _run(settings, cuts, X, y)
    assert one.selection.records == other.selection.records == 1000
    assert one.selection.history == other.selection.history
    assert one.selection.rungs == 6
    assert pickle.dumps(one.model.model) == pickle.dumps(other.model.model)
    assert one.model is one.selection.leader_model
    # The service's prequential score is the leader's predictions, one per record.
    assert one.evaluator.count == 1000
    assert one.records_learnt == 1000


def test_every_live_candidate_learns_and_stopped_ones_do_not() -> None:
    settings = make_settings(enabled())
    X, y = stream(400)
    state = _run(settings, [400], X, y)
    learnt = {c.name: c.records_learnt for c in state.selection.candidates}
    # Rungs of 100: four, then two, then one candidate(s) learn.
    assert sorted(learnt.values()) == [100, 100, 200, 400]
    # A stopped candidate's model is released: it never learns or leads again.
    assert [c.model is None for c in state.selection.candidates] == [
        not c.live for c in state.selection.candidates
    ]
    assert sum(c.model is not None for c in state.selection.candidates) == 1
    assert all(c.cpu_seconds > 0 for c in state.selection.candidates)
    assert state.selection.summary()["cpu_seconds"] == pytest.approx(
        sum(c.cpu_seconds for c in state.selection.candidates), abs=1e-5
    )


def test_selection_state_survives_a_pickle_round_trip() -> None:
    """The checkpoint is the pickled state: every candidate and the halving's progress come
    back, and the model is still the leader's (one object)."""
    settings = make_settings(enabled(rung_records=130))
    X, y = stream(600)
    state = _run(settings, [250], X[:250], y[:250])
    restored = pickle.loads(pickle.dumps(state))
    assert restored.model is restored.selection.leader_model
    assert restored.selection.rung_left == state.selection.rung_left == 10
    trainer = build_trainer(settings)
    for s in (state, restored):
        trainer.learn(s, batch(X[250:], y[250:], 250))
    assert restored.selection.history == state.selection.history
    assert pickle.dumps(restored.model.model) == pickle.dumps(state.model.model)


class Refusing:
    """A candidate's model that raises on learning the row whose f0 is ``bad``."""

    def __init__(self, inner: Any, bad: float) -> None:
        self.inner, self.bad = inner, bad
        self.feature_names = inner.feature_names

    def predict_one(self, x: dict[str, float]) -> Any:
        return self.inner.predict_one(x)

    def learn_one(self, x: dict[str, float], y: Any, weight: float = 1.0) -> None:
        if x["f0"] == self.bad:
            raise ValueError("refused")
        self.inner.learn_one(x, y, weight)


def test_leader_refusals_are_the_unit_refusals() -> None:
    """Rows the leader refuses are dead-lettered; a row only another candidate refuses is
    learnt (that candidate skips it)."""
    settings = make_settings(enabled())
    X, y = stream(50)
    state = new_state(settings)
    assert state.selection is not None
    leader, other = state.selection.candidates[0], state.selection.candidates[1]
    leader.model = Refusing(leader.model, X[3, 0])  # type: ignore[assignment]
    other.model = Refusing(other.model, X[7, 0])  # type: ignore[assignment]
    assert leader.model is not None
    state.model = leader.model
    result = build_trainer(settings).learn(state, batch(X, y))
    assert [r.message_index for r in result.refused] == [3]
    assert result.learnt == 49
    assert (leader.records_learnt, other.records_learnt) == (49, 49)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("selection", "mode", "field"),
    [
        ({"enabled": True, "candidates": CANDIDATES[:1]}, "per_record", "candidates"),
        (enabled(max_live=2), "per_record", "candidates"),
        (enabled(min_live=5), "per_record", "min_live"),
        (enabled(), "full_batch", "training.selection.enabled"),
        (enabled(metric="mae"), "per_record", "training.selection.metric"),
        (
            {"enabled": True, "candidates": [{"params": {"l2": 1}}, {}]},
            "per_record",
            "candidates.0.params",
        ),
        (
            {"enabled": True, "candidates": [{"name": "a"}, {"name": "a"}]},
            "per_record",
            "unique",
        ),
        (
            {"enabled": True, "candidates": [{"params": {"preprocessing.0.x": 1}}, {}]},
            "per_record",
            "training.selection.candidates[0].params.preprocessing.0.x",
        ),
    ],
)
def test_bad_config_fails_naming_the_field(
    selection: dict[str, Any], mode: str, field: str
) -> None:
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        make_settings(selection, mode=mode)


def test_unknown_or_invalid_param_fails_at_build_naming_the_candidate() -> None:
    settings = make_settings({"enabled": True, "candidates": [{}, {"params": {"learner.nope": 1}}]})
    with pytest.raises(IncompatibleLearner, match=r"training\.selection\.candidates\[1\]"):
        build_model(settings)
    settings = make_settings(
        {"enabled": True, "candidates": [{}, {"params": {"learner.alpha": -1.0}}]},
        mode="mini_batch",
        learner="sklearn.linear_model.SGDClassifier",
    )
    with pytest.raises(IncompatibleLearner, match=r"training\.selection\.candidates\[1\]\.params"):
        build_model(settings)


def test_a_disabled_selection_leaves_the_config_hash_alone() -> None:
    """Default off must not disown existing checkpoints; enabled, the candidates are part of
    the state, so another candidate set is another hash."""
    plain = make_settings().config_hash()
    assert make_settings({"enabled": False}).config_hash() == plain
    assert make_settings({"enabled": False, "candidates": CANDIDATES}).config_hash() == plain
    on = make_settings(enabled()).config_hash()
    assert on != plain
    assert make_settings(enabled(rung_records=200)).config_hash() != on
    # max_live is a cap checked at start, not an input of any decision.
    assert make_settings(enabled(max_live=8)).config_hash() == on


def test_a_disabled_selection_uses_the_plain_trainers() -> None:
    settings = make_settings()
    assert not isinstance(build_trainer(settings), SelectionTrainer)
    assert new_state(settings).selection is None


def test_run_refuses_a_bad_candidate_before_starting(tmp_path: Path) -> None:
    """The real command: a candidate param the learner does not take stops ``run`` at start
    with one line naming the field (before any broker is contacted)."""
    path = tmp_path / "config.yaml"
    data = make_settings().model_dump(mode="json", exclude={"schema_registry"})
    data["checkpoint"]["dir"] = str(tmp_path / "checkpoints")
    data["training"]["selection"] = {
        "enabled": True,
        "candidates": [{}, {"params": {"learner.x": 1}}],
    }
    path.write_text(yaml.safe_dump(data))
    done = subprocess.run(
        [sys.executable, "-m", "stream_trainer", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "training.selection.candidates[1].params.learner.x" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
