"""Typed features (category, boolean, missing): the contract's columns, each family's
encoding, and the same predictions as the learner run by hand on the raw records."""

from __future__ import annotations

import json
import math
import pickle
from typing import Any

import numpy as np
import pytest
from river import compose, linear_model, preprocessing

from stream_trainer.config import RecordSettings, settings_from_mapping
from stream_trainer.ingest.features import OTHER, FeatureContract, FeatureValueError, category_code
from stream_trainer.ingest.records import DecodedBatch, RecordDecoder
from stream_trainer.laptop.datasets import TRANSACTIONS_FEATURES, get_dataset
from stream_trainer.training.learners import IncompatibleLearner, SklearnAdapter, build_model

LABELS = [False, True]


def typed_settings(
    learner: str,
    mode: str,
    params: dict[str, Any] | None = None,
    preprocessing: list[str] | None = None,
    encoding: str = "auto",
) -> Any:
    return settings_from_mapping(
        {
            "kafka": {"bootstrap_servers": "localhost:9092", "group_id": "g"},
            "topics": {"input": ["in"], "dead_letter": "dlq", "versions": "v"},
            "record": {"features": list(TRANSACTIONS_FEATURES), "labels": LABELS},
            "model": {
                "name": "m",
                "task": "binary_classification",
                "learner": {"path": learner, "params": params or {}},
                "preprocessing": [{"path": p} for p in preprocessing or []],
                "categorical_encoding": encoding,
            },
            "training": {"mode": mode},
            "checkpoint": {"dir": "/tmp/ck", "allow_unsigned": True},
            "registry": {"root": "/tmp/reg"},
        },
        env={},
    )


def records(count: int, seed: int = 7) -> list[tuple[dict[str, Any], bool]]:
    return list(get_dataset("transactions").rows(count, seed=seed))


def decoded(rows: list[tuple[dict[str, Any], bool]]) -> Any:
    record = RecordSettings(features=list(TRANSACTIONS_FEATURES), labels=LABELS)
    decoder = RecordDecoder(record, "binary_classification")
    values = [json.dumps({"x": x, "y": y}).encode() for x, y in rows]
    out = decoder.decode_values(values)
    assert not out.rejects, out.rejects[:3]
    return out


def test_contract_columns() -> None:
    contract = FeatureContract.from_settings(
        RecordSettings(features=list(TRANSACTIONS_FEATURES), labels=LABELS)
    )
    row = contract.encode_record(
        {
            "amount": 12,
            "hour": 3.0,
            "merchant_category": "online_services",  # unlisted: the "other" bucket
            "country": "DE",
            "international": True,
        }
    )
    assert row[:3] == [12.0, 3.0, 5.0]
    assert row[3] == category_code("DE") and row[3] != category_code("FR")
    assert math.isnan(row[4]) and row[5] == 1.0 and math.isnan(row[6]) and math.isnan(row[7])
    assert category_code(1) != category_code("1")  # type-strict
    assert row[3] < 2**53 and float(int(row[3])) == row[3]
    merchant = contract.features[2]
    assert merchant.token(5.0) == OTHER and merchant.token(0.0) == "grocery"


@pytest.mark.parametrize(
    ("x", "reason"),
    [
        ({"merchant_category": 3}, None),  # an int is not a listed string: other
        ({"international": 1}, "wrong_type"),
        ({"amount": True}, "wrong_type"),
        ({"amount": None}, "wrong_type"),
        ({"merchant_category": None}, "wrong_type"),
        ({"device": ["pos"]}, "wrong_type"),
        ({"country": 1.5}, "wrong_type"),
        ({"hour": None, "amount": None}, "wrong_type"),
    ],
)
def test_type_mismatches_are_rejected_with_reason(x: dict[str, Any], reason: str | None) -> None:
    base = {"amount": 1.0, "hour": 2.0, "merchant_category": "fuel", "international": False}
    record = RecordSettings(features=list(TRANSACTIONS_FEATURES), labels=LABELS)
    decoder = RecordDecoder(record, "binary_classification")
    out = decoder.decode_values([json.dumps({"x": {**base, **x}, "y": True}).encode()])
    if reason is None:
        assert not out.rejects and len(out.valid_index) == 1
    else:
        assert [r.reason for _, r in out.rejects] == [reason]


def test_unknown_category_reject_and_missing_required() -> None:
    features = [
        {"name": "c", "type": "category", "categories": ["a", "b"], "unknown_category": "reject"},
        {"name": "n"},
    ]
    decoder = RecordDecoder(
        RecordSettings(features=features, labels=LABELS), "binary_classification"
    )
    values = [
        b'{"x": {"c": "a", "n": 1}, "y": true}',
        b'{"x": {"c": "z", "n": 1}, "y": true}',
        b'{"x": {"c": "b"}, "y": true}',
        b'{"x": {"c": "b", "n": 1, "extra": 2}, "y": true}',
    ]
    out = decoder.decode_values(values)
    assert out.valid_index.tolist() == [0]
    assert [(i, r.reason) for i, r in out.rejects] == [
        (1, "unknown_category"),
        (2, "missing_feature"),
        (3, "unknown_feature"),
    ]
    with pytest.raises(FeatureValueError, match="not one of its categories"):
        FeatureContract.from_settings(
            RecordSettings(features=features, labels=LABELS)
        ).encode_record({"c": "z", "n": 1})


