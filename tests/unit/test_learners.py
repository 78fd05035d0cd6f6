"""build_model and the River / scikit-learn adapters."""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from river import datasets

from stream_trainer.config import Settings, load_settings, settings_from_mapping
from stream_trainer.laptop.datasets import get_dataset
from stream_trainer.training.learners import (
    IncompatibleLearner,
    ModelAdapter,
    RiverAdapter,
    SklearnAdapter,
    build_model,
)

FEATURES = ["f0", "f1", "f2", "f3"]
PHISHING_FEATURES = list(get_dataset("phishing").features)


def make_settings(
    learner: str,
    *,
    params: dict[str, Any] | None = None,
    preprocessing: list[str] | None = None,
    task: str = "binary_classification",
    mode: str = "per_record",
    labels: list[Any] | None = None,
    features: list[str] | None = None,
    metrics: list[str] | None = None,
    weight_field: str | None = None,
) -> Settings:
    if labels is None and task != "regression":
        labels = [0, 1] if task == "binary_classification" else ["a", "b", "c"]
    record: dict[str, Any] = {"features": features or FEATURES, "labels": labels}
    if weight_field is not None:
        record["weight_field"] = weight_field
    data: dict[str, Any] = {
        "kafka": {"bootstrap_servers": "localhost:9092", "group_id": "g"},
        "topics": {"input": ["in"], "dead_letter": "dlq", "versions": "v"},
        "record": record,
        "model": {
            "name": "m",
            "task": task,
            "learner": {"path": learner, "params": params or {}},
            "preprocessing": [{"path": p} for p in preprocessing or []],
        },
        "training": {"mode": mode},
        "checkpoint": {"dir": "/tmp/ck", "allow_unsigned": True},
        "registry": {"root": "/tmp/reg"},
    }
    if metrics is not None:
        data["evaluation"] = {"metrics": metrics}
    return settings_from_mapping(data, env={})


