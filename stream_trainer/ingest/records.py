"""Per-batch decoding and strict validation of JSON records (the record contract).

A batch of Kafka messages becomes a :class:`DecodedBatch`: a float64 feature matrix of the
valid records plus one :class:`InvalidRecord` per rejected message. Every input message ends
up exactly once, either in ``valid_index`` or in ``invalid``; NaN and infinities never reach
``X`` (River silently turns every weight into NaN otherwise).

Two paths, one contract:

* the fast path decodes each value with a msgspec decoder typed for this record layout (a
  struct whose fields are the configured features, label and weight). msgspec rejects NaN /
  Infinity literals as malformed JSON and ``1e999`` as out of range, rejects bools and strings
  where a number is expected, and reports missing / unknown fields, all in C;
* any message the fast path does not accept is re-examined by the slow path, which is the
  authority on *why* it is invalid (one low-cardinality reason from :data:`REASONS`). The slow
  path also parses what msgspec refused with the lenient stdlib parser, only to name the
  reason precisely (``feature 'f3' is NaN`` rather than "malformed JSON"); a record that only
  the lenient parser accepts is never valid.

Strict JSON is UTF-8 (RFC 8259): a value with invalid UTF-8 anywhere, even inside a string the
contract ignores (which msgspec skips without checking), is malformed. Nesting deeper than the
decoders' recursion limit is malformed too. Should the batch path still raise on some value,
the batch is decoded again value by value and only the values that raise are rejected
(``decoder_error``, with the exception's class): no value can stop the decoding of others.
"""

from __future__ import annotations

import itertools
import json
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import msgspec
import numpy as np
import numpy.typing as npt

from stream_trainer.config import Label, RecordSettings
from stream_trainer.ingest.features import (
    REFUSED,
    FeatureContract,
    FeatureValueError,
    json_type,
    quote,
)
from stream_trainer.ingest.wire import REASONS as WIRE_REASONS
from stream_trainer.ingest.wire import WireDecoder, WireFormatError

REASONS: Final[tuple[str, ...]] = (
    "too_large",
    "empty",
    "malformed_json",
    "not_object",
    "missing_label",
    "unknown_label",
    "missing_feature",
    "unknown_feature",
    "unknown_category",
    "wrong_type",
    "non_finite",
    "bad_weight",
    "decoder_error",
    "learner_error",
    "no_model_key",
    *WIRE_REASONS,
)

MAX_MESSAGE_CHARS: Final = 500


class MessageLike(Protocol):
    """The part of ``confluent_kafka.Message`` the decoder reads (``key()`` is optional)."""

    def value(self) -> bytes | None: ...
    def topic(self) -> str: ...
    def partition(self) -> int: ...
    def offset(self) -> int: ...
    def timestamp(self) -> tuple[int, int]: ...


@dataclass(frozen=True, slots=True)
class InvalidRecord:
    """A rejected message with its provenance and one reason from :data:`REASONS`."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
    value: bytes | None
    key: bytes | None
    stage: str  # "decode" | "validate" | "learn"
    reason: str
    error_class: str
    message: str  # human text, no record values beyond short quoted names; <= 500 chars


def invalid_from_message(
    message: MessageLike, stage: str, reason: str, error_class: str, text: str
) -> InvalidRecord:
    """An :class:`InvalidRecord` for ``message`` (used here and for learner errors)."""
    kind, ts = message.timestamp()
    key_method = getattr(message, "key", None)
    key = key_method() if key_method is not None else None
    return InvalidRecord(
        topic=message.topic(),
        partition=message.partition(),
        offset=message.offset(),
        timestamp_ms=ts if kind != 0 else None,  # 0 = TIMESTAMP_NOT_AVAILABLE
        value=message.value(),
        key=key,
        stage=stage,
        reason=reason,
        error_class=error_class,
        message=text[:MAX_MESSAGE_CHARS],
    )


@dataclass(slots=True)
class DecodedValues:
    """:meth:`RecordDecoder.decode_values`' output: the valid rows and the rejected indexes."""

    X: npt.NDArray[np.float64]
    y: npt.NDArray[Any]
    weights: npt.NDArray[np.float64] | None
    valid_index: npt.NDArray[np.int64]  # ascending indexes into the input values
    rejects: list[tuple[int, Rejection]]  # ascending by index


