"""The one "every N records / T seconds" rule (stream_trainer.operations.cadence) and its two owners
that persist their count in the state: the publisher and the full-batch trainer. Pure
logic with an explicit clock: no broker, no registry, no sleeps."""

from __future__ import annotations

import pickle
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from stream_trainer.config import Settings, settings_from_mapping
from stream_trainer.operations.app import new_state
from stream_trainer.operations.cadence import Cadence
from stream_trainer.operations.metrics import build_metrics
from stream_trainer.publishing.publisher import ModelPublisher
from stream_trainer.state.training_state import TrainingState
from stream_trainer.training.trainers import FullBatchTrainer
from tests.unit.test_trainers_unscored import FEATURES, batch, separable

T0 = 1_000.0  # an arbitrary clock origin: the cadence must not assume the clock starts at 0

# -- the rule ------------------------------------------------------------------------------


def test_none_none_is_never_due() -> None:
    cadence = Cadence(None, None, since=T0)
    cadence.observe(10**9)
    assert not cadence.due(T0 + 10**9)
    assert cadence.trigger(T0 + 10**9) is None


def test_only_records_is_due_at_exactly_n_whatever_the_time() -> None:
    cadence = Cadence(every_records=10, every_seconds=None, since=T0)
    cadence.observe(9)
    assert not cadence.due(T0 + 10**6)
    cadence.observe(1)
    assert cadence.trigger(T0) == "records"  # no time needs to pass
    cadence.observe(5)
    assert cadence.due(T0)  # past N stays due until reset


def test_only_seconds_is_due_at_exactly_t_with_one_record() -> None:
    cadence = Cadence(every_records=None, every_seconds=60.0, since=T0)
    cadence.observe(1)
    assert not cadence.due(T0 + 59.999)
    assert cadence.trigger(T0 + 60.0) == "time"
    cadence.observe(10**6)  # any number of records: the count alone never fires
    assert not cadence.due(T0 + 59.0)


def test_zero_records_at_the_time_limit_is_not_due_until_one_is_counted() -> None:
    cadence = Cadence(every_records=None, every_seconds=60.0, since=T0)
    assert not cadence.due(T0 + 60.0)
    assert not cadence.due(T0 + 3_600.0)  # however long it waits
    cadence.observe(0)  # a unit that counted nothing (all dead-lettered, say)
    assert not cadence.due(T0 + 3_600.0)
    cadence.observe(1)
    assert cadence.trigger(T0 + 3_600.0) == "time"  # at once: the period is long over


def test_records_take_precedence_over_time() -> None:
    cadence = Cadence(every_records=5, every_seconds=1.0, since=T0)
    cadence.observe(1)
    assert cadence.trigger(T0 + 1.0) == "time"
    cadence.observe(4)
    assert cadence.trigger(T0 + 1.0) == "records"


def test_reset_counts_from_zero_and_restarts_the_period() -> None:
    cadence = Cadence(every_records=10, every_seconds=60.0, since=T0)
    cadence.observe(10)
    assert cadence.due(T0)
    cadence.reset(T0 + 30.0)
    assert (cadence.count, cadence.since) == (0, T0 + 30.0)
    cadence.observe(1)
    assert not cadence.due(T0 + 60.0)  # 30 s after the reset, not 60
    assert cadence.trigger(T0 + 90.0) == "time"


def test_restart_installs_a_count_and_starts_the_period_now() -> None:
    cadence = Cadence(every_records=10, every_seconds=60.0)
    cadence.observe(3)
    cadence.restart(4, T0)  # replaces the count, does not add to it
    assert (cadence.count, cadence.since) == (4, T0)
    assert not cadence.due(T0 + 59.0)
    assert cadence.trigger(T0 + 60.0) == "time"
    cadence.restart(10, T0)
    assert cadence.trigger(T0) == "records"


def test_defer_keeps_the_count_and_restarts_the_period() -> None:
    cadence = Cadence(every_records=None, every_seconds=10.0, since=T0)
    cadence.observe(3)
    assert cadence.due(T0 + 10.0)
    cadence.defer(T0 + 10.0)
    assert cadence.count == 3
    assert not cadence.due(T0 + 19.0)
    assert cadence.due(T0 + 20.0)


@pytest.mark.parametrize(("records", "seconds"), [(0, None), (-1, None), (None, 0.0), (None, -1)])
def test_a_cadence_that_could_never_wait_is_refused(
    records: int | None, seconds: float | None
) -> None:
    with pytest.raises(ValueError, match="every_"):
        Cadence(records, seconds)