def blobs(
    n: int, task: str = "binary_classification", seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Separable-ish synthetic data over FEATURES."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, len(FEATURES)))
    score = X @ np.array([2.0, -1.0, 0.5, 0.0])
    if task == "regression":
        return X, score + rng.normal(scale=0.1, size=n)
    if task == "binary_classification":
        return X, (score > 0).astype(np.int64)
    names = np.array(["a", "b", "c"], dtype=object)
    return X, names[np.digitize(score, [-1.0, 1.0])]


RIVER_LR = "river.linear_model.LogisticRegression"
SCALER = "river.preprocessing.StandardScaler"

# (learner, preprocessing, task, mode, params)
COMBINATIONS: list[tuple[str, list[str], str, str, dict[str, Any]]] = [
    (RIVER_LR, [SCALER], "binary_classification", "per_record", {}),
    (RIVER_LR, [SCALER], "binary_classification", "mini_batch", {}),
    (RIVER_LR, [SCALER], "binary_classification", "full_batch", {}),
    ("river.tree.HoeffdingTreeClassifier", [], "binary_classification", "per_record", {}),
    ("river.tree.HoeffdingTreeClassifier", [], "multiclass_classification", "mini_batch", {}),
    ("river.linear_model.LinearRegression", [SCALER], "regression", "per_record", {}),
    (
        "sklearn.linear_model.SGDClassifier",
        ["sklearn.preprocessing.StandardScaler"],
        "binary_classification",
        "mini_batch",
        {"loss": "log_loss", "random_state": 0},
    ),
    ("sklearn.linear_model.SGDRegressor", [], "regression", "mini_batch", {"random_state": 0}),
    (
        "sklearn.ensemble.RandomForestClassifier",
        [],
        "binary_classification",
        "full_batch",
        {"n_estimators": 10, "random_state": 0},
    ),
    (
        "sklearn.ensemble.GradientBoostingClassifier",
        [],
        "multiclass_classification",
        "full_batch",
        {"n_estimators": 10, "random_state": 0},
    ),
    (
        "sklearn.ensemble.GradientBoostingRegressor",
        [],
        "regression",
        "full_batch",
        {"n_estimators": 10, "random_state": 0},
    ),
    (
        "sklearn.neural_network.MLPClassifier",
        ["sklearn.preprocessing.StandardScaler"],
        "binary_classification",
        "mini_batch",
        {"hidden_layer_sizes": [8], "learning_rate_init": 0.05, "random_state": 0},
    ),
]


def train(model: ModelAdapter, mode: str, X: np.ndarray, y: np.ndarray) -> None:
    if mode == "per_record":
        for row, target in zip(X.tolist(), y.tolist(), strict=True):
            model.learn_one(dict(zip(FEATURES, row, strict=True)), target)
    elif mode == "mini_batch":
        for start in range(0, len(y), 100):
            model.learn_many(X[start : start + 100], y[start : start + 100], None)
    else:
        model.fit(X, y, None)


def ids(combination: tuple[Any, ...]) -> str:
    return f"{combination[0].rsplit('.', 1)[1]}-{combination[2]}-{combination[3]}"


@pytest.fixture(params=COMBINATIONS, ids=ids)
def trained(request: pytest.FixtureRequest) -> tuple[ModelAdapter, str, np.ndarray, np.ndarray]:
    learner, preprocessing, task, mode, params = request.param
    settings = make_settings(
        learner, params=params, preprocessing=preprocessing, task=task, mode=mode
    )
    model = build_model(settings)
    X, y = blobs(600, task)
    train(model, mode, X, y)
    return model, task, X, y


def test_every_combination_learns_and_predicts(
    trained: tuple[ModelAdapter, str, np.ndarray, np.ndarray],
) -> None:
    model, task, X, y = trained
    assert model.is_fitted()
    assert model.parameters_finite()
    predictions, proba = model.predict_many(X[:200])
    assert len(predictions) == 200
    if task == "regression":
        assert proba is None
        assert predictions.dtype == np.float64
        assert np.mean(np.abs(predictions - y[:200])) < 1.0
    else:
        assert predictions.dtype == object
        assert set(predictions.tolist()) <= set(np.unique(y).tolist())
        assert np.mean(predictions == y[:200]) > 0.7
        if task == "binary_classification":
            assert proba is not None
            assert np.all((proba >= 0) & (proba <= 1))
            # proba is P(labels[1]): it agrees with the predicted label.
            assert np.mean((proba > 0.5) == (predictions == 1)) > 0.95
        else:
            assert proba is None
    description = model.describe()
    assert description["family"] == model.family
    assert description["pipeline"][-1]["path"] == description["path"]


def test_pickle_round_trip_predicts_identically(
    trained: tuple[ModelAdapter, str, np.ndarray, np.ndarray],
) -> None:
    model, _, X, _ = trained
    restored = pickle.loads(pickle.dumps(model))
    before, p_before = model.predict_many(X[:100])
    after, p_after = restored.predict_many(X[:100])
    assert before.tolist() == after.tolist()
    if p_before is not None:
        assert p_after is not None
        np.testing.assert_array_equal(p_before, p_after)
    x = dict(zip(FEATURES, X[0].tolist(), strict=True))
    assert model.predict_one(x) == restored.predict_one(x)


def test_fresh_is_untrained_with_same_description(
    trained: tuple[ModelAdapter, str, np.ndarray, np.ndarray],
) -> None:
    model, task, X, _ = trained
    fresh = model.fresh()
    assert not fresh.is_fitted()
    assert fresh.describe() == model.describe()
    if isinstance(fresh, SklearnAdapter):
        predictions, _ = fresh.predict_many(X[:5])
        if task == "regression":
            assert np.isnan(predictions).all()
        else:
            assert predictions.tolist() == [None] * 5


def test_phishing_prequential_accuracy() -> None:
    settings = make_settings(
        RIVER_LR, preprocessing=[SCALER], labels=[False, True], features=PHISHING_FEATURES
    )
    model = build_model(settings)
    correct = 0
    n = 0
    for x, y in datasets.Phishing():
        label, proba = model.predict_one(x)
        assert proba is not None
        correct += label == y
        n += 1
        model.learn_one(x, y)
    assert n == 1250
    assert correct / n >= 0.85


def test_string_labels_binary_river() -> None:
    """River's LogisticRegression treats any truthy label as positive: the adapter encodes."""
    settings = make_settings(RIVER_LR, preprocessing=[SCALER], labels=["legit", "phish"])
    model = build_model(settings)
    X, y = blobs(500)
    names = np.array(["legit", "phish"], dtype=object)[y]
    for row, target in zip(X.tolist(), names.tolist(), strict=True):
        model.learn_one(dict(zip(FEATURES, row, strict=True)), target)
    predictions, _ = model.predict_many(X)
    assert set(predictions.tolist()) == {"legit", "phish"}
    assert np.mean(predictions == names) > 0.9


def test_cold_start_predictions() -> None:
    tree = build_model(make_settings("river.tree.HoeffdingTreeClassifier"))
    assert tree.predict_one({"f0": 0.0, "f1": 0.0, "f2": 0.0, "f3": 0.0}) == (None, None)
    predictions, proba = tree.predict_many(np.zeros((3, 4)))
    assert predictions.tolist() == [None] * 3
    assert proba is not None
    assert np.isnan(proba).all()
    sgd = build_model(
        make_settings(
            "sklearn.linear_model.SGDClassifier", params={"loss": "log_loss"}, mode="mini_batch"
        )
    )
    assert not sgd.is_fitted()
    assert sgd.predict_one({"f0": 0.0, "f1": 0.0, "f2": 0.0, "f3": 0.0}) == (None, None)


def test_weighted_learning() -> None:
    settings = make_settings(RIVER_LR, weight_field="w")
    model = build_model(settings)
    x = {"f0": 1.0, "f1": 0.0, "f2": 0.0, "f3": 0.0}
    light = model.fresh()
    model.learn_one(x, 1, weight=5.0)
    light.learn_one(x, 1, weight=1.0)
    heavy_p = model.predict_one(x)[1]
    light_p = light.predict_one(x)[1]
    assert heavy_p is not None
    assert light_p is not None
    assert heavy_p > light_p
    sgd = build_model(
        make_settings(
            "sklearn.linear_model.SGDClassifier",
            params={"loss": "log_loss", "random_state": 0},
            mode="mini_batch",
            weight_field="w",
        )
    )
    X, y = blobs(200)
    sgd.learn_many(X, y, np.ones(200))
    assert sgd.is_fitted()


def test_sklearn_partial_fit_fixes_classes_at_first_batch() -> None:
    settings = make_settings(
        "sklearn.linear_model.SGDClassifier",
        params={"loss": "log_loss", "random_state": 0},
        mode="mini_batch",
    )
    model = build_model(settings)
    X, _ = blobs(50)
    # The first batch holds only one class: partial_fit must still know both.
    model.learn_many(X, np.zeros(50, dtype=np.int64), None)
    assert isinstance(model, SklearnAdapter)
    assert model.model.classes_.tolist() == [0, 1]
    _, proba = model.predict_many(X)
    assert proba is not None
    assert proba.shape == (50,)


def test_river_fit_replays_from_scratch() -> None:
    settings = make_settings(RIVER_LR, preprocessing=[SCALER], mode="full_batch")
    a = build_model(settings)
    b = build_model(settings)
    X, y = blobs(300)
    a.learn_many(X[:100], 1 - y[:100], None)  # junk history that fit must forget
    a.fit(X, y, None)
    b.fit(X, y, None)
    np.testing.assert_array_equal(a.predict_many(X)[1], b.predict_many(X)[1])


@pytest.mark.parametrize(
    ("learner", "preprocessing"),
    [
        (RIVER_LR, [SCALER]),
        ("sklearn.linear_model.SGDClassifier", ["sklearn.preprocessing.StandardScaler"]),
    ],
)
def test_parameters_finite_detects_nan(learner: str, preprocessing: list[str]) -> None:
    mode = "per_record" if learner.startswith("river") else "mini_batch"
    model = build_model(make_settings(learner, preprocessing=preprocessing, mode=mode))
    X, y = blobs(200)
    train(model, mode, X, y)
    assert model.parameters_finite()
    if isinstance(model, RiverAdapter):
        model.model["LogisticRegression"]._weights["f0"] = math.nan
    else:
        assert isinstance(model, SklearnAdapter)
        model.model[-1].coef_[0, 1] = math.nan
    assert not model.parameters_finite()


def test_parameters_finite_detects_scaler_nan() -> None:
    model = build_model(make_settings(RIVER_LR, preprocessing=[SCALER]))
    X, y = blobs(50)
    train(model, "per_record", X, y)
    assert isinstance(model, RiverAdapter)
    model.model["StandardScaler"].vars["f2"] = math.inf
    assert not model.parameters_finite()


def test_hoeffding_tree_constructor_inf_is_not_a_bad_parameter() -> None:
    model = build_model(make_settings("river.tree.HoeffdingTreeClassifier"))
    X, y = blobs(100)
    train(model, "per_record", X, y)
    assert model.parameters_finite()  # max_depth=None is stored as math.inf


def test_river_mini_batch_without_learn_many_says_so() -> None:
    model = build_model(
        make_settings(
            "river.tree.HoeffdingTreeClassifier",
            task="multiclass_classification",
            mode="mini_batch",
        )
    )
    assert model.describe()["batch_learning"] == "learn_one_loop"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (
            {"learner": "sklearn.ensemble.RandomForestClassifier", "mode": "mini_batch"},
            "model.learner: sklearn.ensemble.RandomForestClassifier has no partial_fit; "
            "training.mode mini_batch needs it (use full_batch)",
        ),
        (
            {
                "learner": "sklearn.linear_model.SGDClassifier",
                "preprocessing": ["sklearn.preprocessing.QuantileTransformer"],
                "mode": "mini_batch",
            },
            "model.preprocessing[0]: sklearn.preprocessing.QuantileTransformer has no partial_fit",
        ),
        (
            {"learner": "sklearn.linear_model.SGDClassifier", "mode": "per_record"},
            "training.mode per_record needs a River learner",
        ),
        (
            {"learner": RIVER_LR, "preprocessing": ["sklearn.preprocessing.StandardScaler"]},
            "model.preprocessing[0].path: sklearn.preprocessing.StandardScaler is sklearn but "
            "model.learner is river",
        ),
        (
            {"learner": "river.linear_model.LinearRegression"},
            "model.learner.path: river.linear_model.LinearRegression is not a Classifier",
        ),
        (
            {"learner": RIVER_LR, "task": "regression"},
            "model.learner.path: river.linear_model.LogisticRegression is not a Regressor",
        ),
        (
            {"learner": "sklearn.linear_model.SGDRegressor", "mode": "full_batch"},
            "model.learner.path: sklearn.linear_model.SGDRegressor is not a classifier",
        ),
        (
            {
                "learner": "sklearn.linear_model.SGDClassifier",
                "task": "regression",
                "mode": "full_batch",
            },
            "is not a regressor",
        ),
        (
            {"learner": RIVER_LR, "params": {"learning_rate": 0.1}},
            "model.learner.params: unknown parameter(s) ['learning_rate']",
        ),
        (
            {
                "learner": "sklearn.linear_model.SGDClassifier",
                "params": {"loss": "nope"},
                "mode": "full_batch",
            },
            "model.learner.params: invalid for sklearn.linear_model.SGDClassifier",
        ),
        (
            {
                "learner": "sklearn.linear_model.SGDClassifier",
                "mode": "mini_batch",
                "metrics": ["accuracy", "roc_auc"],
            },
            "evaluation.metrics: ['roc_auc'] need probabilities",
        ),
        (
            {
                "learner": "river.tree.HoeffdingTreeClassifier",
                "task": "multiclass_classification",
                "metrics": ["log_loss"],
            },
            "evaluation.metrics: ['log_loss'] are supported for binary_classification only",
        ),
        (
            {"learner": "river.preprocessing.StandardScaler"},
            "model.learner.path: river.preprocessing.StandardScaler is not a Classifier",
        ),
        (
            {"learner": RIVER_LR, "preprocessing": ["river.linear_model.LinearRegression"]},
            "model.preprocessing[0].path: river.linear_model.LinearRegression is not a River "
            "transformer",
        ),
        (
            {
                "learner": "sklearn.neighbors.KNeighborsClassifier",
                "mode": "full_batch",
                "weight_field": "w",
            },
            "record.weight_field is set but model.learner: "
            "sklearn.neighbors.KNeighborsClassifier.fit takes no sample_weight",
        ),
    ],
)
def test_incompatible_combinations_name_the_field(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(IncompatibleLearner) as caught:
        build_model(make_settings(**kwargs))
    assert needle in str(caught.value)


@pytest.mark.parametrize(
    "path",
    [
        "river.utils.os.system",  # not importable as a module
        "river.utils.inspect.isclass",  # a function, not a class
        "sklearn.utils.Bunch",  # a class, not an estimator
        "river.drift.ADWIN",  # a River object, not an estimator
        "sklearn.base._UnstableArchMixin",  # private
        "river.linear_model.NoSuchModel",
    ],
)
def test_disallowed_paths_are_refused(path: str) -> None:
    with pytest.raises(IncompatibleLearner, match=r"model\.learner\.path"):
        build_model(make_settings(path))


def test_describe_is_json_able() -> None:
    import json

    model = build_model(make_settings(RIVER_LR, params={"l2": 0.01}, preprocessing=[SCALER]))
    description = json.loads(json.dumps(model.describe()))
    assert description == {
        "features": [{"name": f"f{i}", "type": "number", "missing": "reject"} for i in range(4)],
        "encoding": {},
        "family": "river",
        "path": RIVER_LR,
        "params": {"l2": 0.01},
        "pipeline": [{"path": SCALER, "params": {}}, {"path": RIVER_LR, "params": {"l2": 0.01}}],
        "task": "binary_classification",
        "mode": "per_record",
        "batch_learning": "learn_one_loop",
    }


class _NaNForNegatives:
    """A user transformer that yields NaN for negative inputs (log-like)."""

    def partial_fit(self, X: np.ndarray) -> _NaNForNegatives:
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        out = np.array(X, dtype=np.float64)
        out[out < 0] = math.nan
        return out


def test_sklearn_steps_match_the_pipeline_and_nan_from_a_transformer_still_raises() -> None:
    """The adapter calls the pipeline's steps itself and skips the finiteness scan only on
    the decoder's (already finite) matrix: predictions equal Pipeline.predict_proba, and a
    step that produces NaN still makes the learner refuse the unit."""
    model = build_model(
        make_settings(
            "sklearn.linear_model.SGDClassifier",
            params={"loss": "log_loss", "random_state": 0},
            preprocessing=["sklearn.preprocessing.StandardScaler"],
            mode="mini_batch",
        )
    )
    assert isinstance(model, SklearnAdapter)
    X, y = blobs(400)
    model.learn_many(X, y, None)
    _, proba = model.predict_many(X)
    assert proba is not None
    assert np.array_equal(proba, model.model.predict_proba(X)[:, 1])
    model.model.steps[0] = ("nan_for_negatives", _NaNForNegatives())
    with pytest.raises(ValueError, match="NaN"):
        model.learn_many(X - 10.0, y, None)


def test_restored_river_model_gives_the_key_objects_it_stores() -> None:
    # A dict lookup with the stored key object itself skips comparing the strings; input
    # dicts keyed by names parsed from the config again after a restore (equal, but other
    # objects) made per_record ~7 % slower. The names must come back with the model.
    settings = make_settings(
        "river.linear_model.LogisticRegression",
        preprocessing=["river.preprocessing.StandardScaler"],
    )
    model = build_model(settings)
    names = model.feature_names
    model.learn_one(dict(zip(names, [1.0] * len(names), strict=True)), 1)
    restored = pickle.loads(pickle.dumps(model))
    scaler = restored._model["StandardScaler"]  # private, but the identity is the contract
    stored = {id(key) for key in scaler.counts}
    assert restored.feature_names == tuple(settings.record.features)
    assert all(id(name) in stored for name in restored.feature_names)
    # What the service parses from its config after a restart does not share them.
    again = tuple(make_settings("river.linear_model.LogisticRegression").record.features)
    assert not any(id(name) in stored for name in again)


SHIPPED_CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
SECRETS = {
    "STREAM_TRAINER_CHECKPOINT__HMAC_KEY": "hmac-secret-7f3a9c",
    "STREAM_TRAINER_KAFKA__SASL_PASSWORD": "sasl-secret-52e1d8",
}


@pytest.mark.parametrize("config", SHIPPED_CONFIGS, ids=lambda p: p.stem)
def test_pickled_adapter_holds_no_settings_and_no_secret(config: Path) -> None:
    # Adapters go into checkpoints, published artifacts and the fit worker: a Settings
    # kept inside pickles its SecretStr values in clear.
    settings = load_settings(config, env=SECRETS)
    assert settings.kafka.sasl_password is not None  # the secret is in Settings...
    model = build_model(settings)
    names = model.feature_names
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, len(names)))
    labels = settings.record.labels
    y = rng.normal(size=200) if labels is None else np.array([labels[i % 2] for i in range(200)])
    if settings.training.mode == "per_record":
        for row, target in zip(X.tolist(), y.tolist(), strict=True):
            model.learn_one(dict(zip(names, row, strict=True)), target)
    else:
        train(model, settings.training.mode, X, y)
    assert model.is_fitted()
    for blob in (pickle.dumps(model, protocol=5), pickle.dumps(model.fresh(), protocol=5)):
        for secret in SECRETS.values():
            assert secret.encode() not in blob  # ...and not in what is pickled
        assert b"stream_trainer.config" not in blob  # no config object of any kind
    assert model.describe()["path"] == settings.model.learner.path


def test_adapter_pickled_with_settings_by_an_old_release_loads_without_them() -> None:
    settings = make_settings(RIVER_LR, preprocessing=[SCALER])
    model = build_model(settings)
    spec = model._spec  # type: ignore[attr-defined]
    old = model.__dict__
    old["_settings"] = settings  # what releases before ModelSpec pickled
    del old["_spec"]
    restored = pickle.loads(pickle.dumps(model))
    assert "_settings" not in vars(restored) and restored._spec == spec
    assert b"stream_trainer.config" not in pickle.dumps(restored)
