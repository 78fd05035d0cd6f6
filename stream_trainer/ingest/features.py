"""The typed feature contract: how one raw feature value becomes one float64 column.

Every valid record becomes a row of float64, one column per feature in contract order, so
the decode worker, the window, checkpoints and the learners keep one array type:

* ``number``: the value (finite);
* ``boolean``: 1.0 / 0.0 (a number is not a boolean, nor a boolean a number);
* ``category`` with a ``categories`` list: the category's index; a value outside the list is
  ``len(categories)`` (the shared "other" bucket) or rejected (``unknown_category: reject``);
* ``category`` without a list (open): a stable 53-bit code of the value (blake2b of its type
  tag and text), exact in a float64 and the same in every process and release;
* a missing or null value of a feature with ``missing: allow``: NaN, in any type's column.
  NaN therefore means "missing" and nothing else: numbers are finite.

:class:`FeatureContract` holds plain values only, is pickled with the model (so a
:class:`~stream_trainer.publishing.reader.ModelReader` turns the same raw record into the same row)
and
is written into version metadata by :meth:`FeatureContract.describe`.
"""

from __future__ import annotations

import builtins
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from stream_trainer.config import FeatureConfig, RecordSettings
from stream_trainer.errors import StreamTrainerError

FeatureType = Literal["number", "category", "boolean"]
MISSING: Final = math.nan
OTHER: Final = "__other__"  # the River token of the "other" bucket
_CODE_BITS: Final = 53  # float64 holds every integer below 2**53 exactly


class FeatureValueError(StreamTrainerError, ValueError):
    """A raw value that the contract refuses; ``reason`` is a dead-letter reason."""

    def __init__(self, reason: str, error_class: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.error_class = error_class


def category_code(value: str | int) -> float:
    """The stable code of an open-list category value (type-tagged: 1 and "1" differ)."""
    tag = b"s:" if isinstance(value, str) else b"i:"
    digest = hashlib.blake2b(tag + str(value).encode("utf-8"), digest_size=8).digest()
    return float(int.from_bytes(digest, "big") >> (64 - _CODE_BITS))


REFUSED: Final = -1.0  # a column value no code takes: marks a refused category
_MEMO_LIMIT: Final = 100_000  # open-list codes remembered per feature


class _CodeMemo(dict[Any, float]):
    """Open-list category codes by value, computed on first sight (``None``: missing)."""

    def __missing__(self, key: Any) -> float:
        code = category_code(key)
        if len(self) < _MEMO_LIMIT:
            self[key] = code
        return code


def json_type(value: Any) -> str:
    """How a JSON value's type reads in a rejection message ('a string')."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "null"


def quote(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters (names and values a record chose)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True, slots=True)
class Feature:
    """One feature of the contract, as plain values (see the module doc)."""

    name: str
    type: FeatureType = "number"
    allow_missing: bool = False
    categories: tuple[str | int, ...] | None = None
    reject_unknown: bool = False
    _index: dict[tuple[builtins.type, str | int], int] = field(
        default_factory=dict, compare=False, repr=False
    )

    _codes: dict[Any, float] = field(default_factory=dict, compare=False, repr=False)
    _memo: _CodeMemo = field(default_factory=_CodeMemo, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.categories is not None:
            self._index.update({(type(c), c): i for i, c in enumerate(self.categories)})
            # By value: msgspec hands over only str and int (never bool or float), and a
            # str never equals an int, so this is type-strict for the fast path.
            self._codes.update({c: float(i) for i, c in enumerate(self.categories)})
        self._codes[None] = MISSING
        self._memo[None] = MISSING

    def __reduce__(self) -> tuple[Any, ...]:
        # The lookup tables and the code memo are rebuilt, never pickled with a model.
        fields = (self.name, self.type, self.allow_missing, self.categories, self.reject_unknown)
        return (Feature, fields)

    @property
    def other_code(self) -> int | None:
        """The "other" bucket's code, for a listed category that keeps unknown values."""
        if self.categories is None or self.reject_unknown:
            return None
        return len(self.categories)

    def encode(self, value: Any) -> float:
        """The column value of a raw value that is present and not null.

        Raises FeatureValueError with reason ``wrong_type``, ``non_finite`` or
        ``unknown_category``."""
        if self.type == "number":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise FeatureValueError(
                    "wrong_type",
                    "WrongFeatureType",
                    f"feature {quote(self.name)} is {json_type(value)}, expected a number",
                )
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            if not math.isfinite(number):
                raise FeatureValueError(
                    "non_finite", "NonFiniteFeature", f"feature {quote(self.name)} is {number}"
                )
            return number
        if self.type == "boolean":
            if not isinstance(value, bool):
                raise FeatureValueError(
                    "wrong_type",
                    "WrongFeatureType",
                    f"feature {quote(self.name)} is {json_type(value)}, expected a boolean",
                )
            return 1.0 if value else 0.0
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise FeatureValueError(
                "wrong_type",
                "WrongFeatureType",
                f"feature {quote(self.name)} is {json_type(value)}, expected a category "
                "(string or integer)",
            )
        if self.categories is None:
            return category_code(value)
        index = self._index.get((type(value), value))
        if index is not None:
            return float(index)
        if self.reject_unknown:
            raise FeatureValueError(
                "unknown_category",
                "UnknownCategory",
                f"feature {quote(self.name)}: {quote(value)} is not one of its categories",
            )
        return float(len(self.categories))

    def column(self, values: list[Any]) -> npt.NDArray[np.float64]:
        """The column of values that msgspec already type-checked for this feature (see
        records.py: numbers are finite floats, booleans bools, categories str or int, and
        ``None`` only where missing values are allowed). An unlisted category of a feature
        that rejects them is :data:`REFUSED` (the slow path then names the record)."""
        n = len(values)
        if self.type != "category":
            return np.array(values, dtype=np.float64).reshape(n)  # None -> NaN
        if self.categories is None:
            return np.fromiter(map(self._memo.__getitem__, values), np.float64, count=n)
        default = REFUSED if self.reject_unknown else float(len(self.categories))
        return np.fromiter(map(self._codes.get, values, repeat(default)), np.float64, count=n)

    def token(self, code: float) -> Any:
        """What River sees for a column value that is not missing: the number (1.0 / 0.0
        for a boolean); the category itself (or :data:`OTHER`); an open category's code."""
        if self.type != "category":
            return code
        index = int(code)
        if self.categories is None:
            return index
        return self.categories[index] if index < len(self.categories) else OTHER

    def describe(self) -> dict[str, Any]:
        """JSON-able description for version metadata."""
        out: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "missing": "allow" if self.allow_missing else "reject",
        }
        if self.type == "category":
            out["categories"] = None if self.categories is None else list(self.categories)
            if self.categories is not None:
                out["unknown_category"] = "reject" if self.reject_unknown else "other"
            else:
                out["coding"] = "blake2b-53 of 's:'+text or 'i:'+integer"
        return out