def test_a_negative_count_is_refused() -> None:
    cadence = Cadence(1, None)
    with pytest.raises(ValueError, match="negative"):
        cadence.observe(-1)
    assert cadence.count == 0


# -- owners --------------------------------------------------------------------------------


def make_settings(
    *,
    publish: tuple[int | None, float | None] = (None, None),
    retrain: tuple[int | None, float | None] = (None, None),
) -> Settings:
    data: dict[str, Any] = {
        "kafka": {"bootstrap_servers": "localhost:9092", "group_id": "g"},
        "topics": {"input": ["in"], "dead_letter": "dlq", "versions": "v"},
        "record": {"features": FEATURES, "labels": [0, 1]},
        "model": {
            "name": "m",
            "task": "binary_classification",
            "learner": {"path": "sklearn.linear_model.SGDClassifier"},
        },
        "training": {
            "mode": "full_batch",
            "full_batch": {
                "window_records": 1_000,
                "min_records": 10,
                "fit_in_worker": False,
                "retrain_on_drift": False,
                "retrain_every_records": retrain[0],
                "retrain_every_seconds": retrain[1],
            },
        },
        "evaluation": {"metrics": ["accuracy"]},
        "checkpoint": {"dir": "/tmp/ck", "allow_unsigned": True},
        "registry": {
            "root": "/tmp/reg",
            "publish_every_records": publish[0],
            "publish_every_seconds": publish[1],
        },
    }
    return settings_from_mapping(data, env={})


def fitted_state(settings: Settings) -> TrainingState:
    state = new_state(settings)
    X, y = separable(50, seed=0)
    state.model.fit(X, y, None)
    return state


class _SameAsLastVersion:
    """Stands in for the registry: the last version is the state as it is now, so a
    publish is skipped (the skip restarts the period like a publish does)."""

    def __init__(self, state: TrainingState) -> None:
        self._meta = {"records_learnt": state.records_learnt, "retrains": state.retrains}

    def get(self, _version: int) -> Any:
        return SimpleNamespace(metadata=self._meta)


def publisher_for(settings: Settings, registry: Any = None) -> ModelPublisher:
    return ModelPublisher(settings, registry, None, build_metrics(CollectorRegistry()))


def test_publish_counts_learnt_records_persisted_in_the_state() -> None:
    settings = make_settings(publish=(100, 60.0))
    state = fitted_state(settings)
    publisher = publisher_for(settings)
    publisher.install(state, T0)
    publisher.observe(state, 0)
    assert publisher.due(state, None, T0 + 60.0) is None  # nothing learnt: not by time
    publisher.observe(state, 99)
    assert state.records_since_publish == 99  # what the next checkpoint persists
    assert publisher.due(state, None, T0 + 59.0) is None
    assert publisher.due(state, None, T0 + 60.0) == "time"
    publisher.observe(state, 1)
    assert publisher.due(state, None, T0) == "records"


def test_publish_after_restore_takes_the_count_and_starts_the_period_at_install() -> None:
    settings = make_settings(publish=(100, 60.0))
    state = fitted_state(settings)
    state.records_since_publish = 40  # learnt before the checkpoint this state came from
    publisher = publisher_for(settings)
    publisher.install(state, T0)
    assert publisher.due(state, None, T0 + 59.0) is None  # does not publish on landing
    assert publisher.due(state, None, T0 + 60.0) == "time"
    publisher.observe(state, 60)
    assert state.records_since_publish == 100
    assert publisher.due(state, None, T0) == "records"


def test_publish_wanted_comes_first_and_no_model_publishes_nothing() -> None:
    settings = make_settings(publish=(1, 1.0))
    publisher = publisher_for(settings)
    unfitted = new_state(settings)
    publisher.install(unfitted, T0)
    publisher.observe(unfitted, 5)
    assert publisher.due(unfitted, None, T0 + 10.0) is None
    assert publisher.due(unfitted, "manual", T0) == "manual"


def test_a_skipped_publish_restarts_the_count_and_the_period() -> None:
    settings = make_settings(publish=(None, 60.0))
    state = fitted_state(settings)
    state.model_version = 3
    publisher = publisher_for(settings, _SameAsLastVersion(state))
    publisher.install(state, T0)
    publisher.observe(state, 5)
    assert publisher.publish(state, "time", T0 + 60.0) is None  # skipped: same as version 3
    assert state.records_since_publish == 0
    publisher.observe(state, 1)
    assert publisher.due(state, None, T0 + 119.0) is None  # the period restarted at T0+60
    assert publisher.due(state, None, T0 + 120.0) == "time"