@dataclass(slots=True)
class DecodedBatch:
    """The valid records of a batch as arrays, aligned row by row, plus the rejects."""

    X: npt.NDArray[np.float64]  # (n_valid, n_features), columns in RecordSettings.features order
    y: npt.NDArray[Any]  # object (str/bool/mixed labels), int64 (int labels), float64 (regression)
    weights: npt.NDArray[np.float64] | None  # None when no weight_field is configured
    valid_index: npt.NDArray[np.int64]  # ascending indexes into the input message list
    invalid: list[InvalidRecord]
    topics: list[str]  # of the valid records, aligned with X
    partitions: npt.NDArray[np.int64]
    offsets: npt.NDArray[np.int64]
    feature_names: tuple[str, ...] = ()
    # Every input message's coordinates (valid or not), read once per batch so callers
    # never call the message accessors again per record.
    message_topics: list[str] = field(default_factory=list)
    message_partitions: npt.NDArray[np.int64] = field(
        default_factory=lambda: np.empty(0, dtype=np.int64)
    )
    message_offsets: npt.NDArray[np.int64] = field(
        default_factory=lambda: np.empty(0, dtype=np.int64)
    )
    contract: FeatureContract | None = None  # None: all required numbers

    def __len__(self) -> int:
        return int(self.X.shape[0])

    def x_dicts(self, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """River-style ``{feature: value}`` dicts of the valid records, keyed by ``names``
        (``feature_names`` by default; pass the model's ``feature_names``, equal and in the
        same order, so its lookups get the very key objects it stores). A typed contract
        leaves missing values out and gives River its tokens (see FeatureContract)."""
        keys = self.feature_names if names is None else names
        if self.contract is not None and not self.contract.plain:
            river_dict = self.contract.river_dict
            return [river_dict(keys, row) for row in self.X.tolist()]
        # map() over zip: the dicts are ~5 % of a per-record unit, and this is the cheapest
        # way to build them (rows have exactly len(feature_names) columns).
        return list(map(dict, map(zip, itertools.repeat(keys), self.X.tolist())))


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why one value is invalid (stage, one of :data:`REASONS`, class, human text)."""

    stage: str
    reason: str
    error_class: str
    message: str


@dataclass(frozen=True, slots=True)
class _Accept:
    row: list[float]
    y: Any
    weight: float


class _NonFinite:
    """Stands in for a NaN / Infinity literal the lenient parser saw."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


_UNPARSEABLE: Final = object()
_FEATURES: Final = operator.attrgetter("features")
_LABEL: Final = operator.attrgetter("label")


def _utf8_error(value: bytes) -> UnicodeDecodeError | None:
    """Why ``value`` is not UTF-8, or None (the ASCII test first: it is far cheaper)."""
    if value.isascii():
        return None
    try:
        value.decode("utf-8")
    except UnicodeDecodeError as error:
        return error
    return None


def _valid_utf8(value: bytes) -> bool:
    return _utf8_error(value) is None


def _lenient_parse(value: bytes) -> Any:
    """The stdlib's reading of a value msgspec refused, or ``_UNPARSEABLE``."""
    try:
        return json.loads(value.decode("utf-8"), parse_constant=_NonFinite)
    except (ValueError, RecursionError):  # includes UnicodeDecodeError, JSONDecodeError
        return _UNPARSEABLE


def _json_type(value: Any) -> str:
    return "a number" if isinstance(value, _NonFinite) else json_type(value)


_quote = quote


def _as_finite_number(value: Any) -> float | tuple[bool, str]:
    """``float(value)`` for a finite JSON number, else (is-a-number, what is wrong)."""
    if isinstance(value, _NonFinite):
        return True, f"is {value.name}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False, f"is {_json_type(value)}, expected a number"
    try:
        number = float(value)
    except OverflowError:
        return True, "is out of the float64 range"
    if not math.isfinite(number):
        return True, f"is {number} (out of the float64 range)"
    return number


def _struct_field(
    name: str, kind: str, allow_missing: bool
) -> tuple[str, Any] | tuple[str, Any, Any]:
    """A msgspec struct field for one feature: exactly the JSON types the contract accepts
    (bool is neither float nor int to msgspec); optional with default None when missing
    values are allowed (absent and null both decode to None)."""
    kind_type: Any = {"number": float, "boolean": bool}.get(kind, str | int)
    if allow_missing:
        return (name, kind_type | None, None)
    return (name, kind_type)


def _y_dtype(task: str, labels: list[Label] | None) -> type:
    if task == "regression":
        return np.float64
    if labels and all(type(label) is int for label in labels):
        return np.int64
    return object


class RecordDecoder:
    """Decodes and validates batches of JSON records against a :class:`RecordSettings`.

    Raises ValueError at construction when the record layout is contradictory (e.g. a flat
    feature named like the label field, or a classification task without labels).
    """

    def __init__(
        self,
        record: RecordSettings,
        task: str,
        wire: WireDecoder | None = None,
        known_fields: Sequence[str] = (),
    ) -> None:
        """``known_fields``: more top-level fields the service reads itself (the model key
        field, ``model.key.field``): never an unknown feature, their values not checked."""
        if (record.format == "json") != (wire is None):
            raise ValueError(
                f"record.format {record.format!r}: a wire decoder is needed exactly when not json"
            )
        self._wire = wire
        self._record = record
        self._task = task
        self._classification = task != "regression"
        self._contract = FeatureContract.from_settings(record)
        self._plain = self._contract.plain
        self._features = self._contract.names
        self._feature_set = frozenset(self._features)
        self._max_bytes = record.max_bytes
        # A schema (Avro, JSON Schema) governs its own fields: fields the contract does not
        # use are expected there, and schema evolution adds them.
        self._reject_unknown = record.unknown_features == "reject" and record.format == "json"
        if self._classification and not record.labels:
            raise ValueError(f"task {task!r} needs record.labels")
        labels = list(record.labels or [])
        # (type, value) pairs: True == 1 in Python, but a label 1 must not match true.
        self._allowed = frozenset((type(label), label) for label in labels)
        self._y_dtype = _y_dtype(task, record.labels)
        meta = [record.label_field, record.id_field, record.event_time_field, record.weight_field]
        self._reserved = frozenset(name for name in meta if name is not None)
        if record.features_field is None:
            clash = self._reserved & self._feature_set
            if clash:
                raise ValueError(f"flat features {sorted(clash)} clash with record metadata fields")
        elif record.features_field in self._reserved:
            raise ValueError(
                f"features_field {record.features_field!r} clashes with a metadata field"
            )
        # A known field may also be a feature (a numeric id learnt from and keyed by).
        self._known = tuple(
            name for name in known_fields if name not in self._reserved | self._feature_set
        )
        self._reserved |= frozenset(self._known)
        self._typed: msgspec.json.Decoder[Any] = msgspec.json.Decoder(self._record_type(labels))
        self._generic = msgspec.json.Decoder()

    def _record_type(self, labels: list[Label]) -> type:
        """A msgspec struct type that accepts exactly the valid records (fields renamed)."""
        record = self._record
        feature_fields: list[tuple[str, Any] | tuple[str, Any, Any]] = [
            _struct_field(f"f{i}", feature.type, feature.allow_missing)
            for i, feature in enumerate(self._contract.features)
        ]
        feature_names = {f"f{i}": name for i, name in enumerate(self._features)}
        label_type: Any
        if self._classification:
            label_types = {type(label) for label in labels}
            label_type = label_types.pop()
            for extra in label_types:
                label_type = label_type | extra
        else:
            label_type = float
        meta_fields: list[tuple[str, Any] | tuple[str, Any, Any]] = [("label", label_type)]
        meta_names = {"label": record.label_field}
        if record.weight_field is not None:
            meta_fields.append(("weight", float, 1.0))
            meta_names["weight"] = record.weight_field
        if record.features_field is not None:
            features_type = msgspec.defstruct(
                "Features",
                feature_fields,
                rename=feature_names,
                forbid_unknown_fields=self._reject_unknown,
                kw_only=True,  # optional features may precede required ones
                gc=False,
            )
            return msgspec.defstruct(
                "Record",
                [("features", features_type), *meta_fields],
                rename={"features": record.features_field, **meta_names},
                gc=False,
            )
        # Flat layout: id / event time are known top-level fields, everything else unknown.
        for name, attr in ((record.id_field, "rid"), (record.event_time_field, "event_time")):
            if name is not None:
                meta_fields.append((attr, Any, None))
                meta_names[attr] = name
        for n, name in enumerate(self._known):
            # Raw: the service reads the value itself; parsing it here would refuse what it
            # accepts in the nested layout (an integer beyond a float's range, say).
            meta_fields.append((f"known{n}", msgspec.Raw, msgspec.Raw()))
            meta_names[f"known{n}"] = name
        return msgspec.defstruct(
            "FlatRecord",
            [*feature_fields, *meta_fields],
            rename={**feature_names, **meta_names},
            forbid_unknown_fields=self._reject_unknown,
            kw_only=True,  # optional features may precede required ones
            gc=False,
        )

    def decode(self, messages: Sequence[MessageLike]) -> DecodedBatch:
        """Decode and validate ``messages``; never raises on bad data."""
        return self.assemble(messages, self.decode_values([m.value() for m in messages]))

    def decode_values(self, values: Sequence[bytes | None]) -> DecodedValues:
        """The Kafka-free half of :meth:`decode`: message values in, arrays and verdicts out.

        Pure and picklable both ways, so it can run in a decode worker process. Never raises
        because of a value (see the module doc), so no record can stop the worker."""
        if self._wire is not None:
            return self._decode_each(values)  # Avro / JSON Schema: one value at a time
        try:
            return self._decode_batch(values)
        except Exception:  # whatever a value provokes, only that value fails (issue 19)
            return self._decode_each(values)

    def _decode_each(self, values: Sequence[bytes | None]) -> DecodedValues:
        """The slow path's verdict on every value, one at a time; a value whose decoding
        raises is rejected as ``decoder_error`` naming the exception's class."""
        rejects: list[tuple[int, Rejection]] = []
        rescued: list[tuple[int, _Accept]] = []
        for i, value in enumerate(values):
            try:
                verdict = self._inspect(value)
            except Exception as error:  # the value is the fault: dead-letter it
                verdict = Rejection(
                    "decode",
                    "decoder_error",
                    type(error).__name__,
                    f"unexpected error decoding the record: {error}",
                )
            if isinstance(verdict, _Accept):
                rescued.append((i, verdict))
            else:
                rejects.append((i, verdict))
        X = np.empty((0, len(self._features)), dtype=np.float64)
        y = self._label_array([])
        weights = None if self._record.weight_field is None else np.empty(0, dtype=np.float64)
        valid_index = np.empty(0, dtype=np.int64)
        if rescued:
            X, y, weights, valid_index = self._merge(X, y, weights, valid_index, rescued)
        return DecodedValues(X, y, weights, valid_index, rejects)

    def _decode_batch(self, values: Sequence[bytes | None]) -> DecodedValues:
        """The fast path over the whole batch, then the slow path for what it refused."""
        decode = self._typed.decode
        max_bytes = self._max_bytes
        isascii = bytes.isascii
        fast_index: list[int] = []
        fast: list[Any] = []
        slow_index: list[int] = []
        for i, value in enumerate(values):
            # msgspec skips strings of unknown fields without checking their UTF-8.
            if not value or len(value) > max_bytes or not (isascii(value) or _valid_utf8(value)):
                slow_index.append(i)
                continue
            try:
                fast.append(decode(value))
            except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
                slow_index.append(i)
            else:
                fast_index.append(i)

        X, y, weights, ok = self._columns(fast)
        if not ok.all():
            bad = np.flatnonzero(~ok)
            slow_index.extend(fast_index[j] for j in bad.tolist())
            keep = np.flatnonzero(ok)
            X, y = X[keep], y[keep]
            weights = weights[keep] if weights is not None else None
            fast_index = [fast_index[j] for j in keep.tolist()]

        rejects: list[tuple[int, Rejection]] = []
        rescued: list[tuple[int, _Accept]] = []
        for i in sorted(slow_index):
            verdict = self._inspect(values[i])
            if isinstance(verdict, _Accept):
                rescued.append((i, verdict))
            else:
                rejects.append((i, verdict))
        valid_index = np.asarray(fast_index, dtype=np.int64)
        if rescued:
            X, y, weights, valid_index = self._merge(X, y, weights, valid_index, rescued)
        return DecodedValues(X, y, weights, valid_index, rejects)

    def assemble(self, messages: Sequence[MessageLike], decoded: DecodedValues) -> DecodedBatch:
        """The :class:`DecodedBatch` of ``messages`` from their :meth:`decode_values`."""
        invalid = [
            invalid_from_message(messages[i], r.stage, r.reason, r.error_class, r.message)
            for i, r in decoded.rejects
        ]
        n = len(messages)
        message_topics = [message.topic() for message in messages]
        message_partitions = np.fromiter(
            (message.partition() for message in messages), dtype=np.int64, count=n
        )
        message_offsets = np.fromiter(
            (message.offset() for message in messages), dtype=np.int64, count=n
        )
        valid_index = decoded.valid_index
        if len(valid_index) == n:  # the usual case: every message is valid
            topics = message_topics
        else:
            topics = [message_topics[i] for i in valid_index.tolist()]
        return DecodedBatch(
            X=decoded.X,
            y=decoded.y,
            weights=decoded.weights,
            valid_index=valid_index,
            invalid=invalid,
            topics=topics,
            partitions=message_partitions[valid_index],
            offsets=message_offsets[valid_index],
            feature_names=self._features,
            contract=self._contract,
            message_topics=message_topics,
            message_partitions=message_partitions,
            message_offsets=message_offsets,
        )

    def _columns(
        self, fast: list[Any]
    ) -> tuple[
        npt.NDArray[np.float64],
        npt.NDArray[Any],
        npt.NDArray[np.float64] | None,
        npt.NDArray[np.bool_],
    ]:
        """Arrays from the typed records, and which rows pass the value checks."""
        n, width = len(fast), len(self._features)
        # map / chain keep the per-value loop in C: ~3x a generator expression here.
        astuple = msgspec.structs.astuple
        if self._record.features_field is not None:
            rows = map(astuple, map(_FEATURES, fast))
        else:
            rows = map(operator.itemgetter(slice(0, width)), map(astuple, fast))
        flat = itertools.chain.from_iterable(rows)
        if self._plain:
            X = np.fromiter(flat, dtype=np.float64, count=n * width).reshape(n, width)
            # msgspec never yields a non-finite float; checked anyway: X must stay finite.
            ok = np.isfinite(X).all(axis=1)
        else:
            X, ok = self._typed_rows(list(flat), n)
        labels = list(map(_LABEL, fast))
        y = self._label_array(labels)
        if self._classification:
            allowed = self._allowed
            ok &= np.fromiter(
                ((type(label), label) in allowed for label in labels), dtype=np.bool_, count=n
            )
        else:
            ok &= np.isfinite(y)
        weights: npt.NDArray[np.float64] | None = None
        if self._record.weight_field is not None:
            weights = np.fromiter((r.weight for r in fast), dtype=np.float64, count=n)
            ok &= np.isfinite(weights) & (weights > 0)
        return X, y, weights, ok

    def _typed_rows(
        self, values: list[Any], n: int
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
        """Rows of a typed contract from msgspec's field values (row-major), built column
        by column (:meth:`Feature.column`). A row with a value the contract refuses (an
        unlisted category of a feature that rejects them) is marked for the slow path,
        which names the reason."""
        width = len(self._features)
        X = np.empty((n, width), dtype=np.float64)
        refused = np.zeros(n, dtype=np.bool_)
        for j, feature in enumerate(self._contract.features):
            X[:, j] = feature.column(values[j::width])
            if feature.reject_unknown and feature.categories is not None:
                refused |= X[:, j] == REFUSED
        X[refused] = 0.0
        return X, ~refused

    def _label_array(self, labels: list[Any]) -> npt.NDArray[Any]:
        if self._y_dtype is object:
            y = np.empty(len(labels), dtype=object)
            y[:] = labels
            return y
        return np.asarray(labels, dtype=self._y_dtype).reshape(len(labels))

    def _merge(
        self,
        X: npt.NDArray[np.float64],
        y: npt.NDArray[Any],
        weights: npt.NDArray[np.float64] | None,
        valid_index: npt.NDArray[np.int64],
        rescued: list[tuple[int, _Accept]],
    ) -> tuple[
        npt.NDArray[np.float64],
        npt.NDArray[Any],
        npt.NDArray[np.float64] | None,
        npt.NDArray[np.int64],
    ]:
        """Adds the records the slow path accepted, keeping ascending message order."""
        extra_x = np.asarray([a.row for _, a in rescued], dtype=np.float64)
        extra_y = self._label_array([a.y for _, a in rescued])
        index = np.concatenate([valid_index, np.asarray([i for i, _ in rescued], np.int64)])
        order = np.argsort(index, kind="stable")
        X = np.concatenate([X.reshape(-1, len(self._features)), extra_x])[order]
        y = np.concatenate([y, extra_y])[order]
        if weights is not None:
            extra_w = np.asarray([a.weight for _, a in rescued], dtype=np.float64)
            weights = np.concatenate([weights, extra_w])[order]
        return X, y, weights, index[order]

    def _inspect(self, value: bytes | None) -> Rejection | _Accept:
        """The authoritative verdict on one value."""
        if not value:
            return Rejection("decode", "empty", "EmptyValue", "record value is empty or null")
        if len(value) > self._max_bytes:
            return Rejection(
                "decode",
                "too_large",
                "RecordTooLarge",
                f"record value is {len(value)} bytes, over the limit of {self._max_bytes}",
            )
        if self._wire is not None:
            return self._inspect_wire(self._wire, value)
        utf8_error = _utf8_error(value)
        if utf8_error is not None:
            return Rejection(
                "decode",
                "malformed_json",
                "InvalidUTF8",
                f"invalid UTF-8 at byte {utf8_error.start} (strict JSON is UTF-8)",
            )
        strict_error: str | None = None
        try:
            obj = self._generic.decode(value)
        except RecursionError:
            return Rejection(
                "decode", "malformed_json", "NestingTooDeep", "JSON is nested too deeply"
            )
        except msgspec.DecodeError as error:
            strict_error = str(error)
            obj = _lenient_parse(value)
            if obj is _UNPARSEABLE:
                return Rejection(
                    "decode", "malformed_json", "MalformedJSON", f"invalid JSON: {error}"
                )
        verdict = self._check(obj)
        if isinstance(verdict, _Accept) and strict_error is not None:
            # Only strict JSON is valid; the lenient parse only serves to name the reason.
            return Rejection(
                "decode", "malformed_json", "MalformedJSON", f"not strict JSON: {strict_error}"
            )
        return verdict

    def _inspect_wire(self, wire: WireDecoder, value: bytes) -> Rejection | _Accept:
        """A wire-format value (the registry already asked for its schema: ``ensure``):
        decoded by its schema, then checked against the contract like a JSON object; a
        rejection names the schema id."""
        try:
            obj, schema_id = wire.decode(value)
        except WireFormatError as error:
            return Rejection("decode", error.reason, type(error).__name__, error.message)
        verdict = self._check(obj)
        if isinstance(verdict, Rejection):
            message = f"{verdict.message} (schema id {schema_id})"
            return Rejection(verdict.stage, verdict.reason, verdict.error_class, message)
        return verdict

    def _check(self, obj: Any) -> Rejection | _Accept:
        record = self._record
        if not isinstance(obj, dict):
            return Rejection(
                "validate",
                "not_object",
                "NotAnObject",
                f"top-level JSON value is {_json_type(obj)}, expected an object",
            )
        if record.features_field is not None:
            if record.features_field not in obj:
                return Rejection(
                    "validate",
                    "missing_feature",
                    "MissingFeatures",
                    f"features object {_quote(record.features_field)} is missing",
                )
            features = obj[record.features_field]
            if not isinstance(features, dict):
                return Rejection(
                    "validate",
                    "wrong_type",
                    "WrongFeaturesType",
                    f"{_quote(record.features_field)} is {_json_type(features)}, "
                    "expected an object",
                )
            unknown = features.keys() - self._feature_set
        else:
            features = obj
            unknown = features.keys() - self._feature_set - self._reserved
        contract = self._contract
        missing = [
            f.name for f in contract.features if not f.allow_missing and f.name not in features
        ]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            return Rejection(
                "validate",
                "missing_feature",
                "MissingFeature",
                f"feature {_quote(missing[0])} is missing{more}",
            )
        if unknown and self._reject_unknown:
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            return Rejection(
                "validate",
                "unknown_feature",
                "UnknownFeature",
                f"unknown feature {_quote(min(unknown))}{more}",
            )
        row: list[float] = []
        if self._plain:
            for name in self._features:
                number = _as_finite_number(features[name])
                if isinstance(number, tuple):
                    is_number, problem = number
                    reason, cls = (
                        ("non_finite", "NonFiniteFeature")
                        if is_number
                        else ("wrong_type", "WrongFeatureType")
                    )
                    return Rejection("validate", reason, cls, f"feature {_quote(name)} {problem}")
                row.append(number)
        else:
            for index, name in enumerate(self._features):
                value = features.get(name)
                if isinstance(value, _NonFinite):
                    return Rejection(
                        "validate",
                        "non_finite",
                        "NonFiniteFeature",
                        f"feature {_quote(name)} is {value.name}",
                    )
                try:
                    row.append(contract.encode_value(index, name in features, value))
                except FeatureValueError as error:
                    return Rejection("validate", error.reason, error.error_class, str(error))
        label = obj.get(record.label_field)
        if label is None:
            return Rejection(
                "validate",
                "missing_label",
                "MissingLabel",
                f"label field {_quote(record.label_field)} is missing or null",
            )
        y: Any
        if self._classification:
            if isinstance(label, _NonFinite) or not isinstance(label, str | int):
                return Rejection(
                    "validate",
                    "unknown_label",
                    "UnknownLabel",
                    f"label is {_json_type(label)}, not one of the configured labels",
                )
            if (type(label), label) not in self._allowed:
                return Rejection(
                    "validate",
                    "unknown_label",
                    "UnknownLabel",
                    f"label {_quote(label)} is not one of the configured labels",
                )
            y = label
        else:
            number = _as_finite_number(label)
            if isinstance(number, tuple):
                is_number, problem = number
                return Rejection(
                    "validate",
                    "non_finite" if is_number else "wrong_type",
                    "NonFiniteLabel" if is_number else "WrongLabelType",
                    f"label {problem}",
                )
            y = number
        weight = 1.0
        if record.weight_field is not None and record.weight_field in obj:
            number = _as_finite_number(obj[record.weight_field])
            if isinstance(number, tuple) or number <= 0:
                problem = number[1] if isinstance(number, tuple) else f"is {number}, expected > 0"
                return Rejection(
                    "validate",
                    "bad_weight",
                    "BadWeight",
                    f"weight {_quote(record.weight_field)} {problem}",
                )
            weight = number
        return _Accept(row, y, weight)
