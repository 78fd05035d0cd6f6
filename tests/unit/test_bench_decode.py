"""The decode benchmark's pieces and the typed workload's configs (no broker, no registry)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from stream_trainer.ingest.features import FeatureContract
from stream_trainer.laptop.benchmarks import decode, stages
from stream_trainer.laptop.benchmarks.workload import (
    InMemory,
    Paths,
    default_config,
    record_section,
    service_config,
    settings_of,
    workload_dataset,
)
from stream_trainer.laptop.datasets import get_dataset

TRANSACTIONS = get_dataset("transactions")


def _decode_all(path: decode.DecodePath) -> Any:
    decoded = path.decoder.decode_values(path.values)
    assert decoded.rejects == []
    return decoded


def test_numeric_projection_keeps_records_and_shape_and_is_all_numbers() -> None:
    numeric, typed = decode.build_paths(TRANSACTIONS, 500, paths=["numeric_json", "typed_json"])
    assert len(numeric.values) == len(typed.values) == 500
    n, t = _decode_all(numeric), _decode_all(typed)
    assert n.X.shape == t.X.shape == (500, len(TRANSACTIONS.features))
    assert list(n.y) == list(t.y)
    assert np.isfinite(n.X).all()  # missing -> 0: the baseline is today's all-numeric path
    assert np.isnan(t.X).any()  # ... of records that do have missing values
    # Listed categories and booleans keep the contract's code; missing values become 0.
    contract = FeatureContract.from_settings(decode.record_settings(TRANSACTIONS, "json", True))
    for j, feature in enumerate(contract.features):
        if feature.type == "category" and feature.categories is None:
            continue  # open list: a small index of first sight instead of the 53-bit code
        assert np.array_equal(n.X[:, j], np.nan_to_num(t.X[:, j], nan=0.0)), feature.name


def test_numeric_projection_of_one_record() -> None:
    contract = FeatureContract.from_settings(decode.record_settings(TRANSACTIONS, "json", True))
    codes: dict[str, dict[Any, int]] = {}
    x = {
        "amount": 12.5,
        "hour": 3.0,
        "merchant_category": "online_services",  # unlisted: the "other" bucket
        "country": "DE",
        "international": True,
        "card_present": None,
    }
    assert decode.numeric_projection(contract, x, codes) == {
        "amount": 12.5,
        "hour": 3.0,
        "merchant_category": 5.0,
        "country": 0.0,
        "device": 0.0,
        "international": 1.0,
        "card_present": 0.0,
        "customer_age": 0.0,
    }
    second = decode.numeric_projection(contract, {**x, "country": "FR"}, codes)
    assert second["country"] == 1.0
    assert decode.numeric_projection(contract, x, codes)["country"] == 0.0  # stable


def test_wire_paths_decode_to_the_typed_rows_from_in_memory_schemas() -> None:
    typed, avro, json_schema = decode.build_paths(
        TRANSACTIONS, 300, paths=["typed_json", "avro", "json_schema"]
    )
    expected = _decode_all(typed)
    for path in (avro, json_schema):
        assert path.wire is not None and path.wire.known(decode.STATIC_SCHEMA_ID)
        got = _decode_all(path)
        np.testing.assert_array_equal(got.X, expected.X)  # NaN == NaN here
        assert list(got.y) == list(expected.y)
        path.close()
    assert avro.bytes_per_record < typed.bytes_per_record  # Avro carries no field names


def test_time_decode_refuses_a_path_with_rejected_records() -> None:
    (typed,) = decode.build_paths(TRANSACTIONS, 10, paths=["typed_json"])
    typed.values[3] = b'{"x": {}, "y": true}'
    with pytest.raises(decode.DecodeBenchError, match="typed_json: 1 records rejected"):
        decode.time_decode(typed)


def test_unknown_path_is_refused() -> None:
    with pytest.raises(ValueError, match="protobuf"):
        decode.build_paths(TRANSACTIONS, 10, paths=["protobuf"])


def test_summary_rates_ratios_and_targets() -> None:
    runs = [
        {"numeric_json": 1.0, "typed_json": 1.25, "avro": 10.0},  # 0.8, 0.1 of the baseline
        {"numeric_json": 2.0, "typed_json": 2.0, "avro": 10.0},  # 1.0, 0.2
        {"numeric_json": 1.0, "typed_json": 1.0, "avro": 4.0},  # 1.0, 0.25
    ]
    summary = decode.summarize(runs, {"numeric_json": 150, "typed_json": 160, "avro": 50}, 1000)
    rates = summary["paths"]["typed_json"]["records_per_s"]
    assert rates["runs"] == [800.0, 500.0, 1000.0]
    assert rates["median"] == 800.0 and rates["min"] == 500.0 and rates["max"] == 1000.0
    assert summary["paths"]["avro"]["us_per_record"]["median"] == pytest.approx(10_000.0)
    # Ratios of the medians (typed 800 / numeric 1000; avro 100 / 1000) ...
    assert summary["ratios"] == {"typed_json": 0.8, "avro": 0.1}
    # ... and within each repeat, as a spread.
    assert summary["ratios_per_repeat"]["typed_json"]["runs"] == [0.8, 1.0, 1.0]
    assert summary["ratios_per_repeat"]["avro"]["median"] == pytest.approx(0.2)
    assert summary["targets"]["typed_json"] == {"value": 0.8, "target": ">= 0.8", "met": True}
    assert summary["targets"]["avro"]["met"] is False
    assert "numeric_json" not in summary["ratios"]
    assert decode.ratios({"numeric_json": 0.0, "avro": 5.0})["avro"] is not None
    assert math.isnan(decode.ratios({"numeric_json": 0.0, "avro": 5.0})["avro"])


def test_record_section_of_the_numeric_workload_is_unchanged() -> None:
    assert record_section(workload_dataset(3)) == {
        "features": ["f0", "f1", "f2"],
        "features_field": "x",
        "label_field": "y",
        "labels": [False, True],
    }


def _paths() -> Paths:
    from pathlib import Path

    return Paths("localhost:9092", "t", "d", "v", "c", "g", Path("cp"), Path("reg"), 1)


def test_service_config_of_avro_transactions_reads_the_typed_contract_from_the_registry() -> None:
    config = service_config(
        default_config("mini_batch"),
        record_section(TRANSACTIONS, "avro"),
        _paths(),
        "mini_batch",
        schema_registry_url="http://127.0.0.1:1/apis/ccompat/v7",
    )
    settings = settings_of(config, "k" * 32)
    assert settings.record.format == "avro"
    assert settings.schema_registry.url == "http://127.0.0.1:1/apis/ccompat/v7"
    assert [f.model_dump(exclude_none=True)["name"] for f in settings.record.feature_configs] == [
        f["name"] for f in TRANSACTIONS.typed_features or ()
    ]
    assert not FeatureContract.from_settings(settings.record).plain


class _Recorder:
    """Stands in for the model: records what the learner ceiling feeds it."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def predict_one(self, x: dict[str, Any]) -> tuple[Any, None]:
        return None, None

    def learn_one(self, x: dict[str, Any], y: Any, weight: float = 1.0) -> None:
        self.seen.append(x)