def _window(state: TrainingState, n: int) -> None:
    """Fill the window without learning (what a restored window looks like)."""
    assert state.window is not None
    X, y = separable(n, seed=1)
    state.window.extend(X, y)


def _finish(trainer: FullBatchTrainer, state: TrainingState, now: float) -> Any:
    assert trainer._running is not None
    trainer._running.result(timeout=60)
    return trainer.poll_retrain(state, now)


def test_a_time_retrain_of_an_unchanged_window_does_not_fire() -> None:
    """The behaviour change of the one cadence: before it, this retrained every T."""
    settings = make_settings(retrain=(None, 60.0))
    state = new_state(settings)
    _window(state, 200)
    trainer = FullBatchTrainer(settings)
    trainer.install(state, T0)
    try:
        assert trainer.poll_retrain(state, T0 + 3_600.0) is None
        assert not trainer.retraining and state.retrain_wanted is None
        X, y = separable(1, seed=2)
        trainer.learn(state, batch(X, y))
        assert state.records_since_retrain == 1
        assert trainer.poll_retrain(state, T0 + 3_600.0) is None
        assert trainer.retraining and state.retrain_running == "time"
        assert state.records_since_retrain == 0
        outcome = _finish(trainer, state, T0 + 3_601.0)
        assert outcome is not None and outcome.trigger == "time"
        # The period restarted when the retrain started; the window is unchanged since.
        assert trainer.poll_retrain(state, T0 + 3_600.0 + 120.0) is None
        assert not trainer.retraining
    finally:
        trainer.close()


def test_a_count_retrain_fires_at_n_learnt_records() -> None:
    settings = make_settings(retrain=(100, None))
    state = new_state(settings)
    trainer = FullBatchTrainer(settings)
    trainer.install(state, T0)
    X, y = separable(100, seed=3)
    try:
        trainer.learn(state, batch(X[:99], y[:99]))
        assert trainer.poll_retrain(state, T0 + 10**6) is None and not trainer.retraining
        trainer.learn(state, batch(X[99:], y[99:]))
        trainer.poll_retrain(state, T0)
        assert state.retrain_running == "count"
        assert _finish(trainer, state, T0).trigger == "count"
    finally:
        trainer.close()


def test_a_retrain_count_from_an_old_checkpoint_is_installed() -> None:
    """The count is ``records_since_retrain`` in the pickled state; a checkpoint written
    before that field existed loads with the class default (0)."""
    settings = make_settings(retrain=(100, 60.0))
    state = new_state(settings)
    _window(state, 200)
    state.records_since_retrain = 100
    trainer = FullBatchTrainer(settings)
    try:
        restored: TrainingState = pickle.loads(pickle.dumps(state))
        trainer.install(restored, T0)
        trainer.poll_retrain(restored, T0)
        assert restored.retrain_running == "count"
        _finish(trainer, restored, T0)

        del state.__dict__["records_since_retrain"]  # as a pickle from before the field
        old: TrainingState = pickle.loads(pickle.dumps(state))
        assert old.records_since_retrain == 0
        trainer.install(old, T0)
        assert trainer.poll_retrain(old, T0 + 3_600.0) is None and not trainer.retraining
    finally:
        trainer.close()


def test_a_time_retrain_waits_one_period_after_install() -> None:
    settings = make_settings(retrain=(None, 60.0))
    state = new_state(settings)
    _window(state, 200)
    state.records_since_retrain = 5  # learnt before the restart, not yet retrained on
    trainer = FullBatchTrainer(settings)
    trainer.install(state, T0)
    try:
        assert trainer.poll_retrain(state, T0 + 59.0) is None and not trainer.retraining
        trainer.poll_retrain(state, T0 + 60.0)
        assert state.retrain_running == "time"
        _finish(trainer, state, T0 + 60.0)
    finally:
        trainer.close()


def test_states_count_separately_per_owner() -> None:
    """What counts is the owner's choice: the trainer and publisher count learnt records,
    each in its own field, each reset by its own action."""
    settings = make_settings(publish=(10, None), retrain=(10, None))
    state = new_state(settings)
    trainer, publisher = FullBatchTrainer(settings), publisher_for(settings)
    trainer.install(state, T0)
    publisher.install(state, T0)
    X, y = separable(10, seed=4)
    try:
        result = trainer.learn(state, batch(X, y))
        publisher.observe(state, result.learnt)
        assert state.records_since_retrain == state.records_since_publish == 10
        trainer.poll_retrain(state, T0)
        assert state.records_since_retrain == 0
        assert state.records_since_publish == 10
        _finish(trainer, state, T0)
        assert publisher.due(state, None, T0) == "records"
    finally:
        trainer.close()
