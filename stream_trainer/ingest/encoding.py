"""How typed features reach each learner family (see the table in docs/records.md).

The decoder's rows hold one float64 column per feature (:mod:`stream_trainer.ingest.features`):
category codes, 1.0 / 0.0 for booleans, NaN for an allowed missing value. This module turns
them into what a learner can take, as the first steps of the model's own pipeline, so the
encoders are checkpointed and published with it and a reader predicts from raw records:

* River: ``TransformerUnion(Discard(categories) | preprocessing..., Discard(numbers) |
  OneHotEncoder())``, fed dicts that leave missing values out;
* scikit-learn ``partial_fit`` (mini_batch): :class:`FixedWidthEncoder`, stateless and fixed
  by the contract, so its width never changes: one-hot of the listed categories plus an
  "other" column, or ``hash_buckets`` columns for hashed ones; a missing value is an
  indicator column plus a fill of 0;
* scikit-learn ``fit`` (full_batch): a :class:`~sklearn.compose.ColumnTransformer` refit on
  every window: native categories (an OrdinalEncoder whose unknowns and missing values are
  NaN) for learners with a ``categorical_features`` parameter, one-hot and mean imputation
  with indicators for the rest.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from river import compose
from river import preprocessing as river_preprocessing
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder

from stream_trainer.ingest.features import FeatureContract

Encoding = Literal["onehot", "hashing", "native"]


def partial_fit_encoding(configured: str) -> Encoding:
    """``model.categorical_encoding`` resolved for scikit-learn ``partial_fit``: ``auto`` is
    ``onehot`` (listed categories one-hot, open lists hashed); ``hashing`` hashes all."""
    return "hashing" if configured == "hashing" else "onehot"


class FixedWidthEncoder(TransformerMixin, BaseEstimator):  # type: ignore[misc]
    """The contract's rows as a fixed-width, finite matrix for ``partial_fit`` learners.

    Stateless: ``fit`` / ``partial_fit`` learn nothing, so the output width is fixed by the
    contract from the first unit on. A category feature listed in the contract is one-hot
    over its categories (plus an "other" column when unknown values are kept) unless
    ``encoding`` is ``hashing``; an open-list one is always hashed into ``hash_buckets``
    columns. Every feature that allows missing values gets an indicator column; its value
    columns are 0 when it is missing.
    """

    def __init__(
        self, contract: FeatureContract, encoding: str = "onehot", hash_buckets: int = 32
    ) -> None:
        self.contract = contract
        self.encoding = encoding
        self.hash_buckets = hash_buckets

    def fit(self, X: Any, y: Any = None, **_: Any) -> FixedWidthEncoder:
        """Learns nothing (see the class doc)."""
        return self

    def partial_fit(self, X: Any, y: Any = None, **_: Any) -> FixedWidthEncoder:
        """Learns nothing (see the class doc)."""
        return self

    def _width(self, index: int) -> int:
        feature = self.contract.features[index]
        if feature.type != "category":
            return 1
        if feature.categories is None or self.encoding == "hashing":
            return self.hash_buckets
        return len(feature.categories) + (0 if feature.reject_unknown else 1)

    def get_feature_names_out(self, input_features: Any = None) -> npt.NDArray[np.object_]:
        """Names of the output columns, in order."""
        names: list[str] = []
        for index, feature in enumerate(self.contract.features):
            width = self._width(index)
            if feature.type != "category":
                names.append(feature.name)
            elif feature.categories is not None and self.encoding != "hashing":
                names.extend(f"{feature.name}={c}" for c in feature.categories)
                if width > len(feature.categories):
                    names.append(f"{feature.name}=__other__")
            else:
                names.extend(f"{feature.name}#{b}" for b in range(width))
            if feature.allow_missing:
                names.append(f"{feature.name}__missing")
        return np.asarray(names, dtype=object)

    def transform(self, X: Any) -> npt.NDArray[np.float64]:
        """The encoded matrix (finite; width fixed by the contract)."""
        X = np.asarray(X, dtype=np.float64)
        n = X.shape[0]
        blocks: list[npt.NDArray[np.float64]] = []
        for index, feature in enumerate(self.contract.features):
            column = X[:, index]
            missing = np.isnan(column)
            if feature.type != "category":
                blocks.append(np.where(missing, 0.0, column).reshape(n, 1))
            else:
                width = self._width(index)
                codes = np.where(missing, 0.0, column).astype(np.int64)
                if feature.categories is None or self.encoding == "hashing":
                    codes = codes % width
                block = np.zeros((n, width), dtype=np.float64)
                rows = np.flatnonzero(~missing)
                block[rows, codes[rows]] = 1.0
                blocks.append(block)
            if feature.allow_missing:
                blocks.append(missing.astype(np.float64).reshape(n, 1))
        return np.hstack(blocks) if blocks else np.empty((n, 0))


def native_categories(learner: Any) -> bool:
    """True for a learner that takes categorical features natively (HistGradientBoosting)."""
    try:
        return "categorical_features" in learner.get_params()
    except AttributeError:
        return False


def window_encoder(contract: FeatureContract, learner: Any, configured: str) -> Any:
    """The ColumnTransformer that a full-batch ``fit`` refits on each window, and sets the
    learner's ``categorical_features`` when it is native (categories come first)."""
    categorical = list(contract.categorical)
    others = [i for i in range(len(contract.features)) if i not in categorical]
    native = configured == "native" or (configured == "auto" and native_categories(learner))
    if native:
        max_bins = int(learner.get_params().get("max_bins", 255))
        learner.set_params(categorical_features=list(range(len(categorical))))
        return ColumnTransformer(
            [
                (
                    "categories",
                    OrdinalEncoder(
                        handle_unknown="use_encoded_value",
                        unknown_value=np.nan,
                        encoded_missing_value=np.nan,
                        max_categories=max_bins,
                    ),
                    categorical,
                ),
                ("numbers", "passthrough", others),
            ],
            sparse_threshold=0.0,
        )
    return ColumnTransformer(
        [
            (
                "categories",
                OneHotEncoder(handle_unknown="ignore", sparse_output=False),
                categorical,
            ),
            (
                "numbers",
                SimpleImputer(strategy="mean", add_indicator=True, keep_empty_features=True),
                others,
            ),
        ],
        sparse_threshold=0.0,
    )


