"""River and scikit-learn estimators behind one small, pure protocol.

Learners do no I/O and update no metrics: the trainer calls them and scores the
result. :func:`build_model` validates the configured pipeline against the task and the
training mode and fails fast with :class:`IncompatibleLearner`, whose message names the
config field at fault.

"No prediction yet" (cold start: nothing learnt, or a scikit-learn model not fitted) is
``None`` for a label, ``NaN`` for a regression value or a probability. In batch form
labels are an ``object`` array (``None`` where missing) and regression values ``float64``
(``NaN`` where missing). :class:`~stream_trainer.training.evaluation.PrequentialEvaluator`
understands both.

Binary River classifiers are trained on ``y == labels[1]`` (a bool) and their
predictions decoded back to the configured labels, because River's binary learners
(e.g. ``LogisticRegression``) only know ``True``/``False`` and treat any truthy label
as positive.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import inspect
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
from river import base as river_base
from sklearn import config_context
from sklearn.base import BaseEstimator, clone, is_classifier, is_regressor
from sklearn.pipeline import make_pipeline

from stream_trainer.config import EstimatorSpec, Settings
from stream_trainer.errors import StreamTrainerError
from stream_trainer.ingest.encoding import (
    FixedWidthEncoder,
    describe_encoding,
    partial_fit_encoding,
    river_union,
    window_encoder,
)
from stream_trainer.ingest.features import FeatureContract

ALLOWED_PREFIXES = ("river.", "sklearn.")

Family = Literal["river", "sklearn"]

# Test-only learners (stream_trainer/testing), by config path and adapter family. They are
# admitted only when the process runs with TESTING_ENV=1, so a production config naming one
# fails at start: like STREAM_TRAINER_CRASH_AT, the switch is inert unless set.
TESTING_ENV = "STREAM_TRAINER_TESTING_LEARNERS"
TESTING_LEARNERS: dict[str, Family] = {
    "stream_trainer.testing.counting.CountingLearner": "river",
    "stream_trainer.testing.counting.CountingBatchLearner": "sklearn",
}
_PROBA_METRICS = ("log_loss", "roc_auc")


class IncompatibleLearner(StreamTrainerError, ValueError):
    """The configured learner cannot run with this task / mode; the message names the field."""


@dataclass(frozen=True)
class ModelSpec:
    """The plain values an adapter keeps from the config.

    Adapters are pickled into checkpoints and published artifacts and sent to the fit
    worker, so they hold this, never ``Settings`` (whose secrets a pickle keeps in clear).
    ``pipeline`` is ``(path, params)`` per step, the learner last.
    """

    features: tuple[str, ...]
    task: str
    labels: tuple[Any, ...]
    mode: str
    pipeline: tuple[tuple[str, dict[str, Any]], ...]
    # None in models saved before typed features: all required numbers.
    contract: FeatureContract | None = None

    def feature_contract(self) -> FeatureContract:
        """The typed feature contract the model was built for."""
        contract = getattr(self, "contract", None)
        return contract if contract is not None else FeatureContract.numeric(self.features)


def model_spec(settings: Settings) -> ModelSpec:
    """What an adapter needs from ``settings``, as plain values."""
    model = settings.model
    return ModelSpec(
        features=tuple(settings.record.feature_names),
        contract=FeatureContract.from_settings(settings.record),
        task=model.task,
        labels=tuple(settings.record.labels or ()),
        mode=settings.training.mode,
        pipeline=tuple(
            (spec.path, dict(spec.params)) for spec in [*model.preprocessing, model.learner]
        ),
    )


def _without_settings(state: dict[str, Any]) -> dict[str, Any]:
    """An adapter's pickled state with a ``Settings`` (kept by releases before ModelSpec)
    replaced by its ModelSpec, so old checkpoints still load and the next one is clean."""
    settings = state.pop("_settings", None)
    if settings is not None and "_spec" not in state:
        state["_spec"] = model_spec(settings)
    return state


def split_overrides(
    spec: ModelSpec, overrides: Mapping[str, Any]
) -> tuple[ModelSpec, dict[int, dict[str, Any]]]:
    """``spec`` with ``overrides`` merged into its steps' params, and the overrides by step
    index in ``spec.pipeline`` (the learner is the last). A path is ``learner.PARAM`` or
    ``preprocessing.INDEX.PARAM``; the config validated both forms."""
    by_step: dict[int, dict[str, Any]] = {}
    last = len(spec.pipeline) - 1
    for path, value in overrides.items():
        head, _, rest = path.partition(".")
        if head == "learner":
            index, name = last, rest
        else:
            position, _, name = rest.partition(".")
            index = int(position)
        if not 0 <= index <= last or not name:
            raise IncompatibleLearner(f"search parameter {path!r} names no pipeline step")
        by_step.setdefault(index, {})[name] = value
    pipeline = tuple(
        (path, {**params, **by_step.get(i, {})}) for i, (path, params) in enumerate(spec.pipeline)
    )
    return dataclasses.replace(spec, pipeline=pipeline), by_step


class ModelAdapter(Protocol):
    """What a trainer needs from a model. Implementations are picklable and pure."""

    family: Family

    @property
    def feature_names(self) -> tuple[str, ...]:
        """``record.features``, as the string objects the model's own dicts are keyed by.

        Input dicts must be built with these: a dict lookup whose key *is* the stored key
        skips the string comparison. Names parsed from the config again after a checkpoint
        restore are equal but other objects, and made per_record 6-8 % slower."""
        ...

    def predict_one(self, x: dict[str, float]) -> tuple[Any, float | None]:
        """(label or value, P(labels[1]) for binary / max proba for multiclass / None).

        Before any learning: ``(None, None)`` for classifiers; a River regressor's own
        cold-start value (e.g. 0.0).
        """
        ...

    def learn_one(self, x: dict[str, float], y: Any, weight: float = 1.0) -> None:
        """Learn one record (River only; per_record mode)."""
        ...

    def predict_many(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(predictions, positive-class probabilities for binary or None); see module doc."""
        ...

    def learn_many(self, X: np.ndarray, y: np.ndarray, weights: np.ndarray | None) -> None:
        """Learn a mini-batch: River ``learn_many`` (or a learn_one loop), sklearn partial_fit."""
        ...

    def fit(self, X: np.ndarray, y: np.ndarray, weights: np.ndarray | None) -> None:
        """Retrain from scratch on these rows (sklearn ``fit``; River replays learn_one)."""
        ...

    def fresh(self) -> ModelAdapter:
        """An untrained copy with the same configuration."""
        ...

    def with_params(self, overrides: Mapping[str, Any]) -> ModelAdapter:
        """An untrained copy whose steps take ``overrides`` (search paths such as
        ``learner.max_depth`` or ``preprocessing.0.with_mean``, see
        :func:`split_overrides`); ``describe()`` reports the merged params. Raises what the
        estimator raises on a value it refuses."""
        ...

    def is_fitted(self) -> bool:
        """True once the model has learnt at least one record."""
        ...

    def parameters_finite(self) -> bool:
        """False if any learnt numeric parameter is NaN or infinite."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-able description for version metadata."""
        ...

    def predict_record(self, features: Mapping[str, Any]) -> tuple[Any, float | None]:
        """Like ``predict_one`` for a raw ``{feature: value}`` mapping as a record carries
        it (categories as strings, missing keys or nulls): the contract encodes it first.
        Raises FeatureValueError for a value the contract refuses."""
        ...


