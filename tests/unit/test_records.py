"""RecordDecoder: the record contract on a poison mix interleaved with valid records."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from stream_trainer.config import RecordSettings
from stream_trainer.ingest.records import REASONS, DecodedBatch, RecordDecoder

FEATURES = ["b", "a", "c"]  # deliberately not sorted: columns must follow this order


@dataclass
class FakeMessage:
    _value: bytes | None
    _offset: int
    _topic: str = "in"
    _partition: int = 0
    _key: bytes | None = b"k"

    def value(self) -> bytes | None:
        return self._value

    def key(self) -> bytes | None:
        return self._key

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_700_000_000_000 + self._offset)

    def headers(self) -> None:
        return None

    def error(self) -> None:
        return None


def messages(values: Sequence[bytes | None]) -> list[FakeMessage]:
    return [FakeMessage(value, 100 + i) for i, value in enumerate(values)]


def ok(b: float, a: float, c: float, y: Any = 1) -> bytes:
    return json.dumps({"x": {"a": a, "b": b, "c": c}, "y": y, "id": "r"}).encode()


def check_partition(batch: DecodedBatch, n: int) -> None:
    """Every message exactly once: valid or invalid."""
    seen = sorted(batch.valid_index.tolist() + [r.offset - 100 for r in batch.invalid])
    assert seen == list(range(n))
    assert np.isfinite(batch.X).all()
    assert all(r.reason in REASONS for r in batch.invalid)


# (raw value, expected reason) -- each poison record has exactly one fault.
POISON: list[tuple[bytes | None, str]] = [
    (b'{"x": {"a": 1, "b": 2, "c": 3', "malformed_json"),
    (b'{"x": {"a": NaN, "b": 2, "c": 3}, "y": 1}', "non_finite"),
    (b'{"x": {"a": 1, "b": Infinity, "c": 3}, "y": 1}', "non_finite"),
    (b'{"x": {"a": 1, "b": 2, "c": -Infinity}, "y": 1}', "non_finite"),
    (b'{"x": {"a": 1e999, "b": 2, "c": 3}, "y": 1}', "non_finite"),
    (b'{"x": {"a": -1e999, "b": 2, "c": 3}, "y": 1}', "non_finite"),
    (b'{"x": {"a": ' + b"9" * 310 + b', "b": 2, "c": 3}, "y": 1}', "non_finite"),
    (b'{"x": {"a": "1.5", "b": 2, "c": 3}, "y": 1}', "wrong_type"),
    (b'{"x": {"a": true, "b": 2, "c": 3}, "y": 1}', "wrong_type"),
    (b'{"x": {"a": null, "b": 2, "c": 3}, "y": 1}', "wrong_type"),
    (b'{"x": {"a": {"v": 1}, "b": 2, "c": 3}, "y": 1}', "wrong_type"),
    (b'{"x": {"a": [1], "b": 2, "c": 3}, "y": 1}', "wrong_type"),
    (b'{"x": [1, 2, 3], "y": 1}', "wrong_type"),
    (b'{"x": {"a": 1, "b": 2, "c": 3}}', "missing_label"),
    (b'{"x": {"a": 1, "b": 2, "c": 3}, "y": null}', "missing_label"),
    (b'{"x": {"a": 1, "b": 2, "c": 3}, "y": 7}', "unknown_label"),
    (b'{"x": {"a": 1, "b": 2, "c": 3}, "y": true}', "unknown_label"),  # labels are [0, 1]
    (b'{"x": {"a": 1, "b": 2, "c": 3}, "y": 1.0}', "unknown_label"),
    (b'{"x": {"a": 1, "b": 2, "c": 3}, "y": "1"}', "unknown_label"),
    (b'{"x": {"a": 1, "b": 2, "C": 3}, "y": 1}', "missing_feature"),
    (b'{"x": {"a": 1, "b": 2, "c": 3, "d": 4}, "y": 1}', "unknown_feature"),
    (b'{"y": 1}', "missing_feature"),
    (b'{"x": {"a": 1, "b": 2, "c": 3}, "y": 1, "pad": "' + b"z" * 400 + b'"}', "too_large"),
    (b"", "empty"),
    (None, "empty"),
    (b"   ", "malformed_json"),
    (b"\xff\xfe{}", "malformed_json"),
    # Strict JSON is strict UTF-8, even in strings the contract ignores (issue 19).
    (b'{"x": {"a": 1, "b": 2, "c": 3}, "y": 1, "id": "\xff"}', "malformed_json"),
    (b'{"x": {"a": 1, "b": 2, "c": 3}, "y": 1, "note": "\xc0\xaf"}', "malformed_json"),
    (b'{"x": {"a": 1, "b": 2, "c": 3}, "y": 1, "note": "\xed\xa0\x80"}', "malformed_json"),
    (b'{"x": {"a": 1, "b": 2, "c": 3}, "y": 1, "note": "\xe2\x82"}', "malformed_json"),
    (b'{"x": {"a": 1, "b": 2, "c": 3}, "y": 1} {}', "malformed_json"),
    (b'{"x": {"a": 1, "b": 2, "c": 3}, "y": 1, "meta": NaN}', "malformed_json"),
    (b"[1, 2, 3]", "not_object"),
    (b'"hello"', "not_object"),
    (b"42", "not_object"),
    (b"null", "not_object"),
]


@pytest.fixture
def decoder() -> RecordDecoder:
    settings = RecordSettings(features=FEATURES, labels=[0, 1], max_bytes=400)
    return RecordDecoder(settings, "binary_classification")


def test_poison_mix_interleaved_with_valid_records(decoder: RecordDecoder) -> None:
    values: list[bytes | None] = []
    expected_valid: list[int] = []
    expected_reasons: list[str] = []
    for k, (poison, reason) in enumerate(POISON):
        expected_valid.append(len(values))
        values.append(ok(b=k, a=-k, c=0.5, y=k % 2))
        values.append(poison)
        expected_reasons.append(reason)
    expected_valid.append(len(values))
    values.append(ok(b=1e308, a=-0.0, c=5, y=0))  # finite extremes and ints are valid

    batch = decoder.decode(messages(values))

    check_partition(batch, len(values))
    assert batch.valid_index.tolist() == expected_valid
    got = [(r.offset - 100, r.reason) for r in batch.invalid]
    assert got == [(2 * k + 1, reason) for k, reason in enumerate(expected_reasons)]
    n = len(POISON)
    assert batch.X.shape == (n + 1, 3)
    assert batch.X.dtype == np.float64
    # columns in configured order: b, a, c
    assert batch.X[:n].tolist() == [[k, -k, 0.5] for k in range(n)]
    assert batch.X[n].tolist() == [1e308, -0.0, 5.0]
    assert batch.y.dtype == np.int64
    assert batch.y.tolist() == [k % 2 for k in range(n)] + [0]
    assert batch.weights is None
    assert batch.offsets.tolist() == [100 + i for i in expected_valid]
    assert batch.partitions.tolist() == [0] * (n + 1)
    assert batch.topics == ["in"] * (n + 1)


def test_invalid_record_carries_provenance(decoder: RecordDecoder) -> None:
    raw = b'{"x": {"a": NaN, "b": 2, "c": 3}, "y": 1}'
    batch = decoder.decode([FakeMessage(raw, 42, "events", 3, b"key-1")])
    (record,) = batch.invalid
    assert (record.topic, record.partition, record.offset) == ("events", 3, 42)
    assert record.timestamp_ms == 1_700_000_000_042
    assert (record.value, record.key) == (raw, b"key-1")
    assert (record.stage, record.reason, record.error_class) == (
        "validate",
        "non_finite",
        "NonFiniteFeature",
    )
    assert record.message == "feature 'a' is NaN"


def test_messages_are_short_even_for_huge_names(decoder: RecordDecoder) -> None:
    name = "n" * 5000
    raw = json.dumps({"x": {"a": 1, "b": 2, "c": 3, name: 1}, "y": 1}).encode()
    wide = RecordDecoder(
        RecordSettings(features=FEATURES, labels=[0, 1], max_bytes=10_000),
        "binary_classification",
    )
    (record,) = wide.decode(messages([raw])).invalid
    assert record.reason == "unknown_feature"
    assert len(record.message) < 100


def test_bool_labels_do_not_match_ints() -> None:
    settings = RecordSettings(features=["a"], labels=[True, False])
    decoder = RecordDecoder(settings, "binary_classification")
    values = [
        b'{"x": {"a": 1}, "y": true}',
        b'{"x": {"a": 1}, "y": 1}',
        b'{"x": {"a": 1}, "y": 0}',
        b'{"x": {"a": 1}, "y": false}',
    ]
    batch = decoder.decode(messages(values))
    assert batch.valid_index.tolist() == [0, 3]
    assert [r.reason for r in batch.invalid] == ["unknown_label", "unknown_label"]
    assert batch.y.dtype == object
    assert batch.y.tolist() == [True, False]
    assert all(type(label) is bool for label in batch.y)


def test_mixed_int_and_bool_labels_are_type_strict() -> None:
    # 2 and True are distinct config labels; JSON 1 equals True in Python but must not match.
    settings = RecordSettings(features=["a"], labels=[2, True, "cat"])
    decoder = RecordDecoder(settings, "multiclass_classification")
    values = [
        b'{"x": {"a": 1}, "y": 1}',
        b'{"x": {"a": 1}, "y": true}',
        b'{"x": {"a": 1}, "y": 2}',
        b'{"x": {"a": 1}, "y": "cat"}',
        b'{"x": {"a": 1}, "y": "dog"}',
    ]
    batch = decoder.decode(messages(values))
    assert batch.valid_index.tolist() == [1, 2, 3]
    assert batch.y.tolist() == [True, 2, "cat"]
    assert [(r.offset - 100, r.reason) for r in batch.invalid] == [
        (0, "unknown_label"),
        (4, "unknown_label"),
    ]


def test_flat_fields_mode() -> None:
    settings = RecordSettings(
        features=["f1", "f0"],
        features_field=None,
        label_field="label",
        id_field="id",
        event_time_field="ts",
        labels=["a", "b"],
    )
    decoder = RecordDecoder(settings, "binary_classification")
    values = [
        b'{"f0": 1, "f1": 2.5, "label": "a", "id": "x", "ts": 5}',
        b'{"f0": 1, "f1": 2.5, "label": "a", "other": 1}',  # unknown top-level field
        b'{"f0": 1, "label": "b"}',
        b'{"f0": 3, "f1": -4, "label": "b"}',
        b'{"f0": 3, "f1": "x", "label": "b"}',
        b'{"f0": 3, "f1": 4, "label": "c"}',
    ]
    batch = decoder.decode(messages(values))
    assert batch.valid_index.tolist() == [0, 3]
    assert batch.X.tolist() == [[2.5, 1.0], [-4.0, 3.0]]
    assert batch.y.tolist() == ["a", "b"]
    assert [r.reason for r in batch.invalid] == [
        "unknown_feature",
        "missing_feature",
        "wrong_type",
        "unknown_label",
    ]
    assert batch.x_dicts() == [{"f1": 2.5, "f0": 1.0}, {"f1": -4.0, "f0": 3.0}]


def test_unknown_features_ignored_when_configured() -> None:
    settings = RecordSettings(features=["a"], labels=[0, 1], unknown_features="ignore")
    flat = RecordSettings(
        features=["a"], labels=[0, 1], unknown_features="ignore", features_field=None
    )
    values = [b'{"x": {"a": 1, "zz": "w"}, "y": 1}', b'{"a": 2, "zz": [1], "x": 0, "y": 0}']
    nested = RecordDecoder(settings, "binary_classification").decode(messages(values))
    assert nested.valid_index.tolist() == [0]
    assert [r.reason for r in nested.invalid] == ["wrong_type"]  # "x": 0
    flat_batch = RecordDecoder(flat, "binary_classification").decode(messages(values))
    assert flat_batch.valid_index.tolist() == [1]
    assert flat_batch.X.tolist() == [[2.0]]


def test_regression_labels() -> None:
    settings = RecordSettings(features=["a"], label_field="target")
    decoder = RecordDecoder(settings, "regression")
    values = [
        b'{"x": {"a": 1}, "target": 2.5}',
        b'{"x": {"a": 1}, "target": 3}',
        b'{"x": {"a": 1}, "target": NaN}',
        b'{"x": {"a": 1}, "target": 1e999}',
        b'{"x": {"a": 1}, "target": "2.5"}',
        b'{"x": {"a": 1}, "target": true}',
        b'{"x": {"a": 1}}',
        b'{"x": {"a": 1}, "target": -7e-3}',
    ]
    batch = decoder.decode(messages(values))
    assert batch.valid_index.tolist() == [0, 1, 7]
    assert batch.y.dtype == np.float64
    assert batch.y.tolist() == [2.5, 3.0, -0.007]
    assert [r.reason for r in batch.invalid] == [
        "non_finite",
        "non_finite",
        "wrong_type",
        "wrong_type",
        "missing_label",
    ]


def test_weights() -> None:
    settings = RecordSettings(features=["a"], labels=["p", "q"], weight_field="w")
    decoder = RecordDecoder(settings, "binary_classification")
    values = [
        b'{"x": {"a": 1}, "y": "p", "w": 2.5}',
        b'{"x": {"a": 1}, "y": "p"}',  # absent weight = 1
        b'{"x": {"a": 1}, "y": "p", "w": 0}',
        b'{"x": {"a": 1}, "y": "p", "w": -1}',
        b'{"x": {"a": 1}, "y": "p", "w": "2"}',
        b'{"x": {"a": 1}, "y": "p", "w": true}',
        b'{"x": {"a": 1}, "y": "p", "w": NaN}',
        b'{"x": {"a": 1}, "y": "p", "w": 1e999}',
        b'{"x": {"a": 1}, "y": "p", "w": null}',
        b'{"x": {"a": 1}, "y": "q", "w": 3}',
    ]
    batch = decoder.decode(messages(values))
    assert batch.valid_index.tolist() == [0, 1, 9]
    assert batch.weights is not None
    assert batch.weights.tolist() == [2.5, 1.0, 3.0]
    assert batch.y.tolist() == ["p", "p", "q"]
    assert [r.reason for r in batch.invalid] == ["bad_weight"] * 7


def test_empty_batch_and_all_invalid(decoder: RecordDecoder) -> None:
    empty = decoder.decode([])
    assert empty.X.shape == (0, 3)
    assert empty.valid_index.tolist() == []
    assert empty.x_dicts() == []
    bad = decoder.decode(messages([b"{", None]))
    assert bad.X.shape == (0, 3)
    assert [r.reason for r in bad.invalid] == ["malformed_json", "empty"]
    assert bad.partitions.tolist() == []


def test_message_without_key_method(decoder: RecordDecoder) -> None:
    class NoKey:
        def value(self) -> bytes:
            return b"{"

        def topic(self) -> str:
            return "t"

        def partition(self) -> int:
            return 1

        def offset(self) -> int:
            return 9

        def timestamp(self) -> tuple[int, int]:
            return (0, -1)  # TIMESTAMP_NOT_AVAILABLE

    (record,) = decoder.decode([NoKey()]).invalid
    assert record.key is None
    assert record.timestamp_ms is None


def test_contradictory_layout_is_rejected_at_construction() -> None:
    with pytest.raises(ValueError, match="clash"):
        RecordDecoder(
            RecordSettings(features=["y", "a"], features_field=None, labels=[0, 1]),
            "binary_classification",
        )
    with pytest.raises(ValueError, match="labels"):
        RecordDecoder(RecordSettings(features=["a"]), "binary_classification")


def test_random_poison_never_reaches_x(decoder: RecordDecoder) -> None:
    rng = np.random.default_rng(7)
    pool = [p for p, _ in POISON] + [ok(1, 2, 3), ok(-1.5, 0, 9, y=0)]
    picks = rng.integers(0, len(pool), size=2000)
    values = [pool[i] for i in picks]
    batch = decoder.decode(messages(values))
    check_partition(batch, len(values))
    valid_pool = {len(pool) - 2, len(pool) - 1}
    assert batch.valid_index.tolist() == [i for i, p in enumerate(picks) if p in valid_pool]


DEPTH = 10_000


def deep(levels: int = DEPTH) -> bytes:
    return b"[" * levels + b"]" * levels


@pytest.mark.parametrize(
    "value",
    [
        b'{"x": {"a": 1, "b": 2, "c": 3}, "y": 1, "meta": ' + deep() + b"}",
        b'{"x": {"a": ' + deep() + b', "b": 2, "c": 3}, "y": 1}',
        b'{"x": {"a": 1, "b": 2, "c": 3}, "y": ' + deep() + b"}",
        deep(),
        b'{"x": ' + b'{"x": ' * DEPTH + b"1" + b"}" * DEPTH + b"}",
    ],
    ids=["ignored_field", "feature", "label", "top_level", "objects"],
)
def test_deep_nesting_is_malformed_json_and_the_rest_is_learnt(value: bytes) -> None:
    settings = RecordSettings(features=FEATURES, labels=[0, 1], max_bytes=100_000)
    decoder = RecordDecoder(settings, "binary")
    values = [ok(1, 2, 3), value, ok(4, 5, 6, y=0)]

    batch = decoder.decode(messages(values))  # raised RecursionError before issue 19

    check_partition(batch, 3)
    assert batch.valid_index.tolist() == [0, 2]
    assert [(r.reason, r.error_class) for r in batch.invalid] == [
        ("malformed_json", "NestingTooDeep")
    ]
    assert batch.X.tolist() == [[1, 2, 3], [4, 5, 6]]


def test_invalid_utf8_names_the_byte_and_valid_utf8_is_accepted(decoder: RecordDecoder) -> None:
    text = '{"x": {"a": 1, "b": 2, "c": 3}, "y": 1, "id": "Z\u00fcrich \u2603 \U0001f600"}'
    values = [text.encode(), b'{"x": {"a": 1, "b": 2, "c": 3}, "y": 1, "id": "ok\xffok"}']

    batch = decoder.decode(messages(values))

    assert batch.valid_index.tolist() == [0]
    [invalid] = batch.invalid
    assert (invalid.reason, invalid.error_class) == ("malformed_json", "InvalidUTF8")
    bad_at = values[1].index(b"\xff")
    assert f"byte {bad_at}" in invalid.message


def test_a_value_that_breaks_the_batch_path_rejects_only_itself(decoder: RecordDecoder) -> None:
    # A label past int64 made numpy raise OverflowError for the whole batch.
    huge = b'{"x": {"a": 1, "b": 2, "c": 3}, "y": ' + b"9" * 30 + b"}"
    values = [ok(i, i, i, y=i % 2) for i in range(5)] + [huge] + [ok(7, 7, 7)]

    batch = decoder.decode(messages(values))

    check_partition(batch, 7)
    assert batch.valid_index.tolist() == [0, 1, 2, 3, 4, 6]
    assert [(r.offset, r.reason) for r in batch.invalid] == [(105, "unknown_label")]
    assert batch.X.tolist() == [[i, i, i] for i in range(5)] + [[7, 7, 7]]
    assert batch.y.dtype == np.int64 and batch.y.tolist() == [0, 1, 0, 1, 0, 1]


def test_an_unexpected_decoder_exception_dead_letters_that_record_with_its_class(
    decoder: RecordDecoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No known value makes the checks themselves raise (each such value is a bug, fixed when
    # found): simulate one, to show it costs one dead letter and nothing else.
    huge = b'{"x": {"a": 1, "b": 2, "c": 3}, "y": ' + b"9" * 30 + b"}"
    check = RecordDecoder._check

    def broken(self: RecordDecoder, obj: Any) -> Any:
        if obj.get("id") == "boom":
            raise KeyError("surprise")
        return check(self, obj)

    monkeypatch.setattr(RecordDecoder, "_check", broken)
    boom = b'{"x": {"a": 1, "b": 2, "c": 3}, "y": 5, "id": "boom"}'
    values = [ok(1, 1, 1), boom, huge, ok(2, 2, 2, y=0)]

    batch = decoder.decode(messages(values))

    check_partition(batch, 4)
    assert batch.valid_index.tolist() == [0, 3]
    assert [(r.offset, r.reason, r.error_class) for r in batch.invalid] == [
        (101, "decoder_error", "KeyError"),
        (102, "unknown_label", "UnknownLabel"),
    ]
    assert "surprise" in batch.invalid[0].message
