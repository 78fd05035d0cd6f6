"""MLflow export: what a version becomes in MLflow, the config's checks, and the exporter's
retry accounting (a stand-in mirror; the real server is in tests/integration)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from stream_trainer.config import ConfigError, MlflowSettings, settings_from_mapping
from stream_trainer.publishing.mlflow_export import (
    MlflowClient,
    MlflowError,
    MlflowExporter,
    MlflowMetrics,
    lineage_tags,
    mlmodel_text,
    next_backoff,
    run_metrics,
    run_params,
)
from stream_trainer.publishing.registry import ModelRegistry, VersionInfo

ROOT = Path(__file__).resolve().parents[2]

METADATA: dict[str, Any] = {
    "version": 7,
    "model_name": "fraud",
    "parent_version": 6,
    "trigger": "retrain:drift",
    "training_mode": "full_batch",
    "config_hash": "c0ffee",
    "records_learnt": 12000,
    "retrains": 3,
    "records_dead_lettered": 2,
    "created_at": "2026-12-05T01:00:00.000Z",
    "artifact_sha256": "ab" * 32,
    "artifact_hmac": "sig",
    "champion": True,
    "offsets_total": {"tx:0": [[0, 12002]]},
    "offsets_since_parent": {"tx:0": [[10000, 12002]]},
    "metrics": {"window": {"accuracy": 0.91, "r2": None}, "total": {"accuracy": 0.88}},
    "gate": {"candidate_score": 0.91, "champion_score": float("nan"), "metric": "accuracy"},
    "learner": {
        "path": "sklearn.linear_model.SGDClassifier",
        "task": "binary_classification",
        "params": {"alpha": 0.0001, "loss": "log_loss", "class_weight": {"0": 1, "1": 5}},
        "pipeline": [
            {"path": "sklearn.preprocessing.StandardScaler", "params": {}},
            {"path": "sklearn.linear_model.SGDClassifier", "params": {}},
        ],
    },
    "search": {
        "algorithm": "tpe",
        "baseline_score": 0.87,
        "best": {"number": 4, "score": 0.91, "params": {"alpha": 0.0001}},
        "trials": [{"number": n} for n in range(40)],
        "space": {"alpha": {"low": 1e-6}},
    },
}


def test_metrics_are_the_gate_and_prequential_scores_finite_only() -> None:
    metrics = run_metrics(METADATA)
    assert metrics["gate.candidate_score"] == 0.91
    assert "gate.champion_score" not in metrics  # NaN: MLflow would refuse the batch
    assert metrics["prequential.window.accuracy"] == 0.91
    assert metrics["prequential.total.accuracy"] == 0.88
    assert "prequential.window.r2" not in metrics
    assert metrics["records_learnt"] == 12000.0
    assert metrics["search.best_score"] == 0.91 and metrics["search.baseline_score"] == 0.87


def test_params_are_the_learners_as_strings() -> None:
    params = run_params(METADATA)
    assert params["learner"] == "sklearn.linear_model.SGDClassifier"
    assert params["learner.alpha"] == "0.0001"
    assert params["learner.loss"] == "log_loss"
    assert params["learner.class_weight"] == '{"0":1,"1":5}'
    assert params["preprocessing"] == "sklearn.preprocessing.StandardScaler"
    huge = {**METADATA, "learner": {"params": {"grid": list(range(5000))}}}
    assert len(run_params(huge)["learner.grid"]) == 6000  # MLflow's limit, clipped


def test_lineage_tags_carry_what_was_learnt_and_why() -> None:
    tags = lineage_tags(METADATA)
    assert tags["stream_trainer.version"] == "7"
    assert tags["stream_trainer.parent_version"] == "6"
    assert tags["stream_trainer.trigger"] == "retrain:drift"
    assert tags["stream_trainer.config_hash"] == "c0ffee"
    assert tags["stream_trainer.offsets_since_parent"] == '{"tx:0":[[10000,12002]]}'
    assert tags["stream_trainer.champion_when_published"] == "true"
    summary = tags["stream_trainer.search"]
    assert '"algorithm":"tpe"' in summary and "trials" not in summary
    first = lineage_tags({**METADATA, "parent_version": None})
    assert "stream_trainer.parent_version" not in first


def test_mlmodel_names_our_artifact_without_a_pyfunc_loader() -> None:
    text = mlmodel_text(METADATA, "run123")
    parsed = yaml.safe_load(text)
    flavor = parsed["flavors"]["stream_trainer"]
    assert flavor["artifact"] == "model.pkl" and flavor["sha256"] == "ab" * 32
    assert flavor["signed"] is True
    assert "python_function" not in parsed["flavors"]
    assert parsed["run_id"] == "run123" and parsed["artifact_path"] == "model"


def test_backoff_doubles_up_to_the_cap() -> None:
    cfg = MlflowSettings(retry_backoff_initial_s=1, retry_backoff_max_s=5)
    waits = [1.0]
    for _ in range(4):
        waits.append(next_backoff(waits[-1], cfg))
    assert waits == [1, 2, 4, 5, 5]


# -- config -------------------------------------------------------------------------------


def _config(mlflow: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    data["registry"]["mlflow"] = mlflow
    return data


@pytest.mark.parametrize(
    ("mlflow", "field"),
    [
        ({"enabled": True}, "tracking_uri"),
        ({"tracking_uri": "ftp://x"}, "tracking_uri"),
        ({"enabled": True, "tracking_uri": "http://u:p@mlflow:5000"}, "tracking_uri"),
        ({"enabled": True, "tracking_uri": "http://m", "username": "u"}, "password"),
        ({"enabled": True, "tracking_uri": "http://m", "tokn": "x"}, "tokn"),
        ({"tracking_uri": "http://m", "registered_model_name": "it's"}, "registered_model_name"),
    ],
)
def test_bad_mlflow_config_fails_at_start_naming_the_field(
    mlflow: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError) as error:
        settings_from_mapping(_config(mlflow), env={})
    assert "registry.mlflow" in str(error.value) and field in str(error.value)


def test_credentials_come_from_env_or_files_and_are_masked(tmp_path: Path) -> None:
    env = {"STREAM_TRAINER_REGISTRY__MLFLOW__TOKEN": "tok-from-env-123"}
    settings = settings_from_mapping(
        _config({"enabled": True, "tracking_uri": "http://mlflow:5000"}), env=env
    )
    cfg = settings.registry.mlflow
    assert cfg.authorization() == "Bearer tok-from-env-123"
    assert cfg.secrets() == ["tok-from-env-123"]
    assert "tok-from-env-123" not in settings.model_dump_json()
    password = tmp_path / "password"
    password.write_text("pw-from-file\n")
    basic = MlflowSettings(tracking_uri="http://m", username="ci", password_file=password)
    assert basic.authorization() == "Basic Y2k6cHctZnJvbS1maWxl"  # ci:pw-from-file


def test_an_unreadable_ca_file_is_an_error_naming_the_field(tmp_path: Path) -> None:
    cfg = MlflowSettings(tracking_uri="https://m", ssl_ca_location=tmp_path / "missing.pem")
    with pytest.raises(MlflowError, match=r"registry\.mlflow\.ssl_ca_location"):
        MlflowClient(cfg)


# -- exporter -----------------------------------------------------------------------------


class _FlakyMirror:
    """Stands in for MLflow: fails ``failures`` times, then holds what it was given."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.versions: dict[int, str] = {}
        self.alias: str | None = None

    def exported(self) -> dict[int, str]:
        if self.failures:
            self.failures -= 1
            raise MlflowError("MLflow at http://m unreachable: refused")
        return dict(self.versions)

    def export(self, info: VersionInfo, artifact: bytes) -> str:
        self.versions[info.version] = str(len(self.versions) + 1)
        return self.versions[info.version]

    def forget(self) -> None:
        pass

    def alias_version(self) -> str | None:
        return self.alias

    def set_alias(self, version: str) -> None:
        self.alias = version