def test_categories_need_category_type() -> None:
    with pytest.raises(ValueError, match="categories need type: category"):
        RecordSettings(features=[{"name": "a", "categories": ["x"]}], labels=LABELS)


def test_river_per_record_equals_the_pipeline_run_by_hand_on_raw_records() -> None:
    rows = records(3000)
    out = decoded(rows)
    model = build_model(
        typed_settings(
            "river.linear_model.LogisticRegression",
            "per_record",
            preprocessing=["river.preprocessing.StandardScaler"],
        )
    )
    # The oracle: River's own pipeline on the raw dicts (strings, missing keys left out),
    # built here without any of the service's code.
    numbers = ["amount", "hour", "international", "card_present", "customer_age"]
    categories = ["merchant_category", "country", "device"]
    oracle = (
        compose.TransformerUnion(
            compose.Discard(*categories) | preprocessing.StandardScaler(),
            compose.Discard(*numbers) | preprocessing.OneHotEncoder(),
        )
        | linear_model.LogisticRegression()
    )
    ours: list[float] = []
    theirs: list[float] = []
    batch = DecodedBatch(
        X=out.X,
        y=out.y,
        weights=None,
        valid_index=out.valid_index,
        invalid=[],
        topics=[],
        partitions=np.zeros(0, np.int64),
        offsets=np.zeros(0, np.int64),
        feature_names=model.feature_names,
        contract=FeatureContract.from_settings(
            RecordSettings(features=list(TRANSACTIONS_FEATURES), labels=LABELS)
        ),
    )
    for x, (raw, y) in zip(batch.x_dicts(model.feature_names), rows, strict=True):
        _, p = model.predict_one(x)
        ours.append(-1.0 if p is None else p)
        model.learn_one(x, y)
        clean = {
            k: (float(v) if isinstance(v, bool) else v) for k, v in raw.items() if v is not None
        }
        dist = oracle.predict_proba_one(clean)
        theirs.append(dist.get(True, 0.0) if dist else -1.0)
        oracle.learn_one(clean, y)
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-12)
    hits = sum((p > 0.5) == y for p, (_, y) in zip(ours[100:], rows[100:], strict=True))
    assert hits / (len(rows) - 100) > 0.7
    # The published model predicts from the raw record, as a serving system holds it.
    restored = pickle.loads(pickle.dumps(model))
    raw, _ = rows[-1]
    assert restored.predict_record(raw) == model.predict_one(batch.x_dicts()[-1])


def test_sklearn_partial_fit_width_is_fixed_and_it_learns() -> None:
    rows = records(4000)
    out = decoded(rows)
    model = build_model(
        typed_settings(
            "sklearn.linear_model.SGDClassifier",
            "mini_batch",
            params={"loss": "log_loss", "random_state": 0},
            preprocessing=["sklearn.preprocessing.StandardScaler"],
        )
    )
    assert isinstance(model, SklearnAdapter)
    encoder = model.model.steps[0][1]
    widths = set()
    hits = 0
    for start in range(0, len(rows), 500):
        X, y = out.X[start : start + 500], out.y[start : start + 500]
        widths.add(encoder.transform(X).shape[1])
        if start:
            predicted, _ = model.predict_many(X)
            hits += int((predicted == y).sum())
        model.learn_many(X, y, None)
    # 2 numbers; merchant 5 + other; country hashed 32 + missing; device 3 + other +
    # missing; international; card_present + missing; age + missing
    assert widths == {2 + 6 + 33 + 5 + 1 + 2 + 2}
    encoding = model.describe()["encoding"]
    assert encoding["categories"] == "onehot" and encoding["width"] == 51
    assert hits / (len(rows) - 500) > 0.7
    label, p = model.predict_record(
        {"amount": 5.0, "hour": 1.0, "merchant_category": "x", "international": False}
    )
    assert label in LABELS and p is not None and 0.0 <= p <= 1.0


def test_native_encoding_refused_for_partial_fit() -> None:
    with pytest.raises(IncompatibleLearner, match="categorical_encoding"):
        build_model(
            typed_settings("sklearn.linear_model.SGDClassifier", "mini_batch", encoding="native")
        )


@pytest.mark.parametrize(
    ("learner", "steps"),
    [
        ("sklearn.ensemble.HistGradientBoostingClassifier", []),
        ("sklearn.linear_model.LogisticRegression", ["sklearn.preprocessing.StandardScaler"]),
    ],
)
def test_full_batch_fit_refits_encoders_per_window(learner: str, steps: list[str]) -> None:
    rows = records(5000)
    out = decoded(rows)
    model = build_model(typed_settings(learner, "full_batch", preprocessing=steps))
    model.fit(out.X[:4000], out.y[:4000], None)
    predicted, _ = model.predict_many(out.X[4000:])
    accuracy = float((predicted == out.y[4000:]).mean())
    majority = max(float(np.mean(out.y[4000:] == label)) for label in LABELS)
    print(f"{learner}: holdout accuracy {accuracy:.3f} (majority {majority:.3f})")
    assert accuracy > majority + 0.05
    if "HistGradient" in learner:
        assert isinstance(model, SklearnAdapter)
        fitted = model.model.steps[-1][1]
        assert fitted.is_categorical_ is not None and fitted.is_categorical_[:3].all()