# --------------------------------------------------------------------------- building


def _field(index: int | None) -> str:
    return "model.learner" if index is None else f"model.preprocessing[{index}]"


def _family(path: str) -> Family:
    if path in TESTING_LEARNERS:
        return TESTING_LEARNERS[path]
    return "river" if path.startswith("river.") else "sklearn"


def _testing_learner(path: str, field: str) -> type:
    """The test-only learner class at ``path`` when TESTING_ENV is set; raises naming
    ``field`` otherwise."""
    if os.environ.get(TESTING_ENV) != "1":
        raise IncompatibleLearner(
            f"{field}.path: {path!r} is a test-only learner; it is admitted only when "
            f"{TESTING_ENV}=1 is set (never in production)"
        )
    module_name, _, name = path.rpartition(".")
    cls: type = getattr(importlib.import_module(module_name), name)
    return cls


def _resolve(spec: EstimatorSpec, field: str) -> type:
    """Import ``spec.path`` and check it is a River or scikit-learn estimator class."""
    path = spec.path
    if path in TESTING_LEARNERS:
        return _testing_learner(path, field)
    module_name, _, name = path.rpartition(".")
    if not path.startswith(ALLOWED_PREFIXES) or not module_name or name.startswith("_"):
        raise IncompatibleLearner(
            f"{field}.path: {path!r} is not allowed; use a public river.* or sklearn.* "
            "estimator class"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise IncompatibleLearner(f"{field}.path: cannot import {module_name!r}: {error}") from None
    cls = getattr(module, name, None)
    if not inspect.isclass(cls):
        raise IncompatibleLearner(f"{field}.path: {path!r} is not a class")
    family = _family(path)
    origin = getattr(cls, "__module__", "")
    ok = (
        issubclass(cls, river_base.Estimator) and origin.startswith("river")
        if family == "river"
        else issubclass(cls, BaseEstimator) and origin.startswith("sklearn")
    )
    if not ok:
        raise IncompatibleLearner(
            f"{field}.path: {path!r} is not a {family} estimator "
            f"({'river.base.Estimator' if family == 'river' else 'sklearn BaseEstimator'})"
        )
    return cls


def _construct(cls: type, spec: EstimatorSpec, field: str) -> Any:
    signature = inspect.signature(cls)
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    unknown = sorted(set(spec.params) - set(signature.parameters))
    if unknown and not accepts_any:
        raise IncompatibleLearner(
            f"{field}.params: unknown parameter(s) {unknown} for {spec.path} "
            f"(accepted: {sorted(signature.parameters)})"
        )
    try:
        estimator = cls(**spec.params)
        # scikit-learn validates parameter values only at fit; check them now.
        validate = getattr(estimator, "_validate_params", None)
        if _family(spec.path) == "sklearn" and callable(validate):
            validate()
    except (TypeError, ValueError) as error:
        raise IncompatibleLearner(f"{field}.params: invalid for {spec.path}: {error}") from None
    return estimator


def _accepts(method: Callable[..., Any], name: str) -> bool:
    parameters = inspect.signature(method).parameters
    return name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def _river_has(estimator: Any, method: str) -> bool:
    """True if the River estimator overrides ``method`` (the base classes only raise)."""
    impl = getattr(type(estimator), method, None)
    if impl is None:
        return False
    defaults = [getattr(b, method, None) for b in (river_base.Classifier, river_base.Estimator)]
    return all(impl is not d for d in defaults)


def _pandas_available() -> bool:
    try:
        importlib.import_module("pandas")
    except ImportError:
        return False
    return True


def build_model(settings: Settings) -> ModelAdapter:
    """Build the configured pipeline and check it fits the task, mode, metrics and weights.

    Raises IncompatibleLearner naming the offending config field.
    """
    model = settings.model
    specs: list[tuple[EstimatorSpec, str]] = [
        (spec, _field(i)) for i, spec in enumerate(model.preprocessing)
    ]
    specs.append((model.learner, _field(None)))
    family = _family(model.learner.path)
    for spec, field in specs[:-1]:
        if _family(spec.path) != family:
            raise IncompatibleLearner(
                f"{field}.path: {spec.path} is {_family(spec.path)} but model.learner is "
                f"{family} ({model.learner.path}); a pipeline cannot mix families"
            )
    steps = [_construct(_resolve(spec, field), spec, field) for spec, field in specs]
    _check_search_space(settings, steps)
    task = model.task
    mode = settings.training.mode
    metrics = settings.evaluation_metrics()
    labels = list(settings.record.labels or [])
    if task == "multiclass_classification":
        bad = [m for m in metrics if m in _PROBA_METRICS]
        if bad:
            raise IncompatibleLearner(
                f"evaluation.metrics: {bad} are supported for binary_classification only"
            )
    adapter: ModelAdapter
    if family == "river":
        adapter = _build_river(settings, steps=steps, specs=specs, labels=labels, metrics=metrics)
    else:
        adapter = _build_sklearn(
            settings, steps=steps, specs=specs, labels=labels, metrics=metrics, task=task, mode=mode
        )
    _check_candidates(settings, adapter)
    return adapter


def _check_search_space(settings: Settings, steps: list[Any]) -> None:
    """Every searched parameter must be one its step's constructor takes."""
    search = settings.training.full_batch.search
    if search.enabled:
        paths = {path: f"training.full_batch.search.space.{path}" for path in search.space}
        _check_param_paths(settings, steps, paths)
    selection = settings.training.selection
    if selection.enabled:
        for i, candidate in enumerate(selection.candidates):
            prefix = f"training.selection.candidates[{i}].params"
            _check_param_paths(
                settings, steps, {path: f"{prefix}.{path}" for path in candidate.params}
            )


def _check_candidates(settings: Settings, model: ModelAdapter) -> None:
    """Every online-selection candidate can be built with its values (as the selection will)."""
    selection = settings.training.selection
    if not selection.enabled:
        return
    for i, candidate in enumerate(selection.candidates):
        try:
            model.with_params(candidate.params)
        except (TypeError, ValueError) as error:
            raise IncompatibleLearner(
                f"training.selection.candidates[{i}].params: invalid for "
                f"{settings.model.learner.path}: {error}"
            ) from None


def _check_param_paths(settings: Settings, steps: list[Any], paths: Mapping[str, str]) -> None:
    """Each ``path`` (learner.P / preprocessing.I.P) names a parameter its step takes;
    the error names ``paths[path]``, the config field."""
    categorical = bool(FeatureContract.from_settings(settings.record).categorical)
    for path, field in paths.items():
        head, _, rest = path.partition(".")
        if head == "learner":
            step, name, where = steps[-1], rest, settings.model.learner.path
        else:
            position, _, name = rest.partition(".")
            step = steps[int(position)]
            where = settings.model.preprocessing[int(position)].path
            if categorical and _family(settings.model.learner.path) == "river":
                raise IncompatibleLearner(
                    f"{field}: River preprocessing params cannot be overridden with category "
                    "features (the steps sit inside the encoding union); set the learner's"
                )
        accepted = inspect.signature(type(step)).parameters
        if name not in accepted and not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
            raise IncompatibleLearner(
                f"{field}: unknown parameter {name!r} for {where} (accepted: {sorted(accepted)})"
            )


def _build_river(
    settings: Settings,
    *,
    steps: list[Any],
    specs: list[tuple[EstimatorSpec, str]],
    labels: list[Any],
    metrics: list[str],
) -> RiverAdapter:
    task = settings.model.task
    learner = steps[-1]
    path = settings.model.learner.path
    for step, (spec, field) in zip(steps[:-1], specs[:-1], strict=True):
        if not isinstance(step, river_base.Transformer):
            raise IncompatibleLearner(f"{field}.path: {spec.path} is not a River transformer")
    wanted = river_base.Regressor if task == "regression" else river_base.Classifier
    if not isinstance(learner, wanted):
        raise IncompatibleLearner(
            f"model.learner.path: {path} is not a {wanted.__name__}; model.task is {task}"
        )
    has_proba = task != "regression" and _river_has(learner, "predict_proba_one")
    needs_proba = [m for m in metrics if m in _PROBA_METRICS]
    if needs_proba and not has_proba:
        raise IncompatibleLearner(
            f"evaluation.metrics: {needs_proba} need probabilities; model.learner: {path} "
            "has no predict_proba_one"
        )
    if settings.record.weight_field is not None and not _accepts(learner.learn_one, "w"):
        raise IncompatibleLearner(
            f"record.weight_field is set but model.learner: {path}.learn_one takes no weight"
        )
    model_settings = model_spec(settings)
    contract = model_settings.feature_contract()
    batch = "learn_one_loop"
    if (
        settings.training.mode == "mini_batch"
        and contract.plain  # frames cannot leave a missing value out, as dicts do
        and all(_river_has(s, "learn_many") for s in steps)
        and _pandas_available()
    ):
        batch = "learn_many"
    if contract.categorical:
        steps = [river_union(contract, steps[:-1]), steps[-1]]
    model = steps[0]
    for step in steps[1:]:
        model = model | step
    return RiverAdapter(model, model_settings, labels, has_proba, batch)


def _build_sklearn(
    settings: Settings,
    *,
    steps: list[Any],
    specs: list[tuple[EstimatorSpec, str]],
    labels: list[Any],
    metrics: list[str],
    task: str,
    mode: str,
) -> SklearnAdapter:
    learner = steps[-1]
    path = settings.model.learner.path
    if mode == "per_record":
        raise IncompatibleLearner(
            f"model.learner: {path} is scikit-learn; training.mode per_record needs a River "
            "learner (learn_one); use mini_batch (partial_fit) or full_batch (fit)"
        )
    for step, (spec, field) in zip(steps[:-1], specs[:-1], strict=True):
        if not hasattr(step, "transform"):
            raise IncompatibleLearner(f"{field}.path: {spec.path} is not a transformer")
    classification = task != "regression"
    if classification and not is_classifier(learner):
        raise IncompatibleLearner(
            f"model.learner.path: {path} is not a classifier; model.task is {task}"
        )
    if not classification and not is_regressor(learner):
        raise IncompatibleLearner(
            f"model.learner.path: {path} is not a regressor; model.task is {task}"
        )
    if mode == "mini_batch":
        for step, (spec, field) in zip(steps, specs, strict=True):
            if not hasattr(step, "partial_fit"):
                raise IncompatibleLearner(
                    f"{field}: {spec.path} has no partial_fit; training.mode mini_batch needs "
                    "it (use full_batch)"
                )
    model_settings = model_spec(settings)
    contract = model_settings.feature_contract()
    if not contract.plain:
        configured = settings.model.categorical_encoding
        if mode == "mini_batch":
            if configured == "native":
                raise IncompatibleLearner(
                    "model.categorical_encoding: native needs training.mode full_batch (a "
                    "partial_fit learner needs a fixed width: use onehot or hashing)"
                )
            encoding = partial_fit_encoding(configured)
            steps = [FixedWidthEncoder(contract, encoding, settings.model.hash_buckets), *steps]
        else:
            steps = [window_encoder(contract, learner, configured), *steps]
    pipeline = make_pipeline(*steps)
    # hasattr, not callable(getattr(...)): SGDClassifier(loss="hinge") hides predict_proba.
    has_proba = classification and hasattr(pipeline, "predict_proba")
    needs_proba = [m for m in metrics if m in _PROBA_METRICS]
    if needs_proba and not has_proba:
        raise IncompatibleLearner(
            f"evaluation.metrics: {needs_proba} need probabilities; model.learner: {path} "
            "has no predict_proba (with these params)"
        )
    if settings.record.weight_field is not None:
        method = learner.partial_fit if mode == "mini_batch" else learner.fit
        if not _accepts(method, "sample_weight"):
            raise IncompatibleLearner(
                f"record.weight_field is set but model.learner: {path}.{method.__name__} "
                "takes no sample_weight"
            )
    return SklearnAdapter(pipeline, model_settings, labels, has_proba)


def _record_row(contract: FeatureContract, features: Mapping[str, Any]) -> np.ndarray:
    return np.asarray([contract.encode_record(features)], dtype=np.float64)


def _describe(spec: ModelSpec, family: Family, batch: str, first: Any) -> dict[str, Any]:
    path, params = spec.pipeline[-1]
    contract = spec.feature_contract()
    return {
        "features": contract.describe(),
        "encoding": describe_encoding(family, contract, first),
        "family": family,
        "path": path,
        "params": copy.deepcopy(params),
        "pipeline": [{"path": p, "params": copy.deepcopy(q)} for p, q in spec.pipeline],
        "task": spec.task,
        "mode": spec.mode,
        "batch_learning": batch,
    }


# --------------------------------------------------------------------------- checks


def _bad_number(value: Any) -> bool:
    if isinstance(value, bool | int):
        return False
    if isinstance(value, float | np.floating):
        return not math.isfinite(value)
    if isinstance(value, np.ndarray):
        return value.dtype.kind in "fc" and not bool(np.isfinite(value).all())
    return False


def _state_finite(value: Any) -> bool:
    """Numbers, arrays, and mappings / lists of those: all finite? Other objects are skipped."""
    if _bad_number(value):
        return False
    if isinstance(value, list | tuple):
        return all(_state_finite(v) for v in value if not hasattr(v, "__dict__"))
    values = getattr(value, "values", None)
    if callable(values) and hasattr(value, "keys") and not isinstance(value, np.ndarray):
        try:
            return all(not _bad_number(v) for v in values())
        except TypeError:
            return True
    return True


# --------------------------------------------------------------------------- River


class RiverAdapter:
    """A River estimator or pipeline. Methods are bound once: per_record must stay close
    to the bare ``predict_proba_one`` + ``learn_one`` cost."""

    family: Family = "river"

    def __init__(
        self,
        model: Any,
        spec: ModelSpec,
        labels: Sequence[Any],
        has_proba: bool,
        batch: str,
    ) -> None:
        self._model = model
        self._spec = spec
        self._features = list(spec.features)
        self._contract = spec.feature_contract()
        self._task = spec.task
        self._labels = list(labels)
        self._has_proba = has_proba
        self._batch = batch
        self._n_learned = 0
        self._bind()

    def _bind(self) -> None:
        model = self._model
        self._learn = model.learn_one
        self._predict = model.predict_one
        self._proba = model.predict_proba_one if self._has_proba else None
        self._binary = self._task == "binary_classification"
        self._positive = self._labels[1] if self._binary else None
        self._negative = self._labels[0] if self._binary else None

    @property
    def feature_names(self) -> tuple[str, ...]:
        """See :class:`ModelAdapter`. ``_features`` is pickled with the model, so pickle's
        memo restores both onto the same string objects."""
        return tuple(self._features)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_learn", "_predict", "_proba"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(_without_settings(state))
        if "_contract" not in self.__dict__:  # saved before typed features
            self._contract = self._spec.feature_contract()
        self._bind()

    def predict_one(self, x: dict[str, float]) -> tuple[Any, float | None]:
        """See :class:`ModelAdapter`."""
        proba_one = self._proba
        if self._binary:
            if proba_one is None:
                label = self._predict(x)
                if label is None:
                    return None, None
                return (self._positive if label else self._negative), None
            dist = proba_one(x)
            if not dist:
                return None, None
            p = dist.get(True, 0.0)
            return (self._positive if p > 0.5 else self._negative), p
        if proba_one is not None:
            dist = proba_one(x)
            if not dist:
                return None, None
            label = max(dist, key=dist.__getitem__)
            return label, dist[label]
        return self._predict(x), None

    def learn_one(self, x: dict[str, float], y: Any, weight: float = 1.0) -> None:
        """See :class:`ModelAdapter`."""
        if self._binary:
            y = y == self._positive
        if weight == 1.0:
            self._learn(x, y)
        else:
            self._learn(x, y, w=weight)
        self._n_learned += 1

    def _rows(self, X: np.ndarray) -> list[dict[str, Any]]:
        features = self._features
        rows = np.asarray(X).tolist()
        if self._contract.plain:
            return [dict(zip(features, row, strict=True)) for row in rows]
        river_dict = self._contract.river_dict
        return [river_dict(features, row) for row in rows]

    def predict_record(self, features: Mapping[str, Any]) -> tuple[Any, float | None]:
        """See :class:`ModelAdapter`."""
        return self.predict_one(self._rows(_record_row(self._contract, features))[0])

    def predict_many(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """See :class:`ModelAdapter` (a predict_one loop: River's many-methods need pandas)."""
        rows = self._rows(X)
        predict = self.predict_one
        pairs = [predict(x) for x in rows]
        if self._task == "regression":
            values = np.array([np.nan if v is None else v for v, _ in pairs], dtype=np.float64)
            return values, None
        labels = np.empty(len(pairs), dtype=object)
        labels[:] = [v for v, _ in pairs]
        if not (self._binary and self._has_proba):
            return labels, None
        proba = np.array([np.nan if p is None else p for _, p in pairs], dtype=np.float64)
        return labels, proba

    def _encode(self, y: np.ndarray) -> list[Any]:
        values = np.asarray(y).tolist()
        if self._binary:
            positive = self._positive
            return [v == positive for v in values]
        return list(values)

    def learn_many(self, X: np.ndarray, y: np.ndarray, weights: np.ndarray | None) -> None:
        """River ``learn_many`` on a pandas frame when every step supports it (and pandas is
        installed), else a learn_one loop; ``describe()["batch_learning"]`` says which."""
        if len(y) == 0:
            return
        if self._batch == "learn_many":
            # Optional dependency: River's mini-batch API takes dataframes.
            pd = importlib.import_module("pandas")
            frame = pd.DataFrame(np.asarray(X, dtype=np.float64), columns=self._features)
            target = pd.Series(self._encode(y))
            if weights is None:
                self._model.learn_many(frame, target)
            else:
                self._model.learn_many(frame, target, w=pd.Series(np.asarray(weights)))
            self._n_learned += len(target)
            return
        self._replay(X, y, weights)

    def _replay(self, X: np.ndarray, y: np.ndarray, weights: np.ndarray | None) -> None:
        learn = self._learn
        targets = self._encode(y)
        rows = self._rows(X)
        if weights is None:
            for x, target in zip(rows, targets, strict=True):
                learn(x, target)
        else:
            for x, target, w in zip(rows, targets, np.asarray(weights).tolist(), strict=True):
                learn(x, target, w=w)
        self._n_learned += len(targets)

    def fit(self, X: np.ndarray, y: np.ndarray, weights: np.ndarray | None) -> None:
        """Replace the model with an untrained clone and replay ``learn_one`` in row order."""
        self._model = self._model.clone()
        self._n_learned = 0
        self._bind()
        self._replay(X, y, weights)

    def fresh(self) -> RiverAdapter:
        """See :class:`ModelAdapter`."""
        return RiverAdapter(
            self._model.clone(), self._spec, self._labels, self._has_proba, self._batch
        )

    def with_params(self, overrides: Mapping[str, Any]) -> RiverAdapter:
        """See :class:`ModelAdapter`. The configured steps are the pipeline's last ones; with
        category features the preprocessing sits inside the encoding union, so only the
        learner's params can be overridden then (build_model refuses the others)."""
        spec, by_step = split_overrides(self._spec, overrides)
        steps = list(self._model.steps.values()) if hasattr(self._model, "steps") else [self._model]
        offset = len(steps) - len(spec.pipeline)
        if offset != 0 and any(i != len(spec.pipeline) - 1 for i in by_step):
            raise IncompatibleLearner(
                "search over preprocessing params needs numeric features only (River)"
            )
        last = len(spec.pipeline) - 1
        clones = []
        for position, step in enumerate(steps):
            index = last if position == len(steps) - 1 else position - offset
            params = by_step.get(index)
            clones.append(step.clone(params) if params else step.clone())
        model = clones[0]
        for step in clones[1:]:
            model = model | step
        return RiverAdapter(model, spec, self._labels, self._has_proba, self._batch)

    def is_fitted(self) -> bool:
        """See :class:`ModelAdapter`."""
        return self._n_learned > 0

    def parameters_finite(self) -> bool:
        """Checks each step's learnt attributes (those that are not constructor parameters):
        floats, arrays and weight / statistics mappings. Nested objects (tree nodes) are not
        walked: NaN reaches a tree only through its inputs, which are validated upstream."""
        steps = list(self._model.steps.values()) if hasattr(self._model, "steps") else [self._model]
        for step in steps:
            params = set(step._get_params())
            for name, value in vars(step).items():
                if name not in params and not _state_finite(value):
                    return False
        return True

    def describe(self) -> dict[str, Any]:
        """See :class:`ModelAdapter`."""
        return _describe(self._spec, "river", self._batch, None)

    @property
    def model(self) -> Any:
        """The wrapped River estimator or pipeline."""
        return self._model


# --------------------------------------------------------------------------- scikit-learn


def _trusted_params() -> Any:
    """scikit-learn's per-call parameter validation off: ``_construct`` validated the
    parameters once; repeating it on every partial_fit / predict cost ~10 % of a mini-batch
    unit. Input validation (shapes, finiteness) stays on."""
    return config_context(skip_parameter_validation=True)


def _decoded_input(first: bool) -> Any:
    """For the step that receives the decoder's matrix (``first``): the record contract
    already rejected NaN and infinities, so sklearn's finiteness scan of it (~8 % of a
    mini-batch unit) is skipped. Later steps see transformed data and keep the check, so a
    transformer that produces NaN still fails loudly (and its records are dead-lettered)."""
    return config_context(assume_finite=True) if first else contextlib.nullcontext()


class SklearnAdapter:
    """A scikit-learn pipeline (``make_pipeline`` of preprocessing then learner)."""

    family: Family = "sklearn"

    def __init__(
        self, pipeline: Any, spec: ModelSpec, labels: Sequence[Any], has_proba: bool
    ) -> None:
        self._pipeline = pipeline
        self._spec = spec
        self._task = spec.task
        self._labels = list(labels)
        self._has_proba = has_proba
        self._fitted = False

    def _empty(self, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        if self._task == "regression":
            return np.full(n, np.nan), None
        labels = np.full(n, None, dtype=object)
        proba = np.full(n, np.nan) if self._binary_proba else None
        return labels, proba

    @property
    def feature_names(self) -> tuple[str, ...]:
        """See :class:`ModelAdapter` (scikit-learn takes matrices: identity does not matter)."""
        return self._spec.features

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(_without_settings(state))

    @property
    def _binary_proba(self) -> bool:
        return self._task == "binary_classification" and self._has_proba

    def predict_many(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """See :class:`ModelAdapter`; an unfitted model gives the "no prediction" form."""
        X = np.asarray(X, dtype=np.float64)
        if not self._fitted or len(X) == 0:
            return self._empty(len(X))
        with _trusted_params():
            return self._predict(X)

    def _predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        # The steps one by one, as _partial_fit does (what Pipeline.predict does, minus
        # its routing), so the first step's finiteness scan can be skipped.
        steps = [step for _, step in self._pipeline.steps]
        Xt = X
        for index, step in enumerate(steps[:-1]):
            with _decoded_input(index == 0):
                Xt = step.transform(Xt)
        last = steps[-1]
        with _decoded_input(len(steps) == 1):
            if self._task == "regression":
                return np.asarray(last.predict(Xt), dtype=np.float64), None
            if not self._binary_proba:
                labels = np.empty(len(X), dtype=object)
                labels[:] = last.predict(Xt).tolist()
                return labels, None
            proba_all = last.predict_proba(Xt)
        # Python values, not numpy scalars: the evaluator's label lookups are 20x slower
        # on np.bool_ / np.int64 keys.
        classes = last.classes_.tolist()
        positive = self._labels[1]
        if positive in classes:
            proba = np.asarray(proba_all[:, classes.index(positive)], dtype=np.float64)
        else:  # a full-batch fit that never saw the positive class
            proba = np.zeros(len(X))
        labels = np.empty(len(X), dtype=object)
        labels[:] = np.asarray(classes, dtype=object)[np.argmax(proba_all, axis=1)]
        return labels, proba

    def predict_record(self, features: Mapping[str, Any]) -> tuple[Any, float | None]:
        """See :class:`ModelAdapter`."""
        return self._predict_row(_record_row(self._spec.feature_contract(), features))

    def _predict_row(self, row: np.ndarray) -> tuple[Any, float | None]:
        values, proba = self.predict_many(row)
        value = values[0]
        if self._task == "regression":
            return (None if math.isnan(value) else float(value)), None
        p = None if proba is None or math.isnan(proba[0]) else float(proba[0])
        return value, p

    def predict_one(self, x: dict[str, float]) -> tuple[Any, float | None]:
        """See :class:`ModelAdapter` (slow path: a one-row predict_many)."""
        row = np.array([[x[name] for name in self._spec.features]], dtype=np.float64)
        return self._predict_row(row)

    def learn_one(self, x: dict[str, float], y: Any, weight: float = 1.0) -> None:
        """A one-row partial_fit (build_model refuses sklearn for per_record)."""
        row = np.array([[x[name] for name in self._spec.features]], dtype=np.float64)
        self.learn_many(row, np.array([y], dtype=object), np.array([weight]))

    def learn_many(self, X: np.ndarray, y: np.ndarray, weights: np.ndarray | None) -> None:
        """partial_fit every step in order; classes = record.labels, given on the first call
        (which fixes them)."""
        if len(y) == 0:
            return
        with _trusted_params():
            self._partial_fit(X, y, weights)
        self._fitted = True

    def _partial_fit(self, X: np.ndarray, y: np.ndarray, weights: np.ndarray | None) -> None:
        Xt = np.asarray(X, dtype=np.float64)
        target = self._target(y)
        steps = [step for _, step in self._pipeline.steps]
        for index, step in enumerate(steps[:-1]):
            with _decoded_input(index == 0):
                if weights is not None and _accepts(step.partial_fit, "sample_weight"):
                    step.partial_fit(Xt, sample_weight=weights)
                else:
                    step.partial_fit(Xt)
                Xt = step.transform(Xt)
        kwargs: dict[str, Any] = {}
        if self._task != "regression" and not hasattr(steps[-1], "classes_"):
            # Needed on the first call only; on later calls sklearn re-derives and compares
            # the classes each time (~4 % of a mini-batch unit).
            kwargs["classes"] = np.asarray(self._labels)
        if weights is not None:
            kwargs["sample_weight"] = np.asarray(weights, dtype=np.float64)
        with _decoded_input(len(steps) == 1):
            steps[-1].partial_fit(Xt, target, **kwargs)

    def _target(self, y: np.ndarray) -> np.ndarray:
        if self._task == "regression":
            return np.asarray(y, dtype=np.float64)
        # The label dtype of record.labels, so classes= and y agree (object arrays confuse
        # sklearn's type_of_target).
        return np.asarray(np.asarray(y).tolist(), dtype=np.asarray(self._labels).dtype)

    def fit(self, X: np.ndarray, y: np.ndarray, weights: np.ndarray | None) -> None:
        """Fit a fresh clone (so ``warm_start`` never leaks old state), then keep it.

        Raises whatever the estimator raises (e.g. a single class in the window)."""
        pipeline = clone(self._pipeline)
        kwargs: dict[str, Any] = {}
        if weights is not None:
            last = pipeline.steps[-1][0]
            kwargs[f"{last}__sample_weight"] = np.asarray(weights, dtype=np.float64)
        pipeline.fit(np.asarray(X, dtype=np.float64), self._target(y), **kwargs)
        self._pipeline = pipeline
        self._fitted = True

    def fresh(self) -> SklearnAdapter:
        """See :class:`ModelAdapter`."""
        return SklearnAdapter(clone(self._pipeline), self._spec, self._labels, self._has_proba)

    def with_params(self, overrides: Mapping[str, Any]) -> SklearnAdapter:
        """See :class:`ModelAdapter`. The configured steps are the pipeline's last ones (a
        feature encoder may come first); the new values are validated at once."""
        spec, by_step = split_overrides(self._spec, overrides)
        pipeline = clone(self._pipeline)
        offset = len(pipeline.steps) - len(spec.pipeline)
        for index, params in by_step.items():
            step = pipeline.steps[offset + index][1]
            step.set_params(**params)
            validate = getattr(step, "_validate_params", None)
            if callable(validate):
                validate()
        has_proba = self._task != "regression" and hasattr(pipeline, "predict_proba")
        return SklearnAdapter(pipeline, spec, self._labels, has_proba)

    def is_fitted(self) -> bool:
        """See :class:`ModelAdapter`."""
        return self._fitted

    def parameters_finite(self) -> bool:
        """Checks every step's fitted attributes (``name_``): floats, float arrays, lists."""
        for _, step in self._pipeline.steps:
            for name, value in vars(step).items():
                if name.endswith("_") and not name.startswith("_") and not _state_finite(value):
                    return False
        return True

    def describe(self) -> dict[str, Any]:
        """See :class:`ModelAdapter`."""
        batch = "partial_fit" if self._spec.mode == "mini_batch" else "fit"
        return _describe(self._spec, "sklearn", batch, self._pipeline.steps[0][1])

    @property
    def model(self) -> Any:
        """The wrapped scikit-learn pipeline."""
        return self._pipeline