def test_learner_ceiling_feeds_river_the_service_s_dicts_of_a_typed_contract(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = service_config(
        default_config("per_record"), record_section(TRANSACTIONS), _paths(), "per_record"
    )
    settings = settings_of(config, "k" * 32)
    (typed,) = decode.build_paths(TRANSACTIONS, 50, paths=["typed_json"])
    batch = typed.decoder.decode([_Message(v) for v in typed.values])
    recorder = _Recorder()
    monkeypatch.setattr("stream_trainer.training.learners.build_model", lambda _settings: recorder)
    run = stages.learner_ceiling(InMemory(batch.X, batch.y), settings)
    assert run.records == 50
    # The service's dicts: missing values left out, categories as River tokens.
    assert recorder.seen == batch.x_dicts()
    assert any("device" not in x for x in recorder.seen)
    assert {x["merchant_category"] for x in recorder.seen} <= {
        "grocery",
        "restaurants",
        "fuel",
        "travel",
        "electronics",
        "__other__",
    }


class _Message:
    def __init__(self, value: bytes) -> None:
        self._value = value

    def value(self) -> bytes:
        return self._value

    def topic(self) -> str:
        return "t"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return 0

    def timestamp(self) -> tuple[int, int]:
        return (0, 0)


def test_cli_refuses_what_it_cannot_measure(capsys: pytest.CaptureFixture[str]) -> None:
    from stream_trainer.cli import main

    # An all-numeric dataset has no typed paths to compare with the numeric one.
    assert main(["bench", "--decode-only", "--dataset", "phishing"]) == 2
    assert "no typed features" in capsys.readouterr().err
    # A wire format needs its registry (checked before any broker starts).
    assert main(["bench", "--dataset", "transactions", "--format", "avro"]) == 2
    assert "needs --schema-registry" in capsys.readouterr().err


def test_cli_decode_only_runs_without_a_registry(capsys: pytest.CaptureFixture[str]) -> None:
    from stream_trainer.cli import main

    assert main(["bench", "--decode-only", "--records", "300", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "schemas in memory" in out
    for name in decode.PATHS:
        assert name in out