def river_union(contract: FeatureContract, preprocessing: list[Any]) -> Any:
    """River's front of the pipeline for a contract with category features: the numbers
    (and booleans) through ``preprocessing``, the categories one-hot encoded."""
    names = contract.names
    categorical = [names[i] for i in contract.categorical]
    numbers = [n for n in names if n not in categorical]
    branches: list[Any] = []
    # Discard, not Select: Select raises KeyError on a missing key, Discard keeps what is
    # there (in the record's key order, which the contract fixes).
    if numbers:
        branch: Any = compose.Discard(*categorical)
        for step in preprocessing:
            branch = branch | step
        branches.append(branch)
    if categorical:
        branches.append(compose.Discard(*numbers) | river_preprocessing.OneHotEncoder())
    if len(branches) == 1:
        return branches[0]
    return compose.TransformerUnion(*branches)


def describe_encoding(family: str, contract: FeatureContract, first: Any) -> dict[str, Any]:
    """How this model encodes its typed features, for version metadata (``first``: the
    pipeline's first step). Empty for an all-numeric contract (nothing is encoded)."""
    if contract.plain:
        return {}
    if family == "river":
        return {
            "categories": "onehot (River OneHotEncoder)" if contract.categorical else "none",
            "missing": "left out of the dict",
        }
    if isinstance(first, FixedWidthEncoder):
        return {
            "categories": first.encoding,
            "hash_buckets": first.hash_buckets,
            "missing": "indicator column + fill 0",
            "width": len(first.get_feature_names_out()),
        }
    native = isinstance(first, ColumnTransformer) and isinstance(
        first.transformers[0][1], OrdinalEncoder
    )
    return {
        "categories": "native (OrdinalEncoder per window)" if native else "onehot per window",
        "missing": "native (NaN)" if native else "mean imputation + indicator per window",
    }