def test_exporter_retries_with_backoff_counts_and_never_loses_a_version(
    tmp_path: Path,
) -> None:
    registry = ModelRegistry(tmp_path, "m", None, keep_last=10)
    for n in range(2):
        registry.publish(f"model {n}".encode(), {"metrics": {}}, promote=True)
    mirror = _FlakyMirror(failures=3)
    collector = CollectorRegistry()
    waits: list[float] = []
    exporter: MlflowExporter

    def wait(event: threading.Event, seconds: float) -> bool:
        waits.append(seconds)
        if mirror.versions:  # exported: stop the loop instead of sleeping
            exporter.close(timeout=0)
        return event.is_set()

    exporter = MlflowExporter(
        MlflowSettings(retry_backoff_initial_s=0.5, retry_backoff_max_s=1.5),
        mirror,  # type: ignore[arg-type]
        registry,
        MlflowMetrics.build(collector),
        wait=wait,
    )
    exporter._run()  # on this thread: the waits are the test's

    def count(result: str) -> float | None:
        return collector.get_sample_value("stream_trainer_mlflow_exports_total", {"result": result})

    assert waits[:3] == [0.5, 1.0, 1.5]  # doubling backoff, capped
    assert (count("failed"), count("retried"), count("ok")) == (3, 3, 2)
    assert sorted(mirror.versions) == [1, 2]
    assert mirror.alias == mirror.versions[2]  # the champion
    assert collector.get_sample_value("stream_trainer_mlflow_export_pending") == 0