def _feature(config: FeatureConfig) -> Feature:
    return Feature(
        name=config.name,
        type=config.type,
        allow_missing=config.missing == "allow",
        categories=None if config.categories is None else tuple(config.categories),
        reject_unknown=config.unknown_category == "reject",
    )


@dataclass(frozen=True, slots=True)
class FeatureContract:
    """The features of the record contract, in column order (plain, picklable values)."""

    features: tuple[Feature, ...]

    @classmethod
    def from_settings(cls, record: RecordSettings) -> FeatureContract:
        """The contract ``record.features`` declares."""
        return cls(tuple(_feature(config) for config in record.feature_configs))

    @classmethod
    def numeric(cls, names: Sequence[str]) -> FeatureContract:
        """All required numbers (the contract of a plain list of names)."""
        return cls(tuple(Feature(name) for name in names))

    @property
    def names(self) -> tuple[str, ...]:
        """The feature names, in column order."""
        return tuple(f.name for f in self.features)

    @property
    def plain(self) -> bool:
        """True when every feature is a required number (the all-numeric fast paths)."""
        return all(f.type == "number" and not f.allow_missing for f in self.features)

    @property
    def categorical(self) -> tuple[int, ...]:
        """Column indexes of the category features."""
        return tuple(i for i, f in enumerate(self.features) if f.type == "category")

    def encode_value(self, index: int, present: bool, value: Any) -> float:
        """Column ``index``'s value for a raw value (``present`` False: the key is absent).

        Raises FeatureValueError (``missing_feature`` for an absent or null value of a
        feature that does not allow it)."""
        feature = self.features[index]
        if not present or value is None:
            if feature.allow_missing:
                return MISSING
            if not present:
                raise FeatureValueError(
                    "missing_feature",
                    "MissingFeature",
                    f"feature {quote(feature.name)} is missing",
                )
            expected = {"number": "a number", "boolean": "a boolean"}.get(
                feature.type, "a category"
            )
            raise FeatureValueError(
                "wrong_type",
                "WrongFeatureType",
                f"feature {quote(feature.name)} is null, expected {expected}",
            )
        return feature.encode(value)

    def encode_record(self, features: Mapping[str, Any]) -> list[float]:
        """The row of a raw ``{feature: value}`` mapping (extra keys are ignored).

        Raises FeatureValueError naming the first feature at fault."""
        return [
            self.encode_value(i, f.name in features, features.get(f.name))
            for i, f in enumerate(self.features)
        ]

    def river_dict(self, names: Sequence[str], row: Sequence[float]) -> dict[str, Any]:
        """River's view of one row: missing values left out, tokens for the rest
        (``names``: the model's own key objects, equal to :attr:`names`)."""
        isnan = math.isnan
        out: dict[str, Any] = {}
        for name, feature, code in zip(names, self.features, row, strict=True):
            if not isnan(code):  # NaN: missing
                out[name] = feature.token(code)
        return out

    def describe(self) -> list[dict[str, Any]]:
        """JSON-able description of every feature, for version metadata."""
        return [f.describe() for f in self.features]
